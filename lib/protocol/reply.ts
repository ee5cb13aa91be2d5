// Transmission replies: simple replies and structured reply chunks. Pure functions over Buffers.
// Encoders return only headers (and small fixed payloads); bulk read data is written after them by the caller,
// so data is never copied into a reply buffer.

import {
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_ERROR_OFFSET,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  MAX_STRING_LENGTH,
  SIMPLE_REPLY_SIZE,
  STRUCTURED_REPLY_HEADER_SIZE,
} from './constants';
import { ProtocolError } from '../errors';

/** One base:allocation (or other context) descriptor. */
export interface Extent {
  length: number;
  flags: number;
}

export function encodeSimpleReply(cookie: bigint, error: number, target: Buffer = Buffer.allocUnsafe(SIMPLE_REPLY_SIZE), off = 0): Buffer {
  target.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, off);
  target.writeUInt32BE(error >>> 0, off + 4);
  target.writeBigUInt64BE(cookie, off + 8);
  return target;
}

function writeChunkHeader(b: Buffer, off: number, cookie: bigint, flags: number, type: number, length: number): void {
  b.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, off);
  b.writeUInt16BE(flags, off + 4);
  b.writeUInt16BE(type, off + 6);
  b.writeBigUInt64BE(cookie, off + 8);
  // No `>>> 0`: a length past 2^32-1 (e.g. an unsplit 4 GiB read) must throw, not wrap and desync the stream.
  b.writeUInt32BE(length, off + 16);
}

/** A bare structured chunk header (20 bytes). */
export function encodeChunkHeader(cookie: bigint, flags: number, type: number, length: number): Buffer {
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_SIZE);
  writeChunkHeader(b, 0, cookie, flags, type, length);
  return b;
}

/** NBD_REPLY_TYPE_NONE with DONE: the final chunk of a successful reply (into target at off, if given). */
export function encodeNoneChunk(cookie: bigint, target: Buffer = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_SIZE), off = 0): Buffer {
  writeChunkHeader(target, off, cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 0);
  return target;
}

/** Header + offset of an OFFSET_DATA chunk (28 bytes); the caller sends dataLength bytes of data after it. */
export function encodeOffsetDataHeader(
  cookie: bigint,
  flags: number,
  offset: number,
  dataLength: number,
  target: Buffer = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_SIZE + 8),
  off = 0,
): Buffer {
  writeChunkHeader(target, off, cookie, flags, NBD_REPLY_TYPE_OFFSET_DATA, 8 + dataLength);
  writeU64(target, off + STRUCTURED_REPLY_HEADER_SIZE, offset);
  return target;
}

/** A complete OFFSET_HOLE chunk (32 bytes). */
export function encodeOffsetHole(
  cookie: bigint,
  flags: number,
  offset: number,
  size: number,
  target: Buffer = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_SIZE + 12),
  off = 0,
): Buffer {
  writeChunkHeader(target, off, cookie, flags, NBD_REPLY_TYPE_OFFSET_HOLE, 12);
  writeU64(target, off + STRUCTURED_REPLY_HEADER_SIZE, offset);
  target.writeUInt32BE(size >>> 0, off + STRUCTURED_REPLY_HEADER_SIZE + 8);
  return target;
}

/** A non-negative integer below 2^53 as a big-endian u64 (two 32-bit words: no BigInt on the hot path). */
function writeU64(b: Buffer, off: number, v: number): void {
  b.writeUInt32BE(Math.floor(v / 0x1_0000_0000), off);
  b.writeUInt32BE(v >>> 0, off + 4);
}

/** A complete BLOCK_STATUS chunk for one meta context. extents must be non-empty. */
export function encodeBlockStatus(cookie: bigint, flags: number, contextId: number, extents: readonly Extent[]): Buffer {
  const len = 4 + 8 * extents.length;
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_SIZE + len);
  writeChunkHeader(b, 0, cookie, flags, NBD_REPLY_TYPE_BLOCK_STATUS, len);
  let p = STRUCTURED_REPLY_HEADER_SIZE;
  b.writeUInt32BE(contextId >>> 0, p);
  p += 4;
  for (const e of extents) {
    b.writeUInt32BE(e.length >>> 0, p);
    b.writeUInt32BE(e.flags >>> 0, p + 4);
    p += 8;
  }
  return b;
}

