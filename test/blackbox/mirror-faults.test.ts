// Two nbdmirror processes on loopback with the replication link itself faulted: the primary's --peer goes to a
// TcpProxy that forwards to the secondary's NBD port (the HTTP control link stays direct). Each subtest drives
// a random-write stream through the primary while the proxy slows the link down, lets it go silent for longer
// than the peer timeout, or drops it (repeatedly, and once in the middle of a resync), and ends the same way:
// every acknowledged write reads back from the primary, and once the faults are gone the nodes are in sync
// and both copies are byte-identical.
// One more uses the slow link to show that the primary's busy polling restarts when the peer's reply arrives.

import t from 'tap';
import type { Test } from 'tap';
import * as net from 'node:net';
import { performance } from 'node:perf_hooks';
import { NbdClient } from '../../lib/client/nbd-client';
import { prng } from '../helpers/bytes';
import { startTcpProxy, type TcpProxy } from '../helpers/tcp-proxy';
import { hashExport, makePair, type Node, waitInSync, waitRep } from '../helpers/two-nodes';

const MiB = 1024 * 1024;
const BLOCK = 4096;
const SIZE = 64 * MiB;
const PEER_TIMEOUT_MS = 1000;
const ARGS = ['--peer-timeout', '1s'];

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function connect(node: Node): Promise<NbdClient> {
  return NbdClient.connect({ host: '127.0.0.1', port: node.nbdPort }, { exportName: 'disk0', metaContexts: [] });
}

/**
 * A pair whose primary (a) reaches the secondary's NBD port only through a proxy. makePair fixes a's --peer
 * when it is called, before b's port is known to us, so a port is held open for the proxy while makePair
 * picks the nodes' ports (they cannot collide with it), then released and taken by the proxy at once.
 */
async function faultedPair(t: Test, primaryArgs: readonly string[] = []): Promise<{ a: Node; b: Node; proxy: TcpProxy }> {
  const holder = net.createServer();
  await new Promise<void>((resolve, reject) => {
    holder.once('error', reject);
    holder.listen(0, '127.0.0.1', () => resolve());
  });
  const proxyPort = (holder.address() as net.AddressInfo).port;
  const { a, b } = await makePair(t, { args: ARGS, peerNbdPort: { a: proxyPort } });
  await new Promise((r) => holder.close(r));
  const proxy = await startTcpProxy(t, { target: { host: '127.0.0.1', port: b.nbdPort }, listen: { host: '127.0.0.1', port: proxyPort } });
  await b.start(['--role', 'secondary']);
  await a.start(['--role', 'primary', ...primaryArgs]);
  await waitInSync(a, b);
  const ra = await a.rep();
  t.equal(ra.link.peer, proxy.url, 'the primary links through the proxy');
  t.ok(proxy.stats.connections >= 1, 'the link connection went through the proxy');
  return { a, b, proxy };
}

/**
 * Writes 4 KiB blocks at random block numbers in [0, blocks), at most `depth` at once and never two to one
 * block at once. Remembers, per block, the last acknowledged content seed and any seed in flight, and the
 * latency and completion time of every acknowledged write.
 */
class Writer {
  readonly acked = new Map<number, number>();
  readonly inFlight = new Map<number, number>();
  /** Completion times (performance.now()) of acknowledged writes, in order. */
  readonly doneAt: number[] = [];
  minLatency = Infinity;
  maxLatency = 0;
  errors = 0;
  firstError: unknown = null;
  writes = 0;
  private stopped = false;
  private seq: number;
  private readonly rnd: () => number;

  constructor(
    private readonly c: NbdClient,
    private readonly blocks: number,
    seed: number,
    /** First block of the region written. */
    private readonly base = 0,
    /** Pause after each write (ms), to bound the write rate. */
    private readonly gapMs = 0,
  ) {
    this.rnd = prng(seed);
    this.seq = seed * 1_000_000 + 1;
  }

  static content(seed: number): Buffer {
    const b = Buffer.alloc(BLOCK);
    for (let i = 0; i < BLOCK; i += 4) b.writeUInt32LE((seed * 2654435761 + i) >>> 0, i);
    return b;
  }

