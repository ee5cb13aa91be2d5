// Writes a connection's reply batches to its socket, the long ones from libuv's thread pool when that pays.
//
// A socket write copies its bytes into the kernel and, on loopback, runs the receiver's side of TCP as well.
// On one event loop the writes of every connection are in series: with several clients reading long blocks
// at once (nbdcopy's four connections) the loop's writes are the limit, while a server with a thread or a
// process per connection sends from both cores. A batch of at least `poolMin` bytes is therefore written with
// fs.writev on the socket's file descriptor, in a thread-pool thread, while the loop serves the others.
//
// The descriptor is non-blocking: what the kernel does not take at once (a full send buffer) goes the usual
// way, through the net.Socket, which waits for the socket to become writable. Bytes leave in order because
// only one path is busy at a time: a batch goes to the pool only when the net.Socket has nothing queued, and
// batches that come while a pool write is in flight wait for it.
//
// The net.Socket does not know about the pool write, so its handle's `close` and `shutdown` are held back
// until the write has returned: a descriptor closed under a write in flight could be reused at once by the
// next accepted socket, which would receive this one's bytes, and a shutdown would cut the batch short.

import * as fs from 'node:fs';
import type { Socket } from 'node:net';

/** Called once a batch's bytes are all written, or with an error when they never will be. */
export type WriteDone = ((err?: Error | null) => void) | undefined;

/** Batches of at least this many bytes may go to the thread pool (a hand-off costs more than a short write). */
export const POOL_WRITE_MIN = 256 * 1024;

/** Pool writes made, and how many of them the kernel took only in part (the rest went through the socket). */
export interface PoolWriteCounts {
  pool: number;
  partial: number;
}

export interface ReplyWriterOptions {
  /** Batches this long or longer may go to the thread pool; 0 turns pool writes off. */
  poolMin?: number;
  /**
   * Whether pool writes pay now; asked per batch. The listener says yes while more than one connection is
   * open: their copies then run in parallel (nbdcopy from the server, four connections: 2.1-2.3 → 2.3-2.5
   * GB/s). A lone connection's writes are in series either way, and a hand-off per batch, with the larger
   * batches it makes, cost more than the loop saves (1 MiB reads QD8: 2.7-2.9k against 3.0-3.4k IOPS).
   */
  worthIt?: () => boolean;
  /** Counters to add this writer's pool writes to. */
  counts?: PoolWriteCounts;
}

interface StreamHandle {
  fd?: number;
  close(cb?: () => void): void;
  shutdown(req: { oncomplete?: (status: number) => void }): number;
}

export class ReplyWriter {
  /** The socket's descriptor, or -1 when pool writes are off (no descriptor, or poolMin of 0). */
  private readonly fd: number;
  private readonly poolMin: number;
  private readonly worthIt: () => boolean;
  private readonly counts: PoolWriteCounts;
  private poolBusy = false;
  private poolBytes = 0;
  /** Batches that came while a pool write was in flight, in order, with their callbacks. */
  private waiting: Buffer[] = [];
  private waitingBytes = 0;
  private waitingDone: WriteDone[] = [];
  /** Handle calls held back until the pool write in flight returns. */
  private heldBack: (() => void)[] = [];
  /** end() came during a pool write: the socket ends once every batch is handed to it. */
  private endWhenIdle = false;

  /** @param onWritten called after a pool write has returned (pendingBytes went down) */
  constructor(
    private readonly socket: Socket,
    private readonly onWritten: () => void,
    opts: ReplyWriterOptions = {},
  ) {
    this.poolMin = opts.poolMin ?? POOL_WRITE_MIN;
    this.worthIt = opts.worthIt ?? ((): boolean => true);
    this.counts = opts.counts ?? { pool: 0, partial: 0 };
    const handle = (socket as unknown as { _handle: StreamHandle | null })._handle;
    this.fd = this.poolMin > 0 && handle !== null && typeof handle.fd === 'number' && handle.fd >= 0 ? handle.fd : -1;
    if (this.fd >= 0) this.holdBackDuringPoolWrites(handle!);
  }

  /** Reply bytes handed over and not yet written. */
  get pendingBytes(): number {
    return this.socket.writableLength + this.poolBytes + this.waitingBytes;
  }

