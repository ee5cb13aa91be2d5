// Micro-benchmark of the per-request codec work on the server's hot path: decodeRequest, encodeSimpleReply,
// encodeOffsetDataHeader, and FrameReader push/peek/consume/take for 28-byte request headers + 4 KiB payloads.
// Each case is measured for the current implementation (lib/protocol) and one alternative written here, and
// printed as ns/op (median of several timed samples, variants interleaved) with the ratio alternative/current.
//
// Run: npm run bench:micro            (builds, compiles bench/ with bench/tsconfig.json, runs this file)
//      BENCH_MS=50 node dist/bench/micro/codec.bench.js   (time per sample; default 40 ms, ~5 s in total)
//
// Plain node + process.hrtime.bigint(); no benchmark library. The machine is shared, so re-run before believing
// a difference under ~10%; the alternatives are checked for identical results before they are timed.

import { check, compare, report } from './harness';
import { FrameReader } from '../../lib/protocol/frame-reader';
import { decodeRequest, encodeRequest, type Request } from '../../lib/protocol/request';
import { encodeOffsetDataHeader, encodeSimpleReply } from '../../lib/protocol/reply';
import {
  NBD_CMD_READ,
  NBD_CMD_WRITE,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  REQUEST_SIZE,
  SIMPLE_REPLY_SIZE,
  STRUCTURED_REPLY_HEADER_SIZE,
} from '../../lib/protocol/constants';

const PAYLOAD = 4096;
/** Results land here so that V8 cannot drop the measured work as dead code. */
let sink = 0;

// ---------------------------------------------------------------------------------------------------------------
// Alternatives
// ---------------------------------------------------------------------------------------------------------------

/** decodeRequest with the cookie read as two 32-bit halves and combined into a bigint. */
function decodeRequestTwoU32(buf: Buffer, off = 0): Request | null {
  if (buf.length - off < REQUEST_SIZE) return null;
  if (buf.readUInt32BE(off) !== NBD_REQUEST_MAGIC) throw new Error('bad request magic');
  return {
    flags: buf.readUInt16BE(off + 4),
    type: buf.readUInt16BE(off + 6),
    cookie: (BigInt(buf.readUInt32BE(off + 8)) << 32n) | BigInt(buf.readUInt32BE(off + 12)),
    offset: buf.readUInt32BE(off + 16) * 0x1_0000_0000 + buf.readUInt32BE(off + 20),
    length: buf.readUInt32BE(off + 24),
  };
}

/** A request whose cookie is kept as two numbers: no BigInt anywhere (would need an API change). */
interface RequestHiLo {
  flags: number;
  type: number;
  cookieHi: number;
  cookieLo: number;
  offset: number;
  length: number;
}
function decodeRequestHiLo(buf: Buffer, off = 0): RequestHiLo | null {
  if (buf.length - off < REQUEST_SIZE) return null;
  if (buf.readUInt32BE(off) !== NBD_REQUEST_MAGIC) throw new Error('bad request magic');
  return {
    flags: buf.readUInt16BE(off + 4),
    type: buf.readUInt16BE(off + 6),
    cookieHi: buf.readUInt32BE(off + 8),
    cookieLo: buf.readUInt32BE(off + 12),
    offset: buf.readUInt32BE(off + 16) * 0x1_0000_0000 + buf.readUInt32BE(off + 20),
    length: buf.readUInt32BE(off + 24),
  };
}

/** encodeSimpleReply writing the bigint cookie as two 32-bit halves. */
function encodeSimpleReplyTwoU32(cookie: bigint, error: number): Buffer {
  const b = Buffer.allocUnsafe(SIMPLE_REPLY_SIZE);
  b.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error >>> 0, 4);
  b.writeUInt32BE(Number(cookie >> 32n), 8);
  b.writeUInt32BE(Number(cookie & 0xffff_ffffn), 12);
  return b;
}

/** encodeSimpleReply from a hi/lo cookie (pairs with decodeRequestHiLo). */
function encodeSimpleReplyHiLo(cookieHi: number, cookieLo: number, error: number): Buffer {
  const b = Buffer.allocUnsafe(SIMPLE_REPLY_SIZE);
  b.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error >>> 0, 4);
  b.writeUInt32BE(cookieHi, 8);
  b.writeUInt32BE(cookieLo, 12);
  return b;
}

/** encodeOffsetDataHeader with the offset written as two 32-bit halves (no BigInt(offset)). */
function encodeOffsetDataHeaderBigIntOffset(cookie: bigint, flags: number, offset: number, dataLength: number): Buffer {
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_SIZE + 8);
  b.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(NBD_REPLY_TYPE_OFFSET_DATA, 6);
  b.writeBigUInt64BE(cookie, 8);
  b.writeUInt32BE(8 + dataLength, 16);
  b.writeBigUInt64BE(BigInt(offset), 20);
  return b;
}