/** A complete ERROR chunk (with DONE unless flags say otherwise); the message is cut to the 4096-byte limit. */
export function encodeErrorChunk(cookie: bigint, flags: number, error: number, message = ''): Buffer {
  const full = Buffer.from(message, 'utf8');
  let cut = Math.min(full.length, MAX_STRING_LENGTH);
  // Cut on a character boundary: never before a UTF-8 continuation byte (10xxxxxx).
  while (cut < full.length && cut > 0 && (full[cut]! & 0xc0) === 0x80) cut--;
  const msg = full.subarray(0, cut);
  const len = 6 + msg.length;
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_SIZE + len);
  writeChunkHeader(b, 0, cookie, flags, NBD_REPLY_TYPE_ERROR, len);
  b.writeUInt32BE(error >>> 0, STRUCTURED_REPLY_HEADER_SIZE);
  b.writeUInt16BE(msg.length, STRUCTURED_REPLY_HEADER_SIZE + 4);
  msg.copy(b, STRUCTURED_REPLY_HEADER_SIZE + 6);
  return b;
}

// ---------------------------------------------------------------------------------------------------------------
// Client side

export type ReplyHeader =
  | { kind: 'simple'; error: number; cookie: bigint; headerSize: number }
  | { kind: 'structured'; flags: number; type: number; cookie: bigint; length: number; headerSize: number };

/** Decode a simple reply or structured chunk header. Null if short; throws ProtocolError on a bad magic. */
export function decodeReplyHeader(buf: Buffer, off = 0): ReplyHeader | null {
  const avail = buf.length - off;
  if (avail < 4) return null;
  const magic = buf.readUInt32BE(off);
  if (magic === NBD_SIMPLE_REPLY_MAGIC) {
    if (avail < SIMPLE_REPLY_SIZE) return null;
    return { kind: 'simple', error: buf.readUInt32BE(off + 4), cookie: buf.readBigUInt64BE(off + 8), headerSize: SIMPLE_REPLY_SIZE };
  }
  if (magic === NBD_STRUCTURED_REPLY_MAGIC) {
    if (avail < STRUCTURED_REPLY_HEADER_SIZE) return null;
    return {
      kind: 'structured',
      flags: buf.readUInt16BE(off + 4),
      type: buf.readUInt16BE(off + 6),
      cookie: buf.readBigUInt64BE(off + 8),
      length: buf.readUInt32BE(off + 16),
      headerSize: STRUCTURED_REPLY_HEADER_SIZE,
    };
  }
  throw new ProtocolError(`bad reply magic 0x${magic.toString(16)}`);
}

/** OFFSET_DATA payload: offset and a view of the data (no copy). */
export function parseOffsetData(payload: Buffer): { offset: number; data: Buffer } | undefined {
  if (payload.length < 9) return undefined;
  return { offset: Number(payload.readBigUInt64BE(0)), data: payload.subarray(8) };
}

export function parseOffsetHole(payload: Buffer): { offset: number; size: number } | undefined {
  if (payload.length !== 12) return undefined;
  const size = payload.readUInt32BE(8);
  if (size === 0) return undefined;
  return { offset: Number(payload.readBigUInt64BE(0)), size };
}

export function parseBlockStatus(payload: Buffer): { contextId: number; extents: Extent[] } | undefined {
  if (payload.length < 12 || (payload.length - 4) % 8 !== 0) return undefined;
  const extents: Extent[] = [];
  for (let p = 4; p < payload.length; p += 8) {
    const length = payload.readUInt32BE(p);
    if (length === 0) return undefined; // the spec: extent length MUST be nonzero
    extents.push({ length, flags: payload.readUInt32BE(p + 4) });
  }
  return { contextId: payload.readUInt32BE(0), extents };
}

/** ERROR and ERROR_OFFSET payloads. */
export function parseErrorChunk(type: number, payload: Buffer): { error: number; message: string; offset?: number } | undefined {
  if (payload.length < 6) return undefined;
  const error = payload.readUInt32BE(0);
  const msgLen = payload.readUInt16BE(4);
  if (msgLen > MAX_STRING_LENGTH || 6 + msgLen > payload.length) return undefined;
  const message = payload.toString('utf8', 6, 6 + msgLen);
  if (type === NBD_REPLY_TYPE_ERROR_OFFSET) {
    if (payload.length !== 6 + msgLen + 8) return undefined;
    return { error, message, offset: Number(payload.readBigUInt64BE(6 + msgLen)) };
  }
  // ERROR has no fields after the message; other (unknown) error types may have some.
  if (type === NBD_REPLY_TYPE_ERROR && payload.length !== 6 + msgLen) return undefined;
  return { error, message };
}
