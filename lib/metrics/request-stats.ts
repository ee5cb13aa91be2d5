// Per-export request counters kept by the NBD connections: requests, payload bytes, errors by NBD errno,
// latency and requests in flight, per command. Plain numbers and typed arrays indexed by the command's wire
// number, so counting costs a few increments per request; lib/metrics/prometheus.ts reads them at scrape time.

import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  nameOfError,
} from '../protocol/constants';
import { LatencyHistogram } from './histogram';
import type { PoolWriteCounts } from '../server/reply-writer';

/** Who sent the requests: ordinary NBD clients, or the peer node over the replication link. */
export type RequestSource = 'client' | 'peer';

/** The commands counted, by wire number, with their metric label. */
export const COMMAND_LABELS: ReadonlyArray<readonly [number, string]> = [
  [NBD_CMD_READ, 'read'],
  [NBD_CMD_WRITE, 'write'],
  [NBD_CMD_FLUSH, 'flush'],
  [NBD_CMD_TRIM, 'trim'],
  [NBD_CMD_CACHE, 'cache'],
  [NBD_CMD_WRITE_ZEROES, 'write_zeroes'],
  [NBD_CMD_BLOCK_STATUS, 'block_status'],
];
const SLOTS = Math.max(...COMMAND_LABELS.map(([c]) => c)) + 1;

export class RequestStats {
  readonly requests = new Float64Array(SLOTS);
  readonly bytes = new Float64Array(SLOTS);
  readonly inFlight = new Int32Array(SLOTS);
  readonly latency: LatencyHistogram[] = Array.from({ length: SLOTS }, () => new LatencyHistogram());
  /** "command errno" → count; errors are rare, a Map is fine. */
  readonly errors = new Map<string, number>();

  constructor(
    readonly exportName: string,
    readonly source: RequestSource,
  ) {}

  /** A request was handed to the device; returns its start time for end(). */
  begin(cmd: number): number {
    if (cmd < SLOTS) this.inFlight[cmd]!++;
    return performance.now();
  }

  /** The request begun at t0 was answered (successfully or not); bytes is its payload or range length. */
  end(cmd: number, bytes: number, t0: number): void {
    if (cmd >= SLOTS) return;
    this.inFlight[cmd]!--;
    this.requests[cmd]!++;
    this.bytes[cmd]! += bytes;
    this.latency[cmd]!.observe((performance.now() - t0) / 1000);
  }

  /** A request refused before it reached the device (it still counts as a request). */
  refused(cmd: number): void {
    if (cmd < SLOTS) this.requests[cmd]!++;
  }

  /** An error reply went out for this command. */
  error(cmd: number, errno: number): void {
    const key = `${cmd} ${nameOfError(errno)}`;
    this.errors.set(key, (this.errors.get(key) ?? 0) + 1);
  }
}

/** Every export's stats for one node: one RequestStats per (export, source), made on first use. */
export class NodeRequestStats {
  private readonly byKey = new Map<string, RequestStats>();
  connectionsAccepted = 0;
  connectionsOpen = 0;
  /** Reply batches the connections wrote from the thread pool (see ReplyWriter). */
  readonly replyPoolWrites: PoolWriteCounts = { pool: 0, partial: 0 };

  for(exportName: string, source: RequestSource): RequestStats {
    const key = `${source}\0${exportName}`;
    let s = this.byKey.get(key);
    if (s === undefined) this.byKey.set(key, (s = new RequestStats(exportName, source)));
    return s;
  }

  all(): RequestStats[] {
    return [...this.byKey.values()];
  }
}
