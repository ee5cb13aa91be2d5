// lib/server/validate.ts: one table of requests, each naming the error class it must produce (or null) and the
// errno toNbdErrno must put on the wire. Requests far past 2^53 are built as wire bytes and decoded, so the test
// covers what the server really sees for offsets it cannot represent exactly.

import t from 'tap';
import { validateRequest, type ValidateContext } from '../../../lib/server/validate';
import { decodeRequest, type Request } from '../../../lib/protocol/request';
import {
  InvalidRequestError,
  NbdmirrorError,
  NoSpaceError,
  OutOfRangeError,
  ReadOnlyError,
  TooLargeError,
  toNbdErrno,
} from '../../../lib/errors';
import { bytes } from '../../helpers/bytes';

// Wire values from doc/proto.md, written out.
const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7 } as const;
const F = { FUA: 1 << 0, NO_HOLE: 1 << 1, DF: 1 << 2, REQ_ONE: 1 << 3, FAST_ZERO: 1 << 4 } as const;
const TF = {
  HAS_FLAGS: 1 << 0, READ_ONLY: 1 << 1, SEND_FLUSH: 1 << 2, SEND_FUA: 1 << 3, SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6, SEND_DF: 1 << 7, CAN_MULTI_CONN: 1 << 8, SEND_CACHE: 1 << 10, SEND_FAST_ZERO: 1 << 11,
} as const;
const EPERM = 1;
const EINVAL = 22;
const ENOSPC = 28;

const MiB = 1024 * 1024;
const MAX_PAYLOAD = 32 * MiB;
const U32_MAX = 2 ** 32 - 1;

const ALL_FLAGS = TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_DF |
  TF.CAN_MULTI_CONN | TF.SEND_CACHE | TF.SEND_FAST_ZERO;
const RO_FLAGS = TF.HAS_FLAGS | TF.READ_ONLY | TF.SEND_FLUSH | TF.SEND_DF | TF.CAN_MULTI_CONN | TF.SEND_CACHE;

const SIZE = 1 * MiB;
/** A 1 TiB export, so requests up to 4 GiB-1 are inside it. */
const BIG = 2 ** 40;
/** The largest 4 KiB-aligned size below 2^53. */
const HUGE = 2 ** 53 - 4096;

const base: ValidateContext = { size: SIZE, flags: ALL_FLAGS, structuredReplies: true, baseAllocation: true };

type ErrorClass = new (...args: never[]) => NbdmirrorError;

interface Case {
  name: string;
  req: Partial<Request>;
  ctx?: Partial<ValidateContext>;
  /** null: the request is valid. */
  want: null | [ErrorClass, number];
  message?: RegExp;
}

const einval = (): [ErrorClass, number] => [InvalidRequestError, EINVAL];
const range = (): [ErrorClass, number] => [OutOfRangeError, EINVAL];
const nospace = (): [ErrorClass, number] => [NoSpaceError, ENOSPC];
const readOnly = (): [ErrorClass, number] => [ReadOnlyError, EPERM];
const tooLarge = (): [ErrorClass, number] => [TooLargeError, EINVAL];

const RO = { flags: RO_FLAGS };