  /** Run until stop() or until maxWrites. */
  async run(depth: number, maxWrites = 1_000_000): Promise<void> {
    const worker = async (): Promise<void> => {
      while (!this.stopped && this.writes < maxWrites) {
        let block = this.base + Math.floor(this.rnd() * this.blocks);
        for (let k = 0; k < 8 && this.inFlight.has(block); k++) block = this.base + Math.floor(this.rnd() * this.blocks);
        if (this.inFlight.has(block)) continue;
        const seed = this.seq++;
        this.inFlight.set(block, seed);
        this.writes++;
        const started = performance.now();
        try {
          await this.c.pwrite(Writer.content(seed), block * BLOCK);
        } catch (err) {
          this.errors++;
          this.firstError ??= err;
          return; // the seed stays "in flight": either content may be on disk
        }
        const now = performance.now();
        this.minLatency = Math.min(this.minLatency, now - started);
        this.maxLatency = Math.max(this.maxLatency, now - started);
        this.doneAt.push(now);
        this.acked.set(block, seed);
        this.inFlight.delete(block);
        if (this.gapMs > 0) await sleep(this.gapMs);
      }
    };
    await Promise.all(Array.from({ length: depth }, worker));
  }

  stop(): void {
    this.stopped = true;
  }

  /** Acknowledged writes that completed in [from, to). */
  completedBetween(from: number, to: number): number {
    return this.doneAt.filter((x) => x >= from && x < to).length;
  }

  /** Every acknowledged block reads back as its last acknowledged content (or a later in-flight one). */
  async verify(t: Test, c: NbdClient, what: string): Promise<void> {
    let bad = 0;
    for (const [block, seed] of this.acked) {
      const got = await c.pread(block * BLOCK, BLOCK);
      const pending = this.inFlight.get(block);
      if (!got.equals(Writer.content(seed)) && !(pending !== undefined && got.equals(Writer.content(pending)))) bad++;
    }
    t.ok(this.acked.size > 0, `${what}: writes were acknowledged (${this.acked.size} blocks)`);
    t.equal(bad, 0, `${what}: all ${this.acked.size} acknowledged blocks read back`);
  }
}

async function identical(t: Test, a: Node, b: Node, what: string): Promise<void> {
  const [ha, hb] = await Promise.all([hashExport(a.uri()), hashExport(b.uri())]);
  t.equal(ha, hb, `${what}: both copies are byte-identical`);
}

function noErrors(t: Test, w: Writer, what: string): void {
  t.equal(w.errors, 0, `${what}: no client write failed${w.firstError ? ` (first: ${String(w.firstError)})` : ''}`);
}

t.test('slow link (20 ms each way): mirrored writes wait for the peer, none fails, the link holds', async (t) => {
  const { a, b, proxy } = await faultedPair(t);
  const connectsBefore = (await a.rep()).link.connects;
  proxy.setDelay(20);
  const bytesBefore = proxy.stats.bytesUp;
  const c = await connect(a);
  const w = new Writer(c, SIZE / BLOCK, 1);
  const writing = w.run(8);
  await sleep(3000);
  const during = await a.rep();
  w.stop();
  await writing;
  noErrors(t, w, 'slow link');
  t.ok(w.writes > 100, `writes went on (${w.writes})`);
  // A write completes only when the peer acknowledged it: at least one round trip through the 2 × 20 ms delay.
  t.ok(w.minLatency >= 35, `every write waited for the peer (min latency ${w.minLatency.toFixed(1)} ms)`);
  t.ok(proxy.stats.bytesUp - bytesBefore >= w.acked.size * BLOCK, 'the mirrored writes went through the proxy');
  t.equal(during.link.state, 'connected', 'the link stayed connected (40 ms round trips are well inside the 1 s peer timeout)');
  t.equal(during.outOfSync.blocks, 0, 'nothing was marked out of sync');
  t.equal(during.link.connects, connectsBefore, 'no reconnect happened');
  await c.flush();
  await w.verify(t, c, 'primary');
  proxy.setDelay(0);
  await waitInSync(a, b);
  await identical(t, a, b, 'after the slow-link stream');
  await c.disconnect();
});

