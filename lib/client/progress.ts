// The long-running operator commands: `nbdmirror status --watch` and the wait of `nbdmirror resync`. Both poll
// GET /v1/status once per interval (every request and every wait bounded) and show what changed: on a TTY a
// cli-progress bar per running resync with change lines above it; off a TTY plain lines, at most one per
// export per interval. The text itself comes from the pure functions in ./admin.

import { setTimeout as sleep } from 'node:timers/promises';
import { MultiBar, type SingleBar } from 'cli-progress';
import { IoError } from '../errors';
import {
  type AdminClient,
  clock,
  formatDuration,
  formatRate,
  formatStatus,
  type NodeStatusView,
  RateMeter,
  type ReplicaView,
  resyncProgress,
  type ResyncProgressView,
  summaryLine,
  syncBaseline,
  syncPhase,
  withMeasuredRate,
} from './admin';
import { humanSize } from './info';

type Stream = NodeJS.WritableStream & { isTTY?: boolean };

/** Progress bars (one per key) with log lines above them, on a TTY. */
export class BarBoard {
  private multi: MultiBar | null = null;
  private readonly bars = new Map<string, SingleBar>();

  constructor(private readonly stream: Stream) {}

  log(line: string): void {
    if (this.multi !== null) {
      this.multi.log(`${line}\n`);
      this.multi.update();
    } else {
      this.stream.write(`${line}\n`);
    }
  }

  set(key: string, p: ResyncProgressView): void {
    const payload = {
      name: key,
      left: humanSize(p.remainingBytes),
      size: humanSize(p.totalBytes),
      // (not "eta": cli-progress fills that token in itself)
      speed: p.rate > 0 ? formatRate(p.rate) : '? bytes/s',
      etaText: p.rate > 0 && p.etaSeconds !== null ? formatDuration(p.etaSeconds) : '?',
      pct: p.percent.toFixed(1),
    };
    const bar = this.bars.get(key);
    if (bar !== undefined) {
      if (bar.getTotal() !== p.totalBlocks) bar.setTotal(p.totalBlocks);
      bar.update(p.doneBlocks, payload);
      return;
    }
    this.multi ??= new MultiBar({
      stream: this.stream,
      format: '{name} resync [{bar}] {pct}% | {left} of {size} left | {speed} | ETA {etaText}',
      barsize: 30,
      hideCursor: true,
      clearOnComplete: true,
      // SIGINT is handled by the command (it stops the board itself).
      gracefulExit: false,
      emptyOnZero: true,
    });
    this.bars.set(key, this.multi.create(p.totalBlocks, p.doneBlocks, payload));
  }

  remove(key: string): void {
    const bar = this.bars.get(key);
    if (bar === undefined || this.multi === null) return;
    this.bars.delete(key);
    if (this.bars.size === 0) {
      this.multi.stop();
      this.multi = null;
    } else {
      this.multi.remove(bar);
    }
  }

  stop(): void {
    this.multi?.stop();
    this.multi = null;
    this.bars.clear();
  }
}

/** Sleep, but wake up early (without throwing) when the signal fires. */
async function pause(ms: number, signal: AbortSignal | undefined): Promise<void> {
  if (signal?.aborted === true) return;
  try {
    await sleep(ms, undefined, signal === undefined ? {} : { signal });
  } catch {
    // aborted
  }
}

export interface WatchOptions {
  intervalMs: number;
  json: boolean;
  /** Progress bars (stdout is a TTY). */
  tty: boolean;
  out: Stream;
  /** Fires on SIGINT: the watch ends normally. */
  signal: AbortSignal;
}

/**
 * `status --watch`: the full status once, then one line per change (a JSON line per change with --json),
 * until the signal fires. A first request that fails throws (exit 1); later failures are shown and retried.
 */
