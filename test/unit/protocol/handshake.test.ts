// lib/protocol/handshake.ts: byte tables built from doc/proto.md layouts with the independent byte builder,
// round trips, "need more" on every prefix, malformed payloads, and whole handshake streams cut at every offset.

import t from 'tap';
import * as H from '../../../lib/protocol/handshake';
import {
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_NO_ZEROES,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_FLUSH,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
  isRepError,
} from '../../../lib/protocol/constants';
import { FrameReader } from '../../../lib/protocol/frame-reader';
import { NbdmirrorError, ProtocolError } from '../../../lib/errors';
import { asciiOfLength, bytes, cat, prng, splits2, splits3 } from '../../helpers/bytes';

// Spec literals, written out here rather than imported, so the tables do not depend on constants.ts.
const REP_MAGIC = 0x0003e889045565a9n;
const UNICODE = 'диск-😀-ディスク';

function throwsProtocol(t: tap.Test, fn: () => unknown, msg: string): void {
  let err: unknown;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  t.ok(
    err instanceof ProtocolError && err instanceof NbdmirrorError && err.code === 'PROTOCOL',
    msg,
  );
}

/** Every proper prefix of msg (and the same placed after junk at an offset) decodes as null without throwing. */
function everyPrefixNeedsMore(t: tap.Test, msg: Buffer, decode: (b: Buffer, off: number) => unknown, what: string): void {
  const junk = Buffer.from([0xde, 0xad, 0xbe]);
  let bad = 0;
  for (let i = 0; i < msg.length; i++) {
    try {
      if (decode(msg.subarray(0, i), 0) !== null) bad++;
      if (decode(cat(junk, msg.subarray(0, i)), junk.length) !== null) bad++;
    } catch {
      bad++;
    }
  }
  t.equal(bad, 0, `${what}: all ${msg.length} proper prefixes need more and none throws`);
}

/** Every proper prefix of payload is refused (undefined) without throwing. */
function everyPrefixRefused(t: tap.Test, payload: Buffer, parse: (b: Buffer) => unknown, what: string): void {
  let bad = 0;
  for (let i = 0; i < payload.length; i++) {
    try {
      if (parse(payload.subarray(0, i)) !== undefined) bad++;
    } catch {
      bad++;
    }
  }
  t.equal(bad, 0, `${what}: all ${payload.length} truncations refused`);
}

// -------------------------------------------------------------------------------------------------------------
// Greeting and client flags

t.test('encodeGreeting / decodeGreeting byte table', async (t) => {
  for (const flags of [0, NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES, 0xffff]) {
    const wire = bytes().str('NBDMAGIC').str('IHAVEOPT').u16(flags).buf();
    t.same(H.encodeGreeting(flags), wire, `encode flags 0x${flags.toString(16)}`);
    t.same(H.decodeGreeting(wire), { handshakeFlags: flags }, `decode flags 0x${flags.toString(16)}`);
    t.same(H.decodeGreeting(cat(Buffer.from('xyz'), wire, Buffer.from('tail')), 3), { handshakeFlags: flags }, 'at an offset, with bytes after');
  }
});

t.test('decodeGreeting: truncated and bad magic', async (t) => {
  const wire = bytes().str('NBDMAGIC').str('IHAVEOPT').u16(3).buf();
  everyPrefixNeedsMore(t, wire, H.decodeGreeting, 'greeting');
  for (let i = 0; i < 16; i++) {
    const bad = Buffer.from(wire);
    bad[i]! ^= 0x20;
    throwsProtocol(t, () => H.decodeGreeting(bad), `greeting with magic byte ${i} flipped`);
  }
  // An oldstyle server: NBDMAGIC then cliserv_magic.
  const oldstyle = bytes().str('NBDMAGIC').u64(0x00420281861253n).u16(0).buf();
  throwsProtocol(t, () => H.decodeGreeting(oldstyle), 'oldstyle greeting');
  throwsProtocol(t, () => H.decodeGreeting(Buffer.alloc(18)), 'all zeroes');
});

t.test('encodeClientFlags / decodeClientFlags', async (t) => {
  const table: [number, number][] = [
    [0, 0],
    [NBD_FLAG_C_FIXED_NEWSTYLE, 1],
    [NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES, 3],
    [0x80000000, 0x80000000],
    [0xffffffff, 0xffffffff],
    [-1, 0xffffffff], // a signed bit pattern is sent as its unsigned value
  ];
  for (const [input, wireValue] of table) {
    const wire = bytes().u32(wireValue).buf();
    t.same(H.encodeClientFlags(input), wire, `encode ${input}`);
    t.equal(H.decodeClientFlags(wire), wireValue, `decode 0x${wireValue.toString(16)}`);
    t.equal(H.decodeClientFlags(cat(Buffer.alloc(5), wire), 5), wireValue, 'at an offset');
  }
  everyPrefixNeedsMore(t, bytes().u32(3).buf(), H.decodeClientFlags, 'client flags');
});