t.test("busy polling covers a mirrored write's wait for the peer: the primary polls again when the reply comes", async (t) => {
  // With the link 50 ms each way, a mirrored write's reply from the peer comes 100 ms or more after the client's
  // request, long after a 10 ms window opened by the request has closed. The link's reads touch the polling
  // too, so every write opens two windows of at least 10 ms each (a polled window is never shorter than
  // --busy-poll), apart as the writes are; with the client's requests alone there would be one per write.
  const WINDOW_MS = 10;
  const WRITES = 8;
  const { a, b, proxy } = await faultedPair(t, ['--busy-poll', `${WINDOW_MS}ms`]);
  const polled = async (): Promise<number> => {
    const res = await fetch(`http://127.0.0.1:${a.httpPort}/metrics`, { signal: AbortSignal.timeout(10_000) });
    const line = (await res.text()).split('\n').find((l) => l.startsWith('nbdmirror_busy_poll_seconds_total '));
    if (line === undefined) throw new Error('no nbdmirror_busy_poll_seconds_total in /metrics');
    return Number(line.slice(line.indexOf(' ') + 1));
  };
  const c = await connect(a);
  proxy.setDelay(50);
  const before = await polled();
  const started = performance.now();
  for (let i = 0; i < WRITES; i++) {
    await c.pwrite(Buffer.alloc(BLOCK, i + 1), i * BLOCK);
    await sleep(3 * WINDOW_MS); // so that the reply's window ends before the next request opens one
  }
  const elapsed = performance.now() - started;
  const during = (await polled()) - before;
  t.ok(elapsed >= WRITES * (100 + 3 * WINDOW_MS) * 0.95, `each write waited for the delayed peer (${elapsed.toFixed(0)} ms for ${WRITES})`);
  const floor = (2 * WRITES * WINDOW_MS) / 1000;
  t.ok(during >= floor * 0.999, `the primary polled ${(during * 1000).toFixed(1)} ms: at least two ${WINDOW_MS} ms windows per write (${floor * 1000} ms)`);
  t.ok(during < elapsed / 1000, 'and not the whole time: it slept while waiting for the peer');
  proxy.setDelay(0);
  await waitInSync(a, b);
  await identical(t, a, b, 'after the delayed writes');
  await c.disconnect();
});

t.test('link silent longer than the peer timeout: writes go on degraded, then the link reconnects and resyncs', async (t) => {
  const { a, b, proxy } = await faultedPair(t);
  const c = await connect(a);
  const w = new Writer(c, SIZE / BLOCK, 2);
  const writing = w.run(8);
  await sleep(500);
  const pausedAt = performance.now();
  proxy.pause();
  // The watchdog gives up on the peer after the 1 s timeout (checked every 250 ms): degraded from then on.
  const degraded = await waitRep(a, (r) => r.link.state !== 'connected' && r.outOfSync.blocks > 0, 2000);
  const degradedAfter = performance.now() - pausedAt;
  await sleep(Math.max(0, 2500 - (performance.now() - pausedAt)));
  const resumedAt = performance.now();
  const stillDegraded = await a.rep();
  t.ok(degradedAfter < 2000, `the primary went degraded ${degradedAfter.toFixed(0)} ms into the silence`);
  t.not(degraded.link.state, 'connected', `the link is down (${degraded.link.state}: ${degraded.link.reason})`);
  t.ok(degraded.outOfSync.blocks > 0, `blocks marked out of sync (${degraded.outOfSync.blocks})`);
  t.not(stillDegraded.link.state, 'connected', 'the link cannot come back while the proxy holds every byte');
  const bDuring = await b.rep();
  t.not(bDuring.disk, 'UpToDate', `the secondary no longer counts as up to date (${bDuring.disk})`);
  // Writes went on during the silence, after at most about the peer timeout.
  const lateInPause = w.completedBetween(pausedAt + PEER_TIMEOUT_MS + 500, resumedAt);
  t.ok(lateInPause > 20, `writes completed in the last part of the silence (${lateInPause})`);
  t.ok(w.maxLatency < PEER_TIMEOUT_MS + 1250, `no write waited much longer than the peer timeout (max ${w.maxLatency.toFixed(0)} ms)`);
  noErrors(t, w, 'during the silence');

  // Drop whatever stalled connection is left and let bytes flow: the link comes back and resyncs.
  proxy.dropAll();
  proxy.resume();
  await sleep(1000); // writes keep going while the link reconnects and resyncs
  w.stop();
  await writing;
  noErrors(t, w, 'whole stream');
  await c.flush();
  await w.verify(t, c, 'primary');
  await waitInSync(a, b);
  const ra = await a.rep();
  t.ok(ra.link.connects >= 2, `the link reconnected (connects ${ra.link.connects})`);
  t.ok((ra.link.lastResync?.blocks ?? 0) > 0, `the reconnect resynced the blocks written meanwhile (${ra.link.lastResync?.blocks})`);
  t.equal((await b.rep()).disk, 'UpToDate', 'the secondary is up to date again');
  await identical(t, a, b, 'after the silence');
  await c.disconnect();
});

