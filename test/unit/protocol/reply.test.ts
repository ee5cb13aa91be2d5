// lib/protocol/reply.ts: simple replies and structured chunks against the spec layouts, chunk payload parsers
// on truncated and malformed payloads, and a reply stream cut at every offset.

import t from 'tap';
import * as R from '../../../lib/protocol/reply';
import {
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOSPC,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_ERROR_OFFSET,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
  isReplyTypeError,
} from '../../../lib/protocol/constants';
import { FrameReader } from '../../../lib/protocol/frame-reader';
import { NbdmirrorError, ProtocolError } from '../../../lib/errors';
import { asciiOfLength, bytes, cat, prng, splits2, splits3 } from '../../helpers/bytes';

// Spec literals.
const SIMPLE = 0x67446698;
const STRUCTURED = 0x668e33ef;
const T_NONE = 0;
const T_DATA = 1;
const T_HOLE = 2;
const T_BS = 5;
const T_ERR = 2 ** 15 + 1;
const T_ERR_OFF = 2 ** 15 + 2;
const MAX_COOKIE = 2n ** 64n - 1n;
const UNICODE = 'ошибка: 磁盘已满 😱';

const chunk = (flags: number, type: number, cookie: bigint, length: number) =>
  bytes().u32(STRUCTURED).u16(flags).u16(type).u64(cookie).u32(length);

function throwsProtocol(t: tap.Test, fn: () => unknown, msg: string): void {
  let err: unknown;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  t.ok(err instanceof ProtocolError && err instanceof NbdmirrorError && err.code === 'PROTOCOL', msg);
}

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
// Encoders

t.test('encodeSimpleReply byte table', async (t) => {
  const cases: [bigint, number][] = [
    [0n, 0],
    [1n, NBD_EIO],
    [0x0102030405060708n, NBD_ENOSPC],
    [MAX_COOKIE, 0xffffffff],
  ];
  for (const [cookie, error] of cases) {
    const wire = bytes().u32(SIMPLE).u32(error).u64(cookie).buf();
    t.same(R.encodeSimpleReply(cookie, error), wire, `cookie ${cookie} error ${error}`);
    t.same(R.decodeReplyHeader(wire), { kind: 'simple', error, cookie, headerSize: 16 }, 'decodes back');
  }
  const target = Buffer.alloc(24, 0x77);
  t.equal(R.encodeSimpleReply(9n, 0, target, 4), target, 'returns the target');
  t.same(target, bytes().fill(4, 0x77).u32(SIMPLE).u32(0).u64(9n).fill(4, 0x77).buf(), 'writes only its 16 bytes');
});

t.test('chunk encoders with a target write the same bytes at the offset and nothing else', async (t) => {
  const cases: Array<[string, (target?: Buffer, off?: number) => Buffer]> = [
    ['NONE', (b, o) => (b === undefined ? R.encodeNoneChunk(MAX_COOKIE) : R.encodeNoneChunk(MAX_COOKIE, b, o))],
    ['OFFSET_DATA', (b, o) => (b === undefined ? R.encodeOffsetDataHeader(7n, 1, 2 ** 53 - 4096, 4096) : R.encodeOffsetDataHeader(7n, 1, 2 ** 53 - 4096, 4096, b, o))],
    ['OFFSET_HOLE', (b, o) => (b === undefined ? R.encodeOffsetHole(8n, 0, 0x1_2345_6000, 512) : R.encodeOffsetHole(8n, 0, 0x1_2345_6000, 512, b, o))],
  ];
  for (const [name, enc] of cases) {
    const fresh = enc();
    const target = Buffer.alloc(fresh.length + 10, 0x55);
    t.equal(enc(target, 5), target, `${name}: returns the target`);
    t.same(target.subarray(5, 5 + fresh.length), fresh, `${name}: same bytes as a fresh buffer`);
    t.ok(target.subarray(0, 5).every((x) => x === 0x55) && target.subarray(5 + fresh.length).every((x) => x === 0x55), `${name}: nothing else touched`);
  }
  t.equal(R.parseOffsetData(Buffer.concat([R.encodeOffsetDataHeader(1n, 0, 2 ** 53 - 4096, 1).subarray(20), Buffer.alloc(1)]))!.offset, 2 ** 53 - 4096, 'an offset past 2^32 round-trips (written as two words)');
});

