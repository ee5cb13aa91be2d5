// lib/client/nbd-client.ts against a scripted fake server: what a real server rarely does on demand — replies
// out of order, chunks of one read in any order, replies split into single bytes, error chunks of every kind,
// fallbacks in the handshake — and every wire violation the client must turn into ProtocolError, tearing the
// connection down and rejecting all pending requests.

import type * as net from 'node:net';
import t from 'tap';
import type { Test } from 'tap';
import {
  BASE_ALLOCATION,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_UNSUP,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_ERROR_OFFSET,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_CMD_DISC,
} from '../../../lib/protocol/constants';
import { encodeOptionReply } from '../../../lib/protocol/handshake';
import {
  encodeBlockStatus,
  encodeChunkHeader,
  encodeErrorChunk,
  encodeNoneChunk,
  encodeOffsetDataHeader,
  encodeOffsetHole,
  encodeSimpleReply,
} from '../../../lib/protocol/reply';
import type { Request } from '../../../lib/protocol/request';
import { IoError, PeerError, ProtocolError } from '../../../lib/errors';
import { NbdClient, type ConnectOptions } from '../../../lib/client/nbd-client';
import { FAKE_FLAGS, FAKE_SIZE, type FakeOptions, type FakeServer, defaultOption, startFake } from '../../helpers/fake-nbd-server';

async function fake(tt: Test, opts: FakeOptions = {}): Promise<FakeServer> {
  const f = await startFake(opts);
  tt.teardown(() => f.close());
  return f;
}

async function client(tt: Test, f: FakeServer, opts: ConnectOptions = {}): Promise<NbdClient> {
  const c = await NbdClient.connect(f.target, { connectTimeoutMs: 5_000, ...opts });
  tt.teardown(() => c.close());
  return c;
}

/** Deterministic content of the fake disk. */
function pattern(offset: number, length: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) b[i] = (offset + i) % 251;
  return b;
}

/** A whole structured read reply as one OFFSET_DATA chunk with DONE. */
function dataReply(req: Request): Buffer[] {
  return [encodeOffsetDataHeader(req.cookie, NBD_REPLY_FLAG_DONE, req.offset, req.length), pattern(req.offset, req.length)];
}

/** Settle a promise into its value or error, so a rejection is never unhandled while a test awaits others. */
function settle<T>(p: Promise<T>): Promise<{ ok: true; value: T } | { ok: false; error: unknown }> {
  return p.then(
    (value) => ({ ok: true as const, value }),
    (error: unknown) => ({ ok: false as const, error }),
  );
}