// -------------------------------------------------------------------------------------------------------------
// Options

t.test('encodeOption / decodeOptionHeader byte table', async (t) => {
  const cases: [number, Buffer][] = [
    [NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(0)],
    [NBD_OPT_LIST, Buffer.alloc(0)],
    [NBD_OPT_EXPORT_NAME, Buffer.from('disk')],
    [NBD_OPT_GO, bytes().str32('x').u16(0).buf()],
    [0xffffffff, Buffer.from([1, 2, 3])],
    [0, Buffer.alloc(300, 7)],
  ];
  for (const [opt, data] of cases) {
    const wire = bytes().str('IHAVEOPT').u32(opt).u32(data.length).raw(data).buf();
    t.same(H.encodeOption(opt, data), wire, `encode option ${opt} with ${data.length} bytes`);
    t.same(H.decodeOptionHeader(wire), { option: opt, length: data.length }, `decode option ${opt}`);
    t.same(H.decodeOptionHeader(cat(Buffer.alloc(2), wire), 2), { option: opt, length: data.length }, 'at an offset');
  }
  t.same(H.encodeOption(NBD_OPT_LIST), bytes().str('IHAVEOPT').u32(3).u32(0).buf(), 'data defaults to empty');
});

t.test('decodeOptionHeader: truncated and bad magic', async (t) => {
  const wire = bytes().str('IHAVEOPT').u32(NBD_OPT_GO).u32(100).buf();
  everyPrefixNeedsMore(t, wire, H.decodeOptionHeader, 'option header');
  for (let i = 0; i < 8; i++) {
    const bad = Buffer.from(wire);
    bad[i]! ^= 0x01;
    throwsProtocol(t, () => H.decodeOptionHeader(bad), `option with magic byte ${i} flipped`);
  }
  // A client that skips the client flags sends "IHAVEOPT" four bytes late.
  throwsProtocol(t, () => H.decodeOptionHeader(cat(bytes().u32(1).buf(), wire)), 'misaligned option');
});

t.test('encodeInfoRequest / parseInfoRequest', async (t) => {
  const cases: H.InfoRequest[] = [
    { name: '', infos: [] },
    { name: 'disk', infos: [NBD_INFO_EXPORT] },
    { name: 'disk', infos: [NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE, NBD_INFO_EXPORT] },
    { name: UNICODE, infos: [0xffff, 0] },
    { name: asciiOfLength(4096), infos: [NBD_INFO_BLOCK_SIZE] },
  ];
  for (const req of cases) {
    const b = bytes().str32(req.name).u16(req.infos.length);
    for (const i of req.infos) b.u16(i);
    const wire = b.buf();
    const label = `name of ${Buffer.byteLength(req.name)} bytes, ${req.infos.length} infos`;
    t.same(H.encodeInfoRequest(req), wire, `encode: ${label}`);
    t.same(H.parseInfoRequest(wire), req, `parse: ${label}`);
    everyPrefixRefused(t, wire, H.parseInfoRequest, `info request (${label})`);
    t.equal(H.parseInfoRequest(cat(wire, Buffer.from([0]))), undefined, `trailing byte refused (${label})`);
    t.equal(H.parseInfoRequest(cat(wire, Buffer.from([0, 0]))), undefined, `trailing info-sized garbage refused (${label})`);
  }
});

t.test('parseInfoRequest: lengths and counts that lie', async (t) => {
  const name = 'disk';
  const withNameLen = (len: number): Buffer => bytes().u32(len).str(name).u16(1).u16(0).buf();
  t.same(H.parseInfoRequest(withNameLen(4)), { name, infos: [0] }, 'honest length parses');
  for (const len of [5, 7, 8, 9, 4097, 0x80000000, 0xffffffff]) {
    t.equal(H.parseInfoRequest(withNameLen(len)), undefined, `name length ${len} overruns`);
  }
  const withCount = (n: number): Buffer => bytes().str32(name).u16(n).u16(1).u16(2).buf();
  t.ok(H.parseInfoRequest(withCount(2)) !== undefined, 'honest count parses');
  for (const n of [0, 1, 3, 0xffff]) t.equal(H.parseInfoRequest(withCount(n)), undefined, `count ${n} with 2 present`);
  t.equal(H.parseInfoRequest(bytes().str32(asciiOfLength(4097)).u16(0).buf()), undefined, 'name of 4097 bytes');
  t.same(H.parseInfoRequest(bytes().str32(asciiOfLength(4096)).u16(0).buf()), { name: asciiOfLength(4096), infos: [] }, 'name of 4096 bytes');
});

