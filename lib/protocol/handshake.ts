// Handshake-phase codec: greeting, client flags, options and option replies, NBD_INFO_* payloads.
// Pure functions over Buffers. Stream decoders return null for "need more bytes" and throw ProtocolError for
// bytes that can never become valid; payload parsers return undefined for a malformed payload.

import {
  EXPORT_NAME_REPLY_SIZE,
  EXPORT_NAME_ZEROES,
  GREETING_SIZE,
  MAX_STRING_LENGTH,
  NBD_IHAVEOPT,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_MAGIC,
  NBD_REP_MAGIC,
  OPTION_HEADER_SIZE,
  OPTION_REPLY_HEADER_SIZE,
} from './constants';
import { ProtocolError } from '../errors';

// ---------------------------------------------------------------------------------------------------------------
// Greeting and client flags

/** Server greeting: NBDMAGIC, IHAVEOPT, 16-bit handshake flags. */
export function encodeGreeting(handshakeFlags: number): Buffer {
  const b = Buffer.allocUnsafe(GREETING_SIZE);
  b.writeBigUInt64BE(NBD_MAGIC, 0);
  b.writeBigUInt64BE(NBD_IHAVEOPT, 8);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

/** Client side: the greeting's handshake flags, null if fewer than 18 bytes. Throws on a non-newstyle server. */
export function decodeGreeting(buf: Buffer, off = 0): { handshakeFlags: number } | null {
  if (buf.length - off < GREETING_SIZE) return null;
  if (buf.readBigUInt64BE(off) !== NBD_MAGIC) throw new ProtocolError('server greeting lacks NBDMAGIC');
  if (buf.readBigUInt64BE(off + 8) !== NBD_IHAVEOPT) throw new ProtocolError('server is not newstyle (no IHAVEOPT)');
  return { handshakeFlags: buf.readUInt16BE(off + 16) };
}

export function encodeClientFlags(flags: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(flags >>> 0, 0);
  return b;
}

export function decodeClientFlags(buf: Buffer, off = 0): number | null {
  if (buf.length - off < 4) return null;
  return buf.readUInt32BE(off);
}

// ---------------------------------------------------------------------------------------------------------------
// Options (client → server)

export interface OptionHeader {
  option: number;
  length: number;
}

/** Option header: IHAVEOPT, option, length. Null if short; throws ProtocolError on a bad magic. */
export function decodeOptionHeader(buf: Buffer, off = 0): OptionHeader | null {
  if (buf.length - off < OPTION_HEADER_SIZE) return null;
  if (buf.readBigUInt64BE(off) !== NBD_IHAVEOPT) throw new ProtocolError('option without IHAVEOPT magic');
  return { option: buf.readUInt32BE(off + 8), length: buf.readUInt32BE(off + 12) };
}

export function encodeOption(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(OPTION_HEADER_SIZE + data.length);
  b.writeBigUInt64BE(NBD_IHAVEOPT, 0);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(data.length, 12);
  data.copy(b, OPTION_HEADER_SIZE);
  return b;
}

/** Read a 32-bit-length-prefixed string at off; undefined when it runs past end or exceeds the spec's limit. */
function readString32(buf: Buffer, off: number, end: number): { value: string; next: number } | undefined {
  if (end - off < 4) return undefined;
  const len = buf.readUInt32BE(off);
  if (len > MAX_STRING_LENGTH || len > end - off - 4) return undefined;
  return { value: buf.toString('utf8', off + 4, off + 4 + len), next: off + 4 + len };
}

function writeString32(parts: Buffer[], s: string): void {
  const body = Buffer.from(s, 'utf8');
  const len = Buffer.allocUnsafe(4);
  len.writeUInt32BE(body.length, 0);
  parts.push(len, body);
}

/** NBD_OPT_INFO / NBD_OPT_GO payload: export name and the NBD_INFO_* types the client asks for. */
export interface InfoRequest {
  name: string;
  infos: number[];
}

export function parseInfoRequest(data: Buffer): InfoRequest | undefined {
  const name = readString32(data, 0, data.length);
  if (name === undefined) return undefined;
  let p = name.next;
  if (data.length - p < 2) return undefined;
  const n = data.readUInt16BE(p);
  p += 2;
  if (data.length - p !== n * 2) return undefined;
  const infos: number[] = [];
  for (let i = 0; i < n; i++) infos.push(data.readUInt16BE(p + i * 2));
  return { name: name.value, infos };
}

export function encodeInfoRequest(req: InfoRequest): Buffer {
  const parts: Buffer[] = [];
  writeString32(parts, req.name);
  const tail = Buffer.allocUnsafe(2 + 2 * req.infos.length);
  tail.writeUInt16BE(req.infos.length, 0);
  req.infos.forEach((t, i) => tail.writeUInt16BE(t, 2 + 2 * i));
  parts.push(tail);
  return Buffer.concat(parts);
}

/** NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT payload. */
export interface MetaContextRequest {
  name: string;
  queries: string[];
}

export function parseMetaContextRequest(data: Buffer): MetaContextRequest | undefined {
  const name = readString32(data, 0, data.length);
  if (name === undefined) return undefined;
  let p = name.next;
  if (data.length - p < 4) return undefined;
  const n = data.readUInt32BE(p);
  p += 4;
  // Each query needs at least 4 bytes; this bounds n before we loop.
  if (n > (data.length - p) / 4) return undefined;
  const queries: string[] = [];
  for (let i = 0; i < n; i++) {
    const q = readString32(data, p, data.length);
    if (q === undefined) return undefined;
    queries.push(q.value);
    p = q.next;
  }
  if (p !== data.length) return undefined;
  return { name: name.value, queries };
}

export function encodeMetaContextRequest(req: MetaContextRequest): Buffer {
  const parts: Buffer[] = [];
  writeString32(parts, req.name);
  const n = Buffer.allocUnsafe(4);
  n.writeUInt32BE(req.queries.length, 0);
  parts.push(n);
  for (const q of req.queries) writeString32(parts, q);
  return Buffer.concat(parts);
}

/** NBD_OPT_EXPORT_NAME payload is the bare name (no length prefix). */
export function parseExportNameRequest(data: Buffer): string | undefined {
  if (data.length > MAX_STRING_LENGTH) return undefined;
  return data.toString('utf8');
}

// ---------------------------------------------------------------------------------------------------------------
// Option replies (server → client)

export interface OptionReplyHeader {
  option: number;
  type: number;
  length: number;
}

export function encodeOptionReply(option: number, type: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(OPTION_REPLY_HEADER_SIZE + payload.length);
  b.writeBigUInt64BE(NBD_REP_MAGIC, 0);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(payload.length, 16);
  payload.copy(b, OPTION_REPLY_HEADER_SIZE);
  return b;
}

/** Client side: option reply header, null if short; throws ProtocolError on a bad magic. */
export function decodeOptionReplyHeader(buf: Buffer, off = 0): OptionReplyHeader | null {
  if (buf.length - off < OPTION_REPLY_HEADER_SIZE) return null;
  if (buf.readBigUInt64BE(off) !== NBD_REP_MAGIC) throw new ProtocolError('option reply with bad magic');
  return { option: buf.readUInt32BE(off + 8), type: buf.readUInt32BE(off + 12), length: buf.readUInt32BE(off + 16) };
}

/** NBD_REP_SERVER payload: name (32-bit length) then an optional description filling the rest. */
export function encodeServerReply(name: string, description = ''): Buffer {
  const parts: Buffer[] = [];
  writeString32(parts, name);
  parts.push(Buffer.from(description, 'utf8'));
  return Buffer.concat(parts);
}

export function parseServerReply(data: Buffer): { name: string; description: string } | undefined {
  const name = readString32(data, 0, data.length);
  if (name === undefined || data.length - name.next > MAX_STRING_LENGTH) return undefined;
  return { name: name.value, description: data.toString('utf8', name.next) };
}

/** NBD_REP_META_CONTEXT payload: 32-bit context id then the context name. */
export function encodeMetaContextReply(id: number, name: string): Buffer {
  const body = Buffer.from(name, 'utf8');
  const b = Buffer.allocUnsafe(4 + body.length);
  b.writeUInt32BE(id >>> 0, 0);
  body.copy(b, 4);
  return b;
}

export function parseMetaContextReply(data: Buffer): { id: number; name: string } | undefined {
  if (data.length < 4 || data.length - 4 > MAX_STRING_LENGTH) return undefined;
  return { id: data.readUInt32BE(0), name: data.toString('utf8', 4) };
}

/** Error replies may carry a human-readable message as their payload. */
export function parseErrorReplyMessage(data: Buffer): string {
  return data.toString('utf8', 0, Math.min(data.length, MAX_STRING_LENGTH));
}

// NBD_REP_INFO payloads: 16-bit type then type-specific data.

export interface BlockSizes {
  minimum: number;
  preferred: number;
  maximum: number;
}

export type InfoPayload =
  | { type: typeof NBD_INFO_EXPORT; size: number; flags: number }
  | { type: typeof NBD_INFO_NAME; name: string }
  | { type: typeof NBD_INFO_DESCRIPTION; description: string }
  | { type: typeof NBD_INFO_BLOCK_SIZE; sizes: BlockSizes }
  | { type: number; unknown: Buffer };

export function encodeInfoExport(size: number, flags: number): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeUInt16BE(NBD_INFO_EXPORT, 0);
  b.writeBigUInt64BE(BigInt(size), 2);
  b.writeUInt16BE(flags, 10);
  return b;
}