t.test('handshake: flags, structured replies, meta contexts, GO', async (tt) => {
  const f = await fake(tt);
  const c = await client(tt, f);
  tt.equal(f.clientFlags(), NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
  tt.same(f.options(), [NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT, NBD_OPT_GO]);
  tt.equal(c.size, FAKE_SIZE);
  tt.equal(c.transmissionFlags, FAKE_FLAGS);
  tt.ok(c.canFlush && c.canFua && c.canDf);
  tt.notOk(c.canTrim || c.canZero || c.canCache || c.canMultiConn || c.canFastZero || c.readOnly);
  tt.ok(c.structuredReplies);
  tt.same([...c.metaContexts], [[BASE_ALLOCATION, 7]]);
});

t.test('handshake: NO_ZEROES not offered → not set, and EXPORT_NAME reads the 124 zero bytes', async (tt) => {
  const f = await fake(tt, { handshakeFlags: NBD_FLAG_FIXED_NEWSTYLE });
  const c = await client(tt, f, { useExportName: true });
  tt.equal(f.clientFlags(), NBD_FLAG_C_FIXED_NEWSTYLE);
  tt.equal(f.options().at(-1), NBD_OPT_EXPORT_NAME);
  tt.equal(c.size, FAKE_SIZE);
  tt.equal(c.description, undefined);
});

t.test('handshake: a non-fixed newstyle server only gets EXPORT_NAME', async (tt) => {
  const f = await fake(tt, { handshakeFlags: 0 });
  const c = await client(tt, f);
  tt.equal(f.clientFlags(), 0);
  tt.same(f.options(), [NBD_OPT_EXPORT_NAME]);
  tt.notOk(c.structuredReplies);
  tt.equal(c.metaContexts.size, 0);
});

t.test('handshake: GO unsupported → falls back to EXPORT_NAME', async (tt) => {
  const f = await fake(tt, {
    onOption: (opt) => (opt === NBD_OPT_GO ? { replies: [encodeOptionReply(opt, NBD_REP_ERR_UNSUP)] } : undefined),
  });
  const c = await client(tt, f);
  tt.same(f.options(), [NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT, NBD_OPT_GO, NBD_OPT_EXPORT_NAME]);
  tt.equal(c.size, FAKE_SIZE);
});

t.test('handshake: structured replies declined → no meta context negotiation, simple replies', async (tt) => {
  const f = await fake(tt, {
    onOption: (opt) => (opt === NBD_OPT_STRUCTURED_REPLY ? { replies: [encodeOptionReply(opt, NBD_REP_ERR_UNSUP)] } : undefined),
    onRequest: (req, _p, sock) => {
      sock.write(encodeSimpleReply(req.cookie, 0));
      sock.write(pattern(req.offset, req.length));
    },
  });
  const c = await client(tt, f);
  tt.same(f.options(), [NBD_OPT_STRUCTURED_REPLY, NBD_OPT_GO]);
  tt.notOk(c.structuredReplies);
  tt.same(await c.pread(100, 5000), pattern(100, 5000));
});

t.test('handshake: a reply to the wrong option is a ProtocolError', async (tt) => {
  const f = await fake(tt, {
    onOption: (opt) => (opt === NBD_OPT_STRUCTURED_REPLY ? { replies: [encodeOptionReply(NBD_OPT_GO, NBD_REP_ACK)] } : undefined),
  });
  await tt.rejects(NbdClient.connect(f.target), ProtocolError);
});

t.test('handshake: server hangs up mid-negotiation → IoError', async (tt) => {
  const f = await fake(tt, { onOption: () => ({ replies: [], next: 'close' }) });
  await tt.rejects(NbdClient.connect(f.target), { name: 'IoError', message: /closed the connection during the handshake/ });
});

t.test('replies out of order are matched by cookie', async (tt) => {
  const held: Request[] = [];
  let sock: net.Socket | undefined;
  const f = await fake(tt, {
    onRequest: (req, _p, s) => {
      sock = s;
      held.push(req);
      if (held.length === 3) for (const r of held.reverse()) for (const b of dataReply(r)) s.write(b);
    },
  });
  const c = await client(tt, f);
  const reads = [c.pread(0, 10), c.pread(5000, 70_000), c.pread(FAKE_SIZE - 3, 3)];
  const got = await Promise.all(reads);
  tt.same(got[0], pattern(0, 10));
  tt.same(got[1], pattern(5000, 70_000));
  tt.same(got[2], pattern(FAKE_SIZE - 3, 3));
  tt.ok(sock !== undefined);
});

t.test('beyond maxInFlight requests queue, go out as slots free, and every reply finds its request', async (tt) => {
  // The server holds each batch of 3 and answers it in reverse order, so slots are freed and reused out of
  // order; 40 reads through 3 slots reuse each slot about 13 times.
  const held: Request[] = [];
  let maxSeen = 0;
  const f = await fake(tt, {
    onRequest: (req, _p, s) => {
      held.push(req);
      maxSeen = Math.max(maxSeen, held.length);
      if (held.length === 3 || f.requests().length === 40) for (const r of held.splice(0).reverse()) for (const b of dataReply(r)) s.write(b);
    },
  });
  const c = await client(tt, f, { maxInFlight: 3 });
  const reads: Promise<Buffer>[] = [];
  for (let i = 0; i < 40; i++) reads.push(c.pread(i * 1000, 100 + i));
  tt.equal(c.inFlightCount, 3, 'three in flight');
  tt.equal(c.queuedCount, 37, 'the rest queued');
  const got = await Promise.all(reads);
  for (let i = 0; i < 40; i++) tt.same(got[i], pattern(i * 1000, 100 + i), `read ${i}`);
  tt.equal(maxSeen, 3, 'never more than maxInFlight at the server');
  const cookies = f.requests().map((r) => r.cookie);
  tt.equal(new Set(cookies).size, 40, 'every request had its own cookie, though slots were reused');
  tt.equal(c.inFlightCount, 0);
  tt.equal(c.queuedCount, 0);
});

t.test("a reply with the cookie of a finished request whose slot is in use again is a ProtocolError", async (tt) => {
  let firstCookie: bigint | undefined;
  const f = await fake(tt, {
    onRequest: (req, _p, s) => {
      if (firstCookie === undefined) {
        firstCookie = req.cookie;
        for (const b of dataReply(req)) s.write(b);
      } else {
        s.write(encodeSimpleReply(firstCookie, 0)); // answers the next request (same slot) with the old cookie
      }
    },
  });
  const c = await client(tt, f, { maxInFlight: 1 });
  tt.same(await c.pread(0, 10), pattern(0, 10));
  const r = await settle(c.pread(0, 10));
  tt.ok(!r.ok && r.error instanceof ProtocolError, 'rejected with ProtocolError');
  tt.match(r.ok ? '' : (r.error as Error).message, /unknown cookie/);
  const [a, b] = f.requests();
  tt.not(a!.cookie, b!.cookie, 'the second request had a new cookie');
});

t.test('one read assembled from data and hole chunks in any order, interleaved with another reply', async (tt) => {
  const f = await fake(tt, {
    onRequest: (req, _p, s) => {
      if (req.offset === 1000) {
        // [1000,1100) data, [1100,1200) hole, [1200,1300) data: sent last-first, DONE on a separate NONE.
        s.write(Buffer.concat([encodeOffsetDataHeader(req.cookie, 0, 1200, 100), pattern(1200, 100)]));
        s.write(encodeOffsetHole(req.cookie, 0, 1100, 100));
        s.write(Buffer.concat([encodeOffsetDataHeader(req.cookie, 0, 1000, 100), pattern(1000, 100)]));
        s.write(encodeNoneChunk(req.cookie));
      } else {
        for (const b of dataReply(req)) s.write(b);
      }
    },
  });
  const c = await client(tt, f);
  const [a, b] = await Promise.all([c.pread(1000, 300), c.pread(0, 64)]);
  tt.same(a, Buffer.concat([pattern(1000, 100), Buffer.alloc(100), pattern(1200, 100)]));
  tt.same(b, pattern(0, 64));
});

t.test('a reply stream delivered one byte at a time decodes the same', async (tt) => {
  // Replies go through one queue so that messages stay whole while their bytes trickle out one per write.
  const out: number[] = [];
  let dripping = false;
  const drip = (s: net.Socket): void => {
    const next = out.shift();
    if (next === undefined || s.destroyed) {
      dripping = false;
      return;
    }
    s.write(Buffer.from([next]));
    setImmediate(() => drip(s));
  };
  const f = await fake(tt, {
    onRequest: (req, _p, s) => {
      const bytes =
        req.type === NBD_CMD_READ
          ? Buffer.concat([
              encodeOffsetHole(req.cookie, 0, req.offset, 8),
              encodeOffsetDataHeader(req.cookie, NBD_REPLY_FLAG_DONE, req.offset + 8, req.length - 8),
              pattern(req.offset + 8, req.length - 8),
            ])
          : encodeBlockStatus(req.cookie, NBD_REPLY_FLAG_DONE, 7, [
              { length: 4096, flags: 3 },
              { length: 512, flags: 0 },
            ]);
      out.push(...bytes);
      if (!dripping) {
        dripping = true;
        drip(s);
      }
    },
  });
  const c = await client(tt, f);
  const [r, bs] = await Promise.all([c.pread(40, 60), c.blockStatus(0, 8192)]);
  tt.same(r, Buffer.concat([Buffer.alloc(8), pattern(48, 52)]));
  tt.same(bs, new Map([[BASE_ALLOCATION, [{ length: 4096, flags: 3 }, { length: 512, flags: 0 }]]]));
});

t.test('request flags reach the wire as asked', async (tt) => {
  const f = await fake(tt, {
    onRequest: (req, _p, s) => {
      if (req.type === NBD_CMD_READ) for (const b of dataReply(req)) s.write(b);
      else if (req.type === NBD_CMD_BLOCK_STATUS) s.write(encodeBlockStatus(req.cookie, NBD_REPLY_FLAG_DONE, 7, [{ length: 1, flags: 0 }]));
      else s.write(encodeSimpleReply(req.cookie, 0));
    },
  });
  const c = await client(tt, f);
  await c.pread(0, 1, { df: true });
  await c.pwrite(Buffer.from('abc'), 9, { fua: true });
  await c.zero(0, 10, { fua: true, noHole: true, fastZero: true });
  await c.trim(0, 10, { fua: true });
  await c.blockStatus(0, 10, { reqOne: true });
  await c.flush();
  await c.cache(4, 5);
  const reqs = f.requests();
  tt.same(reqs.map((r) => r.flags), [
    NBD_CMD_FLAG_DF,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_REQ_ONE,
    0,
    0,
  ]);
  tt.equal(reqs[2]!.type, NBD_CMD_WRITE_ZEROES);
  tt.same([reqs[6]!.offset, reqs[6]!.length], [4, 5]);
  tt.equal(new Set(reqs.map((r) => r.cookie)).size, reqs.length, 'cookies are unique');
  await c.disconnect(1_000);
  tt.equal(f.requests().at(-1)!.type, NBD_CMD_DISC, 'disconnect sends NBD_CMD_DISC');
});

t.test('block status with two meta contexts', async (tt) => {
  const f = await fake(tt, {
    contexts: new Map([[BASE_ALLOCATION, 3], ['qemu:dirty-bitmap:b0', 9]]),
    onRequest: (req, _p, s) => {
      s.write(encodeBlockStatus(req.cookie, 0, 9, [{ length: 65536, flags: 1 }]));
      s.write(encodeBlockStatus(req.cookie, NBD_REPLY_FLAG_DONE, 3, [{ length: 4096, flags: 0 }, { length: 61440, flags: 3 }]));
    },
  });
  const c = await client(tt, f, { metaContexts: [BASE_ALLOCATION, 'qemu:dirty-bitmap:b0'] });
  tt.same(c.metaContexts, new Map([[BASE_ALLOCATION, 3], ['qemu:dirty-bitmap:b0', 9]]));
  const bs = await c.blockStatus(0, 65536);
  tt.same(bs.get(BASE_ALLOCATION), [{ length: 4096, flags: 0 }, { length: 61440, flags: 3 }]);
  tt.same(bs.get('qemu:dirty-bitmap:b0'), [{ length: 65536, flags: 1 }]);
});

t.test('error chunks and simple errors become PeerError with the errno', async (tt) => {
  const f = await fake(tt, {
    onRequest: (req, _p, s) => {
      switch (req.type) {
        case NBD_CMD_READ: // ERROR_OFFSET after some data, then NONE
          s.write(Buffer.concat([encodeOffsetDataHeader(req.cookie, 0, 0, 10), pattern(0, 10)]));
          s.write(errorOffsetChunk(req.cookie, 5, 'disk on fire', 10));
          s.write(encodeNoneChunk(req.cookie));
          break;
        case NBD_CMD_WRITE: // plain ERROR with DONE
          s.write(encodeErrorChunk(req.cookie, NBD_REPLY_FLAG_DONE, 28, 'full'));
          break;
        case NBD_CMD_TRIM: // an error type this client does not know is still an error
          s.write(Buffer.concat([encodeChunkHeader(req.cookie, NBD_REPLY_FLAG_DONE, 0x8000 + 99, 6), u32(95), Buffer.alloc(2)]));
          break;
        default: // a structured-negotiated server may still answer non-reads with a simple error
          s.write(encodeSimpleReply(req.cookie, 1));
      }
    },
  });
  const c = await client(tt, f);
  const results = await Promise.all([settle(c.pread(0, 20)), settle(c.pwrite(Buffer.alloc(4), 1)), settle(c.trim(2, 1)), settle(c.flush())]);
  const errnos = results.map((r) => (r.ok ? 'ok' : (r.error as PeerError).errno));
  tt.same(errnos, [5, 28, 95, 1]);
  tt.ok(results.every((r) => !r.ok && r.error instanceof PeerError));
  tt.match(results[0]!.ok ? '' : (results[0]!.error as Error).message, /READ at offset 0 length 20 failed: EIO \(disk on fire\)/);
  await tt.rejects(c.flush(), { name: 'PeerError', errno: 1 }, 'errors fail only their request: the connection is still up');
});

t.test('pwriteCallbacks: one callback per write, never from inside the call; FUA, errors, bad ranges, closed', async (tt) => {
  const f = await fake(tt, {
    onRequest: (req, payload, s) => {
      if (req.type !== NBD_CMD_WRITE) return;
      s.write(req.offset === 4096 ? encodeErrorChunk(req.cookie, NBD_REPLY_FLAG_DONE, 28, 'full') : encodeSimpleReply(req.cookie, 0));
      tt.same(payload, Buffer.alloc(req.length, req.offset / 512), `payload of the write at ${req.offset}`);
    },
  });
  const c = await client(tt, f);
  const outcome = (offset: number, length: number, fua: boolean): Promise<string> =>
    new Promise((resolve) => {
      let inside = true;
      let calls = 0;
      const once = (what: string): void => {
        calls++;
        if (inside) resolve('synchronous');
        // A second callback would show up as a later call on the same write.
        setImmediate(() => resolve(calls === 1 ? what : `${calls} callbacks`));
      };
      c.pwriteCallbacks(Buffer.alloc(length, offset / 512), offset, fua, () => once('ok'), (err) => once(`${err.name}:${(err as PeerError).errno ?? ''}`));
      inside = false;
    });
  tt.same(await Promise.all([outcome(0, 512, false), outcome(4096, 512, true), outcome(1024, 100, false)]), ['ok', 'PeerError:28', 'ok']);
  tt.same(
    f.requests().map((r) => [r.type, r.flags, r.offset, r.length]),
    [
      [NBD_CMD_WRITE, 0, 0, 512],
      [NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 4096, 512],
      [NBD_CMD_WRITE, 0, 1024, 100],
    ],
  );
  tt.equal(await outcome(-512, 1, false), 'RangeError:', 'a bad offset fails by callback, not by a throw');
  await c.close();
  tt.equal(await outcome(0, 512, false), 'ShutdownError:', 'a closed client fails by callback');
  tt.equal(f.requests().length, 3, 'nothing more was sent');
});

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n, 0);
  return b;
}