t.test('encodeMetaContextRequest / parseMetaContextRequest', async (t) => {
  const cases: H.MetaContextRequest[] = [
    { name: '', queries: [] },
    { name: 'disk', queries: ['base:allocation'] },
    { name: 'disk', queries: ['base:', 'qemu:dirty-bitmap:b0', ''] },
    { name: UNICODE, queries: [UNICODE] },
    { name: asciiOfLength(4096), queries: [asciiOfLength(4096, 1)] },
  ];
  for (const req of cases) {
    const b = bytes().str32(req.name).u32(req.queries.length);
    for (const q of req.queries) b.str32(q);
    const wire = b.buf();
    const label = `name of ${Buffer.byteLength(req.name)} bytes, ${req.queries.length} queries`;
    t.same(H.encodeMetaContextRequest(req), wire, `encode: ${label}`);
    t.same(H.parseMetaContextRequest(wire), req, `parse: ${label}`);
    everyPrefixRefused(t, wire, H.parseMetaContextRequest, `meta context request (${label})`);
    t.equal(H.parseMetaContextRequest(cat(wire, Buffer.from([0]))), undefined, `trailing byte refused (${label})`);
    t.equal(H.parseMetaContextRequest(cat(wire, Buffer.alloc(4))), undefined, `trailing empty query refused (${label})`);
  }
});

t.test('parseMetaContextRequest: lengths and counts that lie', async (t) => {
  const build = (nameLen: number, count: number, q1Len: number): Buffer =>
    bytes().u32(nameLen).str('disk').u32(count).u32(q1Len).str('base:allocation').str32('x').buf();
  t.same(H.parseMetaContextRequest(build(4, 2, 15)), { name: 'disk', queries: ['base:allocation', 'x'] }, 'honest');
  for (const n of [5, 100, 4097, 0xffffffff]) t.equal(H.parseMetaContextRequest(build(n, 2, 15)), undefined, `name length ${n}`);
  for (const c of [0, 1, 3, 4, 1000, 0x40000000, 0xffffffff]) t.equal(H.parseMetaContextRequest(build(4, c, 15)), undefined, `count ${c} with 2 present`);
  for (const q of [16, 20, 4097, 0xffffffff]) t.equal(H.parseMetaContextRequest(build(4, 2, q)), undefined, `query length ${q}`);
  t.equal(H.parseMetaContextRequest(bytes().str32('d').u32(1).str32(asciiOfLength(4097)).buf()), undefined, 'query of 4097 bytes');
  t.equal(H.parseMetaContextRequest(bytes().str32(asciiOfLength(4097)).u32(0).buf()), undefined, 'name of 4097 bytes');
});

t.test('parseExportNameRequest', async (t) => {
  for (const name of ['', 'disk', UNICODE, asciiOfLength(4096)]) {
    t.equal(H.parseExportNameRequest(bytes().str(name).buf()), name, `name of ${Buffer.byteLength(name)} bytes`);
  }
  t.equal(H.parseExportNameRequest(Buffer.from(asciiOfLength(4097))), undefined, 'name of 4097 bytes');
});

// -------------------------------------------------------------------------------------------------------------
// Option replies

t.test('encodeOptionReply / decodeOptionReplyHeader byte table', async (t) => {
  const cases: [number, number, Buffer][] = [
    [NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, Buffer.alloc(0)],
    [NBD_OPT_LIST, NBD_REP_SERVER, bytes().str32('a').buf()],
    [NBD_OPT_GO, NBD_REP_ERR_UNKNOWN, Buffer.from('no such export')],
    [0xffffffff, 0xffffffff, Buffer.from([9])],
  ];
  for (const [opt, type, payload] of cases) {
    const wire = bytes().u64(REP_MAGIC).u32(opt).u32(type).u32(payload.length).raw(payload).buf();
    t.same(H.encodeOptionReply(opt, type, payload), wire, `encode option ${opt} type 0x${type.toString(16)}`);
    const want = { option: opt, type, length: payload.length };
    t.same(H.decodeOptionReplyHeader(wire), want, 'decode');
    t.same(H.decodeOptionReplyHeader(cat(Buffer.alloc(7), wire), 7), want, 'decode at an offset');
  }
  t.same(H.encodeOptionReply(NBD_OPT_GO, NBD_REP_ACK), bytes().u64(REP_MAGIC).u32(7).u32(1).u32(0).buf(), 'payload defaults to empty');
});