/** encodeOffsetDataHeader from a hi/lo cookie and a split offset: no BigInt at all. */
function encodeOffsetDataHeaderHiLo(cookieHi: number, cookieLo: number, flags: number, offset: number, dataLength: number): Buffer {
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_SIZE + 8);
  b.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(NBD_REPLY_TYPE_OFFSET_DATA, 6);
  b.writeUInt32BE(cookieHi, 8);
  b.writeUInt32BE(cookieLo, 12);
  b.writeUInt32BE(8 + dataLength, 16);
  b.writeUInt32BE(Math.floor(offset / 0x1_0000_0000), 20);
  b.writeUInt32BE(offset >>> 0, 24);
  return b;
}

/**
 * The naive reader FrameReader replaces: one contiguous Buffer, leftovers concatenated with each new chunk.
 * Same push/peek/consume/take API.
 */
class ConcatReader {
  private buf: Buffer = Buffer.alloc(0);
  private off = 0;
  get length(): number {
    return this.buf.length - this.off;
  }
  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.buf = this.off === this.buf.length ? chunk : Buffer.concat([this.buf.subarray(this.off), chunk]);
    this.off = 0;
  }
  peek(n: number): Buffer | null {
    return n > this.length ? null : this.buf.subarray(this.off, this.off + n);
  }
  consume(n: number): void {
    this.off += n;
  }
  take(n: number): Buffer | null {
    const b = this.peek(n);
    if (b !== null) this.off += n;
    return b;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------------------------

const COOKIE = 0x0123_4567_89ab_cdefn;
const OFFSET = 3 * 2 ** 32 + 12288; // past 4 GiB, so the high word matters
const readHdr = encodeRequest({ flags: 0, type: NBD_CMD_READ, cookie: COOKIE, offset: OFFSET, length: PAYLOAD });
const writeHdr = encodeRequest({ flags: 0, type: NBD_CMD_WRITE, cookie: COOKIE, offset: OFFSET, length: PAYLOAD });

/** The byte stream of `count` WRITE requests (header + 4 KiB each), with distinct cookies and offsets. */
function writeStream(count: number): Buffer {
  const parts: Buffer[] = [];
  for (let i = 0; i < count; i++) {
    parts.push(encodeRequest({ flags: 0, type: NBD_CMD_WRITE, cookie: BigInt(i + 1), offset: i * PAYLOAD, length: PAYLOAD }));
    parts.push(Buffer.alloc(PAYLOAD, i & 0xff));
  }
  return Buffer.concat(parts);
}
/** Cut a stream into chunks of `size` bytes (views, no copies), as socket reads would deliver it. */
function chunked(stream: Buffer, size: number): Buffer[] {
  const out: Buffer[] = [];
  for (let p = 0; p < stream.length; p += size) out.push(stream.subarray(p, Math.min(p + size, stream.length)));
  return out;
}

/**
 * Parse every request in `chunks` the way a connection does: push, peek header, consume, take payload.
 * parseStream and parseStreamConcat are the same code on purpose: one function for both reader classes
 * would make its call sites polymorphic and penalise whichever class is timed second.
 */
function parseStream(reader: FrameReader, chunks: readonly Buffer[]): number {
  let n = 0;
  let need: number | null = null; // payload length still to take, or null when a header comes next
  for (const c of chunks) {
    reader.push(c);
    for (;;) {
      if (need === null) {
        const h = reader.peek(REQUEST_SIZE);
        if (h === null) break;
        const req = decodeRequest(h)!;
        reader.consume(REQUEST_SIZE);
        need = req.type === NBD_CMD_WRITE ? req.length : 0;
        sink += Number(req.cookie & 0xffn);
      }
      if (need > 0) {
        const p = reader.take(need);
        if (p === null) break;
        sink += p[0]!;
      }
      need = null;
      n++;
    }
  }
  return n;
}

function parseStreamConcat(reader: ConcatReader, chunks: readonly Buffer[]): number {
  let n = 0;
  let need: number | null = null; // payload length still to take, or null when a header comes next
  for (const c of chunks) {
    reader.push(c);
    for (;;) {
      if (need === null) {
        const h = reader.peek(REQUEST_SIZE);
        if (h === null) break;
        const req = decodeRequest(h)!;
        reader.consume(REQUEST_SIZE);
        need = req.type === NBD_CMD_WRITE ? req.length : 0;
        sink += Number(req.cookie & 0xffn);
      }
      if (need > 0) {
        const p = reader.take(need);
        if (p === null) break;
        sink += p[0]!;
      }
      need = null;
      n++;
    }
  }
  return n;
}

// ---------------------------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------------------------

function main(): void {
  // Same results first.
  const a = decodeRequest(readHdr)!;
  const b = decodeRequestTwoU32(readHdr)!;
  const c = decodeRequestHiLo(readHdr)!;
  check(a.cookie === b.cookie && a.offset === b.offset && a.length === b.length && a.type === b.type, 'decodeRequestTwoU32');
  check(BigInt(c.cookieHi) * 2n ** 32n + BigInt(c.cookieLo) === a.cookie && c.offset === a.offset, 'decodeRequestHiLo');
  check(encodeSimpleReply(COOKIE, 5).equals(encodeSimpleReplyTwoU32(COOKIE, 5)), 'encodeSimpleReplyTwoU32');
  check(encodeSimpleReply(COOKIE, 5).equals(encodeSimpleReplyHiLo(c.cookieHi, c.cookieLo, 5)), 'encodeSimpleReplyHiLo');
  const od = encodeOffsetDataHeader(COOKIE, NBD_REPLY_FLAG_DONE, OFFSET, PAYLOAD);
  check(od.equals(encodeOffsetDataHeaderBigIntOffset(COOKIE, NBD_REPLY_FLAG_DONE, OFFSET, PAYLOAD)), 'encodeOffsetDataHeaderTwoU32');
  check(od.equals(encodeOffsetDataHeaderHiLo(c.cookieHi, c.cookieLo, NBD_REPLY_FLAG_DONE, OFFSET, PAYLOAD)), 'encodeOffsetDataHeaderHiLo');

  compare(
    'decodeRequest (28-byte header)',
    ['current: readBigUInt64BE cookie', () => void (sink += decodeRequest(readHdr)!.length)],
    [
      ['alt: two readUInt32BE -> BigInt', () => void (sink += decodeRequestTwoU32(readHdr)!.length)],
      ['alt: two readUInt32BE, cookie as hi/lo numbers', () => void (sink += decodeRequestHiLo(readHdr)!.length)],
    ],
  );
  compare(
    'encodeSimpleReply (16 bytes)',
    ['current: writeBigUInt64BE cookie', () => void (sink += encodeSimpleReply(COOKIE, 0)[15]!)],
    [
      ['alt: bigint cookie split, two writeUInt32BE', () => void (sink += encodeSimpleReplyTwoU32(COOKIE, 0)[15]!)],
      ['alt: hi/lo cookie, two writeUInt32BE', () => void (sink += encodeSimpleReplyHiLo(c.cookieHi, c.cookieLo, 0)[15]!)],
    ],
  );
  compare(
    'encodeOffsetDataHeader (28 bytes)',
    ['current: offset as two writeUInt32BE', () => void (sink += encodeOffsetDataHeader(COOKIE, NBD_REPLY_FLAG_DONE, OFFSET, PAYLOAD)[27]!)],
    [
      ['alt: BigInt(offset) + writeBigUInt64BE (the first version)', () => void (sink += encodeOffsetDataHeaderBigIntOffset(COOKIE, NBD_REPLY_FLAG_DONE, OFFSET, PAYLOAD)[27]!)],
      ['alt: hi/lo cookie + split offset (no BigInt)', () => void (sink += encodeOffsetDataHeaderHiLo(c.cookieHi, c.cookieLo, NBD_REPLY_FLAG_DONE, OFFSET, PAYLOAD)[27]!)],
    ],
  );

  // FrameReader: 28-byte header + 4 KiB payload per WRITE request, delivered in three chunkings.
  const N = 64;
  const stream = writeStream(N);
  const layouts: Array<[string, Buffer[]]> = [
    ['1 chunk per request (28 B + 4 KiB)', chunked(stream, REQUEST_SIZE + PAYLOAD)],
    ['64 KiB socket reads (requests straddle chunks)', chunked(stream, 64 * 1024)],
    ['1000-byte chunks (headers split)', chunked(stream, 1000)],
  ];
  for (const [label, chunks] of layouts) {
    check(parseStream(new FrameReader(), chunks) === N && parseStreamConcat(new ConcatReader(), chunks) === N, `parse ${label}`);
    compare(
      `FrameReader push/peek/consume/take, ${label}`,
      ['current: FrameReader (chunk queue)', () => void parseStream(new FrameReader(), chunks)],
      [['alt: ConcatReader (Buffer.concat leftovers)', () => void parseStreamConcat(new ConcatReader(), chunks)]],
      N,
    );
  }

  report('codec micro-benchmark', `(FrameReader rows: ns per request, i.e. per header + 4 KiB payload; sink ${sink % 997})`);
}

main();
