// lib/client against the reference server, a real `nbdkit memory`: both ways into transmission (GO and
// EXPORT_NAME), NBD_OPT_LIST / INFO / LIST_META_CONTEXT, data round trips at unaligned offsets, pipelining,
// trim/zero seen through block status, DF/REQ_ONE, error replies mapped to PeerError, and the ways a
// connection ends (disconnect, close, server death).

import { randomBytes } from 'node:crypto';
import * as net from 'node:net';
import t from 'tap';
import type { Test } from 'tap';
import { NBD_STATE_HOLE, NBD_STATE_ZERO } from '../../lib/protocol/constants';
import { IoError, NotSupportedError, PeerError, ShutdownError } from '../../lib/errors';
import { type Extent, NbdClient, OptionError } from '../../lib/client/nbd-client';
import { NBD_REP_ERR_UNKNOWN } from '../../lib/protocol/constants';
import { requireTool } from '../helpers/requires';
import { type Nbdkit, startNbdkit } from '../helpers/nbdkit';

const KiB = 1024;
const MiB = 1024 * KiB;

async function open(tt: Test, srv: Nbdkit, opts: Parameters<typeof NbdClient.connect>[1] = {}): Promise<NbdClient> {
  const c = await NbdClient.connect(srv.target, opts);
  tt.teardown(() => c.close());
  return c;
}

/** base:allocation flags at `offset` according to extents that start at `start`. */
function flagsAt(extents: readonly Extent[], start: number, offset: number): number | undefined {
  let pos = start;
  for (const e of extents) {
    if (offset < pos + e.length) return e.flags;
    pos += e.length;
  }
  return undefined;
}

async function rejectsWith<E extends Error>(tt: Test, p: Promise<unknown>, cls: new (...a: never[]) => E, what: string): Promise<E | undefined> {
  try {
    await p;
  } catch (err) {
    tt.type(err, cls, what);
    return err instanceof cls ? err : undefined;
  }
  tt.fail(`${what}: resolved, expected ${cls.name}`);
  return undefined;
}