export async function watchStatus(client: AdminClient, o: WatchOptions): Promise<void> {
  const first = await client.status();
  const board = o.tty && !o.json ? new BarBoard(o.out) : null;
  const say = (line: string): void => (board !== null ? board.log(line) : void o.out.write(`${line}\n`));
  const lineOf = (r: ReplicaView): string => summaryLine(r, { progress: board === null });
  const previous = new Map<string, string>();
  let previousJson = '';

  const meters = new Map<string, RateMeter>();
  const measured = (r: ReplicaView): ReplicaView => {
    let m = meters.get(r.name);
    if (m === undefined) meters.set(r.name, (m = new RateMeter()));
    return withMeasuredRate(r, m, Date.now());
  };

  const show = (s: NodeStatusView, initial: boolean): void => {
    if (o.json) {
      const key = JSON.stringify(s.replication);
      if (key !== previousJson) o.out.write(`${JSON.stringify(s)}\n`);
      previousJson = key;
      return;
    }
    if (initial) say(formatStatus(s.replication));
    const now = clock(new Date());
    const seen = new Set<string>();
    const exports = s.replication.exports.map(measured);
    for (const r of exports) {
      seen.add(r.name);
      const line = lineOf(r);
      if (!initial && previous.get(r.name) !== line) say(`${now} ${line}`);
      previous.set(r.name, line);
    }
    for (const name of [...previous.keys()]) {
      if (seen.has(name)) continue;
      say(`${now} ${name}: no longer on the server`);
      previous.delete(name);
      meters.delete(name);
    }
    if (board !== null) {
      for (const r of exports) {
        const p = resyncProgress(r);
        if (p !== null) board.set(r.name, p);
        else board.remove(r.name);
      }
    }
  };

  let down: string | null = null;
  try {
    show(first, true);
    while (!o.signal.aborted) {
      await pause(o.intervalMs, o.signal);
      if (o.signal.aborted) break;
      let s: NodeStatusView;
      try {
        s = await client.status(Math.max(1000, Math.min(client.timeoutMs, o.intervalMs * 5)));
      } catch (err) {
        const msg = (err as Error).message;
        if (down !== msg) {
          if (o.json) process.stderr.write(`nbdmirror: ${msg}\n`);
          else say(`${clock(new Date())} ${msg}`);
        }
        down = msg;
        continue;
      }
      if (down !== null && !o.json) say(`${clock(new Date())} the server answers again`);
      down = null;
      show(s, false);
    }
  } finally {
    board?.stop();
  }
}

export interface ResyncWaitOptions {
  timeoutMs: number;
  intervalMs: number;
  /** Progress bar (stderr is a TTY) instead of lines. */
  tty: boolean;
  /** Where progress goes (stderr). */
  err: Stream;
  /** Fires on SIGINT: the wait ends with an error (the server's resync goes on). */
  signal?: AbortSignal;
}

/**
 * Wait until the export is in sync on this node (see syncPhase), showing progress. Resolves with the last
 * status; throws IoError when the link is refused, on timeout, or when interrupted.
 */
export async function waitForSync(client: AdminClient, name: string, o: ResyncWaitOptions): Promise<ReplicaView> {
  const deadline = Date.now() + o.timeoutMs;
  const meter = new RateMeter();
  let r: ReplicaView | null = await client.replica(name);
  const base = syncBaseline(r);
  const board = o.tty ? new BarBoard(o.err) : null;
  let lastMessage = '';
  const say = (msg: string): void => {
    if (msg === lastMessage) return;
    lastMessage = msg;
    if (board !== null) board.log(msg);
    else o.err.write(`${msg}\n`);
  };
  let lastState = '';
  const timedOut = (): IoError =>
    new IoError(`${name}: not in sync after ${formatDuration(o.timeoutMs / 1000)} (--timeout ${o.timeoutMs}); last seen: ${lastState}`);
  try {
    for (;;) {
      if (r !== null) {
        const phase = syncPhase(withMeasuredRate(r, meter, Date.now()), base);
        if (phase.kind === 'in-sync') return r;
        if (phase.kind === 'failed') throw new IoError(phase.message);
        lastState = phase.message.startsWith(`${name}: `) ? phase.message.slice(name.length + 2) : phase.message;
        if (board !== null && phase.progress !== null) {
          board.set(name, phase.progress);
        } else {
          board?.remove(name);
          say(phase.message);
        }
      }
      const left = deadline - Date.now();
      if (left <= 0) throw timedOut();
      await pause(Math.min(o.intervalMs, left), o.signal);
      if (o.signal?.aborted === true) throw new IoError(`${name}: interrupted; the node goes on with the resync by itself (see nbdmirror status)`);
      try {
        r = await client.replica(name, Math.max(1000, Math.min(client.timeoutMs, deadline - Date.now())));
      } catch (err) {
        // The node may be restarting: say so and keep trying until the deadline.
        r = null;
        lastState = (err as Error).message;
        say(`${name}: ${lastState}; retrying`);
      }
    }
  } finally {
    board?.stop();
  }
}