  /** Write a batch (`bytes` long in all); `done` is called once all of it is written. */
  write(bufs: Buffer[], bytes: number, done: WriteDone): void {
    if (this.poolBusy) {
      for (const b of bufs) this.waiting.push(b);
      this.waitingBytes += bytes;
      this.waitingDone.push(done);
      return;
    }
    if (this.poolPays(bytes)) this.poolWrite(bufs, bytes, [done]);
    else this.socketWrite(bufs, [done]);
  }

  /** End the socket after every batch handed over (socket.end() would not wait for a pool write). */
  end(): void {
    if (this.poolBusy) this.endWhenIdle = true;
    else this.socket.end();
  }

  private poolPays(bytes: number): boolean {
    return this.fd >= 0 && bytes >= this.poolMin && this.socket.writableLength === 0 && !this.socket.destroyed && this.worthIt();
  }

  private socketWrite(bufs: Buffer[], dones: WriteDone[]): void {
    const done = dones.length === 1 ? dones[0] : (err?: Error | null): void => callAll(dones, err);
    if (bufs.length === 1) {
      this.socket.write(bufs[0]!, done);
      return;
    }
    this.socket.cork();
    const last = bufs.length - 1;
    for (let i = 0; i < last; i++) this.socket.write(bufs[i]!);
    this.socket.write(bufs[last]!, done);
    this.socket.uncork();
  }

  private poolWrite(bufs: Buffer[], bytes: number, dones: WriteDone[]): void {
    this.poolBusy = true;
    this.poolBytes = bytes;
    this.counts.pool++;
    fs.writev(this.fd, bufs, (err, written) => {
      this.poolBusy = false;
      this.poolBytes = 0;
      const waiting = this.waiting;
      const waitingBytes = this.waitingBytes;
      const waitingDone = this.waitingDone;
      this.waiting = [];
      this.waitingBytes = 0;
      this.waitingDone = [];
      if (err !== null && err.code !== 'EAGAIN') {
        // The connection is gone (EPIPE, ECONNRESET): nothing handed over will be written.
        callAll(dones, err);
        callAll(waitingDone, err);
        this.releaseHeldBack();
        this.socket.destroy();
        return;
      }
      const n = err === null ? written : 0;
      if (n < bytes) {
        this.counts.partial++;
        this.socketWrite(rest(bufs, n), dones);
      } else {
        callAll(dones, null);
      }
      if (waiting.length !== 0) {
        if (this.poolPays(waitingBytes)) this.poolWrite(waiting, waitingBytes, waitingDone);
        else this.socketWrite(waiting, waitingDone);
      }
      if (!this.poolBusy) {
        this.releaseHeldBack();
        if (this.endWhenIdle) {
          this.endWhenIdle = false;
          this.socket.end();
        }
      }
      this.onWritten();
    });
  }

  private releaseHeldBack(): void {
    if (this.heldBack.length === 0) return;
    const calls = this.heldBack;
    this.heldBack = [];
    for (const f of calls) f();
  }

  /** The handle's close and shutdown wait for a pool write in flight (see the top of this file). */
  private holdBackDuringPoolWrites(handle: StreamHandle): void {
    const close = handle.close;
    const shutdown = handle.shutdown;
    handle.close = (cb?: () => void): void => {
      if (!this.poolBusy) return close.call(handle, cb);
      this.heldBack.push(() => close.call(handle, cb));
    };
    handle.shutdown = (req): number => {
      if (!this.poolBusy) return shutdown.call(handle, req);
      this.heldBack.push(() => {
        const status = shutdown.call(handle, req);
        if (status !== 0) req.oncomplete?.(status);
      });
      return 0;
    };
  }
}

function callAll(dones: WriteDone[], err?: Error | null): void {
  for (const d of dones) d?.(err);
}

/** The bytes of bufs after the first n (n less than their total). */
function rest(bufs: Buffer[], n: number): Buffer[] {
  let i = 0;
  while (n >= bufs[i]!.length) n -= bufs[i++]!.length;
  const out = bufs.slice(i);
  if (n > 0) out[0] = out[0]!.subarray(n);
  return out;
}
