// Errors are typed once here, each with a stable code, and mapped to NBD errno in exactly one place
// (toNbdErrno). Callers log the rich error before it is reduced to a number for the wire.

import {
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOMEM,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EOVERFLOW,
  NBD_EPERM,
  NBD_ESHUTDOWN,
} from './protocol/constants';

export type ErrorCode =
  | 'PROTOCOL'
  | 'INVALID_REQUEST'
  | 'OUT_OF_RANGE'
  | 'NO_SPACE'
  | 'READ_ONLY'
  | 'NOT_SUPPORTED'
  | 'TOO_LARGE'
  | 'OVERFLOW'
  | 'SHUTDOWN'
  | 'IO'
  | 'NO_MEMORY'
  | 'USAGE'
  | 'LOCKED'
  | 'CORRUPT'
  | 'PEER'
  | 'CONFLICT';

export abstract class NbdmirrorError extends Error {
  abstract readonly code: ErrorCode;
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** The peer broke the wire protocol (bad magic, impossible framing): the connection must be dropped. */
export class ProtocolError extends NbdmirrorError {
  readonly code = 'PROTOCOL';
}
/** A request the spec calls invalid: unknown command or flag, flag not negotiated, FLUSH with a range. */
export class InvalidRequestError extends NbdmirrorError {
  readonly code = 'INVALID_REQUEST';
}
/** Read, trim, cache or block status beyond the end of the export. */
export class OutOfRangeError extends NbdmirrorError {
  readonly code = 'OUT_OF_RANGE';
}
/** Write past the end of the export, or the backing store is full. */
export class NoSpaceError extends NbdmirrorError {
  readonly code = 'NO_SPACE';
}
export class ReadOnlyError extends NbdmirrorError {
  readonly code = 'READ_ONLY';
}
/** The operation cannot be done as asked (e.g. a FAST_ZERO that would not be fast). */
export class NotSupportedError extends NbdmirrorError {
  readonly code = 'NOT_SUPPORTED';
}
/** Request larger than the advertised maximum block size. */
export class TooLargeError extends NbdmirrorError {
  readonly code = 'TOO_LARGE';
}
/** A DF read that cannot be sent unfragmented. */
export class OverflowError extends NbdmirrorError {
  readonly code = 'OVERFLOW';
}
export class ShutdownError extends NbdmirrorError {
  readonly code = 'SHUTDOWN';
}
export class IoError extends NbdmirrorError {
  readonly code = 'IO';
}
export class NoMemoryError extends NbdmirrorError {
  readonly code = 'NO_MEMORY';
}
/** Bad flags, sizes or config: the CLI prints one line and exits 2. */
export class UsageError extends NbdmirrorError {
  readonly code = 'USAGE';
}
/** Another process holds the data directory or backing file. */
export class LockedError extends NbdmirrorError {
  readonly code = 'LOCKED';
}
/** On-disk state we own (pmem region, node file) is damaged: the operator has to decide what to do. */
export class CorruptStateError extends NbdmirrorError {
  readonly code = 'CORRUPT';
}
/** The remote NBD server answered a request with an error (client side). */
export class PeerError extends NbdmirrorError {
  readonly code = 'PEER';
  constructor(message: string, readonly errno: number) {
    super(message);
  }
}

/**
 * A request conflicts with the node's replication state (promote an outdated copy, link with a split-brain
 * peer, a stale epoch). HTTP 409 and CLI exit 1; never reaches the NBD wire in practice (EIO if it did).
 */
export class ConflictError extends NbdmirrorError {
  readonly code = 'CONFLICT';
  constructor(
    message: string,
    readonly reason: string,
    readonly details: Record<string, unknown> = {},
  ) {
    super(message);
  }
}

/** Errno names the kernel reports for a full device or quota. */
const SYSTEM_NO_SPACE = new Set(['ENOSPC', 'EDQUOT', 'EFBIG']);
const SYSTEM_PERM = new Set(['EROFS', 'EPERM', 'EACCES']);

/** The one mapping from an internal error to an NBD wire errno. */
export function toNbdErrno(err: unknown): number {
  if (err instanceof NbdmirrorError) {
    const code = err.code;
    switch (code) {
      case 'INVALID_REQUEST':
      case 'OUT_OF_RANGE':
      case 'TOO_LARGE':
      case 'PROTOCOL':
      case 'USAGE':
        return NBD_EINVAL;
      case 'NO_SPACE':
        return NBD_ENOSPC;
      case 'READ_ONLY':
        return NBD_EPERM;
      case 'NOT_SUPPORTED':
        return NBD_ENOTSUP;
      case 'OVERFLOW':
        return NBD_EOVERFLOW;
      case 'SHUTDOWN':
        return NBD_ESHUTDOWN;
      case 'NO_MEMORY':
        return NBD_ENOMEM;
      case 'IO':
      case 'LOCKED':
      case 'CORRUPT':
      case 'CONFLICT':
        return NBD_EIO;
      case 'PEER':
        return (err as PeerError).errno || NBD_EIO;
      default: {
        const never: never = code;
        return never;
      }
    }
  }
  const sysCode = (err as NodeJS.ErrnoException | undefined)?.code;
  if (typeof sysCode === 'string') {
    if (SYSTEM_NO_SPACE.has(sysCode)) return NBD_ENOSPC;
    if (SYSTEM_PERM.has(sysCode)) return NBD_EPERM;
    if (sysCode === 'ENOMEM') return NBD_ENOMEM;
  }
  return NBD_EIO;
}