t.test('decodeOptionReplyHeader: truncated and bad magic', async (t) => {
  const wire = bytes().u64(REP_MAGIC).u32(NBD_OPT_GO).u32(NBD_REP_ACK).u32(0).buf();
  everyPrefixNeedsMore(t, wire, H.decodeOptionReplyHeader, 'option reply header');
  for (let i = 0; i < 8; i++) {
    const bad = Buffer.from(wire);
    bad[i]! ^= 0x80;
    throwsProtocol(t, () => H.decodeOptionReplyHeader(bad), `option reply with magic byte ${i} flipped`);
  }
  // An EXPORT_NAME reply (size + flags + zeroes) where an option reply was expected.
  throwsProtocol(t, () => H.decodeOptionReplyHeader(bytes().u64(1n << 30n).u16(1).zeros(124).buf()), 'export-name reply');
});

t.test('encodeServerReply / parseServerReply', async (t) => {
  const cases: [string, string][] = [
    ['', ''],
    ['disk', ''],
    ['disk', 'a 1 GiB test disk'],
    [UNICODE, UNICODE],
    [asciiOfLength(4096), asciiOfLength(4096, 3)],
  ];
  for (const [name, description] of cases) {
    const wire = bytes().str32(name).str(description).buf();
    const label = `name ${Buffer.byteLength(name)} bytes, description ${Buffer.byteLength(description)} bytes`;
    t.same(H.encodeServerReply(name, description), wire, `encode: ${label}`);
    t.same(H.parseServerReply(wire), { name, description }, `parse: ${label}`);
  }
  t.same(H.encodeServerReply('x'), bytes().str32('x').buf(), 'description defaults to empty');

  // Cutting into the description still parses (it fills the rest); cutting into the name does not.
  const wire = bytes().str32('disk').str('desc').buf();
  let bad = 0;
  for (let i = 0; i < wire.length; i++) {
    const got = H.parseServerReply(wire.subarray(0, i));
    if (i < 8 ? got !== undefined : JSON.stringify(got) !== JSON.stringify({ name: 'disk', description: 'desc'.slice(0, i - 8) })) bad++;
  }
  t.equal(bad, 0, 'every truncation: refused inside the name, shorter description after it');
  for (const len of [5, 100, 4097, 0xffffffff]) {
    t.equal(H.parseServerReply(bytes().u32(len).str('disk').buf()), undefined, `name length ${len} overruns`);
  }
  t.equal(H.parseServerReply(bytes().str32(asciiOfLength(4097)).buf()), undefined, 'name of 4097 bytes');
  t.equal(H.parseServerReply(bytes().str32('disk').str(asciiOfLength(4097)).buf()), undefined, 'description of 4097 bytes');
});

t.test('encodeMetaContextReply / parseMetaContextReply', async (t) => {
  const cases: [number, string][] = [
    [0, ''],
    [1, 'base:allocation'],
    [0xffffffff, UNICODE],
    [0x80000000, asciiOfLength(4096)],
  ];
  for (const [id, name] of cases) {
    const wire = bytes().u32(id).str(name).buf();
    t.same(H.encodeMetaContextReply(id, name), wire, `encode id ${id}`);
    t.same(H.parseMetaContextReply(wire), { id, name }, `parse id ${id}`);
  }
  t.same(H.encodeMetaContextReply(-1, 'x'), bytes().u32(0xffffffff).str('x').buf(), 'a signed id is sent unsigned');
  for (let i = 0; i < 4; i++) t.equal(H.parseMetaContextReply(Buffer.alloc(i)), undefined, `${i} bytes: no id`);
  t.equal(H.parseMetaContextReply(bytes().u32(1).str(asciiOfLength(4097)).buf()), undefined, 'name of 4097 bytes');
});

t.test('parseErrorReplyMessage', async (t) => {
  t.equal(H.parseErrorReplyMessage(Buffer.alloc(0)), '');
  t.equal(H.parseErrorReplyMessage(bytes().str('export not found').buf()), 'export not found');
  t.equal(H.parseErrorReplyMessage(bytes().str(UNICODE).buf()), UNICODE);
  t.equal(H.parseErrorReplyMessage(Buffer.from(asciiOfLength(5000))), asciiOfLength(4096), 'cut to 4096 bytes');
});