if (requireTool(t, 'nbdkit')) {
  t.test('NBD_OPT_GO: size, flags, structured replies, base:allocation', async (tt) => {
    const srv = await startNbdkit(tt, ['memory', '64M']);
    const c = await open(tt, srv);
    tt.equal(c.size, 64 * MiB);
    tt.equal(c.exportName, '');
    tt.ok(c.structuredReplies, 'structured replies negotiated');
    tt.same([...c.metaContexts.keys()], ['base:allocation']);
    tt.notOk(c.readOnly);
    for (const k of ['canFlush', 'canFua', 'canTrim', 'canZero', 'canFastZero', 'canDf', 'canCache', 'canMultiConn'] as const) {
      tt.ok(c[k], k);
      tt.equal(c.flags[k], c[k], `flags.${k} matches the getter`);
    }
    tt.equal(c.flags.raw, c.transmissionFlags);
    await c.disconnect();
    tt.equal(await c.closed, null, 'clean disconnect');
  });

  t.test('NBD_OPT_EXPORT_NAME path (as Linux nbd-client does)', async (tt) => {
    const srv = await startNbdkit(tt, ['memory', '16M']);
    const c = await open(tt, srv, { useExportName: true });
    tt.equal(c.size, 16 * MiB);
    tt.ok(c.canTrim);
    tt.ok(c.structuredReplies, 'structured replies still negotiated before EXPORT_NAME');
    const data = randomBytes(3000);
    await c.pwrite(data, 777);
    tt.same(await c.pread(777, 3000), data);
    const bs = await c.blockStatus(0, MiB);
    tt.ok(bs.get('base:allocation')!.length > 0, 'meta context negotiated for EXPORT_NAME too');
    await c.disconnect();
  });

  t.test('simple replies only (structuredReplies: false), over a Unix socket', async (tt) => {
    const srv = await startNbdkit(tt, ['memory', '16M'], { transport: 'unix' });
    const c = await open(tt, srv, { structuredReplies: false });
    tt.notOk(c.structuredReplies);
    tt.equal(c.metaContexts.size, 0);
    tt.notOk(c.canDf, 'DF is only offered with structured replies');
    const data = randomBytes(10_001);
    await c.pwrite(data, 4097);
    tt.same(await c.pread(4097, 10_001), data);
    const e = await rejectsWith(tt, c.pread(16 * MiB, 512), PeerError, 'read past end');
    tt.equal(e?.errno, 22, 'EINVAL in a simple reply');
    await rejectsWith(tt, c.blockStatus(0, 4096), NotSupportedError, 'block status without a meta context');
    tt.same(await c.pread(4097, 16), data.subarray(0, 16), 'connection still usable after errors');
    await c.disconnect();
  });

  t.test('NBD_OPT_LIST, NBD_OPT_INFO, NBD_OPT_LIST_META_CONTEXT, unknown export', async (tt) => {
    const srv = await startNbdkit(
      tt,
      ['memory', '8M', 'exportname=alpha', 'exportname=beta', 'exportname-list=explicit', 'exportdesc=fixed:scratch disk', 'exportname-strict=true'],
      { filters: ['exportname'] },
    );
    const list = await NbdClient.list(srv.target);
    tt.same(list, [
      { name: 'alpha', description: 'scratch disk' },
      { name: 'beta', description: 'scratch disk' },
    ]);

    const info = await NbdClient.info(srv.target, 'beta');
    tt.equal(info.exportName, 'beta');
    tt.equal(info.description, 'scratch disk');
    tt.equal(info.size, 8 * MiB);
    tt.ok(info.flags.canFlush);
    tt.same(info.metaContexts, ['base:allocation']);
    tt.same(await NbdClient.listMetaContexts(srv.target, 'alpha'), ['base:allocation']);
    tt.same(await NbdClient.listMetaContexts(srv.target, 'alpha', ['base:allocation']), ['base:allocation']);

    const c = await open(tt, srv, { exportName: 'alpha' });
    tt.equal(c.exportName, 'alpha');
    tt.equal(c.description, 'scratch disk');
    await c.disconnect();

    const e1 = await rejectsWith(tt, NbdClient.info(srv.target, 'gamma'), OptionError, 'INFO for an unknown export');
    tt.equal(e1?.reply, NBD_REP_ERR_UNKNOWN);
    tt.match(e1?.message, /gamma/);
    const e2 = await rejectsWith(tt, NbdClient.connect(srv.target, { exportName: 'gamma' }), OptionError, 'GO for an unknown export');
    tt.equal(e2?.reply, NBD_REP_ERR_UNKNOWN);
    const e3 = await rejectsWith(tt, NbdClient.connect(srv.target, { exportName: 'gamma', useExportName: true }), IoError, 'EXPORT_NAME for an unknown export: the server just closes');
    tt.match(e3?.message, /closed the connection after NBD_OPT_EXPORT_NAME/);
  });

  t.test('NBD_INFO_BLOCK_SIZE is reported when the server sends it', async (tt) => {
    const srv = await startNbdkit(tt, ['memory', '16M', 'blocksize-minimum=512', 'blocksize-preferred=4096', 'blocksize-maximum=1M'], {
      filters: ['blocksize-policy'],
    });
    const c = await open(tt, srv);
    tt.same(c.blockSizes, { minimum: 512, preferred: 4096, maximum: MiB });
    const info = await NbdClient.info(srv.target);
    tt.same(info.blockSizes, { minimum: 512, preferred: 4096, maximum: MiB });
    await c.disconnect();
  });

  t.test('write/read round trips at unaligned offsets, checked against a local model', async (tt) => {
    const size = 16 * MiB;
    const srv = await startNbdkit(tt, ['memory', String(size)]);
    const c = await open(tt, srv);
    const model = Buffer.alloc(size);
    const cases: [number, number][] = [
      [0, 1],
      [1, 511],
      [4095, 2],
      [65_537, 131_071],
      [3 * MiB + 17, MiB + 3],
      [size - 1000, 1000],
    ];
    for (const [off, len] of cases) {
      const data = randomBytes(len);
      data.copy(model, off);
      await c.pwrite(data, off, { fua: off % 2 === 1 });
      tt.same(await c.pread(off, len), data, `read back [${off}, +${len})`);
    }
    // Spans mixing written data and never-written holes come back with zeroes in the holes.
    for (const [off, len] of [[0, 70_000], [4000, 300_000], [3 * MiB, 2 * MiB], [size - 4096, 4096]] as const) {
      tt.ok((await c.pread(off, len)).equals(model.subarray(off, off + len)), `span [${off}, +${len}) matches model`);
    }
    await c.flush();
    await c.disconnect();
  });

  t.test('64 pipelined writes then 64 pipelined reads, all verified', async (tt) => {
    const srv = await startNbdkit(tt, ['memory', '64M']);
    const c = await open(tt, srv);
    const n = 64;
    const blocks = Array.from({ length: n }, (_, i) => ({ off: i * 513 * KiB + (i % 7), data: randomBytes(64 * KiB + i) }));
    const writes = blocks.map((b) => c.pwrite(b.data, b.off));
    tt.equal(c.inFlightCount, n, 'all 64 writes on the wire at once');
    await Promise.all(writes);
    const reads = await Promise.all(blocks.map((b) => c.pread(b.off, b.data.length)));
    reads.forEach((r, i) => tt.ok(r.equals(blocks[i]!.data), `block ${i}`));
    // Mixed: writes and reads of disjoint blocks in flight together.
    const mixed = await Promise.all(
      blocks.map(async (b, i) => {
        if (i % 2 === 0) return (await c.pread(b.off, b.data.length)).equals(b.data);
        const fresh = randomBytes(b.data.length);
        await c.pwrite(fresh, b.off);
        return (await c.pread(b.off, fresh.length)).equals(fresh);
      }),
    );
    tt.ok(mixed.every(Boolean), 'interleaved reads and writes verified');
    await c.disconnect();
  });

  t.test('maxInFlight bounds the wire and queues the rest in order', async (tt) => {
    const srv = await startNbdkit(tt, ['memory', '16M']);
    const c = await open(tt, srv, { maxInFlight: 4 });
    const data = Array.from({ length: 100 }, () => randomBytes(4096));
    const writes = data.map((d, i) => c.pwrite(d, i * 4096));
    tt.equal(c.inFlightCount, 4);
    tt.equal(c.queuedCount, 96);
    await Promise.all(writes);
    tt.equal(c.queuedCount, 0);
    const back = await Promise.all(data.map((_, i) => c.pread(i * 4096, 4096)));
    tt.ok(back.every((b, i) => b.equals(data[i]!)), '100 blocks verified through 4 slots');
    await c.disconnect();
  });

  t.test('trim and zero show up as holes/zeroes in block status; REQ_ONE gives one extent', async (tt) => {
    const srv = await startNbdkit(tt, ['memory', '16M']);
    const c = await open(tt, srv);
    await c.pwrite(randomBytes(MiB), 0);
    let bs = await c.blockStatus(0, MiB);
    tt.equal(flagsAt(bs.get('base:allocation')!, 0, 0), 0, 'written data is allocated');

    await c.trim(256 * KiB, 256 * KiB);
    await c.zero(512 * KiB, 256 * KiB);
    await c.zero(768 * KiB, 128 * KiB, { noHole: true, fua: true });
    await c.zero(896 * KiB, 128 * KiB, { fastZero: true });
    bs = await c.blockStatus(0, MiB);
    const ext = bs.get('base:allocation')!;
    tt.same([...bs.keys()], ['base:allocation']);
    tt.ok(ext.reduce((s, e) => s + e.length, 0) >= MiB || ext.length > 0, 'extents describe the range');
    tt.equal(flagsAt(ext, 0, 100 * KiB), 0, 'untouched data still allocated');
    tt.equal(flagsAt(ext, 0, 300 * KiB), NBD_STATE_HOLE | NBD_STATE_ZERO, 'trimmed range is a hole');
    tt.equal(flagsAt(ext, 0, 600 * KiB)! & NBD_STATE_ZERO, NBD_STATE_ZERO, 'zeroed range reads as zero');
    tt.equal(flagsAt(ext, 0, 800 * KiB)! & NBD_STATE_ZERO, NBD_STATE_ZERO, 'NO_HOLE zeroed range reads as zero');
    tt.ok((await c.pread(256 * KiB, 768 * KiB)).equals(Buffer.alloc(768 * KiB)), 'trimmed and zeroed ranges read as zeroes');

    const one = await c.blockStatus(0, MiB, { reqOne: true });
    const only = one.get('base:allocation')!;
    tt.equal(only.length, 1, 'REQ_ONE: exactly one extent');
    tt.ok(only[0]!.length <= MiB, 'and no longer than the request');
    tt.equal(only[0]!.flags, 0);

    const tail = await c.blockStatus(4 * MiB, 1);
    tt.equal(tail.get('base:allocation')![0]!.flags, NBD_STATE_HOLE | NBD_STATE_ZERO, 'never-written space is a hole');
    await c.disconnect();
  });

  t.test('DF read, FUA write, flush, cache', async (tt) => {
    const srv = await startNbdkit(tt, ['memory', '16M']);
    const c = await open(tt, srv);
    const data = randomBytes(200 * KiB);
    await c.pwrite(data, 12_345, { fua: true });
    tt.ok((await c.pread(12_345, data.length, { df: true })).equals(data), 'DF read returns the data in one chunk');
    tt.ok((await c.pread(0, 2 * MiB, { df: true })).subarray(12_345, 12_345 + data.length).equals(data), 'DF read spanning holes');
    await c.flush();
    await c.cache(0, MiB);
    tt.pass('flush and cache acknowledged');
    await c.disconnect();
  });

  t.test('error replies: read past end is EINVAL, write past end is ENOSPC', async (tt) => {
    const srv = await startNbdkit(tt, ['memory', '16M']);
    const c = await open(tt, srv);
    const r = await rejectsWith(tt, c.pread(16 * MiB, 512), PeerError, 'read at end');
    tt.equal(r?.errno, 22);
    tt.match(r?.message, /READ at offset 16777216 length 512 failed: EINVAL/);
    const r2 = await rejectsWith(tt, c.pread(16 * MiB - 100, 512), PeerError, 'read straddling end');
    tt.equal(r2?.errno, 22);
    const w = await rejectsWith(tt, c.pwrite(Buffer.alloc(512), 16 * MiB - 10), PeerError, 'write past end');
    tt.equal(w?.errno, 28);
    const z = await rejectsWith(tt, c.zero(16 * MiB, 4096), PeerError, 'zero past end');
    tt.equal(z?.errno, 28);
    // Errors in the middle of a pipeline fail only their own request.
    const [good, bad, good2] = await Promise.allSettled([c.pread(0, 4096), c.pread(32 * MiB, 1), c.pread(4096, 4096)]);
    tt.equal(good.status, 'fulfilled');
    tt.equal(bad.status, 'rejected');
    tt.equal(good2.status, 'fulfilled');
    await c.disconnect();
  });

  t.test('error filter: EIO from the plugin arrives as PeerError(5), structured and simple', async (tt) => {
    const srv = await startNbdkit(tt, ['memory', '16M', 'error-pread-rate=1', 'error-pread=EIO'], { filters: ['error'] });
    const c = await open(tt, srv);
    const e = await rejectsWith(tt, c.pread(0, 4096), PeerError, 'structured read error chunk');
    tt.equal(e?.errno, 5);
    await c.pwrite(Buffer.alloc(4096, 1), 0);
    tt.pass('writes still succeed');
    const s = await open(tt, srv, { structuredReplies: false });
    const e2 = await rejectsWith(tt, s.pread(0, 4096), PeerError, 'simple reply error');
    tt.equal(e2?.errno, 5);
    await Promise.all([c.disconnect(), s.disconnect()]);
  });

  t.test('disconnect waits for outstanding requests, then refuses new ones', async (tt) => {
    const srv = await startNbdkit(tt, ['memory', '16M']);
    const c = await open(tt, srv);
    const data = randomBytes(MiB);
    await c.pwrite(data, 0);
    // Reads and a write of a disjoint range still in flight when disconnect() is called.
    const reads = [c.pread(0, 4096), c.pread(MiB - 4096, 4096)];
    const w = c.pwrite(data, 2 * MiB);
    const d = c.disconnect();
    tt.equal(c.inFlightCount, 3, 'DISC not sent while requests are outstanding');
    await w;
    const [r1, r2] = await Promise.all(reads);
    tt.ok(r1!.equals(data.subarray(0, 4096)) && r2!.equals(data.subarray(MiB - 4096)), 'requests issued before disconnect completed');
    await rejectsWith(tt, c.pread(0, 1), ShutdownError, 'request after disconnect');
    await d;
    tt.equal(await c.closed, null);
  });

  t.test('close() rejects in-flight requests at once', async (tt) => {
    const srv = await startNbdkit(tt, ['memory', '16M']);
    const c = await open(tt, srv);
    const r = c.pread(0, MiB);
    const closing = c.close();
    await rejectsWith(tt, r, ShutdownError, 'pending read');
    await closing;
    tt.type(await c.closed, ShutdownError);
  });

  t.test('server shutdown: ESHUTDOWN for in-flight work, then the client disconnects softly', async (tt) => {
    const srv = await startNbdkit(tt, ['memory', '16M', 'delay-read=5'], { filters: ['delay'] });
    const c = await open(tt, srv);
    const pending = c.pread(0, 4096).then(
      () => null,
      (err: unknown) => err,
    );
    await new Promise((resolve) => setTimeout(resolve, 200));
    await srv.stop(); // SIGTERM: nbdkit fails outstanding requests with ESHUTDOWN
    const err = await pending;
    tt.type(err, PeerError);
    tt.equal((err as PeerError).errno, 108, 'NBD_ESHUTDOWN');
    await rejectsWith(tt, c.pread(0, 1), ShutdownError, 'no new requests after ESHUTDOWN');
    await c.closed;
    tt.pass('connection closed');
  });

  t.test('server killed: pending requests reject with IoError', async (tt) => {
    const srv = await startNbdkit(tt, ['memory', '16M', 'delay-read=5'], { filters: ['delay'] });
    const c = await open(tt, srv);
    const pending = c.pread(0, 4096).then(
      () => null,
      (err: unknown) => err,
    );
    await new Promise((resolve) => setTimeout(resolve, 200));
    process.kill(srv.pid, 'SIGKILL'); // our own child, by PID: no chance to answer
    tt.type(await pending, IoError, 'read in flight when the server died');
    tt.type(await c.closed, IoError);
    await rejectsWith(tt, c.pread(0, 1), IoError, 'later requests fail with the same reason');
  });

  t.test('connect failures: refused and timed out', async (tt) => {
    const refused = await rejectsWith(tt, NbdClient.connect({ host: '127.0.0.1', port: 1 }), IoError, 'nothing listening');
    tt.match(refused?.message, /cannot connect to 127\.0\.0\.1:1: .*ECONNREFUSED/);

    // A listener that accepts but never speaks: the handshake times out.
    const sockets: net.Socket[] = [];
    const mute = net.createServer((s) => sockets.push(s));
    await new Promise<void>((resolve) => mute.listen(0, '127.0.0.1', resolve));
    tt.teardown(() => {
      for (const s of sockets) s.destroy();
      mute.close();
    });
    const port = (mute.address() as net.AddressInfo).port;
    const slow = await rejectsWith(tt, NbdClient.connect({ host: '127.0.0.1', port }, { connectTimeoutMs: 200 }), IoError, 'silent server');
    tt.match(slow?.message, /handshake with 127\.0\.0\.1:\d+ timed out after 200 ms/);
  });
}