t.test('encodeChunkHeader / encodeNoneChunk byte table', async (t) => {
  const cases: [bigint, number, number, number][] = [
    [1n, 0, T_DATA, 9],
    [MAX_COOKIE, NBD_REPLY_FLAG_DONE, T_ERR, 6],
    [0n, 0xffff, 0xffff, 0xffffffff],
  ];
  for (const [cookie, flags, type, length] of cases) {
    const wire = chunk(flags, type, cookie, length).buf();
    t.same(R.encodeChunkHeader(cookie, flags, type, length), wire, `type ${type} length ${length}`);
    t.same(R.decodeReplyHeader(wire), { kind: 'structured', flags, type, cookie, length, headerSize: 20 }, 'decodes back');
  }
  t.same(R.encodeNoneChunk(42n), chunk(1, T_NONE, 42n, 0).buf(), 'NONE is DONE with no payload');
  t.same(R.encodeNoneChunk(MAX_COOKIE), chunk(1, T_NONE, MAX_COOKIE, 0).buf(), 'NONE with the max cookie');
  t.throws(() => R.encodeChunkHeader(1n, 0, T_DATA, 2 ** 32), RangeError, 'a length past 32 bits throws, not wraps');
});

t.test('encodeOffsetDataHeader byte table', async (t) => {
  const cases: [bigint, number, number, number][] = [
    [1n, 0, 0, 1],
    [2n, NBD_REPLY_FLAG_DONE, 4096, 65536],
    [MAX_COOKIE, 0, 2 ** 53 - 1, 0xffffffff - 8],
  ];
  for (const [cookie, flags, offset, dataLength] of cases) {
    const wire = chunk(flags, T_DATA, cookie, 8 + dataLength).u64(offset).buf();
    t.same(R.encodeOffsetDataHeader(cookie, flags, offset, dataLength), wire, `offset ${offset} data ${dataLength}`);
  }
  t.throws(() => R.encodeOffsetDataHeader(1n, 0, 0, 0xffffffff - 7), RangeError, 'data too long for one chunk throws');
});

t.test('encodeOffsetHole byte table', async (t) => {
  const cases: [bigint, number, number, number][] = [
    [1n, 0, 0, 1],
    [7n, NBD_REPLY_FLAG_DONE, 2 ** 40, 0xffffffff],
    [MAX_COOKIE, 0, 2 ** 53 - 1, 512],
  ];
  for (const [cookie, flags, offset, size] of cases) {
    const wire = chunk(flags, T_HOLE, cookie, 12).u64(offset).u32(size).buf();
    const enc = R.encodeOffsetHole(cookie, flags, offset, size);
    t.same(enc, wire, `offset ${offset} size ${size}`);
    t.same(R.parseOffsetHole(enc.subarray(20)), { offset, size }, 'payload parses back');
  }
});

t.test('encodeBlockStatus byte table', async (t) => {
  const cases: [number, R.Extent[]][] = [
    [1, [{ length: 4096, flags: 0 }]],
    [0xffffffff, [{ length: 1, flags: NBD_STATE_HOLE }, { length: 0xffffffff, flags: NBD_STATE_HOLE | NBD_STATE_ZERO }, { length: 512, flags: 0xffffffff }]],
  ];
  for (const [ctx, extents] of cases) {
    const b = chunk(NBD_REPLY_FLAG_DONE, T_BS, 9n, 4 + 8 * extents.length).u32(ctx);
    for (const e of extents) b.u32(e.length).u32(e.flags);
    const wire = b.buf();
    const enc = R.encodeBlockStatus(9n, NBD_REPLY_FLAG_DONE, ctx, extents);
    t.same(enc, wire, `context ${ctx}, ${extents.length} extents`);
    t.same(R.parseBlockStatus(enc.subarray(20)), { contextId: ctx, extents }, 'payload parses back');
  }
});

