// What the protocol layer knows about an export: its name, description and storage stack, plus the
// transmission flags and block sizes derived from the stack's capabilities once, at open.

import {
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
} from '../protocol/constants';
import type { BlockSizes } from '../protocol/handshake';
import type { RequestStats } from '../metrics/request-stats';
import type { BlockDevice } from '../storage/block-device';

/** Largest READ/WRITE payload we accept (bytes); advertised as the maximum block size. */
export const MAX_PAYLOAD = 32 * 1024 * 1024;

/** Advertised to every client in NBD_INFO_BLOCK_SIZE, whether or not it asked. */
export const BLOCK_SIZES: BlockSizes = { minimum: 1, preferred: 4096, maximum: MAX_PAYLOAD };

export interface ExportHandle {
  readonly name: string;
  readonly description: string;
  readonly device: BlockDevice;
  /** Where the connections serving this export count their requests (none: not counted). */
  readonly stats?: RequestStats;
  /**
   * Replies are never held back to share a socket write with later ones (see Connection.flushNextRound):
   * for a client that waits for each batch of replies before it can go on, as the mirror's primary does.
   */
  readonly answerAtOnce?: boolean;
  /**
   * Payload bytes a connection to this export may hold in flight, and reply bytes it may queue, before it
   * stops reading requests (each; default MAX_IN_FLIGHT_BYTES and MAX_QUEUED_REPLY_BYTES).
   */
  readonly payloadBudget?: number;
}

export class ExportRegistry {
  private readonly byName = new Map<string, ExportHandle>();

  /**
   * `hidden` resolves names that are never listed (the replication link's per-session export names); it is
   * asked only for names that are not regular exports.
   */
  constructor(
    readonly all: readonly ExportHandle[],
    private readonly hidden?: (name: string) => ExportHandle | undefined,
  ) {
    if (all.length === 0) throw new Error('at least one export is required');
    for (const e of all) this.byName.set(e.name, e);
  }

  /** The export for a client-supplied name; "" means the default (first) export. */
  find(name: string): ExportHandle | undefined {
    if (name === '') return this.all[0];
    return this.byName.get(name) ?? this.hidden?.(name);
  }
}

/** Transmission flags for an export on a connection (DF only makes sense with structured replies). */
export function transmissionFlags(device: BlockDevice, structuredReplies: boolean): number {
  const c = device.caps;
  let f = NBD_FLAG_HAS_FLAGS;
  if (c.flush) f |= NBD_FLAG_SEND_FLUSH;
  if (c.multiConn) f |= NBD_FLAG_CAN_MULTI_CONN;
  if (c.cache) f |= NBD_FLAG_SEND_CACHE;
  if (structuredReplies) f |= NBD_FLAG_SEND_DF;
  if (c.readOnly) {
    f |= NBD_FLAG_READ_ONLY;
  } else {
    if (c.fua) f |= NBD_FLAG_SEND_FUA;
    if (c.trim) f |= NBD_FLAG_SEND_TRIM;
    if (c.zero) f |= NBD_FLAG_SEND_WRITE_ZEROES;
    if (c.zero && c.fastZero) f |= NBD_FLAG_SEND_FAST_ZERO;
  }
  return f;
}
