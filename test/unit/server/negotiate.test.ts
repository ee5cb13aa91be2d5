// lib/server/negotiate.ts: every option through handleOption over a real ExportRegistry, replies decoded with the
// handshake codec. Exports are in-memory devices (lib/storage/memory-device.ts), plus one real BackingFile, so
// the transmission flags come from real capabilities rather than a hand-built fake.

import t from 'tap';
import type { Test } from 'tap';
import {
  BASE_ALLOCATION_ID,
  MAX_OPTIONS,
  MAX_OPTION_LENGTH,
  type HandshakeState,
  type NegotiateContext,
  type OptionOutcome,
  handleOption,
  initialHandshakeState,
  tooBigReply,
} from '../../../lib/server/negotiate';
import { ExportRegistry, type ExportHandle } from '../../../lib/server/exports';
import {
  decodeExportNameReply,
  decodeOptionReplyHeader,
  parseErrorReplyMessage,
  parseInfoPayload,
  parseMetaContextReply,
  parseServerReply,
  type InfoPayload,
} from '../../../lib/protocol/handshake';
import { MemoryDevice } from '../../../lib/storage/memory-device';
import { BackingFile } from '../../../lib/storage/backing-file';
import { silentLogger } from '../../../lib/log';
import { bytes } from '../../helpers/bytes';

