// lib/protocol/request.ts: the 28-byte request header against the spec layout, edge values, every prefix,
// bad magic, and a request stream with write payloads cut at every offset.

import t from 'tap';
import { decodeRequest, encodeRequest, type Request } from '../../../lib/protocol/request';
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
} from '../../../lib/protocol/constants';
import { FrameReader } from '../../../lib/protocol/frame-reader';
import { NbdmirrorError, ProtocolError } from '../../../lib/errors';
import { bytes, cat, prng, splits2, splits3 } from '../../helpers/bytes';

const REQUEST_MAGIC = 0x25609513; // spec literal
const MAX_COOKIE = 2n ** 64n - 1n;

function wireOf(r: Request): Buffer {
  return bytes().u32(REQUEST_MAGIC).u16(r.flags).u16(r.type).u64(r.cookie).u64(r.offset).u32(r.length).buf();
}

const table: Request[] = [
  { flags: 0, type: NBD_CMD_READ, cookie: 1n, offset: 0, length: 4096 },
  { flags: NBD_CMD_FLAG_FUA, type: NBD_CMD_WRITE, cookie: 2n, offset: 512, length: 13 },
  { flags: 0, type: NBD_CMD_DISC, cookie: 0n, offset: 0, length: 0 },
  { flags: 0, type: NBD_CMD_FLUSH, cookie: 0xdeadbeefcafef00dn, offset: 0, length: 0 },
  { flags: NBD_CMD_FLAG_FUA, type: NBD_CMD_TRIM, cookie: 3n, offset: 2 ** 32, length: 2 ** 20 },
  { flags: 0, type: NBD_CMD_CACHE, cookie: 4n, offset: 2 ** 32 - 1, length: 1 },
  { flags: NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO, type: NBD_CMD_WRITE_ZEROES, cookie: 5n, offset: 2 ** 40, length: 0xffffffff },
  { flags: NBD_CMD_FLAG_REQ_ONE, type: NBD_CMD_BLOCK_STATUS, cookie: MAX_COOKIE, offset: 2 ** 53 - 1, length: 0xffffffff },
  { flags: 0xffff, type: 0xffff, cookie: 1n << 63n, offset: 2 ** 53 - 4096, length: 0x80000000 },
];

function label(r: Request): string {
  return `type ${r.type} flags 0x${r.flags.toString(16)} cookie ${r.cookie} offset ${r.offset} length ${r.length}`;
}

t.test('encodeRequest against the byte table', async (t) => {
  for (const r of table) t.same(encodeRequest(r), wireOf(r), label(r));
});

t.test('decodeRequest against the byte table', async (t) => {
  for (const r of table) {
    t.same(decodeRequest(wireOf(r)), r, label(r));
    t.same(decodeRequest(cat(Buffer.alloc(11, 0xaa), wireOf(r), Buffer.alloc(3)), 11), r, `at an offset: ${label(r)}`);
  }
});

t.test('encodeRequest into a caller buffer at an offset touches only its 28 bytes', async (t) => {
  const target = Buffer.alloc(40, 0x5a);
  const r = table[1]!;
  const got = encodeRequest(r, target, 6);
  t.equal(got, target, 'returns the target');
  t.same(target, bytes().fill(6, 0x5a).raw(wireOf(r)).fill(6, 0x5a).buf());
});

t.test('round trips over random requests, offsets up to 2^53 - 1', async (t) => {
  const rnd = prng(7);
  const u32 = (): number => Math.floor(rnd() * 2 ** 32);
  let bad = 0;
  for (let i = 0; i < 2000; i++) {
    const r: Request = {
      flags: Math.floor(rnd() * 2 ** 16),
      type: Math.floor(rnd() * 2 ** 16),
      cookie: (BigInt(u32()) << 32n) | BigInt(u32()),
      offset: Math.floor(rnd() * 2 ** 21) * 2 ** 32 + u32(),
      length: u32(),
    };
    const enc = encodeRequest(r);
    if (!enc.equals(wireOf(r))) bad++;
    if (JSON.stringify(decodeRequest(enc), (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v)) !==
      JSON.stringify(r, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v))) bad++;
  }
  t.equal(bad, 0, '2000 random requests encode to the layout and decode back');
});

t.test('offsets past 2^53 decode to a number past any export size', async (t) => {
  const r = decodeRequest(bytes().u32(REQUEST_MAGIC).u16(0).u16(0).u64(0n).u64(2n ** 64n - 1n).u32(1).buf());
  t.ok(r !== null && r.offset > Number.MAX_SAFE_INTEGER, 'all-ones offset');
  const s = decodeRequest(bytes().u32(REQUEST_MAGIC).u16(0).u16(0).u64(0n).u64(2n ** 53n + 1n).u32(1).buf());
  t.ok(s !== null && s.offset > Number.MAX_SAFE_INTEGER, '2^53 + 1');
});

t.test('encodeRequest refuses a length that does not fit 32 bits', async (t) => {
  t.throws(() => encodeRequest({ flags: 0, type: NBD_CMD_WRITE, cookie: 1n, offset: 0, length: 2 ** 32 }), RangeError, '2^32');
  t.throws(() => encodeRequest({ flags: 0, type: NBD_CMD_READ, cookie: 1n, offset: 0, length: -1 }), RangeError, '-1');
});

