// Request validation against the negotiated flags and the export size: validate → act → reply, and this is
// the validate step (nbdkit validate_request). Pure: returns the error to reply with, or null.

import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_KNOWN,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  nameOfCmd,
} from '../protocol/constants';
import type { Request } from '../protocol/request';
import {
  InvalidRequestError,
  NoSpaceError,
  type NbdmirrorError,
  OutOfRangeError,
  ReadOnlyError,
  TooLargeError,
} from '../errors';
import { MAX_PAYLOAD } from './exports';

export interface ValidateContext {
  size: number;
  /** Transmission flags sent to this client. */
  flags: number;
  structuredReplies: boolean;
  baseAllocation: boolean;
}

/** Commands whose offset/length address the export. */
function isRanged(type: number): boolean {
  return type === NBD_CMD_READ || type === NBD_CMD_WRITE || type === NBD_CMD_TRIM || type === NBD_CMD_CACHE ||
    type === NBD_CMD_WRITE_ZEROES || type === NBD_CMD_BLOCK_STATUS;
}

/** Commands that may only be sent when the matching transmission flag was advertised. */
const NEEDS_FLAG: ReadonlyArray<readonly [number, number]> = [
  [NBD_CMD_FLUSH, NBD_FLAG_SEND_FLUSH],
  [NBD_CMD_TRIM, NBD_FLAG_SEND_TRIM],
  [NBD_CMD_WRITE_ZEROES, NBD_FLAG_SEND_WRITE_ZEROES],
  [NBD_CMD_CACHE, NBD_FLAG_SEND_CACHE],
];

export function validateRequest(req: Request, ctx: ValidateContext): NbdmirrorError | null {
  const { type, flags, offset, length } = req;
  const cmd = nameOfCmd(type);
  if ((ctx.flags & NBD_FLAG_READ_ONLY) !== 0 && (type === NBD_CMD_WRITE || type === NBD_CMD_TRIM || type === NBD_CMD_WRITE_ZEROES)) {
    return new ReadOnlyError(`${cmd} on a read-only export`);
  }
  if (isRanged(type)) {
    if (offset > ctx.size || length > ctx.size - offset) {
      const msg = `${cmd} at ${offset}+${length} is beyond the end of the export (${ctx.size} bytes)`;
      return type === NBD_CMD_WRITE || type === NBD_CMD_WRITE_ZEROES ? new NoSpaceError(msg) : new OutOfRangeError(msg);
    }
  } else if (type === NBD_CMD_FLUSH) {
    if (offset !== 0 || length !== 0) return new InvalidRequestError('FLUSH must have offset and length 0');
  } else {
    return new InvalidRequestError(`unknown command ${type}`);
  }
  if ((flags & ~NBD_CMD_FLAG_KNOWN) !== 0) return new InvalidRequestError(`unknown command flags 0x${flags.toString(16)}`);
  if ((flags & NBD_CMD_FLAG_NO_HOLE) !== 0 && type !== NBD_CMD_WRITE_ZEROES) return new InvalidRequestError('NO_HOLE is only valid on WRITE_ZEROES');
  if ((flags & NBD_CMD_FLAG_FAST_ZERO) !== 0) {
    if (type !== NBD_CMD_WRITE_ZEROES) return new InvalidRequestError('FAST_ZERO is only valid on WRITE_ZEROES');
    if ((ctx.flags & NBD_FLAG_SEND_FAST_ZERO) === 0) return new InvalidRequestError('FAST_ZERO was not negotiated');
  }
  if ((flags & NBD_CMD_FLAG_DF) !== 0) {
    if (type !== NBD_CMD_READ) return new InvalidRequestError('DF is only valid on READ');
    if (!ctx.structuredReplies) return new InvalidRequestError('DF needs structured replies');
  }
  if ((flags & NBD_CMD_FLAG_REQ_ONE) !== 0 && type !== NBD_CMD_BLOCK_STATUS) return new InvalidRequestError('REQ_ONE is only valid on BLOCK_STATUS');
  if ((flags & NBD_CMD_FLAG_FUA) !== 0 && (ctx.flags & NBD_FLAG_SEND_FUA) === 0) return new InvalidRequestError('FUA was not negotiated');
  if ((type === NBD_CMD_READ || type === NBD_CMD_WRITE) && length > MAX_PAYLOAD) {
    return new TooLargeError(`${cmd} of ${length} bytes exceeds the maximum block size ${MAX_PAYLOAD}`);
  }
  for (const [t, f] of NEEDS_FLAG) if (type === t && (ctx.flags & f) === 0) return new InvalidRequestError(`${cmd} is not supported on this export`);
  if (type === NBD_CMD_BLOCK_STATUS) {
    if (!ctx.structuredReplies) return new InvalidRequestError('BLOCK_STATUS needs structured replies');
    if (!ctx.baseAllocation) return new InvalidRequestError('BLOCK_STATUS needs the base:allocation meta context');
    // A reply must carry at least one non-empty extent, so an empty query has no valid answer.
    if (length === 0) return new InvalidRequestError('BLOCK_STATUS with length 0');
  }
  return null;
}