function errorOffsetChunk(cookie: bigint, errno: number, msg: string, offset: number): Buffer {
  const m = Buffer.from(msg);
  const payload = Buffer.alloc(6 + m.length + 8);
  payload.writeUInt32BE(errno, 0);
  payload.writeUInt16BE(m.length, 4);
  m.copy(payload, 6);
  payload.writeBigUInt64BE(BigInt(offset), 6 + m.length);
  return Buffer.concat([encodeChunkHeader(cookie, 0, NBD_REPLY_TYPE_ERROR_OFFSET, payload.length), payload]);
}

/** Wire violations: each answers the first request with bad bytes while a second request is also pending. */
const violations: [string, (req: Request) => Buffer[], RegExp][] = [
  ['bad reply magic', (r) => [Buffer.from('0123456789abcdefghij'), u32(Number(r.cookie))], /bad reply magic/],
  ['unknown cookie', (r) => [encodeSimpleReply(r.cookie + 1000n, 0)], /unknown cookie/],
  ['cookie of 2^64 - 1', () => [encodeSimpleReply(2n ** 64n - 1n, 0)], /unknown cookie/],
  ['OFFSET_DATA outside the request', (r) => [encodeOffsetDataHeader(r.cookie, NBD_REPLY_FLAG_DONE, r.offset + 4096, 4), Buffer.alloc(4)], /outside request/],
  ['OFFSET_HOLE outside the request', (r) => [encodeOffsetHole(r.cookie, NBD_REPLY_FLAG_DONE, r.offset, r.length + 1)], /outside request/],
  ['DONE before the read is covered', (r) => [encodeOffsetDataHeader(r.cookie, NBD_REPLY_FLAG_DONE, r.offset, 8), Buffer.alloc(8)], /covered 8 of/],
  ['OFFSET_DATA shorter than 9 bytes', (r) => [encodeChunkHeader(r.cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, 8), Buffer.alloc(8)], /invalid for READ/],
  ['unknown non-error chunk type', (r) => [encodeChunkHeader(r.cookie, NBD_REPLY_FLAG_DONE, 77, 0)], /type 77/],
  ['NONE without DONE', (r) => [encodeChunkHeader(r.cookie, 0, 0, 0)], /NBD_REPLY_TYPE_NONE/],
  ['BLOCK_STATUS to a READ', (r) => [encodeBlockStatus(r.cookie, NBD_REPLY_FLAG_DONE, 7, [{ length: 1, flags: 0 }])], /invalid for READ/],
  ['error chunk with errno 0', (r) => [encodeErrorChunk(r.cookie, NBD_REPLY_FLAG_DONE, 0, '')], /error 0/],
  ['malformed error chunk', (r) => [encodeChunkHeader(r.cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, 7), u32(5), Buffer.from([0, 9, 0])], /malformed error chunk/],
  ['simple reply after a structured chunk', (r) => [encodeOffsetHole(r.cookie, 0, r.offset, 1), encodeSimpleReply(r.cookie, 0)], /simple reply to cookie/],
];

