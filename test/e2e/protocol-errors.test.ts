// Hand-crafted bytes against a real server on a real socket: every malformed input gets the spec's answer
// (an error reply, or a clean disconnect), and afterwards the server still serves other clients.

import t from 'tap';
import type { Test } from 'tap';
import * as C from '../../lib/protocol/constants';
import { decodeReplyHeader } from '../../lib/protocol/reply';
import {
  encodeClientFlags,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
} from '../../lib/protocol/handshake';
import { encodeRequest } from '../../lib/protocol/request';
import { RawConn } from '../helpers/raw-socket';
import { startTestNode } from '../helpers/in-process';

const req = (type: number, offset: number, length: number, cookie = 1n, flags = 0): Buffer =>
  encodeRequest({ type, flags, cookie, offset, length });

/** A fresh client can still handshake and read after whatever the previous test did. */
async function stillServes(t: Test, port: number): Promise<void> {
  const c = await RawConn.connect(port);
  await c.handshake('disk0');
  c.send(req(C.NBD_CMD_READ, 0, 4096, 77n));
  const r = await c.simpleReply();
  t.equal(r.error, 0, 'another client is still served');
  t.equal((await c.read(4096)).length, 4096);
  c.destroy();
}

t.test('protocol errors', async (t) => {
  const node = await startTestNode(t, { exports: ['disk0=64M', 'other=1M'] });
  const port = node.port;

  t.test('greeting advertises fixed newstyle and no zeroes', async (t) => {
    const c = await RawConn.connect(port);
    const g = await c.read(18);
    t.equal(g.readBigUInt64BE(0), C.NBD_MAGIC);
    t.equal(g.readBigUInt64BE(8), C.NBD_IHAVEOPT);
    t.equal(g.readUInt16BE(16), C.NBD_FLAG_FIXED_NEWSTYLE | C.NBD_FLAG_NO_ZEROES);
    c.destroy();
  });

  t.test('unknown client flags → disconnect', async (t) => {
    const c = await RawConn.connect(port);
    await c.read(18);
    c.send(encodeClientFlags(0x80));
    t.ok(await c.closedWithin(), 'server closed');
    await stillServes(t, port);
  });

  t.test('option with bad magic → disconnect', async (t) => {
    const c = await RawConn.connect(port);
    await c.greet();
    const bad = encodeOption(C.NBD_OPT_LIST);
    bad.writeUInt32BE(0xdeadbeef, 0);
    c.send(bad);
    t.ok(await c.closedWithin());
    await stillServes(t, port);
  });

  t.test('unknown option → ERR_UNSUP, handshake goes on', async (t) => {
    const c = await RawConn.connect(port);
    await c.greet();
    c.send(encodeOption(4242, Buffer.from('junk')));
    const [r] = await c.optionReplies();
    t.equal(r!.type, C.NBD_REP_ERR_UNSUP);
    t.equal(r!.option, 4242);
    c.send(encodeOption(C.NBD_OPT_GO, encodeInfoRequest({ name: 'disk0', infos: [] })));
    const replies = await c.optionReplies();
    t.equal(replies[replies.length - 1]!.type, C.NBD_REP_ACK, 'GO still works');
    c.destroy();
  });

  t.test('STARTTLS → ERR_POLICY (no TLS yet); with payload → ERR_INVALID', async (t) => {
    const c = await RawConn.connect(port);
    await c.greet();
    c.send(encodeOption(C.NBD_OPT_STARTTLS));
    t.equal((await c.optionReply()).type, C.NBD_REP_ERR_POLICY);
    c.send(encodeOption(C.NBD_OPT_STARTTLS, Buffer.from('x')));
    t.equal((await c.optionReply()).type, C.NBD_REP_ERR_INVALID);
    c.destroy();
  });

  t.test('unknown export: GO → ERR_UNKNOWN, EXPORT_NAME → disconnect', async (t) => {
    const c = await RawConn.connect(port);
    await c.greet();
    c.send(encodeOption(C.NBD_OPT_GO, encodeInfoRequest({ name: 'nope', infos: [] })));
    t.equal((await c.optionReply()).type, C.NBD_REP_ERR_UNKNOWN);
    c.send(encodeOption(C.NBD_OPT_INFO, encodeInfoRequest({ name: 'nope', infos: [] })));
    t.equal((await c.optionReply()).type, C.NBD_REP_ERR_UNKNOWN);
    c.send(encodeOption(C.NBD_OPT_EXPORT_NAME, Buffer.from('nope')));
    t.ok(await c.closedWithin());
  });

  t.test('malformed INFO, LIST with payload, meta context before structured replies → ERR_INVALID', async (t) => {
    const c = await RawConn.connect(port);
    await c.greet();
    c.send(encodeOption(C.NBD_OPT_INFO, Buffer.from([0, 0, 0, 9, 1])));
    t.equal((await c.optionReply()).type, C.NBD_REP_ERR_INVALID);
    c.send(encodeOption(C.NBD_OPT_LIST, Buffer.from('x')));
    t.equal((await c.optionReply()).type, C.NBD_REP_ERR_INVALID);
    c.send(encodeOption(C.NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest({ name: 'disk0', queries: [C.BASE_ALLOCATION] })));
    t.equal((await c.optionReply()).type, C.NBD_REP_ERR_INVALID);
    c.send(encodeOption(C.NBD_OPT_STRUCTURED_REPLY, Buffer.from('x')));
    t.equal((await c.optionReply()).type, C.NBD_REP_ERR_INVALID);
    c.destroy();
  });

  t.test('LIST_META_CONTEXT lists base:allocation; SET selects it with an id', async (t) => {
    const c = await RawConn.connect(port);
    await c.greet();
    c.send(encodeOption(C.NBD_OPT_STRUCTURED_REPLY));
    t.equal((await c.optionReply()).type, C.NBD_REP_ACK);
    c.send(encodeOption(C.NBD_OPT_LIST_META_CONTEXT, encodeMetaContextRequest({ name: 'disk0', queries: [] })));
    const list = await c.optionReplies();
    t.equal(list.length, 2);
    t.equal(list[0]!.type, C.NBD_REP_META_CONTEXT);
    t.equal(list[0]!.payload.toString('utf8', 4), C.BASE_ALLOCATION);
    c.send(encodeOption(C.NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest({ name: 'disk0', queries: ['qemu:dirty-bitmap:x', C.BASE_ALLOCATION] })));
    const set = await c.optionReplies();
    t.equal(set.length, 2, 'only the known context is selected');
    t.equal(set[0]!.payload.toString('utf8', 4), C.BASE_ALLOCATION);
    c.destroy();
  });

  t.test('oversized option → ERR_TOO_BIG without buffering, handshake goes on', async (t) => {
    const c = await RawConn.connect(port);
    await c.greet();
    c.send(encodeOption(C.NBD_OPT_GO, Buffer.alloc(200 * 1024)));
    t.equal((await c.optionReply()).type, C.NBD_REP_ERR_TOO_BIG);
    c.send(encodeOption(C.NBD_OPT_LIST));
    const list = await c.optionReplies();
    t.equal(list.filter((r) => r.type === C.NBD_REP_SERVER).length, 2, 'LIST answers both exports');
    c.destroy();
  });

  t.test('too many options → disconnect', async (t) => {
    const c = await RawConn.connect(port);
    await c.greet();
    for (let i = 0; i < 40; i++) c.send(encodeOption(9999));
    t.ok(await c.closedWithin(), 'server gave up on the client');
    await stillServes(t, port);
  });

  t.test('ABORT is acknowledged and closes', async (t) => {
    const c = await RawConn.connect(port);
    await c.greet();
    c.send(encodeOption(C.NBD_OPT_ABORT));
    t.equal((await c.optionReply()).type, C.NBD_REP_ACK);
    t.ok(await c.closedWithin());
  });

  t.test('EXPORT_NAME path: size + flags without zeroes, simple replies', async (t) => {
    const c = await RawConn.connect(port);
    await c.greet();
    c.send(encodeOption(C.NBD_OPT_EXPORT_NAME, Buffer.from('other')));
    const r = await c.read(10);
    t.equal(Number(r.readBigUInt64BE(0)), 1024 * 1024);
    const flags = r.readUInt16BE(8);
    t.ok(flags & C.NBD_FLAG_HAS_FLAGS && flags & C.NBD_FLAG_SEND_FLUSH && flags & C.NBD_FLAG_CAN_MULTI_CONN);
    t.notOk(flags & C.NBD_FLAG_SEND_DF, 'no DF without structured replies');
    c.send(req(C.NBD_CMD_READ, 0, 512, 5n));
    t.same(await c.simpleReply(), { error: 0, cookie: 5n });
    t.equal((await c.read(512)).length, 512);
    c.destroy();
  });

  t.test('EXPORT_NAME without NO_ZEROES gets 124 zero bytes', async (t) => {
    const c = await RawConn.connect(port);
    await c.greet(C.NBD_FLAG_C_FIXED_NEWSTYLE);
    c.send(encodeOption(C.NBD_OPT_EXPORT_NAME, Buffer.from('')));
    const r = await c.read(134);
    t.equal(Number(r.readBigUInt64BE(0)), 64 * 1024 * 1024, '"" is the default (first) export');
    t.ok(r.subarray(10).equals(Buffer.alloc(124)));
    c.destroy();
  });

  t.test('transmission errors (simple replies)', async (t) => {
    const c = await RawConn.connect(port);
    const { size } = await c.handshake('disk0');
    const cases: Array<[string, Buffer, number]> = [
      ['read past the end', req(C.NBD_CMD_READ, size - 512, 1024), C.NBD_EINVAL],
      ['read at a huge offset', req(C.NBD_CMD_READ, 2 ** 60, 512), C.NBD_EINVAL],
      ['unknown command', req(99, 0, 0), C.NBD_EINVAL],
      ['flush with a range', req(C.NBD_CMD_FLUSH, 4096, 0), C.NBD_EINVAL],
      ['unknown flag', req(C.NBD_CMD_READ, 0, 512, 1n, 0x4000), C.NBD_EINVAL],
      ['DF without structured replies', req(C.NBD_CMD_READ, 0, 512, 1n, C.NBD_CMD_FLAG_DF), C.NBD_EINVAL],
      ['NO_HOLE on a write-less command', req(C.NBD_CMD_TRIM, 0, 512, 1n, C.NBD_CMD_FLAG_NO_HOLE), C.NBD_EINVAL],
      ['REQ_ONE outside BLOCK_STATUS', req(C.NBD_CMD_READ, 0, 512, 1n, C.NBD_CMD_FLAG_REQ_ONE), C.NBD_EINVAL],
      ['BLOCK_STATUS without structured replies', req(C.NBD_CMD_BLOCK_STATUS, 0, 512), C.NBD_EINVAL],
      ['read larger than the maximum block size', req(C.NBD_CMD_READ, 0, 33 * 1024 * 1024), C.NBD_EINVAL],
      ['trim past the end', req(C.NBD_CMD_TRIM, size, 1), C.NBD_EINVAL],
      ['write zeroes past the end', req(C.NBD_CMD_WRITE_ZEROES, size - 1, 2), C.NBD_ENOSPC],
      [
        'slow zero refused with FAST_ZERO',
        req(C.NBD_CMD_WRITE_ZEROES, 0, 4096, 1n, C.NBD_CMD_FLAG_NO_HOLE | C.NBD_CMD_FLAG_FAST_ZERO),
        C.NBD_ENOTSUP,
      ],
    ];
    for (const [name, bytes, errno] of cases) {
      c.send(bytes);
      t.equal((await c.simpleReply()).error, errno, name);
    }
    // Write past the end: ENOSPC, and the payload is consumed so the stream stays in sync.
    c.send(Buffer.concat([req(C.NBD_CMD_WRITE, size - 512, 4096, 2n), Buffer.alloc(4096, 0xee)]));
    t.same(await c.simpleReply(), { error: C.NBD_ENOSPC, cookie: 2n }, 'write past the end');
    // Oversized write: refused, payload drained (not buffered), next request answered.
    const big = 40 * 1024 * 1024;
    c.send(req(C.NBD_CMD_WRITE, 0, big, 3n));
    for (let sent = 0; sent < big; sent += 1 << 20) c.send(Buffer.alloc(1 << 20, 0xcc));
    t.same(await c.simpleReply(), { error: C.NBD_EINVAL, cookie: 3n }, 'oversized write refused');
    c.send(req(C.NBD_CMD_READ, 0, 4096, 4n));
    t.same(await c.simpleReply(), { error: 0, cookie: 4n }, 'stream still in sync after the drain');
    t.notOk((await c.read(4096)).includes(0xcc), 'the refused payload was not written');
    c.destroy();
  });

  t.test('bad request magic → disconnect; others unaffected', async (t) => {
    const other = await RawConn.connect(port);
    await other.handshake('disk0');
    const c = await RawConn.connect(port);
    await c.handshake('disk0');
    const bad = req(C.NBD_CMD_READ, 0, 512);
    bad.writeUInt32BE(0x12345678, 0);
    c.send(bad);
    t.ok(await c.closedWithin(), 'bad magic drops the connection');
    other.send(req(C.NBD_CMD_READ, 0, 512, 9n));
    t.same(await other.simpleReply(), { error: 0, cookie: 9n }, 'an existing connection is untouched');
    other.destroy();
  });

  t.test('truncated request then hang-up does not hurt the server', async (t) => {
    const c = await RawConn.connect(port);
    await c.handshake('disk0');
    c.send(req(C.NBD_CMD_WRITE, 0, 4096).subarray(0, 13));
    c.destroy();
    const d = await RawConn.connect(port);
    await d.handshake('disk0');
    d.send(Buffer.concat([req(C.NBD_CMD_WRITE, 0, 4096, 1n), Buffer.alloc(1000)]));
    d.destroy(); // payload cut short
    await stillServes(t, port);
  });

  t.test('structured replies: errors come as ERROR chunks, reads as data/hole chunks', async (t) => {
    const c = await RawConn.connect(port);
    const { size } = await c.handshake('disk0', { structured: true, meta: true });
    c.send(req(C.NBD_CMD_READ, size, 1, 11n));
    const h = decodeReplyHeader(await c.read(20))!;
    t.equal(h.kind, 'structured');
    if (h.kind !== 'structured') return;
    t.equal(h.type, C.NBD_REPLY_TYPE_ERROR);
    t.equal(h.flags & C.NBD_REPLY_FLAG_DONE, C.NBD_REPLY_FLAG_DONE);
    const p = await c.read(h.length);
    t.equal(p.readUInt32BE(0), C.NBD_EINVAL);
    // A fresh export is a hole: one OFFSET_HOLE chunk with DONE.
    c.send(req(C.NBD_CMD_READ, 8 * 4096, 8192, 12n));
    const hh = decodeReplyHeader(await c.read(20))!;
    t.ok(hh.kind === 'structured' && hh.type === C.NBD_REPLY_TYPE_OFFSET_HOLE && hh.flags === C.NBD_REPLY_FLAG_DONE);
    const hp = await c.read(12);
    t.equal(Number(hp.readBigUInt64BE(0)), 8 * 4096);
    t.equal(hp.readUInt32BE(8), 8192);
    // DF on the same range: exactly one OFFSET_DATA chunk of zeros.
    c.send(req(C.NBD_CMD_READ, 8 * 4096, 8192, 13n, C.NBD_CMD_FLAG_DF));
    const dh = decodeReplyHeader(await c.read(20))!;
    t.ok(dh.kind === 'structured' && dh.type === C.NBD_REPLY_TYPE_OFFSET_DATA && dh.flags === C.NBD_REPLY_FLAG_DONE);
    const dp = await c.read(8 + 8192);
    t.ok(dp.subarray(8).equals(Buffer.alloc(8192)));
    // BLOCK_STATUS with REQ_ONE: one descriptor, no longer than asked.
    c.send(req(C.NBD_CMD_BLOCK_STATUS, 0, 1000, 14n, C.NBD_CMD_FLAG_REQ_ONE));
    const bh = decodeReplyHeader(await c.read(20))!;
    t.ok(bh.kind === 'structured' && bh.type === C.NBD_REPLY_TYPE_BLOCK_STATUS);
    const bp = await c.read(bh.kind === 'structured' ? bh.length : 0);
    t.equal(bp.length, 12, 'one descriptor');
    t.equal(bp.readUInt32BE(4), 1000);
    t.equal(bp.readUInt32BE(8), C.NBD_STATE_HOLE | C.NBD_STATE_ZERO);
    // Zero-length BLOCK_STATUS has no valid answer: EINVAL.
    c.send(req(C.NBD_CMD_BLOCK_STATUS, 0, 0, 15n));
    const zh = decodeReplyHeader(await c.read(20))!;
    t.ok(zh.kind === 'structured' && zh.type === C.NBD_REPLY_TYPE_ERROR);
    await c.read(zh.kind === 'structured' ? zh.length : 0);
    c.destroy();
  });

  t.test('BLOCK_STATUS needs base:allocation for this export', async (t) => {
    const c = await RawConn.connect(port);
    await c.greet();
    c.send(encodeOption(C.NBD_OPT_STRUCTURED_REPLY));
    await c.optionReplies();
    // Meta context chosen for "other", then GO to "disk0": the context does not carry over.
    c.send(encodeOption(C.NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest({ name: 'other', queries: [C.BASE_ALLOCATION] })));
    await c.optionReplies();
    c.send(encodeOption(C.NBD_OPT_GO, encodeInfoRequest({ name: 'disk0', infos: [] })));
    await c.optionReplies();
    c.send(req(C.NBD_CMD_BLOCK_STATUS, 0, 4096, 21n));
    const h = decodeReplyHeader(await c.read(20))!;
    t.ok(h.kind === 'structured' && h.type === C.NBD_REPLY_TYPE_ERROR);
    t.equal((await c.read(h.kind === 'structured' ? h.length : 0)).readUInt32BE(0), C.NBD_EINVAL);
    c.destroy();
  });

  t.test('many requests in flight on one connection, every cookie answered once', async (t) => {
    const c = await RawConn.connect(port);
    await c.handshake('disk0');
    const n = 300;
    const batch: Buffer[] = [];
    for (let i = 0; i < n; i++) {
      const data = Buffer.alloc(4096, i & 0xff);
      batch.push(req(C.NBD_CMD_WRITE, i * 4096, 4096, BigInt(1000 + i)), data);
    }
    c.send(Buffer.concat(batch));
    const seen = new Set<bigint>();
    for (let i = 0; i < n; i++) {
      const r = await c.simpleReply();
      t.equal(r.error, 0);
      seen.add(r.cookie);
    }
    t.equal(seen.size, n, 'all distinct cookies answered');
    c.send(req(C.NBD_CMD_READ, 7 * 4096, 4096, 5n));
    await c.simpleReply();
    t.ok((await c.read(4096)).equals(Buffer.alloc(4096, 7)));
    c.destroy();
  });

  t.test('a burst whose replies fill several reply buffers: every reply intact and in one piece', async (t) => {
    // Replies gathered in one tick go into 64 KiB buffers: 6000 one-byte writes (16-byte replies) and 4 KiB
    // reads (4 KiB copied next to each header) cross several buffer ends mid-burst.
    const c = await RawConn.connect(port);
    await c.handshake('disk0');
    const writes = 6000;
    const reads = 40;
    const seen = new Set<bigint>();
    let bad = 0;
    // First the writes (their replies alone fill more than one buffer), then the reads.
    const burst: Buffer[] = [];
    for (let i = 0; i < writes; i++) burst.push(req(C.NBD_CMD_WRITE, 8 * 1024 * 1024 + i, 1, BigInt(10_000 + i)), Buffer.from([i & 0xff]));
    c.send(Buffer.concat(burst));
    for (let i = 0; i < writes; i++) {
      const r = await c.simpleReply();
      seen.add(r.cookie);
      if (r.error !== 0) bad++;
    }
    const reqs: Buffer[] = [];
    for (let i = 0; i < reads; i++) reqs.push(req(C.NBD_CMD_READ, 8 * 1024 * 1024, 4096, BigInt(50_000 + i)));
    c.send(Buffer.concat(reqs));
    const want = Buffer.alloc(4096);
    for (let i = 0; i < 4096; i++) want[i] = i & 0xff;
    for (let i = 0; i < reads; i++) {
      const r = await c.simpleReply();
      seen.add(r.cookie);
      if (r.error !== 0) bad++;
      if (!(await c.read(4096)).equals(want)) bad++;
    }
    t.equal(seen.size, writes + reads, 'every cookie answered once');
    t.equal(bad, 0, 'no error, every read payload right and framed after its header');
    c.destroy();
  });

  t.test('DISC: in-flight writes complete before the server closes', async (t) => {
    const c = await RawConn.connect(port);
    await c.handshake('disk0');
    const payload = Buffer.alloc(1 << 20, 0x5a);
    c.send(Buffer.concat([req(C.NBD_CMD_WRITE, 4 << 20, payload.length, 1n), payload, req(C.NBD_CMD_DISC, 0, 0, 2n)]));
    t.same(await c.simpleReply(), { error: 0, cookie: 1n }, 'the write before DISC is answered');
    t.ok(await c.closedWithin(), 'then the server closes');
    const d = await RawConn.connect(port);
    await d.handshake('disk0');
    d.send(req(C.NBD_CMD_READ, 4 << 20, payload.length, 3n));
    await d.simpleReply();
    t.ok((await d.read(payload.length)).equals(payload));
    d.destroy();
  });

  t.test('multi-conn: a write completed on one connection is seen by another', async (t) => {
    const a = await RawConn.connect(port);
    const b = await RawConn.connect(port);
    await a.handshake('disk0');
    await b.handshake('disk0');
    const data = Buffer.alloc(8192, 0x3c);
    a.send(Buffer.concat([req(C.NBD_CMD_WRITE, 1 << 20, data.length, 1n), data]));
    t.equal((await a.simpleReply()).error, 0);
    b.send(req(C.NBD_CMD_FLUSH, 0, 0, 2n));
    t.equal((await b.simpleReply()).error, 0, 'flush on the other connection');
    b.send(req(C.NBD_CMD_READ, 1 << 20, data.length, 3n));
    await b.simpleReply();
    t.ok((await b.read(data.length)).equals(data));
    a.destroy();
    b.destroy();
  });

  t.test('exports are isolated from each other', async (t) => {
    const a = await RawConn.connect(port);
    await a.handshake('other');
    a.send(Buffer.concat([req(C.NBD_CMD_WRITE, 0, 4096, 1n), Buffer.alloc(4096, 0x99)]));
    t.equal((await a.simpleReply()).error, 0);
    a.send(req(C.NBD_CMD_READ, (1 << 20) - 512, 4096, 2n));
    t.equal((await a.simpleReply()).error, C.NBD_EINVAL, 'bounded by its own size');
    const b = await RawConn.connect(port);
    await b.handshake('disk0');
    b.send(req(C.NBD_CMD_READ, 0, 4096, 3n));
    await b.simpleReply();
    t.notOk((await b.read(4096)).equals(Buffer.alloc(4096, 0x99)), 'disk0 did not get other\'s write');
    a.destroy();
    b.destroy();
  });
});