t.test('NBD_INFO payloads: encoders against the byte table', async (t) => {
  const exports: [number, number][] = [
    [0, 0],
    [512, NBD_FLAG_HAS_FLAGS],
    [2 ** 40, NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY | NBD_FLAG_SEND_FLUSH],
    [2 ** 53 - 1, 0xffff],
  ];
  for (const [size, flags] of exports) {
    const wire = bytes().u16(0).u64(size).u16(flags).buf();
    t.same(H.encodeInfoExport(size, flags), wire, `INFO_EXPORT size ${size}`);
    t.same(H.parseInfoPayload(wire), { type: NBD_INFO_EXPORT, size, flags }, `parse INFO_EXPORT size ${size}`);
  }
  for (const name of ['', 'disk', UNICODE, asciiOfLength(4096)]) {
    const wire = bytes().u16(1).str(name).buf();
    t.same(H.encodeInfoName(name), wire, `INFO_NAME of ${Buffer.byteLength(name)} bytes`);
    t.same(H.parseInfoPayload(wire), { type: NBD_INFO_NAME, name }, 'parse INFO_NAME');
    const dwire = bytes().u16(2).str(name).buf();
    t.same(H.encodeInfoDescription(name), dwire, `INFO_DESCRIPTION of ${Buffer.byteLength(name)} bytes`);
    t.same(H.parseInfoPayload(dwire), { type: NBD_INFO_DESCRIPTION, description: name }, 'parse INFO_DESCRIPTION');
  }
  const sizes: H.BlockSizes[] = [
    { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 },
    { minimum: 512, preferred: 512, maximum: 0xffffffff },
    { minimum: 0, preferred: 0, maximum: 0 },
  ];
  for (const s of sizes) {
    const wire = bytes().u16(3).u32(s.minimum).u32(s.preferred).u32(s.maximum).buf();
    t.same(H.encodeInfoBlockSize(s), wire, `INFO_BLOCK_SIZE ${s.minimum}/${s.preferred}/${s.maximum}`);
    t.same(H.parseInfoPayload(wire), { type: NBD_INFO_BLOCK_SIZE, sizes: s }, 'parse INFO_BLOCK_SIZE');
  }
});

t.test('parseInfoPayload: unknown types and malformed payloads', async (t) => {
  const unknown = bytes().u16(0x1234).raw([1, 2, 3]).buf();
  t.same(H.parseInfoPayload(unknown), { type: 0x1234, unknown: Buffer.from([1, 2, 3]) }, 'unknown type kept as bytes');
  t.same(H.parseInfoPayload(bytes().u16(4).buf()), { type: 4, unknown: Buffer.alloc(0) }, 'unknown type, empty');
  t.equal(H.parseInfoPayload(Buffer.alloc(0)), undefined, 'empty');
  t.equal(H.parseInfoPayload(Buffer.alloc(1)), undefined, 'one byte');
  const exp = bytes().u16(0).u64(4096).u16(1).buf();
  everyPrefixRefused(t, exp, H.parseInfoPayload, 'INFO_EXPORT');
  t.equal(H.parseInfoPayload(cat(exp, Buffer.alloc(1))), undefined, 'INFO_EXPORT with a trailing byte');
  const bs = bytes().u16(3).u32(1).u32(4096).u32(65536).buf();
  everyPrefixRefused(t, bs, H.parseInfoPayload, 'INFO_BLOCK_SIZE');
  t.equal(H.parseInfoPayload(cat(bs, Buffer.alloc(1))), undefined, 'INFO_BLOCK_SIZE with a trailing byte');
  t.equal(H.parseInfoPayload(bytes().u16(1).str(asciiOfLength(4097)).buf()), undefined, 'INFO_NAME of 4097 bytes');
  t.equal(H.parseInfoPayload(bytes().u16(2).str(asciiOfLength(4097)).buf()), undefined, 'INFO_DESCRIPTION of 4097 bytes');
});

t.test('encodeExportNameReply / decodeExportNameReply', async (t) => {
  const cases: [number, number][] = [
    [0, 0],
    [1 << 20, NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH],
    [2 ** 53 - 1, 0xffff],
  ];
  for (const [size, flags] of cases) {
    const short = bytes().u64(size).u16(flags).buf();
    const long = bytes().u64(size).u16(flags).zeros(124).buf();
    t.same(H.encodeExportNameReply(size, flags, true), short, `NO_ZEROES: size ${size}`);
    t.same(H.encodeExportNameReply(size, flags, false), long, `with zeroes: size ${size}`);
    t.same(H.decodeExportNameReply(short, true), { size, flags, length: 10 }, 'decode NO_ZEROES');
    t.same(H.decodeExportNameReply(long, false), { size, flags, length: 134 }, 'decode with zeroes');
    t.same(H.decodeExportNameReply(cat(Buffer.alloc(3), long), false, 3), { size, flags, length: 134 }, 'at an offset');
  }
  const long = bytes().u64(512).u16(1).zeros(124).buf();
  everyPrefixNeedsMore(t, long.subarray(0, 10), (b, off) => H.decodeExportNameReply(b, true, off), 'export-name reply (NO_ZEROES)');
  everyPrefixNeedsMore(t, long, (b, off) => H.decodeExportNameReply(b, false, off), 'export-name reply (zeroes)');
});