for (const [name, bytes, why] of violations) {
  t.test(`protocol violation: ${name} → ProtocolError, connection torn down`, async (tt) => {
    let first = true;
    const f = await fake(tt, {
      onRequest: (req, _p, s) => {
        if (!first) return; // the second request never gets an answer
        first = false;
        for (const b of bytes(req)) s.write(b);
      },
    });
    const c = await client(tt, f);
    const [a, b] = await Promise.all([settle(c.pread(0, 4096)), settle(c.pread(8192, 4096))]);
    tt.ok(!a.ok && a.error instanceof ProtocolError, 'offending request rejects with ProtocolError');
    tt.match(a.ok ? '' : (a.error as Error).message, why);
    tt.ok(!b.ok && b.error === (a.ok ? undefined : a.error), 'the other pending request rejects with the same error');
    tt.type(await c.closed, ProtocolError, 'closed reports the reason');
    await tt.rejects(c.pread(0, 1), ProtocolError, 'later requests reject at once');
  });
}

t.test('BLOCK_STATUS for a context id that was never negotiated is a ProtocolError', async (tt) => {
  const f = await fake(tt, {
    onRequest: (req, _p, s) => s.write(encodeBlockStatus(req.cookie, NBD_REPLY_FLAG_DONE, 99, [{ length: 1, flags: 0 }])),
  });
  const c = await client(tt, f);
  await tt.rejects(c.blockStatus(0, 1), { name: 'ProtocolError', message: /meta context id 99/ });
});