t.test('read-only export: writes get EPERM, reads work', async (t) => {
  const node = await startTestNode(t, { exports: ['ro=1M'], readOnly: true });
  const c = await RawConn.connect(node.port);
  const { flags } = await c.handshake('ro');
  t.ok(flags & C.NBD_FLAG_READ_ONLY, 'READ_ONLY advertised');
  t.notOk(flags & C.NBD_FLAG_SEND_TRIM, 'no TRIM advertised');
  c.send(Buffer.concat([req(C.NBD_CMD_WRITE, 0, 512, 1n), Buffer.alloc(512)]));
  t.same(await c.simpleReply(), { error: C.NBD_EPERM, cookie: 1n });
  c.send(req(C.NBD_CMD_TRIM, 0, 512, 2n));
  t.equal((await c.simpleReply()).error, C.NBD_EPERM);
  c.send(req(C.NBD_CMD_WRITE_ZEROES, 0, 512, 3n));
  t.equal((await c.simpleReply()).error, C.NBD_EPERM);
  c.send(req(C.NBD_CMD_READ, 0, 512, 4n));
  t.equal((await c.simpleReply()).error, 0);
  await c.read(512);
  c.destroy();
});

t.test('server stopping: requests get ESHUTDOWN, then the connection closes', async (t) => {
  const node = await startTestNode(t, { exports: ['disk0=1M'] });
  const c = await RawConn.connect(node.port);
  await c.handshake('disk0');
  const stopped = node.stop();
  await new Promise((r) => setTimeout(r, 50));
  c.send(req(C.NBD_CMD_READ, 0, 512, 1n));
  t.same(await c.simpleReply(), { error: C.NBD_ESHUTDOWN, cookie: 1n });
  c.send(Buffer.concat([req(C.NBD_CMD_WRITE, 0, 512, 2n), Buffer.alloc(512)]));
  t.same(await c.simpleReply(), { error: C.NBD_ESHUTDOWN, cookie: 2n }, 'write refused, payload drained');
  t.ok(await c.closedWithin(5000), 'closed after the grace period');
  await stopped;
});