// -------------------------------------------------------------------------------------------------------------
// Whole streams

type ServerMsg =
  | { kind: 'greeting'; flags: number }
  | { kind: 'reply'; option: number; type: number; body: unknown }
  | { kind: 'exportName'; size: number; flags: number };

/** Decode server → client handshake messages from a FrameReader as far as the buffered bytes allow. */
class ClientSide {
  readonly reader = new FrameReader();
  readonly out: ServerMsg[] = [];
  private state: 'greeting' | 'replies' | 'exportName' | 'done' = 'greeting';
  constructor(private readonly noZeroes: boolean) {}

  push(chunk: Buffer): void {
    this.reader.push(chunk);
    for (;;) if (!this.step()) return;
  }

  private step(): boolean {
    const r = this.reader;
    switch (this.state) {
      case 'greeting': {
        const g = H.decodeGreeting(r.peek(Math.min(r.length, 18))!);
        if (g === null) return false;
        r.consume(18);
        this.out.push({ kind: 'greeting', flags: g.handshakeFlags });
        this.state = 'replies';
        return true;
      }
      case 'replies': {
        const h = H.decodeOptionReplyHeader(r.peek(Math.min(r.length, 20))!);
        if (h === null || r.length < 20 + h.length) return false;
        r.consume(20);
        const payload = r.take(h.length)!;
        this.out.push({ kind: 'reply', option: h.option, type: h.type, body: parseReplyBody(h.type, payload) });
        // In this script the LIST's final ACK is followed by EXPORT_NAME, whose reply has no header.
        if (h.option === NBD_OPT_LIST && h.type === NBD_REP_ACK) this.state = 'exportName';
        return true;
      }
      case 'exportName': {
        // Decode straight from a flat copy with an offset, to exercise off on partial data too.
        const all = r.peek(r.length)!;
        const e = H.decodeExportNameReply(cat(Buffer.from([0xff]), all), this.noZeroes, 1);
        if (e === null) return false;
        r.consume(e.length);
        this.out.push({ kind: 'exportName', size: e.size, flags: e.flags });
        this.state = 'done';
        return true;
      }
      case 'done':
        return false;
    }
  }
}

function parseReplyBody(type: number, payload: Buffer): unknown {
  if (isRepError(type)) return H.parseErrorReplyMessage(payload);
  switch (type) {
    case NBD_REP_ACK:
      return payload.length;
    case NBD_REP_SERVER:
      return H.parseServerReply(payload);
    case NBD_REP_INFO:
      return H.parseInfoPayload(payload);
    case NBD_REP_META_CONTEXT:
      return H.parseMetaContextReply(payload);
    default:
      return payload.toString('hex');
  }
}