t.test('structured chunk when structured replies were not negotiated is a ProtocolError', async (tt) => {
  const f = await fake(tt, { onRequest: (req, _p, s) => s.write(encodeNoneChunk(req.cookie)) });
  const c = await client(tt, f, { structuredReplies: false });
  await tt.rejects(c.flush(), { name: 'ProtocolError', message: /without NBD_OPT_STRUCTURED_REPLY/ });
});

t.test('server closing the socket rejects pending requests with IoError', async (tt) => {
  const f = await fake(tt, { onRequest: (_req, _p, s) => s.destroy() });
  const c = await client(tt, f);
  const [a, b] = await Promise.all([settle(c.pread(0, 1)), settle(c.flush())]);
  tt.ok(!a.ok && a.error instanceof IoError);
  tt.ok(!b.ok && b.error instanceof IoError);
  tt.type(await c.closed, IoError);
});

t.test('argument checks reject before anything is sent', async (tt) => {
  const f = await fake(tt);
  const c = await client(tt, f);
  await tt.rejects(c.pread(-1, 1), RangeError);
  await tt.rejects(c.pread(1.5, 1), RangeError);
  await tt.rejects(c.pread(0, 2 ** 32), RangeError);
  await tt.rejects(NbdClient.connect(f.target, { maxInFlight: 0 }), RangeError);
  await tt.rejects(NbdClient.connect(f.target, { maxInFlight: 65537 }), RangeError);
  tt.equal(f.requests().length, 0);
});

t.test('server hanging up right after NBD_OPT_GO: requests reject with IoError', async (tt) => {
  const f = await fake(tt, {
    onOption: (opt, data) => {
      if (opt !== NBD_OPT_GO) return undefined;
      const go = defaultOption(opt, data, new Map(), true);
      return { replies: go.replies, next: 'close' };
    },
  });
  const c = await client(tt, f);
  tt.equal(c.size, FAKE_SIZE, 'handshake completed');
  await tt.rejects(c.pread(0, 1), IoError);
  tt.type(await c.closed, IoError);
});

t.test('list/info need a fixed-newstyle server', async (tt) => {
  const f = await fake(tt, { handshakeFlags: 0 });
  await tt.rejects(NbdClient.list(f.target), { name: 'NotSupportedError', message: /not a fixed-newstyle/ });
  tt.same(f.options(), [], 'no option was sent to a server that only knows EXPORT_NAME');
});