t.test('encodeErrorChunk byte table', async (t) => {
  const cases: [number, number, string][] = [
    [NBD_REPLY_FLAG_DONE, NBD_EINVAL, ''],
    [NBD_REPLY_FLAG_DONE, NBD_EIO, 'read failed'],
    [0, NBD_ENOSPC, UNICODE],
    [NBD_REPLY_FLAG_DONE, 0xffffffff, asciiOfLength(4096)],
  ];
  for (const [flags, error, message] of cases) {
    const msg = Buffer.from(message);
    const wire = chunk(flags, T_ERR, 3n, 6 + msg.length).u32(error).u16(msg.length).raw(msg).buf();
    const enc = R.encodeErrorChunk(3n, flags, error, message);
    t.same(enc, wire, `error ${error}, message of ${msg.length} bytes`);
    t.same(R.parseErrorChunk(T_ERR, enc.subarray(20)), { error, message }, 'payload parses back');
  }
  t.same(R.encodeErrorChunk(1n, 1, 5), chunk(1, T_ERR, 1n, 6).u32(5).u16(0).buf(), 'message defaults to empty');
});

t.test('encodeErrorChunk cuts long messages to 4096 bytes on a character boundary', async (t) => {
  const ascii = R.encodeErrorChunk(1n, 1, NBD_EIO, asciiOfLength(5000));
  t.same(ascii, chunk(1, T_ERR, 1n, 6 + 4096).u32(NBD_EIO).u16(4096).str(asciiOfLength(4096)).buf(), 'ASCII: exactly 4096');
  // 4095 ASCII bytes then a 4-byte emoji: the emoji does not fit and must not be split.
  const straddle = asciiOfLength(4095) + '😀' + 'tail';
  const enc = R.encodeErrorChunk(1n, 1, NBD_EIO, straddle);
  const parsed = R.parseErrorChunk(T_ERR, enc.subarray(20));
  t.same(parsed, { error: NBD_EIO, message: asciiOfLength(4095) }, 'the straddling character is dropped whole');
  t.notOk(parsed?.message.includes('\ufffd'), 'no replacement character');
  const cyr = 'я'.repeat(3000); // 6000 bytes of 2-byte characters
  const p2 = R.parseErrorChunk(T_ERR, R.encodeErrorChunk(1n, 1, NBD_EIO, cyr).subarray(20));
  t.same(p2, { error: NBD_EIO, message: 'я'.repeat(2048) }, '2-byte characters: 2048 of them');
});

// -------------------------------------------------------------------------------------------------------------
// decodeReplyHeader

t.test('decodeReplyHeader: every prefix needs more, never throws', async (t) => {
  const simple = bytes().u32(SIMPLE).u32(0).u64(5n).buf();
  const structured = chunk(1, T_NONE, 5n, 0).buf();
  for (const [name, wire] of [['simple', simple], ['structured', structured]] as const) {
    let bad = 0;
    for (let i = 0; i < wire.length; i++) {
      try {
        if (R.decodeReplyHeader(wire.subarray(0, i)) !== null) bad++;
        if (R.decodeReplyHeader(cat(Buffer.alloc(9), wire.subarray(0, i)), 9) !== null) bad++;
      } catch {
        bad++;
      }
    }
    t.equal(bad, 0, `${name}: all ${wire.length} prefixes`);
  }
  // Fewer than 4 bytes: even a bad magic is not judged yet.
  for (let i = 0; i < 4; i++) t.equal(R.decodeReplyHeader(Buffer.alloc(i, 0xff)), null, `${i} bytes of 0xff`);
});