function serverStream(noZeroes: boolean): { wire: Buffer; expected: ServerMsg[] } {
  const expected: ServerMsg[] = [];
  const b = bytes();
  const hsFlags = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;
  b.str('NBDMAGIC').str('IHAVEOPT').u16(hsFlags);
  expected.push({ kind: 'greeting', flags: hsFlags });
  const reply = (option: number, type: number, payload: Buffer, body: unknown): void => {
    b.u64(REP_MAGIC).u32(option).u32(type).u32(payload.length).raw(payload);
    expected.push({ kind: 'reply', option, type, body });
  };
  reply(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, Buffer.alloc(0), 0);
  reply(NBD_OPT_SET_META_CONTEXT, NBD_REP_META_CONTEXT, bytes().u32(1).str('base:allocation').buf(), { id: 1, name: 'base:allocation' });
  reply(NBD_OPT_SET_META_CONTEXT, NBD_REP_ACK, Buffer.alloc(0), 0);
  reply(NBD_OPT_INFO, NBD_REP_INFO, bytes().u16(0).u64(2 ** 40).u16(0x4d).buf(), { type: 0, size: 2 ** 40, flags: 0x4d });
  reply(NBD_OPT_INFO, NBD_REP_INFO, bytes().u16(3).u32(1).u32(4096).u32(1 << 25).buf(), {
    type: 3,
    sizes: { minimum: 1, preferred: 4096, maximum: 1 << 25 },
  });
  reply(NBD_OPT_INFO, NBD_REP_INFO, bytes().u16(2).str('é').buf(), { type: 2, description: 'é' });
  reply(NBD_OPT_INFO, NBD_REP_ACK, Buffer.alloc(0), 0);
  reply(NBD_OPT_GO, NBD_REP_ERR_UNKNOWN, Buffer.from('no such export'), 'no such export');
  reply(NBD_OPT_LIST_META_CONTEXT, NBD_REP_ERR_UNSUP, Buffer.alloc(0), '');
  reply(NBD_OPT_LIST, NBD_REP_SERVER, bytes().str32('disk').str('desc').buf(), { name: 'disk', description: 'desc' });
  reply(NBD_OPT_LIST, NBD_REP_SERVER, bytes().str32('').buf(), { name: '', description: '' });
  reply(NBD_OPT_LIST, NBD_REP_ACK, Buffer.alloc(0), 0);
  b.u64(2 ** 33).u16(0x0103);
  if (!noZeroes) b.zeros(124);
  expected.push({ kind: 'exportName', size: 2 ** 33, flags: 0x0103 });
  return { wire: b.buf(), expected };
}

type ClientMsg = { kind: 'flags'; flags: number } | { kind: 'option'; option: number; body: unknown };

/** Decode client → server handshake messages (the server's view). */
class ServerSide {
  readonly reader = new FrameReader();
  readonly out: ClientMsg[] = [];
  private gotFlags = false;

  push(chunk: Buffer): void {
    this.reader.push(chunk);
    for (;;) if (!this.step()) return;
  }

  private step(): boolean {
    const r = this.reader;
    if (!this.gotFlags) {
      const f = H.decodeClientFlags(r.peek(Math.min(r.length, 4))!);
      if (f === null) return false;
      r.consume(4);
      this.out.push({ kind: 'flags', flags: f });
      this.gotFlags = true;
      return true;
    }
    const h = H.decodeOptionHeader(r.peek(Math.min(r.length, 16))!);
    if (h === null || r.length < 16 + h.length) return false;
    r.consume(16);
    this.out.push({ kind: 'option', option: h.option, body: parseOptionBody(h.option, r.take(h.length)!) });
    return true;
  }
}

function parseOptionBody(option: number, data: Buffer): unknown {
  if (option === NBD_OPT_GO || option === NBD_OPT_INFO) return H.parseInfoRequest(data);
  if (option === NBD_OPT_SET_META_CONTEXT || option === NBD_OPT_LIST_META_CONTEXT) return H.parseMetaContextRequest(data);
  if (option === NBD_OPT_EXPORT_NAME) return H.parseExportNameRequest(data);
  return data.length;
}

function clientStream(): { wire: Buffer; expected: ClientMsg[] } {
  const expected: ClientMsg[] = [];
  const b = bytes().u32(3);
  expected.push({ kind: 'flags', flags: 3 });
  const opt = (option: number, data: Buffer, body: unknown): void => {
    b.str('IHAVEOPT').u32(option).u32(data.length).raw(data);
    expected.push({ kind: 'option', option, body });
  };
  opt(NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(0), 0);
  opt(NBD_OPT_SET_META_CONTEXT, bytes().str32('disk').u32(1).str32('base:allocation').buf(), { name: 'disk', queries: ['base:allocation'] });
  opt(NBD_OPT_LIST_META_CONTEXT, bytes().str32('').u32(0).buf(), { name: '', queries: [] });
  opt(NBD_OPT_LIST, Buffer.alloc(0), 0);
  opt(NBD_OPT_INFO, bytes().str32('disk').u16(2).u16(3).u16(1).buf(), { name: 'disk', infos: [3, 1] });
  opt(NBD_OPT_GO, bytes().str32('ü').u16(0).buf(), { name: 'ü', infos: [] });
  opt(NBD_OPT_EXPORT_NAME, Buffer.from('disk'), 'disk');
  return { wire: b.buf(), expected };
}

