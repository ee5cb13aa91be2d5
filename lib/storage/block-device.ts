// The one interface every storage layer implements, so layers stack like nbdkit filters: backing file today,
// pmem region, writeback, read cache, tracking and the mirror later. Ranges passed in are already validated
// by the protocol layer (inside the export, within size limits); layers may assert but need not re-check.

import type { Extent } from '../protocol/reply';

export type { Extent };

export interface Capabilities {
  readOnly: boolean;
  /** FLUSH is meaningful (data can be made durable). */
  flush: boolean;
  /** FUA on writes is honoured. */
  fua: boolean;
  trim: boolean;
  zero: boolean;
  /** zero() with fastZero can succeed (fails with NotSupportedError when it would be slow). */
  fastZero: boolean;
  cache: boolean;
  /** Several connections may share the device and a flush on one covers writes completed on all. */
  multiConn: boolean;
  /** extents() reports real allocation (otherwise everything is data). */
  extents: boolean;
}

export interface WriteFlags {
  /** Force unit access: durable before the promise resolves. */
  fua?: boolean;
}

export interface ZeroFlags extends WriteFlags {
  /** The range may be deallocated (no NO_HOLE flag from the client). */
  mayTrim?: boolean;
  /** Fail with NotSupportedError rather than do a slow zeroing. */
  fastZero?: boolean;
}

/**
 * Contract of every method: offset/length lie inside [0, size); the promise resolves when the operation is
 * done to this layer's guarantee, or rejects with an NbdmirrorError (or a Node system error, mapped by
 * toNbdErrno). Buffers passed to pwrite are owned by the device until the promise settles.
 */
export interface BlockDevice {
  readonly size: number;
  readonly caps: Capabilities;
  /** Fill buf with the bytes at offset (buf.length bytes). */
  pread(buf: Buffer, offset: number): Promise<void>;
  /**
   * Optional fast path of pread for the request hot path: fill buf synchronously when everything it needs is
   * in memory (region, read cache, OS page cache) and return true; false = use pread (buf is then in any
   * state). Throws like pread on failure.
   */
  preadNow?(buf: Buffer, offset: number): boolean;
  pwrite(buf: Buffer, offset: number, flags?: WriteFlags): Promise<void>;
  /**
   * Optional fast path of pwrite for the request hot path: null when the write already completed (with the
   * guarantee pwrite's promise gives), else pwrite's promise. Saves the promises of a write that needs no
   * waiting (e.g. copied into the pmem region).
   */
  pwriteFast?(buf: Buffer, offset: number, flags?: WriteFlags): Promise<void> | null;
  /**
   * Optional fast path: write the buffers (back to back from offset) synchronously if that needs no waiting
   * (e.g. into already allocated space of a file, which lands in the page cache); false = nothing was
   * written, use pwrite. Throws like pwrite on failure.
   */
  pwriteNow?(bufs: readonly Buffer[], offset: number): boolean;
  /**
   * Optional: let another thread write [offset, offset+length) itself, with a plain pwrite to `fd`. Returns
   * null when the write must go through pwrite/pwriteNow (e.g. it needs zero padding). After the bytes
   * landed, call done() (on this thread) before anything else touches the range; on failure, do not.
   */
  directWrite?(offset: number, length: number): DirectWrite | null;
  /**
   * Optional: pread with a callback instead of a promise. For long reads, which go to the thread pool: a
   * promise per layer and a FileHandle read cost the event loop a good part of what the read's hand-off does.
   * Same contract as pread; done may be called before preadCb returns.
   */
  preadCb?(buf: Buffer, offset: number, done: (err: Error | null) => void): void;
  /** Make every write completed before this call durable (on all connections). */
  flush(): Promise<void>;
  trim(offset: number, length: number, flags?: WriteFlags): Promise<void>;
  /** After success the range reads as zeros. */
  zero(offset: number, length: number, flags?: ZeroFlags): Promise<void>;
  /** Advisory prefetch. */
  cache(offset: number, length: number): Promise<void>;
  /**
   * base:allocation extents starting exactly at offset, contiguous, summing to at most length and at least
   * covering the first byte. flags use NBD_STATE_HOLE / NBD_STATE_ZERO.
   */
  extents(offset: number, length: number): Promise<Extent[]>;
  /** Optional: extents() answered synchronously when that needs no I/O; null = use extents(). */
  extentsNow?(offset: number, length: number): Extent[] | null;
  close(): Promise<void>;
}

export interface DirectWrite {
  fd: number;
  /** The bytes are written: record it (e.g. mark the blocks allocated). */
  done(): void;
}

/** Read through dev.preadCb when it has one, else through pread, and call done either way. */
export function preadThen(dev: BlockDevice, buf: Buffer, offset: number, done: (err: Error | null) => void): void {
  if (dev.preadCb !== undefined) dev.preadCb(buf, offset, done);
  else dev.pread(buf, offset).then(() => done(null), done);
}

/** Capabilities of a device that supports every operation (the storage layers we have all do). */
export function fullCapabilities(readOnly: boolean): Capabilities {
  return { readOnly, flush: true, fua: true, trim: true, zero: true, fastZero: true, cache: true, multiConn: true, extents: true };
}