t.test('every prefix needs more and never throws', async (t) => {
  for (const r of [table[0]!, table[7]!]) {
    const wire = wireOf(r);
    let bad = 0;
    for (let i = 0; i < wire.length; i++) {
      try {
        if (decodeRequest(wire.subarray(0, i)) !== null) bad++;
        if (decodeRequest(cat(Buffer.alloc(5), wire.subarray(0, i)), 5) !== null) bad++;
      } catch {
        bad++;
      }
    }
    t.equal(bad, 0, `all 28 prefixes of ${label(r)}`);
  }
  // A bad magic is only judged once the whole header is there.
  t.equal(decodeRequest(Buffer.alloc(27)), null, '27 zero bytes need more');
});

t.test('bad magic throws ProtocolError', async (t) => {
  const good = wireOf(table[0]!);
  const check = (buf: Buffer, what: string, off = 0): void => {
    let err: unknown;
    try {
      decodeRequest(buf, off);
    } catch (e) {
      err = e;
    }
    t.ok(err instanceof ProtocolError && err instanceof NbdmirrorError && err.code === 'PROTOCOL', what);
  };
  for (let i = 0; i < 4; i++) {
    const bad = Buffer.from(good);
    bad[i]! ^= 0x04;
    check(bad, `magic byte ${i} flipped`);
  }
  check(Buffer.alloc(28), 'zero magic');
  check(bytes().u32(0x67446698).zeros(24).buf(), 'simple reply magic');
  check(bytes().u32(0x668e33ef).zeros(24).buf(), 'structured reply magic');
  check(cat(Buffer.alloc(1), good), 'off by one byte', 0);
  check(cat(good, good), 'misaligned offset', 1);
});

// -------------------------------------------------------------------------------------------------------------
// A request stream as the server reads it: header, then for WRITE exactly `length` payload bytes.

type Got = { req: Request; payload?: string };

class ServerReader {
  readonly reader = new FrameReader();
  readonly out: Got[] = [];
  private pending: { req: Request; buf: Buffer; got: number } | undefined;

  push(chunk: Buffer): void {
    this.reader.push(chunk);
    for (;;) {
      if (this.pending !== undefined) {
        const p = this.pending;
        p.got += this.reader.readInto(p.buf, p.got, p.buf.length - p.got);
        if (p.got < p.buf.length) return;
        this.out.push({ req: p.req, payload: p.buf.toString('hex') });
        this.pending = undefined;
        continue;
      }
      const req = decodeRequest(this.reader.peek(Math.min(this.reader.length, 28))!);
      if (req === null) return;
      this.reader.consume(28);
      if (req.type === NBD_CMD_WRITE) this.pending = { req, buf: Buffer.alloc(req.length), got: 0 };
      else this.out.push({ req });
    }
  }
}

function requestStream(): { wire: Buffer; expected: Got[] } {
  const items: { req: Request; payload?: Buffer }[] = [
    { req: { flags: NBD_CMD_FLAG_FUA, type: NBD_CMD_WRITE, cookie: 1n, offset: 4096, length: 13 }, payload: Buffer.from('hello, world!') },
    { req: { flags: 0, type: NBD_CMD_READ, cookie: MAX_COOKIE, offset: 2 ** 53 - 1, length: 0xffffffff } },
    { req: { flags: 0, type: NBD_CMD_WRITE, cookie: 2n, offset: 0, length: 0 }, payload: Buffer.alloc(0) },
    { req: { flags: 0, type: NBD_CMD_FLUSH, cookie: 3n, offset: 0, length: 0 } },
    { req: { flags: 0, type: NBD_CMD_WRITE, cookie: 4n, offset: 2 ** 32, length: 7 }, payload: Buffer.from([1, 2, 3, 4, 5, 6, 7]) },
    { req: { flags: 0, type: NBD_CMD_DISC, cookie: 5n, offset: 0, length: 0 } },
  ];
  const parts: Buffer[] = [];
  const expected: Got[] = [];
  for (const it of items) {
    parts.push(wireOf(it.req));
    if (it.payload !== undefined) parts.push(it.payload);
    expected.push(it.payload === undefined ? { req: it.req } : { req: it.req, payload: it.payload.toString('hex') });
  }
  return { wire: Buffer.concat(parts), expected };
}

const bigJson = (v: unknown): string => JSON.stringify(v, (_k, x: unknown) => (typeof x === 'bigint' ? `${x}n` : x));

t.test('request stream with write payloads, split at every offset', async (t) => {
  const { wire, expected } = requestStream();
  const want = bigJson(expected);
  const run = (pieces: Buffer[]): string => {
    const s = new ServerReader();
    for (const p of pieces) s.push(p);
    return bigJson(s.out);
  };
  t.equal(run([wire]), want, 'one piece');
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
  t.equal(run([...wire].map((b) => Buffer.from([b]))), want, 'one byte at a time');
});

t.test('decodeRequest on every prefix of the flat stream, walking offsets', async (t) => {
  const { wire, expected } = requestStream();
  let bad = 0;
  for (let len = 0; len <= wire.length; len++) {
    const buf = wire.subarray(0, len);
    const got: Request[] = [];
    let off = 0;
    try {
      for (;;) {
        const r = decodeRequest(buf, off);
        if (r === null) break;
        const payload = r.type === NBD_CMD_WRITE ? r.length : 0;
        if (buf.length - off - 28 < payload) break;
        got.push(r);
        off += 28 + payload;
      }
    } catch {
      bad++;
      continue;
    }
    if (bigJson(got) !== bigJson(expected.slice(0, got.length).map((g) => g.req))) bad++;
    if (len === wire.length && got.length !== expected.length) bad++;
  }
  t.equal(bad, 0, `all ${wire.length + 1} prefixes`);
});