t.test('link dropped repeatedly, and once in the middle of a resync: no write fails, the copies converge', async (t) => {
  const { a, b, proxy } = await faultedPair(t);
  const c = await connect(a);
  // Regions: the random stream [0, 30) MiB, a slow stream during the resync [30, 32) MiB, a bulk change set [32, 56) MiB.
  const w = new Writer(c, (30 * MiB) / BLOCK, 3);
  const writing = w.run(8);
  await sleep(300);
  for (let i = 0; i < 5; i++) {
    proxy.dropAll();
    await sleep(300);
  }
  const lastDrop = performance.now();
  await waitRep(a, (r) => r.link.state === 'connected', 15_000);
  t.comment(`reconnected and resynced ${(performance.now() - lastDrop).toFixed(0)} ms after the last of 5 drops`);
  w.stop();
  await writing;
  noErrors(t, w, 'repeated drops');
  const afterDrops = await a.rep();
  t.ok(afterDrops.link.connects > 1, `the link reconnected after drops (connects ${afterDrops.link.connects})`);

  // A larger change set while the link is kept down: a 24 MiB bulk write.
  proxy.refuse(true);
  proxy.dropAll();
  await waitRep(a, (r) => r.link.state !== 'connected' && r.link.state !== 'syncing', 5000);
  const bulkBase = 32 * MiB;
  const bulkLen = 24 * MiB;
  const bulk = Buffer.alloc(bulkLen);
  const rnd = prng(99);
  for (let i = 0; i < bulkLen; i += 4) bulk.writeUInt32LE((rnd() * 0x1_0000_0000) >>> 0, i);
  for (let off = 0; off < bulkLen; off += 256 * 1024) await c.pwrite(bulk.subarray(off, off + 256 * 1024), bulkBase + off);
  const before = await a.rep();
  t.ok(before.outOfSync.blocks >= bulkLen / BLOCK, `the change set is marked out of sync (${before.outOfSync.blocks} blocks)`);
  const connectsBefore = before.link.connects;
  const connectionsBefore = proxy.stats.connections;

  // Let the link back, but cut it once 16 MiB went up: in the middle of the resync. A slow stream of client
  // writes (at most 512 blocks) goes on meanwhile.
  const SLOW_BLOCKS = (2 * MiB) / BLOCK;
  const w2 = new Writer(c, SLOW_BLOCKS, 4, (30 * MiB) / BLOCK, 5);
  const writing2 = w2.run(2);
  proxy.dropAfterBytes(16 * MiB);
  const letIn = performance.now();
  proxy.refuse(false);
  const syncing = await waitRep(a, (r) => r.link.state === 'syncing' || r.link.connects > connectsBefore, 15_000);
  t.comment(`link back ${(performance.now() - letIn).toFixed(0)} ms after the proxy accepted connections again`);
  t.ok(syncing.link.connects > connectsBefore, 'the link came back and started the resync');
  await waitRep(a, (r) => r.link.connects >= connectsBefore + 2, 15_000);
  t.ok(proxy.stats.connections >= connectionsBefore + 2, 'the resync connection was cut and a new one made');
  await waitInSync(a, b);
  t.comment(`in sync ${(performance.now() - letIn).toFixed(0)} ms after the proxy accepted connections again`);
  w2.stop();
  await writing2;
  noErrors(t, w2, 'the interrupted resync');
  t.ok(w2.writes > 10, `client writes went on during the resync (${w2.writes})`);
  const ra = await a.rep();
  t.ok(ra.link.connects > 1, `the primary's link connected ${ra.link.connects} times`);
  // The cut resync had ~16 MiB (4096 blocks) acknowledged. What the peer had not flushed yet (it is flushed
  // every 2 MiB, a few MiB behind) is marked again by design, and at most 512 blocks of client writes. So
  // the resync that completed resumed near where the cut one stopped instead of starting over.
  const last = ra.link.lastResync?.blocks ?? Infinity;
  t.ok(
    last <= before.outOfSync.blocks + SLOW_BLOCKS - 1024,
    `the completing resync did ${last} blocks: the ${before.outOfSync.blocks} marked, less what the cut one finished`,
  );
  await c.flush();
  await w.verify(t, c, 'primary (random stream)');
  await w2.verify(t, c, 'primary (slow stream)');
  const got = await c.pread(bulkBase, bulkLen);
  t.ok(got.equals(bulk), 'primary: the bulk change set reads back');
  await identical(t, a, b, 'after the drops and the interrupted resync');
  await c.disconnect();
});
