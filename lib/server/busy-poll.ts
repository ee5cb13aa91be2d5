// Busy polling: after a request arrives, the event loop keeps polling its sockets for a short window
// (`--busy-poll`) before it may sleep again, as the kernel's SO_BUSY_POLL does for a socket.
//
// Why: at low queue depth the loop sleeps in epoll between requests, and each request then pays a wake-up: on
// a VM, an interrupt to a halted virtual CPU and a return to a thread whose caches went cold. On the 2-core
// KVM guest of bench/, that wake-up was most of a QD1 round trip (4 KiB writes, pmem: p50 59-61 µs, against
// 33-35 µs with a 100 µs window), and a mirrored write pays it twice more, on the secondary and on the
// primary's wait for it (p50 130-150 µs against 55-61). Shorter windows that end before the client's next
// request save nothing: a 50 µs one left QD1 at 42 µs and the mirrored write at 187.
//
// What touches it: every read of a client connection, and every read of the replication link's socket (the
// peer's replies to mirrored writes), since on a mirrored write the loop waits for that reply and then for the
// client's next request, and the two together outlast one window.
//
// How: while the window is open a setImmediate callback re-arms itself; with an immediate pending, libuv polls
// with a zero timeout instead of sleeping, so the next request is read as soon as it arrives. The cost is CPU:
// at most one window of spinning per request that finds the loop idle, none while the loop is busy anyway.

import { performance } from 'node:perf_hooks';

export class BusyPoll {
  private last = 0;
  private spinning = false;
  /** Milliseconds spent polling, over all windows (for the metrics). */
  private polledMs = 0;
  private since = 0;

  /** @param windowMs how long after the last request the loop keeps polling (0: never) */
  constructor(readonly windowMs: number) {}

  /** A request (or part of one) arrived: keep polling for windowMs from now. */
  touch(): void {
    if (this.windowMs <= 0) return;
    this.last = performance.now();
    if (!this.spinning) {
      this.spinning = true;
      this.since = this.last;
      setImmediate(this.spin);
    }
  }

  /** Whether the loop is polling now. */
  get active(): boolean {
    return this.spinning;
  }

  /** Seconds the loop has spent polling so far, the current window included. */
  get polledSeconds(): number {
    return (this.polledMs + (this.spinning ? performance.now() - this.since : 0)) / 1000;
  }

  private readonly spin = (): void => {
    const now = performance.now();
    if (now - this.last < this.windowMs) {
      setImmediate(this.spin);
      return;
    }
    this.spinning = false;
    this.polledMs += now - this.since;
  };
}
