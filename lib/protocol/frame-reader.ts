// A queue of received chunks with cursor operations, so that decoders can ask for "N contiguous bytes" without
// concatenating every chunk (pg-protocol's buffer reader, undici's parser). Pure: no sockets.

export class FrameReader {
  private chunks: Buffer[] = [];
  /** Offset into chunks[0] of the first unread byte. */
  private head = 0;
  private total = 0;

  /** Bytes buffered and not yet consumed. */
  get length(): number {
    return this.total;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.total += chunk.length;
  }

  /**
   * The next n bytes as one Buffer, or null when fewer are buffered ("need more").
   * Zero-copy when they sit in one chunk; otherwise one copy of exactly n bytes.
   * The result is valid until the next consume/push.
   */
  peek(n: number): Buffer | null {
    if (n > this.total) return null;
    const first = this.chunks[0];
    if (n === 0) return Buffer.alloc(0);
    if (first !== undefined && first.length - this.head >= n) return first.subarray(this.head, this.head + n);
    const out = Buffer.allocUnsafe(n);
    this.copyOut(out, 0, n, false);
    return out;
  }

  /** Drop n bytes (n ≤ length). */
  consume(n: number): void {
    if (n > this.total) throw new RangeError(`consume(${n}) with ${this.total} buffered`);
    this.total -= n;
    while (n > 0) {
      const first = this.chunks[0]!;
      const avail = first.length - this.head;
      if (n < avail) {
        this.head += n;
        return;
      }
      n -= avail;
      this.chunks.shift();
      this.head = 0;
    }
  }

  /** Take exactly n bytes (zero-copy when possible), or null when fewer are buffered. */
  take(n: number): Buffer | null {
    const b = this.peek(n);
    if (b === null) return null;
    // peek() may return a view into chunks[0]; consuming keeps that memory alive, which is what we want.
    this.consume(n);
    return b;
  }

  /**
   * Move up to max bytes into target at targetOffset and consume them; returns how many were moved.
   * Used to fill a request payload buffer as chunks arrive.
   */
  readInto(target: Buffer, targetOffset: number, max: number): number {
    const n = Math.min(max, this.total);
    this.copyOut(target, targetOffset, n, true);
    return n;
  }

  /**
   * Copy the unread bytes into a buffer of their own and drop every chunk, so the memory the chunks live in
   * may be reused (a socket reading into the same buffer again).
   */
  detach(): void {
    if (this.total === 0) return; // consume() drops every chunk it used up: nothing is held
    const out = Buffer.allocUnsafe(this.total);
    this.copyOut(out, 0, this.total, false);
    this.chunks = [out];
    this.head = 0;
  }

  /** Discard up to max bytes; returns how many were discarded (draining a refused payload). */
  skip(max: number): number {
    const n = Math.min(max, this.total);
    this.consume(n);
    return n;
  }

  private copyOut(target: Buffer, targetOffset: number, n: number, consume: boolean): void {
    let copied = 0;
    let i = 0;
    let head = this.head;
    while (copied < n) {
      const c = this.chunks[i]!;
      const take = Math.min(c.length - head, n - copied);
      c.copy(target, targetOffset + copied, head, head + take);
      copied += take;
      head = 0;
      i++;
    }
    if (consume) this.consume(n);
  }
}