function runSplits<M>(
  t: tap.Test,
  wire: Buffer,
  expected: M[],
  make: () => { push(b: Buffer): void; out: M[] },
  what: string,
  stride3 = 1,
): void {
  const want = JSON.stringify(expected);
  const check = (pieces: Buffer[]): boolean => {
    const d = make();
    for (const p of pieces) d.push(p);
    return JSON.stringify(d.out) === want;
  };
  const whole = make();
  whole.push(wire);
  t.same(whole.out, expected, `${what}: one piece`);
  let bad = 0;
  let n = 0;
  let firstBad: number[] | undefined;
  for (const pieces of splits2(wire)) {
    n++;
    if (!check(pieces)) {
      bad++;
      firstBad ??= [pieces[0]!.length];
    }
  }
  t.equal(bad, 0, `${what}: all ${n} two-way splits`, { firstBad });
  bad = 0;
  n = 0;
  for (const pieces of splits3(wire, stride3)) {
    n++;
    if (!check(pieces)) {
      bad++;
      firstBad ??= [pieces[0]!.length, pieces[1]!.length];
    }
  }
  t.equal(bad, 0, `${what}: all ${n} three-way splits`, { firstBad });
  t.ok(check([...wire].map((x) => Buffer.from([x]))), `${what}: one byte at a time`);
}

t.test('server → client stream split at every offset', async (t) => {
  for (const noZeroes of [true, false]) {
    const { wire, expected } = serverStream(noZeroes);
    // The 124 zero bytes add nothing new to cut, so the zeroes variant samples its second cut.
    runSplits(t, wire, expected, () => new ClientSide(noZeroes), `greeting + option replies (noZeroes=${noZeroes})`, noZeroes ? 1 : 7);
  }
});

t.test('client → server stream split at every offset', async (t) => {
  const { wire, expected } = clientStream();
  runSplits(t, wire, expected, () => new ServerSide(), 'client flags + options');
});

t.test('decoders on every prefix of a flat stream with offsets never throw and stay in step', async (t) => {
  const { wire, expected } = clientStream();
  let bad = 0;
  for (let len = 0; len <= wire.length; len++) {
    const buf = wire.subarray(0, len);
    const got: ClientMsg[] = [];
    try {
      const f = H.decodeClientFlags(buf, 0);
      if (f !== null) {
        got.push({ kind: 'flags', flags: f });
        let off = 4;
        for (;;) {
          const h = H.decodeOptionHeader(buf, off);
          if (h === null || buf.length - off - 16 < h.length) break;
          got.push({ kind: 'option', option: h.option, body: parseOptionBody(h.option, buf.subarray(off + 16, off + 16 + h.length)) });
          off += 16 + h.length;
        }
      }
    } catch {
      bad++;
      continue;
    }
    if (JSON.stringify(got) !== JSON.stringify(expected.slice(0, got.length))) bad++;
    if (len === wire.length && got.length !== expected.length) bad++;
  }
  t.equal(bad, 0, `all ${wire.length + 1} prefixes decode a prefix of the messages`);
});

t.test('payload parsers never throw on random or mutated input', async (t) => {
  const rnd = prng(42);
  const parsers: [string, (b: Buffer) => unknown][] = [
    ['parseInfoRequest', H.parseInfoRequest],
    ['parseMetaContextRequest', H.parseMetaContextRequest],
    ['parseExportNameRequest', H.parseExportNameRequest],
    ['parseServerReply', H.parseServerReply],
    ['parseMetaContextReply', H.parseMetaContextReply],
    ['parseInfoPayload', H.parseInfoPayload],
    ['parseErrorReplyMessage', H.parseErrorReplyMessage],
  ];
  const seeds = [
    H.encodeInfoRequest({ name: 'disk', infos: [0, 3] }),
    H.encodeMetaContextRequest({ name: 'disk', queries: ['base:allocation', 'x:'] }),
    H.encodeServerReply('disk', 'desc'),
    H.encodeMetaContextReply(7, 'base:allocation'),
    H.encodeInfoExport(4096, 1),
    H.encodeInfoBlockSize({ minimum: 1, preferred: 4096, maximum: 65536 }),
  ];
  for (const [name, parse] of parsers) {
    let threw = 0;
    for (let i = 0; i < 1500; i++) {
      let input: Buffer;
      if (i % 2 === 0) {
        input = Buffer.alloc(Math.floor(rnd() * 40));
        for (let j = 0; j < input.length; j++) input[j] = Math.floor(rnd() * 256);
      } else {
        input = Buffer.from(seeds[i % seeds.length]!);
        const flips = 1 + Math.floor(rnd() * 3);
        for (let k = 0; k < flips && input.length > 0; k++) input[Math.floor(rnd() * input.length)] = Math.floor(rnd() * 256);
        input = input.subarray(0, Math.floor(rnd() * (input.length + 1)));
      }
      try {
        parse(input);
      } catch {
        threw++;
      }
    }
    t.equal(threw, 0, `${name}: 1500 random inputs, no throw`);
  }
});