t.test('decodeReplyHeader: bad magic throws ProtocolError', async (t) => {
  throwsProtocol(t, () => R.decodeReplyHeader(Buffer.alloc(4)), 'zero magic, 4 bytes');
  throwsProtocol(t, () => R.decodeReplyHeader(Buffer.alloc(20)), 'zero magic, 20 bytes');
  throwsProtocol(t, () => R.decodeReplyHeader(bytes().u32(0x25609513).zeros(24).buf()), 'request magic');
  const simple = bytes().u32(SIMPLE).u32(0).u64(5n).buf();
  for (let i = 0; i < 4; i++) {
    const bad = Buffer.from(simple);
    bad[i]! ^= 0x10;
    throwsProtocol(t, () => R.decodeReplyHeader(bad), `simple magic byte ${i} flipped`);
  }
  throwsProtocol(t, () => R.decodeReplyHeader(cat(Buffer.alloc(1), simple), 0), 'misaligned by one');
});

t.test('decodeReplyHeader at an offset', async (t) => {
  const wire = cat(Buffer.alloc(3), bytes().u32(SIMPLE).u32(22).u64(MAX_COOKIE).buf(), chunk(0, T_DATA, 8n, 9).buf());
  t.same(R.decodeReplyHeader(wire, 3), { kind: 'simple', error: 22, cookie: MAX_COOKIE, headerSize: 16 });
  t.same(R.decodeReplyHeader(wire, 19), { kind: 'structured', flags: 0, type: T_DATA, cookie: 8n, length: 9, headerSize: 20 });
});

// -------------------------------------------------------------------------------------------------------------
// Payload parsers

t.test('parseOffsetData', async (t) => {
  const payload = bytes().u64(2 ** 53 - 1).str('x').buf();
  const got = R.parseOffsetData(payload);
  t.equal(got?.offset, 2 ** 53 - 1, 'offset');
  t.same(got?.data, Buffer.from('x'), 'data');
  t.equal(got?.data.buffer, payload.buffer, 'data is a view, not a copy');
  t.equal(got?.data.byteOffset, payload.byteOffset + 8);
  const big = R.parseOffsetData(bytes().u64(4096).fill(1000, 0xab).buf());
  t.same(big, { offset: 4096, data: Buffer.alloc(1000, 0xab) }, '1000 bytes of data');
  for (let i = 0; i <= 8; i++) t.equal(R.parseOffsetData(payload.subarray(0, i)), undefined, `${i} bytes: no data`);
});

t.test('parseOffsetHole', async (t) => {
  const payload = bytes().u64(1024).u32(4096).buf();
  t.same(R.parseOffsetHole(payload), { offset: 1024, size: 4096 });
  everyPrefixRefused(t, payload, R.parseOffsetHole, 'OFFSET_HOLE');
  t.equal(R.parseOffsetHole(cat(payload, Buffer.alloc(1))), undefined, 'trailing byte');
  t.equal(R.parseOffsetHole(bytes().u64(1024).u32(0).buf()), undefined, 'hole size 0');
  t.same(R.parseOffsetHole(bytes().u64(0).u32(0xffffffff).buf()), { offset: 0, size: 0xffffffff }, 'max hole size');
});