t.test('largest requests: 32 MiB READ/WRITE, TRIM and WRITE_ZEROES of 4 GiB − 1', async (t) => {
  const node = await startTestNode(t, { exports: ['big=5G'] });
  const c = await RawConn.connect(node.port);
  await c.handshake('big', { structured: true, meta: true });
  const max = 32 * 1024 * 1024;
  const data = Buffer.alloc(max, 0x42);
  c.send(Buffer.concat([req(C.NBD_CMD_WRITE, 4096, max, 1n), data]));
  t.same(await c.simpleReply(), { error: 0, cookie: 1n }, '32 MiB write');
  c.send(req(C.NBD_CMD_READ, 4096, max, 2n, C.NBD_CMD_FLAG_DF));
  const h = decodeReplyHeader(await c.read(20))!;
  t.ok(h.kind === 'structured' && h.type === C.NBD_REPLY_TYPE_OFFSET_DATA && h.length === 8 + max, '32 MiB DF read in one chunk');
  t.ok((await c.read(8 + max, 20_000)).subarray(8).equals(data));
  const huge = 2 ** 32 - 1;
  c.send(req(C.NBD_CMD_WRITE_ZEROES, 0, huge, 3n));
  t.same(await c.simpleReply(), { error: 0, cookie: 3n }, 'WRITE_ZEROES of 4 GiB − 1');
  c.send(req(C.NBD_CMD_TRIM, 2 ** 30, huge, 4n));
  t.same(await c.simpleReply(), { error: 0, cookie: 4n }, 'TRIM of 4 GiB − 1');
  c.send(req(C.NBD_CMD_BLOCK_STATUS, 0, huge, 5n));
  const bh = decodeReplyHeader(await c.read(20))!;
  const bp = await c.read(bh.kind === 'structured' ? bh.length : 0);
  t.equal(bp.readUInt32BE(4), huge, 'one extent covers the zeroed range');
  t.equal(bp.readUInt32BE(8), C.NBD_STATE_HOLE | C.NBD_STATE_ZERO, 'reported as a hole that reads as zeros');
  c.send(req(C.NBD_CMD_READ, 4096, 65536, 6n, C.NBD_CMD_FLAG_DF));
  const rh = decodeReplyHeader(await c.read(20))!;
  t.ok((await c.read(rh.kind === 'structured' ? rh.length : 0)).subarray(8).equals(Buffer.alloc(65536)), 'zeroed data reads back as zeros');
  c.destroy();
});
