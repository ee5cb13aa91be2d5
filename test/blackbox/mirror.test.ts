// Two nbdmirror processes on loopback, mirroring one export. Each subtest drives the real thing: nbdcopy and
// our NBD client write through the primary, nodes are SIGKILLed and restarted on the same data dirs, and the
// copies are compared by reading both over NBD. Covers: identical copies after mirrored writes, the secondary
// refusing ordinary writes, a secondary crash ending in a bitmap-sized resync, a primary crash ending in an
// activity-log resync with nothing acknowledged lost, failover by promotion and the old primary resynced in
// the right direction, and split brain detected and refused until an operator discards one side.

import t from 'tap';
import type { Test } from 'tap';
import { unlinkSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { NbdClient } from '../../lib/client/nbd-client';
import { prng } from '../helpers/bytes';
import { requireTool } from '../helpers/requires';
import { describe, run } from '../helpers/run';
import { freshDir } from '../helpers/spawn-server';
import { hashExport, makePair, type Node, waitInSync, waitRep } from '../helpers/two-nodes';

const MiB = 1024 * 1024;
const BLOCK = 4096;
const SIZE = 64 * MiB;
const ARGS = ['--peer-timeout', '1s'];

async function connect(node: Node): Promise<NbdClient> {
  return NbdClient.connect({ host: '127.0.0.1', port: node.nbdPort }, { exportName: 'disk0', metaContexts: [] });
}

/**
 * Writes 4 KiB blocks at random block numbers, at most `depth` at once and never two to one block at once.
 * Remembers, per block, the last acknowledged content seed and any seed in flight.
 */
class Writer {
  readonly acked = new Map<number, number>();
  readonly inFlight = new Map<number, number>();
  /** Blocks whose write started at or after markFrom(). */
  readonly since = new Set<number>();
  private marking = false;
  private stopped = false;
  errors = 0;
  writes = 0;
  private seq = 1;
  private readonly rnd: () => number;

  constructor(
    private readonly c: NbdClient,
    private readonly blocks: number,
    seed: number,
  ) {
    this.rnd = prng(seed);
  }

  static content(seed: number): Buffer {
    const b = Buffer.alloc(BLOCK);
    for (let i = 0; i < BLOCK; i += 4) b.writeUInt32LE((seed * 2654435761 + i) >>> 0, i);
    return b;
  }

  markFrom(): void {
    this.marking = true;
  }

  /** Run until stop() or until maxWrites; each request bounded by the client's own failure handling. */
  async run(depth: number, maxWrites: number): Promise<void> {
    const worker = async (): Promise<void> => {
      while (!this.stopped && this.writes < maxWrites) {
        let block = Math.floor(this.rnd() * this.blocks);
        for (let k = 0; k < 8 && this.inFlight.has(block); k++) block = Math.floor(this.rnd() * this.blocks);
        if (this.inFlight.has(block)) continue;
        const seed = this.seq++;
        this.inFlight.set(block, seed);
        if (this.marking) this.since.add(block);
        this.writes++;
        try {
          await this.c.pwrite(Writer.content(seed), block * BLOCK);
          this.acked.set(block, seed);
          this.inFlight.delete(block);
        } catch {
          this.errors++;
          return; // connection gone: the seed stays "in flight" (either content may be on disk)
        }
      }
    };
    await Promise.all(Array.from({ length: depth }, worker));
  }

  stop(): void {
    this.stopped = true;
  }

  /** Every acknowledged block reads back as its last acknowledged content (or a later in-flight one). */
  async verify(t: Test, c: NbdClient, what: string): Promise<void> {
    let bad = 0;
    for (const [block, seed] of this.acked) {
      const got = await c.pread(block * BLOCK, BLOCK);
      const okAcked = got.equals(Writer.content(seed));
      const pending = this.inFlight.get(block);
      if (!okAcked && !(pending !== undefined && got.equals(Writer.content(pending)))) bad++;
    }
    t.equal(bad, 0, `${what}: all ${this.acked.size} acknowledged blocks read back`);
  }
}

async function identical(t: Test, a: Node, b: Node, what: string): Promise<void> {
  const [ha, hb] = await Promise.all([hashExport(a.uri()), hashExport(b.uri())]);
  t.equal(ha, hb, `${what}: both copies are byte-identical`);
}

t.test('mirrored writes land on both nodes; the secondary is read-only to clients', async (t) => {
  const { a, b } = await makePair(t, { args: ARGS });
  await b.start(['--role', 'secondary']);
  await a.start(['--role', 'primary']);
  await waitInSync(a, b);

  if (requireTool(t, 'nbdcopy')) {
    const src = path.join(freshDir(t, 'src'), 'src.img');
    const data = Buffer.alloc(24 * MiB);
    const rnd = prng(11);
    // Data with holes: 64 KiB runs of random bytes, every third run left zero.
    for (let off = 0; off < data.length; off += 64 * 1024) {
      if ((off / 65536) % 3 === 2) continue;
      for (let i = off; i < off + 64 * 1024; i += 4) data.writeUInt32LE((rnd() * 0x1_0000_0000) >>> 0, i);
    }
    writeFileSync(src, data);
    const r = await run('nbdcopy', ['--flush', src, a.uri()], { timeoutMs: 60_000 });
    t.equal(r.code, 0, `nbdcopy into the primary\n${describe(r)}`);
  }
  const c = await connect(a);
  const w = new Writer(c, SIZE / BLOCK, 5);
  await w.run(16, 3000);
  t.equal(w.errors, 0, 'no write failed');
  await c.flush();
  await identical(t, a, b, 'after nbdcopy and random writes');

  const cb = await connect(b);
  t.equal(cb.readOnly, true, 'the secondary advertises the export read-only');
  await cb.disconnect();
  const rep = await b.rep();
  t.equal(rep.role, 'secondary');
  t.equal(rep.disk, 'UpToDate');
  t.ok(rep.session !== null, 'the secondary shows the primary session');
  const ra = await a.rep();
  t.equal(ra.link.state, 'connected');
  t.equal(ra.gen.current, rep.gen.current, 'both nodes hold the same generation id');
  await c.disconnect();
});

t.test('secondary killed during a write stream: writes go on; restart resyncs only what changed', async (t) => {
  const { a, b } = await makePair(t, { args: ARGS });
  await b.start(['--role', 'secondary']);
  await a.start(['--role', 'primary']);
  await waitInSync(a, b);
  const c = await connect(a);
  const w = new Writer(c, SIZE / BLOCK, 9);
  const writing = w.run(8, 1_000_000);
  await new Promise((r) => setTimeout(r, 300));
  // From here on, blocks count as changed. The FLUSH makes everything before it durable on the secondary:
  // what the secondary acknowledged but had not flushed when it died is resynced too (it may have lost it).
  w.markFrom();
  await c.flush();
  await new Promise((r) => setTimeout(r, 20));
  await b.kill();
  w.stop();
  await writing;
  // While the secondary is down, writes go to the first 8 MiB only: the resync must send about that much.
  const w2 = new Writer(c, (8 * MiB) / BLOCK, 10);
  w2.markFrom();
  const writing2 = w2.run(8, 1_000_000);
  await new Promise((r) => setTimeout(r, 2500)); // past the 1 s peer timeout: degraded
  t.ok(w2.writes > 100, `writes went on while the secondary was down (${w2.writes})`);
  t.equal(w.errors + w2.errors, 0, 'no client write failed');
  const degraded = await a.rep();
  t.not(degraded.link.state, 'connected', 'the primary knows the peer is gone');
  t.ok(degraded.outOfSync.blocks > 0, `blocks marked out of sync (${degraded.outOfSync.blocks})`);
  w2.stop();
  await writing2;
  const changed = new Set([...w.since, ...w2.since]).size;
  const connects = (await a.rep()).link.connects;
  const restarted = Date.now();
  await b.start();
  // The restarted secondary announces itself: the primary reconnects at once, not at the end of its backoff
  // (which has grown to seconds while the secondary was down).
  await waitRep(a, (r) => r.link.connects > connects, 10_000);
  const reconnectMs = Date.now() - restarted;
  t.ok(reconnectMs < 2500, `the primary reconnected ${reconnectMs} ms after the secondary was restarted`);
  await waitInSync(a, b);
  const ra = await a.rep();
  t.equal(ra.link.verdict, 'bitmap', 'the nodes chose a bitmap resync');
  const sent = ra.link.lastResync.bytesSent + ra.link.lastResync.bytesZeroed;
  t.ok(sent > 0, `the resync sent ${sent} bytes`);
  t.ok(sent <= 1.5 * changed * BLOCK, `resync bytes ${sent} ≤ 1.5 × the ${changed} blocks changed meanwhile (${changed * BLOCK} B)`);
  await c.flush();
  await identical(t, a, b, 'after the resync');
  for (const [block, seed] of w2.acked) w.acked.set(block, seed);
  await w.verify(t, c, 'primary');
  await c.disconnect();
});

t.test('secondary loses power (killed, its volatile region gone): what it never flushed is resynced', async (t) => {
  // Nothing is written back on its own (10 min max age, 95% high watermark) and the peer timeout is long, so
  // no background FLUSH of the peer comes before the kill: the acknowledged writes exist on the secondary
  // only in its region, which a power loss takes (with --durability disk the region is not persistent).
  const { a, b } = await makePair(t, { args: ['--peer-timeout', '10s', '--writeback-max-age', '10m', '--writeback-high', '95', '--writeback-low', '90'] });
  await b.start(['--role', 'secondary']);
  await a.start(['--role', 'primary']);
  await waitInSync(a, b);
  const regionFile: string = (await b.status()).node.regionFile;
  const c = await connect(a);
  const w = new Writer(c, SIZE / BLOCK, 55);
  await w.run(8, 300);
  t.ok(w.acked.size > 50, `${w.acked.size} blocks written and acknowledged by both nodes, never flushed`);
  await b.kill();
  unlinkSync(regionFile);
  const ra = await waitRep(a, (r) => r.outOfSync.blocks > 0);
  t.ok(ra.outOfSync.blocks >= w.acked.size, `the primary marked the ${w.acked.size} unflushed blocks out of sync when the link dropped (${ra.outOfSync.blocks})`);
  await b.start();
  await waitInSync(a, b);
  await w.verify(t, c, 'primary');
  await identical(t, a, b, 'after resyncing what the secondary lost with its region');
  await c.disconnect();
});

t.test('primary killed during a write stream: only activity-log extents are resynced, nothing acknowledged lost', async (t) => {
  const { a, b } = await makePair(t, { args: ARGS });
  await b.start(['--role', 'secondary']);
  await a.start(['--role', 'primary']);
  await waitInSync(a, b);
  const c = await connect(a);
  // Writes confined to the first 16 MiB: 4 activity-log extents.
  const w = new Writer(c, (16 * MiB) / BLOCK, 21);
  const writing = w.run(16, 1_000_000);
  await new Promise((r) => setTimeout(r, 800));
  await a.kill();
  w.stop();
  await writing;
  t.ok(w.acked.size > 50, `writes were acknowledged before the kill (${w.acked.size} blocks)`);
  await c.close();
  await a.start();
  await waitInSync(a, b);
  const ra = await a.rep();
  const resynced = ra.link.lastResync?.blocks ?? 0;
  t.ok(resynced > 0 && resynced <= (16 * MiB) / BLOCK, `resynced ${resynced} blocks: the activity-log extents, not the whole 64 MiB`);
  const ca = await connect(a);
  await w.verify(t, ca, 'restarted primary');
  await ca.disconnect();
  const cb = await connect(b);
  await w.verify(t, cb, 'secondary');
  await cb.disconnect();
  await identical(t, a, b, 'after the activity-log resync');
});

t.test('failover: secondary promoted after the primary died; the old primary returns as secondary and is resynced', async (t) => {
  const { a, b } = await makePair(t, { args: ARGS });
  await b.start(['--role', 'secondary']);
  await a.start(['--role', 'primary']);
  await waitInSync(a, b);
  const c = await connect(a);
  const w = new Writer(c, SIZE / BLOCK, 33);
  const writing = w.run(8, 1_000_000);
  await new Promise((r) => setTimeout(r, 500));
  await a.kill();
  w.stop();
  await writing;
  await c.close();
  // The primary's session counts as alive for two peer timeouts after its last keepalive.
  await waitRep(b, (r) => r.session === null);
  const promoted = await b.post('/v1/exports/disk0/promote');
  t.equal(promoted.status, 200, `promote the secondary: ${JSON.stringify(promoted.body)}`);
  t.equal(promoted.body.role, 'primary');
  const cb = await connect(b);
  t.equal(cb.readOnly, false, 'the new primary is writable');
  await w.verify(t, cb, 'promoted secondary');
  const w2 = new Writer(cb, SIZE / BLOCK, 44);
  await w2.run(8, 1500);
  t.equal(w2.errors, 0);

  await a.start(['--role', 'secondary']);
  await waitInSync(b, a);
  const ra = await a.rep();
  t.equal(ra.role, 'secondary');
  t.ok(ra.epoch >= promoted.body.epoch, 'the old primary took the new epoch');
  await w2.verify(t, cb, 'new primary');
  await identical(t, b, a, 'after resyncing the old primary');
  await cb.disconnect();
});

t.test('a clean stop of the primary ends its session: the secondary can be promoted at once', async (t) => {
  const { a, b } = await makePair(t, { args: ['--peer-timeout', '10s'] });
  await b.start(['--role', 'secondary']);
  await a.start(['--role', 'primary']);
  await waitInSync(a, b);
  const c = await connect(a);
  await new Writer(c, SIZE / BLOCK, 66).run(4, 200);
  await c.disconnect();
  t.not((await b.rep()).session, null, 'the secondary has a live session');
  await a.stop();
  t.equal((await b.rep()).session, null, 'the stopped primary ended it (no wait for two peer timeouts)');
  const promoted = await b.post('/v1/exports/disk0/promote');
  t.equal(promoted.status, 200, `promoted right away: ${JSON.stringify(promoted.body)}`);
  t.equal((await b.rep()).disk, 'UpToDate');
});

/**
 * A linked pair, then apart: a (primary) writes while b is down; a dies, b is promoted (a higher epoch) and
 * writes; a comes back, as primary (its stored role). Both wrote since they last agreed: a split brain.
 */
async function writtenApart(t: Test, seeds: [number, number], writes: number) {
  const { a, b } = await makePair(t, { args: ARGS });
  await b.start(['--role', 'secondary']);
  await a.start(['--role', 'primary']);
  await waitInSync(a, b);
  await b.kill();
  const ca = await connect(a);
  const wa = new Writer(ca, SIZE / BLOCK, seeds[0]);
  await wa.run(4, writes);
  await a.kill();
  await ca.close();
  await b.start();
  const p = await b.post('/v1/exports/disk0/promote');
  t.equal(p.status, 200, 'promote b while a is down');
  const cb = await connect(b);
  const wb = new Writer(cb, SIZE / BLOCK, seeds[1]);
  await wb.run(4, writes);
  await a.start();
  return { a, b, wa, wb, cb };
}

t.test('split brain: both promoted and written while apart → detected, refused, nothing discarded until the operator says so', async (t) => {
  const { a, b, wa, wb, cb } = await writtenApart(t, [55, 66], 200);
  const sa = await waitRep(a, (r) => r.splitBrain !== null);
  const sb = await waitRep(b, (r) => r.splitBrain !== null);
  t.ok(sa.splitBrain && sb.splitBrain, 'both nodes report the split brain');
  t.not(sa.link?.state, 'connected', 'the link is refused');
  const ca2 = await connect(a);
  await wa.verify(t, ca2, 'a keeps its own writes');
  await ca2.disconnect();
  await wb.verify(t, cb, 'b keeps its own writes');
  t.ok(/SPLIT BRAIN/.test(a.proc!.logs() + b.proc!.logs()), 'logged loudly');

  // The operator keeps b's data and discards a's changes.
  const d = await a.post('/v1/exports/disk0/discard-my-data');
  t.equal(d.status, 200, `discard-my-data on a: ${JSON.stringify(d.body)}`);
  await waitInSync(b, a);
  await wb.verify(t, cb, 'b after resolving');
  await identical(t, b, a, 'after resolving the split brain');
  await cb.disconnect();
});

t.test('split brain resolved the other way: the node with the lower epoch keeps its data', async (t) => {
  const { a, b, wa, cb } = await writtenApart(t, [77, 88], 300);
  await cb.close();
  await waitRep(b, (r) => r.splitBrain !== null);
  // Keep a's data this time: b's changes are discarded although b saw the newer epoch.
  const d = await b.post('/v1/exports/disk0/discard-my-data');
  t.equal(d.status, 200, 'discard-my-data on b');
  await waitInSync(a, b);
  const [ra, rb] = [await a.rep(), await b.rep()];
  t.ok(ra.epoch > 2 && rb.epoch === ra.epoch, `a moved past the epoch 2 b had seen, and b follows it (a: ${ra.epoch}, b: ${rb.epoch})`);
  const ca2 = await connect(a);
  await wa.verify(t, ca2, 'a keeps its writes');
  await ca2.disconnect();
  await identical(t, a, b, 'after resolving in favour of a');
});