t.test('parseBlockStatus', async (t) => {
  const payload = bytes().u32(1).u32(4096).u32(0).u32(8192).u32(3).buf();
  t.same(R.parseBlockStatus(payload), { contextId: 1, extents: [{ length: 4096, flags: 0 }, { length: 8192, flags: 3 }] });
  let bad = 0;
  for (let i = 0; i < payload.length; i++) {
    const got = R.parseBlockStatus(payload.subarray(0, i));
    // Only a cut after the first whole descriptor is itself a valid (shorter) chunk.
    if (i === 12 ? JSON.stringify(got) !== JSON.stringify({ contextId: 1, extents: [{ length: 4096, flags: 0 }] }) : got !== undefined) bad++;
  }
  t.equal(bad, 0, 'every truncation refused unless it ends on a descriptor boundary');
  t.equal(R.parseBlockStatus(bytes().u32(1).buf()), undefined, 'no descriptors');
  for (const extra of [1, 4, 7]) t.equal(R.parseBlockStatus(cat(payload, Buffer.alloc(extra))), undefined, `${extra} trailing bytes`);
  t.equal(R.parseBlockStatus(bytes().u32(1).u32(0).u32(0).buf()), undefined, 'zero-length extent');
  t.equal(R.parseBlockStatus(bytes().u32(1).u32(512).u32(0).u32(0).u32(1).buf()), undefined, 'zero-length second extent');
});

t.test('parseErrorChunk: ERROR', async (t) => {
  for (const msg of ['', 'bad', UNICODE, asciiOfLength(4096)]) {
    const m = Buffer.from(msg);
    const payload = bytes().u32(NBD_EINVAL).u16(m.length).raw(m).buf();
    t.same(R.parseErrorChunk(T_ERR, payload), { error: NBD_EINVAL, message: msg }, `message of ${m.length} bytes`);
    everyPrefixRefused(t, payload, (b) => R.parseErrorChunk(T_ERR, b), `ERROR with ${m.length}-byte message`);
    t.equal(R.parseErrorChunk(T_ERR, cat(payload, Buffer.alloc(1))), undefined, `trailing byte (${m.length}-byte message)`);
  }
  t.equal(R.parseErrorChunk(T_ERR, bytes().u32(5).u16(4).str('abc').buf()), undefined, 'message length overruns');
  t.equal(R.parseErrorChunk(T_ERR, bytes().u32(5).u16(0xffff).buf()), undefined, 'message length 65535 with no message');
  t.equal(R.parseErrorChunk(T_ERR, bytes().u32(5).u16(4097).str(asciiOfLength(4097)).buf()), undefined, 'message of 4097 bytes');
});

t.test('parseErrorChunk: ERROR_OFFSET', async (t) => {
  for (const [msg, offset] of [['', 0], ['at', 2 ** 40], [UNICODE, 2 ** 53 - 1]] as const) {
    const m = Buffer.from(msg);
    const payload = bytes().u32(NBD_EIO).u16(m.length).raw(m).u64(offset).buf();
    t.same(R.parseErrorChunk(T_ERR_OFF, payload), { error: NBD_EIO, message: msg, offset }, `offset ${offset}`);
    everyPrefixRefused(t, payload, (b) => R.parseErrorChunk(T_ERR_OFF, b), `ERROR_OFFSET at ${offset}`);
    t.equal(R.parseErrorChunk(T_ERR_OFF, cat(payload, Buffer.alloc(1))), undefined, 'trailing byte');
  }
  t.equal(R.parseErrorChunk(T_ERR_OFF, bytes().u32(5).u16(3).str('abc').u32(0).buf()), undefined, 'short offset');
});

t.test('parseErrorChunk: unknown error types keep error and message, allow trailing fields', async (t) => {
  const payload = bytes().u32(NBD_ENOSPC).u16(2).str('hi').u64(1n).u32(2).buf();
  t.same(R.parseErrorChunk(0x8003, payload), { error: NBD_ENOSPC, message: 'hi' });
  t.equal(R.parseErrorChunk(0x8003, bytes().u32(5).u16(9).str('hi').buf()), undefined, 'message length past the payload');
  t.equal(R.parseErrorChunk(0x8003, Buffer.alloc(5)), undefined, 'fewer than 6 bytes');
});

