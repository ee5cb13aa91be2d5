// Transmission requests (28-byte compact header). Pure functions over Buffers.

import { NBD_REQUEST_MAGIC, REQUEST_SIZE } from './constants';
import { ProtocolError } from '../errors';

export interface Request {
  flags: number;
  type: number;
  /** Opaque to the server; echoed in every reply chunk. */
  cookie: bigint;
  /**
   * Byte offset. Decoded as a JS number: values past 2^53 lose precision but stay past any export size
   * (sizes are kept below 2^53), so range checks still reject them.
   */
  offset: number;
  length: number;
}

/** Decode a request header at off. Null if fewer than 28 bytes; throws ProtocolError on a bad magic. */
export function decodeRequest(buf: Buffer, off = 0): Request | null {
  if (buf.length - off < REQUEST_SIZE) return null;
  if (buf.readUInt32BE(off) !== NBD_REQUEST_MAGIC) {
    throw new ProtocolError(`bad request magic 0x${buf.readUInt32BE(off).toString(16)}`);
  }
  return {
    flags: buf.readUInt16BE(off + 4),
    type: buf.readUInt16BE(off + 6),
    cookie: buf.readBigUInt64BE(off + 8),
    offset: buf.readUInt32BE(off + 16) * 0x1_0000_0000 + buf.readUInt32BE(off + 20),
    length: buf.readUInt32BE(off + 24),
  };
}

/** Encode a request header into target at off (a fresh 28-byte Buffer when target is omitted). */
export function encodeRequest(req: Request, target: Buffer = Buffer.allocUnsafe(REQUEST_SIZE), off = 0): Buffer {
  target.writeUInt32BE(NBD_REQUEST_MAGIC, off);
  target.writeUInt16BE(req.flags, off + 4);
  target.writeUInt16BE(req.type, off + 6);
  target.writeBigUInt64BE(req.cookie, off + 8);
  target.writeUInt32BE(Math.floor(req.offset / 0x1_0000_0000), off + 16);
  target.writeUInt32BE(req.offset % 0x1_0000_0000, off + 20);
  target.writeUInt32BE(req.length, off + 24); // no `>>> 0`: a length past 2^32-1 throws rather than wraps
  return target;
}
