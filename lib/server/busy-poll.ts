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
//
// The window adapts, as KVM's halt polling does: it starts at --busy-poll, doubles (up to GROWTH_LIMIT times
// that) when a request arrives less than one window after polling gave up, since a window twice as long would
// have caught it, and drops back to --busy-poll after a sleep longer than the largest window. Why: the time
// between requests can sit just past a fixed window. A mirrored secondary sees one write per round trip of the
// whole chain (client, primary, secondary and back), about 70 µs on the bench machine, but over 100 µs in a
// slower stretch of the VM; then the secondary slept between writes, every write paid its wake-up, the round
// trip grew further and the pair stayed slow for the whole run (fio p50 107-165 µs instead of about 70).

import { performance } from 'node:perf_hooks';

/** The window grows to at most this many times --busy-poll. */
export const GROWTH_LIMIT = 4;

export class BusyPoll {
  private last = 0;
  private spinning = false;
  /** Milliseconds spent polling, over all windows (for the metrics). */
  private polledMs = 0;
  private since = 0;
  /** The current window (ms): between windowMs and maxWindowMs. */
  private window: number;
  /** When the last window ended (performance.now()); -Infinity before the first. */
  private endedAt = -Infinity;
  private readonly maxWindowMs: number;

  /** @param windowMs how long after the last request the loop polls at least (0: never) */
  constructor(readonly windowMs: number) {
    this.window = windowMs;
    this.maxWindowMs = windowMs * GROWTH_LIMIT;
  }

  /** A request (or part of one) arrived: keep polling for the current window from now. */
  touch(): void {
    if (this.windowMs <= 0) return;
    const now = performance.now();
    this.last = now;
    if (!this.spinning) {
      const slept = now - this.endedAt;
      if (slept <= this.window) this.window = Math.min(this.window * 2, this.maxWindowMs);
      else if (slept > this.maxWindowMs) this.window = this.windowMs;
      this.spinning = true;
      this.since = now;
      setImmediate(this.spin);
    }
  }

  /** Whether the loop is polling now. */
  get active(): boolean {
    return this.spinning;
  }

  /** The current window in milliseconds (0 when polling is off). */
  get currentWindowMs(): number {
    return this.window;
  }

  /** Seconds the loop has spent polling so far, the current window included. */
  get polledSeconds(): number {
    return (this.polledMs + (this.spinning ? performance.now() - this.since : 0)) / 1000;
  }

  private readonly spin = (): void => {
    const now = performance.now();
    if (now - this.last < this.window) {
      setImmediate(this.spin);
      return;
    }
    this.spinning = false;
    this.endedAt = now;
    this.polledMs += now - this.since;
  };
}