const CASES: Case[] = [
  // ---- valid requests
  { name: 'READ at 0', req: { type: CMD.READ, offset: 0, length: 4096 }, want: null },
  { name: 'READ of the last byte', req: { type: CMD.READ, offset: SIZE - 1, length: 1 }, want: null },
  { name: 'READ of the whole export', req: { type: CMD.READ, offset: 0, length: SIZE }, want: null },
  { name: 'READ of 0 bytes at the end', req: { type: CMD.READ, offset: SIZE, length: 0 }, want: null },
  { name: 'READ with DF and structured replies', req: { type: CMD.READ, flags: F.DF, offset: 0, length: 512 }, want: null },
  { name: 'READ with FUA (valid on any command once negotiated)', req: { type: CMD.READ, flags: F.FUA, offset: 0, length: 1 }, want: null },
  { name: 'READ of exactly 32 MiB', req: { type: CMD.READ, offset: 0, length: MAX_PAYLOAD }, ctx: { size: BIG }, want: null },
  { name: 'WRITE', req: { type: CMD.WRITE, offset: 100, length: 1000 }, want: null },
  { name: 'WRITE FUA', req: { type: CMD.WRITE, flags: F.FUA, offset: 0, length: 1 }, want: null },
  { name: 'WRITE ending at the end', req: { type: CMD.WRITE, offset: SIZE - 512, length: 512 }, want: null },
  { name: 'WRITE of exactly 32 MiB', req: { type: CMD.WRITE, offset: 0, length: MAX_PAYLOAD }, ctx: { size: BIG }, want: null },
  { name: 'FLUSH', req: { type: CMD.FLUSH }, want: null },
  { name: 'FLUSH with FUA', req: { type: CMD.FLUSH, flags: F.FUA }, want: null },
  { name: 'TRIM', req: { type: CMD.TRIM, offset: 4096, length: 8192 }, want: null },
  { name: 'TRIM FUA', req: { type: CMD.TRIM, flags: F.FUA, offset: 0, length: SIZE }, want: null },
  { name: 'TRIM of 4 GiB-1', req: { type: CMD.TRIM, offset: 0, length: U32_MAX }, ctx: { size: BIG }, want: null },
  { name: 'WRITE_ZEROES', req: { type: CMD.WRITE_ZEROES, offset: 1, length: 10 }, want: null },
  { name: 'WRITE_ZEROES NO_HOLE', req: { type: CMD.WRITE_ZEROES, flags: F.NO_HOLE, offset: 0, length: 10 }, want: null },
  { name: 'WRITE_ZEROES FAST_ZERO', req: { type: CMD.WRITE_ZEROES, flags: F.FAST_ZERO, offset: 0, length: 10 }, want: null },
  {
    name: 'WRITE_ZEROES with every flag it may carry',
    req: { type: CMD.WRITE_ZEROES, flags: F.FUA | F.NO_HOLE | F.FAST_ZERO, offset: 0, length: 10 },
    want: null,
  },
  { name: 'WRITE_ZEROES of 4 GiB-1', req: { type: CMD.WRITE_ZEROES, offset: 0, length: U32_MAX }, ctx: { size: BIG }, want: null },
  { name: 'CACHE', req: { type: CMD.CACHE, offset: 0, length: SIZE }, want: null },
  { name: 'CACHE of 4 GiB-1', req: { type: CMD.CACHE, offset: 1, length: U32_MAX }, ctx: { size: BIG }, want: null },
  { name: 'BLOCK_STATUS', req: { type: CMD.BLOCK_STATUS, offset: 0, length: SIZE }, want: null },
  { name: 'BLOCK_STATUS REQ_ONE', req: { type: CMD.BLOCK_STATUS, flags: F.REQ_ONE, offset: 4096, length: 1 }, want: null },
  { name: 'BLOCK_STATUS of 4 GiB-1', req: { type: CMD.BLOCK_STATUS, offset: 0, length: U32_MAX }, ctx: { size: BIG }, want: null },
  { name: 'read-only: READ', req: { type: CMD.READ, offset: 0, length: 1 }, ctx: RO, want: null },
  { name: 'read-only: FLUSH', req: { type: CMD.FLUSH }, ctx: RO, want: null },
  { name: 'read-only: CACHE', req: { type: CMD.CACHE, offset: 0, length: 1 }, ctx: RO, want: null },
  { name: 'read-only: BLOCK_STATUS', req: { type: CMD.BLOCK_STATUS, offset: 0, length: 1 }, ctx: RO, want: null },
  { name: 'near 2^53: READ of the last byte', req: { type: CMD.READ, offset: HUGE - 1, length: 1 }, ctx: { size: HUGE }, want: null },
  { name: 'near 2^53: TRIM to the end', req: { type: CMD.TRIM, offset: HUGE - U32_MAX, length: U32_MAX }, ctx: { size: HUGE }, want: null },

  // ---- read-only is checked first: EPERM even when the range or flags are also wrong
  { name: 'read-only: WRITE', req: { type: CMD.WRITE, offset: 0, length: 1 }, ctx: RO, want: readOnly() },
  { name: 'read-only: TRIM', req: { type: CMD.TRIM, offset: 0, length: 1 }, ctx: RO, want: readOnly() },
  { name: 'read-only: WRITE_ZEROES', req: { type: CMD.WRITE_ZEROES, offset: 0, length: 1 }, ctx: RO, want: readOnly() },
  { name: 'read-only: WRITE past the end', req: { type: CMD.WRITE, offset: SIZE, length: 1 }, ctx: RO, want: readOnly() },
  { name: 'read-only: TRIM past the end', req: { type: CMD.TRIM, offset: SIZE * 2, length: 1 }, ctx: RO, want: readOnly() },
  { name: 'read-only: WRITE_ZEROES with unknown flags', req: { type: CMD.WRITE_ZEROES, flags: 1 << 9, offset: 0, length: 1 }, ctx: RO, want: readOnly() },

  // ---- range
  { name: 'READ starting at the end', req: { type: CMD.READ, offset: SIZE, length: 1 }, want: range(), message: /beyond the end/ },
  { name: 'READ running past the end', req: { type: CMD.READ, offset: SIZE - 1, length: 2 }, want: range() },
  { name: 'READ of 0 bytes past the end', req: { type: CMD.READ, offset: SIZE + 1, length: 0 }, want: range() },
  { name: 'TRIM past the end', req: { type: CMD.TRIM, offset: SIZE - 4096, length: 8192 }, want: range() },
  { name: 'CACHE past the end', req: { type: CMD.CACHE, offset: SIZE, length: 4096 }, want: range() },
  { name: 'BLOCK_STATUS past the end', req: { type: CMD.BLOCK_STATUS, offset: SIZE, length: 1 }, want: range() },
  { name: 'WRITE past the end: ENOSPC', req: { type: CMD.WRITE, offset: SIZE - 1, length: 2 }, want: nospace(), message: /beyond the end/ },
  { name: 'WRITE at the end: ENOSPC', req: { type: CMD.WRITE, offset: SIZE, length: 1 }, want: nospace() },
  { name: 'WRITE_ZEROES past the end: ENOSPC', req: { type: CMD.WRITE_ZEROES, offset: 0, length: SIZE + 1 }, want: nospace() },
  { name: 'range is checked before flags', req: { type: CMD.READ, flags: 1 << 7, offset: SIZE, length: 1 }, want: range() },
  { name: 'range is checked before size', req: { type: CMD.READ, offset: 0, length: MAX_PAYLOAD + 1 }, want: range() },
  { name: 'offset + length overflows nothing: 4 GiB-1 near the end', req: { type: CMD.TRIM, offset: SIZE - 1, length: U32_MAX }, want: range() },

  // ---- unknown commands and FLUSH
  { name: 'unknown command 8', req: { type: 8 }, want: einval(), message: /unknown command 8/ },
  { name: 'unknown command 0xffff', req: { type: 0xffff, offset: 0, length: 0 }, want: einval() },
  { name: 'unknown command on a read-only export', req: { type: 9 }, ctx: RO, want: einval() },
  { name: 'FLUSH with an offset', req: { type: CMD.FLUSH, offset: 1 }, want: einval(), message: /FLUSH/ },
  { name: 'FLUSH with a length', req: { type: CMD.FLUSH, length: 4096 }, want: einval() },
  { name: 'FLUSH not advertised', req: { type: CMD.FLUSH }, ctx: { flags: ALL_FLAGS & ~TF.SEND_FLUSH }, want: einval() },

  // ---- flags
  { name: 'unknown flag bit 5', req: { type: CMD.READ, flags: 1 << 5, offset: 0, length: 1 }, want: einval(), message: /unknown command flags 0x20/ },
  { name: 'unknown flag bit 15', req: { type: CMD.WRITE, flags: 1 << 15, offset: 0, length: 1 }, want: einval() },
  { name: 'NO_HOLE on WRITE', req: { type: CMD.WRITE, flags: F.NO_HOLE, offset: 0, length: 1 }, want: einval(), message: /NO_HOLE/ },
  { name: 'NO_HOLE on TRIM', req: { type: CMD.TRIM, flags: F.NO_HOLE, offset: 0, length: 1 }, want: einval() },
  { name: 'NO_HOLE on READ', req: { type: CMD.READ, flags: F.NO_HOLE, offset: 0, length: 1 }, want: einval() },
  { name: 'FAST_ZERO on WRITE', req: { type: CMD.WRITE, flags: F.FAST_ZERO, offset: 0, length: 1 }, want: einval(), message: /FAST_ZERO/ },
  { name: 'FAST_ZERO on TRIM', req: { type: CMD.TRIM, flags: F.FAST_ZERO, offset: 0, length: 1 }, want: einval() },
  {
    name: 'FAST_ZERO not negotiated',
    req: { type: CMD.WRITE_ZEROES, flags: F.FAST_ZERO, offset: 0, length: 1 },
    ctx: { flags: ALL_FLAGS & ~TF.SEND_FAST_ZERO },
    want: einval(),
    message: /not negotiated/,
  },
  { name: 'DF on WRITE', req: { type: CMD.WRITE, flags: F.DF, offset: 0, length: 1 }, want: einval(), message: /DF/ },
  { name: 'DF on BLOCK_STATUS', req: { type: CMD.BLOCK_STATUS, flags: F.DF, offset: 0, length: 1 }, want: einval() },
  {
    name: 'DF without structured replies',
    req: { type: CMD.READ, flags: F.DF, offset: 0, length: 1 },
    ctx: { structuredReplies: false, baseAllocation: false },
    want: einval(),
    message: /structured/,
  },
  { name: 'REQ_ONE on READ', req: { type: CMD.READ, flags: F.REQ_ONE, offset: 0, length: 1 }, want: einval(), message: /REQ_ONE/ },
  { name: 'REQ_ONE on WRITE_ZEROES', req: { type: CMD.WRITE_ZEROES, flags: F.REQ_ONE, offset: 0, length: 1 }, want: einval() },
  {
    name: 'FUA not negotiated',
    req: { type: CMD.WRITE, flags: F.FUA, offset: 0, length: 1 },
    ctx: { flags: ALL_FLAGS & ~TF.SEND_FUA },
    want: einval(),
    message: /FUA/,
  },
  {
    name: 'FUA on READ, not negotiated',
    req: { type: CMD.READ, flags: F.FUA, offset: 0, length: 1 },
    ctx: { flags: ALL_FLAGS & ~TF.SEND_FUA },
    want: einval(),
  },

  // ---- sizes
  { name: 'READ of 32 MiB + 1', req: { type: CMD.READ, offset: 0, length: MAX_PAYLOAD + 1 }, ctx: { size: BIG }, want: tooLarge(), message: /maximum block size/ },
  { name: 'WRITE of 32 MiB + 1', req: { type: CMD.WRITE, offset: 0, length: MAX_PAYLOAD + 1 }, ctx: { size: BIG }, want: tooLarge() },
  { name: 'WRITE of 4 GiB-1', req: { type: CMD.WRITE, offset: 0, length: U32_MAX }, ctx: { size: BIG }, want: tooLarge() },

  // ---- commands whose transmission flag was not advertised
  { name: 'TRIM not advertised', req: { type: CMD.TRIM, offset: 0, length: 1 }, ctx: { flags: ALL_FLAGS & ~TF.SEND_TRIM }, want: einval(), message: /not supported/ },
  {
    name: 'WRITE_ZEROES not advertised',
    req: { type: CMD.WRITE_ZEROES, offset: 0, length: 1 },
    ctx: { flags: ALL_FLAGS & ~(TF.SEND_WRITE_ZEROES | TF.SEND_FAST_ZERO) },
    want: einval(),
  },
  { name: 'CACHE not advertised', req: { type: CMD.CACHE, offset: 0, length: 1 }, ctx: { flags: ALL_FLAGS & ~TF.SEND_CACHE }, want: einval() },

  // ---- BLOCK_STATUS
  {
    name: 'BLOCK_STATUS without structured replies',
    req: { type: CMD.BLOCK_STATUS, offset: 0, length: 1 },
    ctx: { structuredReplies: false, baseAllocation: false },
    want: einval(),
    message: /structured replies/,
  },
  {
    name: 'BLOCK_STATUS without base:allocation',
    req: { type: CMD.BLOCK_STATUS, offset: 0, length: 1 },
    ctx: { baseAllocation: false },
    want: einval(),
    message: /base:allocation/,
  },
  { name: 'BLOCK_STATUS of length 0', req: { type: CMD.BLOCK_STATUS, offset: 0, length: 0 }, want: einval(), message: /length 0/ },
  { name: 'BLOCK_STATUS of length 0 at the end', req: { type: CMD.BLOCK_STATUS, offset: SIZE, length: 0 }, want: einval() },

  // ---- near 2^53 (exactly representable)
  { name: 'near 2^53: READ at the size', req: { type: CMD.READ, offset: HUGE, length: 1 }, ctx: { size: HUGE }, want: range() },
  { name: 'near 2^53: WRITE running past', req: { type: CMD.WRITE, offset: HUGE - 1, length: 2 }, ctx: { size: HUGE }, want: nospace() },
  { name: 'near 2^53: TRIM one past', req: { type: CMD.TRIM, offset: HUGE - U32_MAX + 1, length: U32_MAX }, ctx: { size: HUGE }, want: range() },
];