// Wire values written out from doc/proto.md rather than imported, so a wrong constant cannot hide here.
const OPT = {
  EXPORT_NAME: 1, ABORT: 2, LIST: 3, PEEK_EXPORT: 4, STARTTLS: 5, INFO: 6, GO: 7, STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9, SET_META_CONTEXT: 10, EXTENDED_HEADERS: 11,
} as const;
const REP = {
  ACK: 1, SERVER: 2, INFO: 3, META_CONTEXT: 4,
  ERR_UNSUP: 0x80000001, ERR_POLICY: 0x80000002, ERR_INVALID: 0x80000003, ERR_UNKNOWN: 0x80000006,
  ERR_SHUTDOWN: 0x80000007, ERR_TOO_BIG: 0x80000009,
} as const;
const INFO = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;
const FLAG = {
  HAS_FLAGS: 1 << 0, READ_ONLY: 1 << 1, SEND_FLUSH: 1 << 2, SEND_FUA: 1 << 3, ROTATIONAL: 1 << 4, SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6, SEND_DF: 1 << 7, CAN_MULTI_CONN: 1 << 8, SEND_RESIZE: 1 << 9, SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const;
const MiB = 1024 * 1024;

/** What a read-write device with every capability advertises, without DF. */
const RW_FLAGS = FLAG.HAS_FLAGS | FLAG.SEND_FLUSH | FLAG.SEND_FUA | FLAG.SEND_TRIM | FLAG.SEND_WRITE_ZEROES |
  FLAG.CAN_MULTI_CONN | FLAG.SEND_CACHE | FLAG.SEND_FAST_ZERO;
/** What a read-only device advertises, without DF: no FUA, TRIM, WRITE_ZEROES or FAST_ZERO. */
const RO_FLAGS = FLAG.HAS_FLAGS | FLAG.READ_ONLY | FLAG.SEND_FLUSH | FLAG.CAN_MULTI_CONN | FLAG.SEND_CACHE;

function exportsFixture(): { registry: ExportRegistry; disk0: ExportHandle; disk1: ExportHandle; ro: ExportHandle } {
  const disk0 = { name: 'disk0', description: 'the first disk', device: new MemoryDevice({ size: 1 * MiB }) };
  const disk1 = { name: 'disk1', description: '', device: new MemoryDevice({ size: 64 * 1024 + 512 }) };
  const ro = { name: 'ro', description: 'read-only ✓', device: new MemoryDevice({ size: 8192, readOnly: true }) };
  return { registry: new ExportRegistry([disk0, disk1, ro]), disk0, disk1, ro };
}

function ctxOf(registry: ExportRegistry, shuttingDown = false): NegotiateContext {
  return { exports: registry, shuttingDown };
}

interface Decoded {
  option: number;
  type: number;
  payload: Buffer;
}

/** Decode one option reply with the codec; the header length must match the bytes that follow. */
function decodeReply(t: Test, buf: Buffer): Decoded {
  const h = decodeOptionReplyHeader(buf);
  if (h === null) throw new Error('reply shorter than a header');
  t.equal(buf.length, 20 + h.length, 'reply length field matches its payload');
  return { option: h.option, type: h.type, payload: buf.subarray(20) };
}

function decodeAll(t: Test, out: OptionOutcome): Decoded[] {
  return out.replies.map((r) => decodeReply(t, r));
}

function info(t: Test, d: Decoded): InfoPayload {
  t.equal(d.type, REP.INFO, 'an NBD_REP_INFO');
  const p = parseInfoPayload(d.payload);
  if (p === undefined) throw new Error('malformed INFO payload');
  return p;
}

/** INFO / GO payload built by hand: name (32-bit length), count (16), info types (16 each). */
function infoRequest(name: string, infos: number[] = []): Buffer {
  const b = bytes().str32(name).u16(infos.length);
  for (const i of infos) b.u16(i);
  return b.buf();
}

/** LIST/SET_META_CONTEXT payload by hand: name, query count (32), queries (32-bit length each). */
function metaRequest(name: string, queries: string[]): Buffer {
  const b = bytes().str32(name).u32(queries.length);
  for (const q of queries) b.str32(q);
  return b.buf();
}

/** Send STRUCTURED_REPLY and check it was acknowledged. */
function structured(t: Test, st: HandshakeState, ctx: NegotiateContext): void {
  const out = handleOption(st, OPT.STRUCTURED_REPLY, Buffer.alloc(0), ctx);
  t.equal(out.next, 'continue');
  t.same(decodeAll(t, out).map((d) => d.type), [REP.ACK], 'STRUCTURED_REPLY acknowledged');
}

function errorType(t: Test, out: OptionOutcome, option: number, type: number, msg: string): string {
  const d = decodeAll(t, out);
  t.equal(d.length, 1, `${msg}: one reply`);
  t.equal(d[0]?.option, option, `${msg}: echoes the option`);
  t.equal(d[0]?.type, type, `${msg}: reply type 0x${type.toString(16)}`);
  const text = parseErrorReplyMessage(d[0]?.payload ?? Buffer.alloc(0));
  t.ok(text.length > 0, `${msg}: carries a message ("${text}")`);
  return text;
}

t.test('initial state', async (t) => {
  t.same(initialHandshakeState(false), { noZeroes: false, structuredReplies: false, meta: null, options: 0 });
  t.same(initialHandshakeState(true), { noZeroes: true, structuredReplies: false, meta: null, options: 0 });
  t.equal(MAX_OPTIONS, 32);
  t.equal(MAX_OPTION_LENGTH, 65536);
  t.throws(() => new ExportRegistry([]), 'a registry needs at least one export');
});

t.test('EXPORT_NAME', async (t) => {
  const { registry, disk0, disk1, ro } = exportsFixture();
  const ctx = ctxOf(registry);

  t.test('known export, zeroes: 134-byte reply with size and flags, then transmission', async (t) => {
    const st = initialHandshakeState(false);
    const out = handleOption(st, OPT.EXPORT_NAME, Buffer.from('disk1'), ctx);
    if (out.next !== 'transmit') throw new Error(`expected transmit, got ${out.next}`);
    t.equal(out.replies.length, 1);
    const r = out.replies[0]!;
    t.equal(r.length, 8 + 2 + 124, 'size + flags + 124 zero bytes');
    t.same(decodeExportNameReply(r, false), { size: 64 * 1024 + 512, flags: RW_FLAGS, length: 134 });
    t.ok(r.subarray(10).every((b) => b === 0), 'the padding is zeros');
    t.equal(out.negotiated.export, disk1, 'negotiated the named export');
    t.equal(out.negotiated.flags, RW_FLAGS, 'no DF without structured replies');
    t.equal(out.negotiated.structuredReplies, false);
    t.equal(out.negotiated.baseAllocation, false);
  });

  t.test('NO_ZEROES: a 10-byte reply', async (t) => {
    const st = initialHandshakeState(true);
    const out = handleOption(st, OPT.EXPORT_NAME, Buffer.from('disk0'), ctx);
    t.equal(out.next, 'transmit');
    t.equal(out.replies[0]?.length, 10);
    t.same(decodeExportNameReply(out.replies[0]!, true), { size: MiB, flags: RW_FLAGS, length: 10 });
  });

  t.test('"" is the default (first) export', async (t) => {
    const out = handleOption(initialHandshakeState(true), OPT.EXPORT_NAME, Buffer.alloc(0), ctx);
    if (out.next !== 'transmit') throw new Error('expected transmit');
    t.equal(out.negotiated.export, disk0);
    t.equal(decodeExportNameReply(out.replies[0]!, true)?.size, MiB);
  });

  t.test('read-only export', async (t) => {
    const out = handleOption(initialHandshakeState(true), OPT.EXPORT_NAME, Buffer.from('ro'), ctx);
    if (out.next !== 'transmit') throw new Error('expected transmit');
    t.equal(out.negotiated.export, ro);
    t.equal(decodeExportNameReply(out.replies[0]!, true)?.flags, RO_FLAGS);
  });

  t.test('after STRUCTURED_REPLY: DF is advertised and structured replies carry over', async (t) => {
    const st = initialHandshakeState(true);
    structured(t, st, ctx);
    const out = handleOption(st, OPT.EXPORT_NAME, Buffer.from('disk0'), ctx);
    if (out.next !== 'transmit') throw new Error('expected transmit');
    t.equal(out.negotiated.flags, RW_FLAGS | FLAG.SEND_DF);
    t.equal(decodeExportNameReply(out.replies[0]!, true)?.flags, RW_FLAGS | FLAG.SEND_DF);
    t.equal(out.negotiated.structuredReplies, true);
  });

  t.test('unknown export: no reply (EXPORT_NAME has no error reply), close', async (t) => {
    const out = handleOption(initialHandshakeState(false), OPT.EXPORT_NAME, Buffer.from('nope'), ctx);
    if (out.next !== 'close') throw new Error('expected close');
    t.same(out.replies, []);
    t.match(out.reason, /unknown export "nope"/);
  });

  t.test('a name longer than 4096 bytes is unknown', async (t) => {
    const out = handleOption(initialHandshakeState(false), OPT.EXPORT_NAME, Buffer.alloc(4097, 0x61), ctx);
    t.equal(out.next, 'close');
    t.same(out.replies, []);
  });
});

t.test('ABORT: ACK then close', async (t) => {
  const { registry } = exportsFixture();
  const out = handleOption(initialHandshakeState(false), OPT.ABORT, Buffer.alloc(0), ctxOf(registry));
  if (out.next !== 'close') throw new Error('expected close');
  t.same(decodeAll(t, out), [{ option: OPT.ABORT, type: REP.ACK, payload: Buffer.alloc(0) }]);
  t.match(out.reason, /ABORT/);
});

t.test('LIST', async (t) => {
  const { registry } = exportsFixture();
  const st = initialHandshakeState(false);
  const out = handleOption(st, OPT.LIST, Buffer.alloc(0), ctxOf(registry));
  t.equal(out.next, 'continue');
  const d = decodeAll(t, out);
  t.same(d.map((x) => [x.option, x.type]), [[OPT.LIST, REP.SERVER], [OPT.LIST, REP.SERVER], [OPT.LIST, REP.SERVER], [OPT.LIST, REP.ACK]]);
  t.same(d.slice(0, 3).map((x) => parseServerReply(x.payload)), [
    { name: 'disk0', description: 'the first disk' },
    { name: 'disk1', description: '' },
    { name: 'ro', description: 'read-only ✓' },
  ], 'every export, in order, with its description');
  t.equal(d[3]?.payload.length, 0);

  const bad = handleOption(st, OPT.LIST, Buffer.from([0]), ctxOf(registry));
  t.equal(bad.next, 'continue', 'a payload is an error the client can recover from');
  errorType(t, bad, OPT.LIST, REP.ERR_INVALID, 'LIST with payload');
});

t.test('STARTTLS is refused by policy; with a payload it is invalid', async (t) => {
  const { registry } = exportsFixture();
  const st = initialHandshakeState(false);
  const out = handleOption(st, OPT.STARTTLS, Buffer.alloc(0), ctxOf(registry));
  t.equal(out.next, 'continue');
  t.match(errorType(t, out, OPT.STARTTLS, REP.ERR_POLICY, 'STARTTLS'), /TLS/);
  const bad = handleOption(st, OPT.STARTTLS, Buffer.from('x'), ctxOf(registry));
  t.equal(bad.next, 'continue');
  errorType(t, bad, OPT.STARTTLS, REP.ERR_INVALID, 'STARTTLS with payload');
});

t.test('STRUCTURED_REPLY', async (t) => {
  const { registry } = exportsFixture();
  const st = initialHandshakeState(false);
  const bad = handleOption(st, OPT.STRUCTURED_REPLY, Buffer.from([1, 2]), ctxOf(registry));
  errorType(t, bad, OPT.STRUCTURED_REPLY, REP.ERR_INVALID, 'with payload');
  t.equal(st.structuredReplies, false, 'a refused request negotiates nothing');
  structured(t, st, ctxOf(registry));
  t.equal(st.structuredReplies, true);
  structured(t, st, ctxOf(registry)); // asking twice is harmless
  t.equal(st.structuredReplies, true);
});

t.test('unsupported options: ERR_UNSUP, continue', async (t) => {
  const { registry } = exportsFixture();
  for (const opt of [OPT.PEEK_EXPORT, OPT.EXTENDED_HEADERS, 0, 12, 99, 0xffffffff]) {
    const out = handleOption(initialHandshakeState(false), opt, Buffer.alloc(0), ctxOf(registry));
    t.equal(out.next, 'continue', `option ${opt}`);
    errorType(t, out, opt, REP.ERR_UNSUP, `option ${opt}`);
  }
});

t.test('INFO and GO', async (t) => {
  const { registry, disk0, disk1, ro } = exportsFixture();
  const ctx = ctxOf(registry);
  const BLOCK_SIZES = { minimum: 1, preferred: 4096, maximum: 32 * MiB };

  for (const opt of [OPT.INFO, OPT.GO]) {
    const what = opt === OPT.INFO ? 'INFO' : 'GO';

    t.test(`${what} with no info requests: EXPORT, BLOCK_SIZE, ACK`, async (t) => {
      const out = handleOption(initialHandshakeState(false), opt, infoRequest('disk1'), ctx);
      const d = decodeAll(t, out);
      t.ok(d.every((x) => x.option === opt), 'every reply echoes the option');
      t.equal(d.length, 3);
      t.same(info(t, d[0]!), { type: INFO.EXPORT, size: 64 * 1024 + 512, flags: RW_FLAGS });
      t.same(info(t, d[1]!), { type: INFO.BLOCK_SIZE, sizes: BLOCK_SIZES }, 'block sizes sent unasked');
      t.equal(d[2]?.type, REP.ACK);
      if (opt === OPT.INFO) {
        t.equal(out.next, 'continue', 'INFO stays in the option phase');
      } else {
        if (out.next !== 'transmit') throw new Error('GO must enter transmission');
        t.equal(out.negotiated.export, disk1);
        t.equal(out.negotiated.flags, RW_FLAGS);
        t.equal(out.negotiated.structuredReplies, false);
        t.equal(out.negotiated.baseAllocation, false);
      }
    });

    t.test(`${what} asking NAME and DESCRIPTION (and an unknown info type)`, async (t) => {
      const out = handleOption(initialHandshakeState(false), opt, infoRequest('disk0', [INFO.DESCRIPTION, 77, INFO.NAME]), ctx);
      const d = decodeAll(t, out);
      t.same(d.map((x) => x.type), [REP.INFO, REP.INFO, REP.INFO, REP.INFO, REP.ACK]);
      t.same(info(t, d[0]!), { type: INFO.EXPORT, size: MiB, flags: RW_FLAGS });
      t.same(info(t, d[1]!), { type: INFO.NAME, name: 'disk0' });
      t.same(info(t, d[2]!), { type: INFO.DESCRIPTION, description: 'the first disk' });
      t.same(info(t, d[3]!), { type: INFO.BLOCK_SIZE, sizes: BLOCK_SIZES });
    });

    t.test(`${what} asking only NAME for the default export "" gives its real name`, async (t) => {
      const out = handleOption(initialHandshakeState(false), opt, infoRequest('', [INFO.NAME]), ctx);
      const d = decodeAll(t, out);
      t.same(d.map((x) => x.type), [REP.INFO, REP.INFO, REP.INFO, REP.ACK]);
      t.same(info(t, d[1]!), { type: INFO.NAME, name: 'disk0' });
      if (opt === OPT.GO && out.next === 'transmit') t.equal(out.negotiated.export, disk0);
      else t.equal(out.next, opt === OPT.GO ? 'transmit' : 'continue');
    });

    t.test(`${what} asking BLOCK_SIZE explicitly sends it once`, async (t) => {
      const d = decodeAll(t, handleOption(initialHandshakeState(false), opt, infoRequest('disk0', [INFO.BLOCK_SIZE]), ctx));
      t.same(d.map((x) => x.type), [REP.INFO, REP.INFO, REP.ACK]);
      t.same(info(t, d[1]!), { type: INFO.BLOCK_SIZE, sizes: BLOCK_SIZES });
    });

    t.test(`${what} on a read-only export, with structured replies`, async (t) => {
      const st = initialHandshakeState(false);
      structured(t, st, ctx);
      const out = handleOption(st, opt, infoRequest('ro', [INFO.DESCRIPTION]), ctx);
      const d = decodeAll(t, out);
      t.same(info(t, d[0]!), { type: INFO.EXPORT, size: 8192, flags: RO_FLAGS | FLAG.SEND_DF });
      t.same(info(t, d[1]!), { type: INFO.DESCRIPTION, description: 'read-only ✓' });
      if (out.next === 'transmit') {
        t.equal(out.negotiated.export, ro);
        t.equal(out.negotiated.structuredReplies, true);
      } else {
        t.equal(opt, OPT.INFO, 'only INFO continues');
      }
    });

    t.test(`${what} for an unknown export: ERR_UNKNOWN, continue`, async (t) => {
      const out = handleOption(initialHandshakeState(false), opt, infoRequest('missing', [INFO.NAME]), ctx);
      t.equal(out.next, 'continue', 'the client may try another name');
      t.match(errorType(t, out, opt, REP.ERR_UNKNOWN, 'unknown export'), /missing/);
    });

    t.test(`${what} with a malformed payload: ERR_INVALID, continue`, async (t) => {
      const cases: [string, Buffer][] = [
        ['empty', Buffer.alloc(0)],
        ['name only, no count', bytes().str32('disk0').buf()],
        ['name length past the end', bytes().u32(100).str('disk0').u16(0).buf()],
        ['count larger than the list', bytes().str32('disk0').u16(2).u16(INFO.NAME).buf()],
        ['a trailing byte', bytes().str32('disk0').u16(1).u16(INFO.NAME).u8(0).buf()],
        ['name over 4096 bytes', bytes().str32('a'.repeat(4097)).u16(0).buf()],
      ];
      for (const [name, payload] of cases) {
        const out = handleOption(initialHandshakeState(false), opt, payload, ctx);
        t.equal(out.next, 'continue', name);
        errorType(t, out, opt, REP.ERR_INVALID, name);
      }
    });
  }

  t.test('GO after INFO: INFO negotiates nothing', async (t) => {
    const st = initialHandshakeState(false);
    handleOption(st, OPT.INFO, infoRequest('disk1'), ctx);
    const out = handleOption(st, OPT.GO, infoRequest('disk0'), ctx);
    if (out.next !== 'transmit') throw new Error('expected transmit');
    t.equal(out.negotiated.export, disk0);
  });
});

t.test('meta contexts', async (t) => {
  const { registry, disk0 } = exportsFixture();
  const ctx = ctxOf(registry);

  for (const opt of [OPT.LIST_META_CONTEXT, OPT.SET_META_CONTEXT]) {
    const what = opt === OPT.LIST_META_CONTEXT ? 'LIST' : 'SET';
    t.test(`${what} before STRUCTURED_REPLY: ERR_INVALID`, async (t) => {
      const st = initialHandshakeState(false);
      const out = handleOption(st, opt, metaRequest('disk0', ['base:allocation']), ctx);
      t.equal(out.next, 'continue');
      errorType(t, out, opt, REP.ERR_INVALID, 'before structured replies');
      t.equal(st.meta, null, 'nothing selected');
    });
    t.test(`${what} for an unknown export: ERR_UNKNOWN`, async (t) => {
      const st = initialHandshakeState(false);
      structured(t, st, ctx);
      errorType(t, handleOption(st, opt, metaRequest('nope', ['base:allocation']), ctx), opt, REP.ERR_UNKNOWN, 'unknown export');
      t.equal(st.meta, null);
    });
    t.test(`${what} malformed: ERR_INVALID`, async (t) => {
      const st = initialHandshakeState(false);
      structured(t, st, ctx);
      const cases: [string, Buffer][] = [
        ['empty', Buffer.alloc(0)],
        ['no query count', bytes().str32('disk0').buf()],
        ['count larger than the queries', bytes().str32('disk0').u32(2).str32('base:allocation').buf()],
        ['a huge count', bytes().str32('disk0').u32(0xffffffff).buf()],
        ['query length past the end', bytes().str32('disk0').u32(1).u32(50).str('base:').buf()],
        ['a trailing byte', bytes().str32('disk0').u32(0).u8(1).buf()],
      ];
      for (const [name, payload] of cases) {
        const out = handleOption(st, opt, payload, ctx);
        t.equal(out.next, 'continue', name);
        errorType(t, out, opt, REP.ERR_INVALID, name);
      }
    });
  }

  /** Send a meta-context option after STRUCTURED_REPLY and return the decoded META_CONTEXT replies. */
  function meta(t: Test, st: HandshakeState, opt: number, name: string, queries: string[]): { id: number; name: string }[] {
    const out = handleOption(st, opt, metaRequest(name, queries), ctx);
    t.equal(out.next, 'continue');
    const d = decodeAll(t, out);
    t.equal(d[d.length - 1]?.type, REP.ACK, 'ends with ACK');
    t.ok(d.slice(0, -1).every((x) => x.type === REP.META_CONTEXT && x.option === opt), 'the rest are META_CONTEXT');
    return d.slice(0, -1).map((x) => {
      const p = parseMetaContextReply(x.payload);
      if (p === undefined) throw new Error('malformed META_CONTEXT');
      return p;
    });
  }

  t.test('LIST_META_CONTEXT answers', async (t) => {
    const st = initialHandshakeState(false);
    structured(t, st, ctx);
    const L = OPT.LIST_META_CONTEXT;
    t.same(meta(t, st, L, 'disk0', []), [{ id: 0, name: 'base:allocation' }], 'no queries: every context, id 0 as LIST answers use');
    t.same(meta(t, st, L, 'disk0', ['base:']).map((c) => c.name), ['base:allocation'], '"base:" lists its namespace');
    t.same(meta(t, st, L, 'disk0', ['base:allocation']).map((c) => c.name), ['base:allocation']);
    t.same(meta(t, st, L, '', ['base:allocation']).map((c) => c.name), ['base:allocation'], 'default export');
    t.same(meta(t, st, L, 'disk0', ['qemu:dirty-bitmap:b0', 'foo:bar', 'base:x']), [], 'unknown contexts: just ACK');
    t.same(
      meta(t, st, L, 'disk0', ['qemu:allocation-depth', 'base:allocation', 'base:allocation']).map((c) => c.name),
      ['base:allocation'],
      'a known context among unknown ones, listed once',
    );
    t.equal(st.meta, null, 'LIST selects nothing');
  });

  t.test('SET_META_CONTEXT selects base:allocation for one export', async (t) => {
    const S = OPT.SET_META_CONTEXT;
    const st = initialHandshakeState(false);
    structured(t, st, ctx);
    t.same(meta(t, st, S, 'disk0', []), [], 'no queries: nothing selected');
    t.same(st.meta, { exportName: 'disk0', baseAllocation: false });
    t.same(meta(t, st, S, 'disk0', ['base:']), [], '"base:" selects nothing on SET');
    t.same(st.meta, { exportName: 'disk0', baseAllocation: false });
    t.same(meta(t, st, S, 'disk0', ['foo:bar', 'base:allocation']), [{ id: BASE_ALLOCATION_ID, name: 'base:allocation' }]);
    t.not(BASE_ALLOCATION_ID, 0, 'a selected context has a non-zero id');
    t.same(st.meta, { exportName: 'disk0', baseAllocation: true });

    const go = handleOption(st, OPT.GO, infoRequest('disk0'), ctx);
    if (go.next !== 'transmit') throw new Error('expected transmit');
    t.equal(go.negotiated.baseAllocation, true, 'GO for the same export uses it');
    t.equal(go.negotiated.export, disk0);
  });

  t.test('a later SET replaces the earlier selection', async (t) => {
    const S = OPT.SET_META_CONTEXT;
    const st = initialHandshakeState(false);
    structured(t, st, ctx);
    meta(t, st, S, 'disk0', ['base:allocation']);
    meta(t, st, S, 'disk0', ['foo:bar']);
    const go = handleOption(st, OPT.GO, infoRequest('disk0'), ctx);
    if (go.next !== 'transmit') throw new Error('expected transmit');
    t.equal(go.negotiated.baseAllocation, false);
  });

  t.test('SET for one export, then GO for another: no base:allocation', async (t) => {
    const st = initialHandshakeState(false);
    structured(t, st, ctx);
    meta(t, st, OPT.SET_META_CONTEXT, 'disk0', ['base:allocation']);
    const go = handleOption(st, OPT.GO, infoRequest('disk1'), ctx);
    if (go.next !== 'transmit') throw new Error('expected transmit');
    t.equal(go.negotiated.baseAllocation, false);
    t.equal(go.negotiated.structuredReplies, true);
    const st2 = initialHandshakeState(false);
    structured(t, st2, ctx);
    meta(t, st2, OPT.SET_META_CONTEXT, 'disk1', ['base:allocation']);
    const en = handleOption(st2, OPT.EXPORT_NAME, Buffer.from('disk0'), ctx);
    if (en.next !== 'transmit') throw new Error('expected transmit');
    t.equal(en.negotiated.baseAllocation, false, 'the same holds for EXPORT_NAME');
  });

  t.test('SET for the default export "" covers GO for its real name', async (t) => {
    const st = initialHandshakeState(false);
    structured(t, st, ctx);
    meta(t, st, OPT.SET_META_CONTEXT, '', ['base:allocation']);
    const go = handleOption(st, OPT.GO, infoRequest('disk0'), ctx);
    if (go.next !== 'transmit') throw new Error('expected transmit');
    t.equal(go.negotiated.baseAllocation, true);
  });
});

t.test('MAX_OPTIONS: option 33 is refused by policy and the connection closes', async (t) => {
  const { registry } = exportsFixture();
  const st = initialHandshakeState(false);
  let continued = 0;
  for (let i = 0; i < MAX_OPTIONS; i++) {
    // Mix good and bad options: every one counts.
    const out = i % 2 === 0 ? handleOption(st, OPT.LIST, Buffer.alloc(0), ctxOf(registry)) : handleOption(st, 99, Buffer.alloc(0), ctxOf(registry));
    if (out.next === 'continue') continued++;
  }
  t.equal(continued, MAX_OPTIONS, '32 options are answered');
  const out = handleOption(st, OPT.GO, infoRequest('disk0'), ctxOf(registry));
  if (out.next !== 'close') throw new Error('expected close');
  errorType(t, out, OPT.GO, REP.ERR_POLICY, 'option 33');
  t.match(out.reason, /too many options/);
  const again = handleOption(st, OPT.EXPORT_NAME, Buffer.from('disk0'), ctxOf(registry));
  t.equal(again.next, 'close', 'even EXPORT_NAME is refused past the cap');
});

t.test('shutting down: ERR_SHUTDOWN then close; EXPORT_NAME just closes', async (t) => {
  const { registry } = exportsFixture();
  const ctx = ctxOf(registry, true);
  const cases: [number, Buffer][] = [
    [OPT.LIST, Buffer.alloc(0)],
    [OPT.GO, infoRequest('disk0')],
    [OPT.INFO, infoRequest('disk0')],
    [OPT.STRUCTURED_REPLY, Buffer.alloc(0)],
    [OPT.SET_META_CONTEXT, metaRequest('disk0', ['base:allocation'])],
    [OPT.ABORT, Buffer.alloc(0)],
    [99, Buffer.alloc(0)],
  ];
  for (const [opt, payload] of cases) {
    const out = handleOption(initialHandshakeState(false), opt, payload, ctx);
    t.equal(out.next, 'close', `option ${opt} closes`);
    errorType(t, out, opt, REP.ERR_SHUTDOWN, `option ${opt}`);
  }
  const en = handleOption(initialHandshakeState(false), OPT.EXPORT_NAME, Buffer.from('disk0'), ctx);
  if (en.next !== 'close') throw new Error('expected close');
  t.same(en.replies, [], 'EXPORT_NAME cannot carry an error: no reply');
});

t.test('tooBigReply', async (t) => {
  const d = decodeReply(t, tooBigReply(OPT.GO, 70000));
  t.equal(d.option, OPT.GO);
  t.equal(d.type, REP.ERR_TOO_BIG);
  t.match(parseErrorReplyMessage(d.payload), /70000/);
});

t.test('flags from a real BackingFile match the in-memory device', async (t) => {
  const dir = t.testdir();
  const log = silentLogger();
  const rw = await BackingFile.open({ dir, name: 'rw', size: 65536, readOnly: false, log });
  const ro = await BackingFile.open({ dir, name: 'ro', size: 65536, readOnly: true, log });
  t.teardown(async () => {
    await rw.close();
    await ro.close();
  });
  const registry = new ExportRegistry([
    { name: 'rw', description: 'file', device: rw },
    { name: 'ro', description: 'file, read-only', device: ro },
  ]);
  const ctx = ctxOf(registry);
  for (const [name, want] of [['rw', RW_FLAGS], ['ro', RO_FLAGS]] as const) {
    for (const sr of [false, true]) {
      const st = initialHandshakeState(true);
      if (sr) structured(t, st, ctx);
      const out = handleOption(st, OPT.GO, infoRequest(name, [INFO.NAME]), ctx);
      if (out.next !== 'transmit') throw new Error('expected transmit');
      const d = decodeAll(t, out);
      const expect = want | (sr ? FLAG.SEND_DF : 0);
      t.same(info(t, d[0]!), { type: INFO.EXPORT, size: 65536, flags: expect }, `${name}, structured=${sr}`);
      t.equal(out.negotiated.flags, expect);
      t.equal(expect & (FLAG.ROTATIONAL | FLAG.SEND_RESIZE), 0, 'never rotational or resizable');
    }
  }
});
