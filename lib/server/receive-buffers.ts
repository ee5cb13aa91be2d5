// The buffers a connection's socket reads land in (net.Socket's `onread`), reused from one read to the next.
// Without them Node allocates a fresh 64 KiB buffer per read: external memory that only full mark-compact
// collections give back. At 1 MiB writes (about 1 GB/s of input) that kept V8's concurrent marking threads
// busy and cost about 1.1 ms of CPU per request, three quarters of it; with reused buffers 0.25–0.3 ms.
//
// A buffer can be read into again only when nothing still points into it. The connection makes that so:
// after each read it copies the unread tail (a partial request header, or input kept while paused) out of
// the buffer (FrameReader.detach), and a WRITE payload handed to a device that completes later pins its
// buffer (hold/release). While the current buffer is pinned, reads go to another one.

/** Bytes per socket read (what Node's own allocation gives a read, too). */
export const RECEIVE_BUFFER_SIZE = 64 * 1024;
/** Unpinned spare buffers kept per connection; more are left to the garbage collector. */
const SPARES_MAX = 4;

export interface ReceiveBuffer {
  readonly buf: Buffer;
  pins: number;
}

export class ReceiveBuffers {
  private cur: ReceiveBuffer = ReceiveBuffers.fresh();
  private readonly spares: ReceiveBuffer[] = [];
  /** Buffers allocated beyond the first: how often pins forced a new one. */
  allocated = 0;
  /**
   * Where the next read should land instead, if anywhere: the rest of a long WRITE payload being received
   * (Connection.directTarget). The kernel then copies it straight into the payload's buffer, in reads as long
   * as what is left of it, instead of into these buffers and from there into the payload's.
   */
  direct: (() => Buffer | null) | null = null;

  private static fresh(): ReceiveBuffer {
    return { buf: Buffer.allocUnsafeSlow(RECEIVE_BUFFER_SIZE), pins: 0 };
  }

  /** The buffer for the next read (net.Socket calls this after every read). */
  readonly next = (): Buffer => {
    const d = this.direct === null ? null : this.direct();
    if (d !== null) return d;
    if (this.cur.pins !== 0) {
      const spare = this.spares.pop();
      if (spare !== undefined) this.cur = spare;
      else {
        this.cur = ReceiveBuffers.fresh();
        this.allocated++;
      }
    }
    return this.cur.buf;
  };

  /**
   * net.Socket's `onread` option: reads land in these buffers, and each goes to onChunk (its bytes are valid
   * during the call only).
   */
  onread(onChunk: (chunk: Buffer) => void): { buffer: () => Buffer; callback: (n: number, buf: Buffer) => boolean } {
    return {
      buffer: this.next,
      callback: (n, buf) => {
        onChunk(buf.subarray(0, n));
        return true; // false would pause the socket
      },
    };
  }

  /**
   * `view` will be used after this read (a WRITE payload a device keeps until its promise settles): if it lies
   * in the buffer just read into, pin that buffer and return it (give it to release() once the view is no
   * longer used; never, if that cannot be known). Null when the view is not ours (a copy).
   */
  hold(view: Buffer): ReceiveBuffer | null {
    if (view.buffer !== this.cur.buf.buffer) return null;
    this.cur.pins++;
    return this.cur;
  }

  release(b: ReceiveBuffer): void {
    if (--b.pins !== 0 || b === this.cur) return;
    if (this.spares.length < SPARES_MAX) this.spares.push(b);
  }
}