t.test('the table', async (t) => {
  for (const c of CASES) {
    const req: Request = { flags: 0, type: CMD.READ, cookie: 1n, offset: 0, length: 0, ...c.req };
    const ctx: ValidateContext = { ...base, ...c.ctx };
    const err = validateRequest(req, ctx);
    if (c.want === null) {
      t.equal(err, null, `${c.name}: valid`);
      continue;
    }
    const [Cls, errno] = c.want;
    t.ok(err instanceof Cls, `${c.name}: ${Cls.name} (got ${err === null ? 'null' : err.name}: ${err?.message ?? ''})`);
    t.equal(toNbdErrno(err), errno, `${c.name}: errno ${errno}`);
    if (c.message) t.match(err?.message, c.message, `${c.name}: message`);
  }
});

t.test('every command type is covered by the table', async (t) => {
  const types = new Set(CASES.map((c) => c.req.type));
  for (const [name, type] of Object.entries(CMD)) {
    if (type === CMD.DISC) continue; // the connection handles DISC before validation
    t.ok(types.has(type), `${name} appears in the table`);
  }
});

/** A request as wire bytes with a 64-bit offset (any value up to 2^64-1), decoded by the real decoder. */
function wire(type: number, offset: bigint, length: number, flags = 0): Request {
  const buf = bytes().u32(0x25609513).u16(flags).u16(type).u64(0xc0ffeen).u64(offset).u32(length).buf();
  const req = decodeRequest(buf);
  if (req === null) throw new Error('short request');
  return req;
}