t.test('payload parsers never throw on random or mutated input', async (t) => {
  const rnd = prng(99);
  const parsers: [string, (b: Buffer) => unknown][] = [
    ['parseOffsetData', R.parseOffsetData],
    ['parseOffsetHole', R.parseOffsetHole],
    ['parseBlockStatus', R.parseBlockStatus],
    ['parseErrorChunk(ERROR)', (b) => R.parseErrorChunk(T_ERR, b)],
    ['parseErrorChunk(ERROR_OFFSET)', (b) => R.parseErrorChunk(T_ERR_OFF, b)],
    ['parseErrorChunk(0x8009)', (b) => R.parseErrorChunk(0x8009, b)],
  ];
  const seeds = [
    R.encodeOffsetHole(1n, 0, 4096, 512).subarray(20),
    R.encodeBlockStatus(1n, 0, 1, [{ length: 1, flags: 2 }, { length: 3, flags: 4 }]).subarray(20),
    R.encodeErrorChunk(1n, 1, 5, 'message').subarray(20),
    bytes().u32(5).u16(2).str('at').u64(77).buf(),
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
        for (let k = 0; k < 2; k++) input[Math.floor(rnd() * input.length)] = Math.floor(rnd() * 256);
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

// -------------------------------------------------------------------------------------------------------------
// A reply stream as the client reads it. A simple reply carries data only for a successful READ, whose length
// the client knows from its request; a structured chunk carries its own length.

type Outstanding = Map<bigint, { read: number }>;
type Msg = Record<string, unknown>;

class ClientReader {
  readonly reader = new FrameReader();
  readonly out: Msg[] = [];
  constructor(private readonly outstanding: Outstanding) {}

  push(b: Buffer): void {
    this.reader.push(b);
    for (;;) {
      const r = this.reader;
      const h = R.decodeReplyHeader(r.peek(Math.min(r.length, 20))!);
      if (h === null) return;
      if (h.kind === 'simple') {
        const dataLen = h.error === 0 ? (this.outstanding.get(h.cookie)?.read ?? 0) : 0;
        if (r.length < h.headerSize + dataLen) return;
        r.consume(h.headerSize);
        const data = r.take(dataLen)!;
        this.out.push({ kind: 'simple', cookie: String(h.cookie), error: h.error, data: data.toString('hex') });
        continue;
      }
      if (r.length < h.headerSize + h.length) return;
      r.consume(h.headerSize);
      const p = r.take(h.length)!;
      this.out.push({ kind: 'chunk', cookie: String(h.cookie), flags: h.flags, type: h.type, body: parseChunk(h.type, p) });
    }
  }
}

function parseChunk(type: number, p: Buffer): unknown {
  switch (type) {
    case NBD_REPLY_TYPE_NONE:
      return p.length;
    case NBD_REPLY_TYPE_OFFSET_DATA: {
      const d = R.parseOffsetData(p);
      return d && { offset: d.offset, data: d.data.toString('hex') };
    }
    case NBD_REPLY_TYPE_OFFSET_HOLE:
      return R.parseOffsetHole(p);
    case NBD_REPLY_TYPE_BLOCK_STATUS:
      return R.parseBlockStatus(p);
    default:
      return isReplyTypeError(type) ? R.parseErrorChunk(type, p) : 'unknown';
  }
}

function replyStream(): { wire: Buffer; expected: Msg[]; outstanding: Outstanding } {
  const outstanding: Outstanding = new Map([
    [2n, { read: 5 }],
    [3n, { read: 5 }],
  ]);
  const b = bytes();
  const expected: Msg[] = [];
  const simple = (cookie: bigint, error: number, data = Buffer.alloc(0)): void => {
    b.u32(SIMPLE).u32(error).u64(cookie).raw(data);
    expected.push({ kind: 'simple', cookie: String(cookie), error, data: data.toString('hex') });
  };
  const ch = (cookie: bigint, flags: number, type: number, payload: Buffer, body: unknown): void => {
    b.raw(chunk(flags, type, cookie, payload.length).raw(payload).buf());
    expected.push({ kind: 'chunk', cookie: String(cookie), flags, type, body });
  };
  simple(1n, 0);
  simple(2n, 0, Buffer.from('abcde'));
  simple(3n, NBD_EIO);
  ch(4n, 0, T_DATA, bytes().u64(1024).str('xyz').buf(), { offset: 1024, data: Buffer.from('xyz').toString('hex') });
  ch(4n, 0, T_HOLE, bytes().u64(1027).u32(4093).buf(), { offset: 1027, size: 4093 });
  ch(4n, NBD_REPLY_FLAG_DONE, T_NONE, Buffer.alloc(0), 0);
  ch(5n, NBD_REPLY_FLAG_DONE, T_BS, bytes().u32(1).u32(4096).u32(0).u32(65536).u32(3).buf(), {
    contextId: 1,
    extents: [{ length: 4096, flags: 0 }, { length: 65536, flags: 3 }],
  });
  ch(6n, NBD_REPLY_FLAG_DONE, T_ERR, bytes().u32(NBD_EINVAL).u16(3).str('bad').buf(), { error: NBD_EINVAL, message: 'bad' });
  ch(7n, 0, T_ERR_OFF, bytes().u32(NBD_EIO).u16(2).str('at').u64(2 ** 40).buf(), { error: NBD_EIO, message: 'at', offset: 2 ** 40 });
  ch(7n, NBD_REPLY_FLAG_DONE, T_NONE, Buffer.alloc(0), 0);
  simple(MAX_COOKIE, 0);
  return { wire: b.buf(), expected, outstanding };
}

t.test('the stream encoders produce what the byte builder does', async (t) => {
  // The same stream, built from the codec's encoders, is byte-identical.
  const { wire } = replyStream();
  const enc = Buffer.concat([
    R.encodeSimpleReply(1n, 0),
    R.encodeSimpleReply(2n, 0),
    Buffer.from('abcde'),
    R.encodeSimpleReply(3n, NBD_EIO),
    R.encodeOffsetDataHeader(4n, 0, 1024, 3),
    Buffer.from('xyz'),
    R.encodeOffsetHole(4n, 0, 1027, 4093),
    R.encodeNoneChunk(4n),
    R.encodeBlockStatus(5n, NBD_REPLY_FLAG_DONE, 1, [{ length: 4096, flags: 0 }, { length: 65536, flags: 3 }]),
    R.encodeErrorChunk(6n, NBD_REPLY_FLAG_DONE, NBD_EINVAL, 'bad'),
    R.encodeChunkHeader(7n, 0, NBD_REPLY_TYPE_ERROR_OFFSET, 16),
    bytes().u32(NBD_EIO).u16(2).str('at').u64(2 ** 40).buf(),
    R.encodeNoneChunk(7n),
    R.encodeSimpleReply(MAX_COOKIE, 0),
  ]);
  t.same(enc, wire);
  t.equal(NBD_REPLY_TYPE_ERROR, T_ERR);
});

t.test('reply stream split at every offset', async (t) => {
  const { wire, expected, outstanding } = replyStream();
  const want = JSON.stringify(expected);
  const run = (pieces: Buffer[]): string => {
    const c = new ClientReader(outstanding);
    for (const p of pieces) c.push(p);
    return JSON.stringify(c.out);
  };
  t.same(JSON.parse(run([wire])), expected, 'one piece');
  let bad = 0;
  let n = 0;
  for (const pieces of splits2(wire)) {
    n++;
    if (run(pieces) !== want) bad++;
  }
  t.equal(bad, 0, `all ${n} two-way splits`);
  bad = 0;
  n = 0;
  for (const pieces of splits3(wire)) {
    n++;
    if (run(pieces) !== want) bad++;
  }
  t.equal(bad, 0, `all ${n} three-way splits`);
  t.equal(run([...wire].map((x) => Buffer.from([x]))), want, 'one byte at a time');
});