export function encodeInfoName(name: string): Buffer {
  return infoString(NBD_INFO_NAME, name);
}

export function encodeInfoDescription(description: string): Buffer {
  return infoString(NBD_INFO_DESCRIPTION, description);
}

function infoString(type: number, s: string): Buffer {
  const body = Buffer.from(s, 'utf8');
  const b = Buffer.allocUnsafe(2 + body.length);
  b.writeUInt16BE(type, 0);
  body.copy(b, 2);
  return b;
}

export function encodeInfoBlockSize(sizes: BlockSizes): Buffer {
  const b = Buffer.allocUnsafe(14);
  b.writeUInt16BE(NBD_INFO_BLOCK_SIZE, 0);
  b.writeUInt32BE(sizes.minimum, 2);
  b.writeUInt32BE(sizes.preferred, 6);
  b.writeUInt32BE(sizes.maximum, 10);
  return b;
}

export function parseInfoPayload(data: Buffer): InfoPayload | undefined {
  if (data.length < 2) return undefined;
  const type = data.readUInt16BE(0);
  switch (type) {
    case NBD_INFO_EXPORT:
      if (data.length !== 12) return undefined;
      return { type, size: Number(data.readBigUInt64BE(2)), flags: data.readUInt16BE(10) };
    case NBD_INFO_NAME:
      if (data.length - 2 > MAX_STRING_LENGTH) return undefined;
      return { type, name: data.toString('utf8', 2) };
    case NBD_INFO_DESCRIPTION:
      if (data.length - 2 > MAX_STRING_LENGTH) return undefined;
      return { type, description: data.toString('utf8', 2) };
    case NBD_INFO_BLOCK_SIZE:
      if (data.length !== 14) return undefined;
      return {
        type,
        sizes: { minimum: data.readUInt32BE(2), preferred: data.readUInt32BE(6), maximum: data.readUInt32BE(10) },
      };
    default:
      return { type, unknown: data.subarray(2) };
  }
}

/** Reply to NBD_OPT_EXPORT_NAME: size, transmission flags, and 124 zero bytes unless NO_ZEROES was agreed. */
export function encodeExportNameReply(size: number, flags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(EXPORT_NAME_REPLY_SIZE + (noZeroes ? 0 : EXPORT_NAME_ZEROES));
  b.writeBigUInt64BE(BigInt(size), 0);
  b.writeUInt16BE(flags, 8);
  return b;
}

export function decodeExportNameReply(buf: Buffer, noZeroes: boolean, off = 0): { size: number; flags: number; length: number } | null {
  const length = EXPORT_NAME_REPLY_SIZE + (noZeroes ? 0 : EXPORT_NAME_ZEROES);
  if (buf.length - off < length) return null;
  return { size: Number(buf.readBigUInt64BE(off)), flags: buf.readUInt16BE(off + 8), length };
}