t.test('offsets from the wire near 2^53 and 2^64', async (t) => {
  const ctx: ValidateContext = { ...base, size: HUGE };
  const cases: [string, Request, ErrorClass, number][] = [
    ['READ at 2^53', wire(CMD.READ, 2n ** 53n, 1), OutOfRangeError, EINVAL],
    ['READ at 2^53+1 (not representable)', wire(CMD.READ, 2n ** 53n + 1n, 1), OutOfRangeError, EINVAL],
    ['READ of 0 at 2^53+1', wire(CMD.READ, 2n ** 53n + 1n, 0), OutOfRangeError, EINVAL],
    ['READ at 2^63', wire(CMD.READ, 2n ** 63n, 512), OutOfRangeError, EINVAL],
    ['READ at 2^64-1', wire(CMD.READ, 2n ** 64n - 1n, 1), OutOfRangeError, EINVAL],
    ['CACHE at 2^64-4096', wire(CMD.CACHE, 2n ** 64n - 4096n, 4096), OutOfRangeError, EINVAL],
    ['BLOCK_STATUS at 2^64-1', wire(CMD.BLOCK_STATUS, 2n ** 64n - 1n, 1), OutOfRangeError, EINVAL],
    ['TRIM at 2^64-1', wire(CMD.TRIM, 2n ** 64n - 1n, U32_MAX), OutOfRangeError, EINVAL],
    ['WRITE at 2^64-1', wire(CMD.WRITE, 2n ** 64n - 1n, 1), NoSpaceError, ENOSPC],
    ['WRITE_ZEROES at 2^63', wire(CMD.WRITE_ZEROES, 2n ** 63n, U32_MAX), NoSpaceError, ENOSPC],
    ['WRITE at the size', wire(CMD.WRITE, BigInt(HUGE), 1), NoSpaceError, ENOSPC],
  ];
  for (const [name, req, Cls, errno] of cases) {
    const err = validateRequest(req, ctx);
    t.ok(err instanceof Cls, `${name}: ${Cls.name}`);
    t.equal(toNbdErrno(err), errno, `${name}: errno ${errno}`);
  }
  t.equal(validateRequest(wire(CMD.READ, BigInt(HUGE - 4096), 4096), ctx), null, 'the last block is readable');
  t.equal(validateRequest(wire(CMD.WRITE, BigInt(HUGE - 1), 1), ctx), null, 'the last byte is writable');
  t.equal(validateRequest(wire(CMD.READ, BigInt(HUGE), 0), ctx), null, 'an empty read at the end is valid');
});

t.test('validation is pure: the same request gives the same answer and nothing is mutated', async (t) => {
  const req: Request = { flags: F.FUA, type: CMD.WRITE, cookie: 7n, offset: 4096, length: 4096 };
  const ctx: ValidateContext = { ...base };
  const before = JSON.stringify({ ...req, cookie: String(req.cookie), ctx });
  t.equal(validateRequest(req, ctx), null);
  t.equal(validateRequest(req, ctx), null);
  t.equal(JSON.stringify({ ...req, cookie: String(req.cookie), ctx }), before);
});
