// Black box: GET /metrics of real server processes. A single node's counters match the traffic real
// clients sent (nbdcopy's bytes, a refused read's EINVAL), its exposition passes `promtool check metrics`;
// a mirrored pair shows the link, the peer's latency histogram, the secondary counting the link's writes as
// source="peer", a degraded primary's out-of-sync bytes and the resync that clears them; and a real
// Prometheus server on loopback scrapes both nodes and answers PromQL over the traffic.

import t from 'tap';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { performance } from 'node:perf_hooks';
import { NbdClient } from '../../lib/client/nbd-client';
import { requireTool } from '../helpers/requires';
import { describe, run } from '../helpers/run';
import { freshDir, startServer } from '../helpers/spawn-server';
import { makePair, type Node, waitInSync, waitRep } from '../helpers/two-nodes';
import { startPrometheus } from '../helpers/prometheus';

const MiB = 1024 * 1024;

async function getText(port: number, p: string): Promise<{ status: number; text: string; type: string }> {
  const res = await fetch(`http://127.0.0.1:${port}${p}`, { signal: AbortSignal.timeout(10_000) });
  return { status: res.status, text: await res.text(), type: res.headers.get('content-type') ?? '' };
}

/** Every sample of the exposition as "series" → value. */
async function scrape(port: number): Promise<Map<string, number>> {
  const { status, text } = await getText(port, '/metrics');
  if (status !== 200) throw new Error(`GET /metrics: HTTP ${status}`);
  const m = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const sp = line.lastIndexOf(' ');
    m.set(line.slice(0, sp), Number(line.slice(sp + 1)));
  }
  return m;
}

const req = (command: string, source = 'client', exp = 'disk0'): string => `{export="${exp}",command="${command}",source="${source}"}`;

async function writeBlocks(node: Node, count: number, seed: number): Promise<void> {
  const c = await NbdClient.connect({ host: '127.0.0.1', port: node.nbdPort }, { exportName: 'disk0', metaContexts: [] });
  try {
    const buf = Buffer.alloc(4096, seed);
    for (let i = 0; i < count; i++) await c.pwrite(buf, ((i * 7919 + seed * 13) % 4096) * 4096);
    await c.flush();
  } finally {
    await c.disconnect();
  }
}

if (requireTool(t, 'nbdcopy') && requireTool(t, 'promtool')) {
  t.test('single node: counters follow real traffic; promtool accepts the exposition', async (t) => {
    const srv = await startServer(t, { args: ['--export', 'disk0=64M', '--pmem-size', '16M'] });
    t.equal((await getText(srv.httpPort, '/healthz')).status, 200, '/healthz');
    t.equal((await getText(srv.httpPort, '/readyz')).status, 200, '/readyz once serving');
    const src = path.join(freshDir(t, 'src'), 'src.img');
    writeFileSync(src, randomBytes(8 * MiB));
    const r = await run('nbdcopy', ['--flush', src, srv.uri('disk0')], { timeoutMs: 60_000 });
    t.equal(r.code, 0, 'nbdcopy into the export', { run: describe(r) });
    const c = await NbdClient.connect({ host: '127.0.0.1', port: srv.nbdPort }, { exportName: 'disk0', metaContexts: [] });
    await t.rejects(c.pread(64 * MiB, 4096), 'a read past the end is refused');
    await c.pread(0, 65536);
    await c.pwrite(Buffer.alloc(4096, 7), 20 * MiB); // short: into the region
    const m = await scrape(srv.httpPort);
    await c.disconnect();

    t.equal(m.get(`nbdmirror_request_bytes_total${req('write')}`), 8 * MiB + 4096, 'write bytes = what nbdcopy copied and our one page');
    t.ok(m.get(`nbdmirror_requests_total${req('write')}`)! >= 8 * MiB / (32 * MiB), 'write requests counted');
    t.ok(m.get(`nbdmirror_requests_total${req('flush')}`)! >= 1, 'nbdcopy --flush sent a FLUSH');
    t.equal(m.get(`nbdmirror_request_errors_total{export="disk0",command="read",source="client",errno="EINVAL"}`), 1, 'the refused read, by errno');
    t.equal(m.get(`nbdmirror_requests_total${req('read')}`), 2, 'both reads are requests');
    t.equal(m.get(`nbdmirror_request_duration_seconds_count${req('read')}`), 1, 'only the served read has a latency');
    t.equal(m.get(`nbdmirror_request_bytes_total${req('read')}`), 65536);
    t.equal(m.get(`nbdmirror_requests_in_flight{export="disk0",source="client"}`), 0);
    t.ok(m.get('nbdmirror_connections_accepted_total')! >= 2, 'connections accepted');
    t.equal(m.get('nbdmirror_connections_open'), 1, 'our own connection is open while scraping');
    t.equal(m.get('nbdmirror_region_capacity_pages'), 4096, '16 MiB region = 4096 pages');
    t.ok(m.get('nbdmirror_region_used_pages')! > 0, 'the region holds pages');
    const bypassed = m.get('nbdmirror_write_bypass_bytes_total')!;
    t.ok(bypassed > 0 && bypassed <= 8 * MiB, `nbdcopy's long writes went past the region (${bypassed} bytes), the short one did not`);
    t.equal(m.get('nbdmirror_replication_role{export="disk0",role="primary"}'), 1, 'a single node is primary');
    t.ok((m.get('process_resident_memory_bytes') ?? 0) > 0, 'process defaults are there');
    t.ok(m.get('nbdmirror_busy_poll_seconds_total')! > 0, `the loop polled after requests (default --busy-poll): ${m.get('nbdmirror_busy_poll_seconds_total')} s`);

    // nbdcopy reads with four connections, 256 KiB per request: long replies go out from the thread pool.
    t.equal(m.get('nbdmirror_reply_pool_writes_total'), 0, 'no pool writes so far: short replies, or one connection');
    const out = await run('nbdcopy', ['--no-extents', srv.uri('disk0'), 'null:'], { timeoutMs: 60_000 });
    t.equal(out.code, 0, 'nbdcopy out of the export', { run: describe(out) });
    const m2 = await scrape(srv.httpPort);
    t.ok(m2.get('nbdmirror_reply_pool_writes_total')! > 0, `replies written from the thread pool: ${m2.get('nbdmirror_reply_pool_writes_total')}`);
    const partial = m2.get('nbdmirror_reply_pool_partial_writes_total');
    t.ok(partial !== undefined && partial <= m2.get('nbdmirror_reply_pool_writes_total')!, `partial pool writes (${partial}) among them`);

    const { text, type } = await getText(srv.httpPort, '/metrics');
    t.match(type, /^text\/plain; version=0\.0\.4/, 'Prometheus text format');
    const pc = spawnSync('promtool', ['check', 'metrics'], { input: text, encoding: 'utf8', timeout: 30_000 });
    t.equal(pc.status, 0, 'promtool check metrics: clean', { stdout: pc.stdout, stderr: pc.stderr });
  });

  t.test('--busy-poll 0: the loop never polls', async (t) => {
    const srv = await startServer(t, { args: ['--export', 'disk0=16M', '--pmem-size', '16M', '--busy-poll', '0'] });
    const c = await NbdClient.connect({ host: '127.0.0.1', port: srv.nbdPort }, { exportName: 'disk0', metaContexts: [] });
    for (let i = 0; i < 20; i++) await c.pwrite(Buffer.alloc(4096, i), i * 4096);
    await c.disconnect();
    const m = await scrape(srv.httpPort);
    t.equal(m.get(`nbdmirror_requests_total${req('write')}`), 20, 'the writes were served');
    t.equal(m.get('nbdmirror_busy_poll_seconds_total'), 0, 'no time spent polling');
  });

  t.test('--busy-poll 10ms: requests just past the window grow it, and a long pause resets it', async (t) => {
    // Writes 15 ms apart: the first 10 ms window ends about 5 ms before the next request, so the window
    // doubles to 20 ms, which then covers the gaps: the loop polls on from write to write. Pacing by timers is
    // loose on a loaded machine, so this allows 30 writes for the growth (one gap within 10 ms of a window's
    // end is enough) and checks the polling time against the wall time loosely.
    const srv = await startServer(t, { args: ['--export', 'disk0=16M', '--pmem-size', '16M', '--busy-poll', '10ms'] });
    const c = await NbdClient.connect({ host: '127.0.0.1', port: srv.nbdPort }, { exportName: 'disk0', metaContexts: [] });
    const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
    let m = await scrape(srv.httpPort);
    t.equal(m.get('nbdmirror_busy_poll_window_seconds'), 0.01, 'the window starts at --busy-poll');
    const polled0 = m.get('nbdmirror_busy_poll_seconds_total')!;
    const started = performance.now();
    for (let i = 0; i < 30; i++) {
      await c.pwrite(Buffer.alloc(4096, i + 1), i * 4096);
      await sleep(15);
    }
    const elapsed = (performance.now() - started) / 1000;
    m = await scrape(srv.httpPort);
    const grown = m.get('nbdmirror_busy_poll_window_seconds')!;
    t.ok(grown >= 0.02 && grown <= 0.04, `the window grew: ${grown * 1000} ms (at most 4 x 10 ms)`);
    const polled = m.get('nbdmirror_busy_poll_seconds_total')! - polled0;
    t.ok(polled >= 0.5 * elapsed, `the loop polled ${polled.toFixed(3)} s of the ${elapsed.toFixed(3)} s between the writes`);
    await sleep(100); // longer than the largest window
    await c.pwrite(Buffer.alloc(4096, 99), 0);
    m = await scrape(srv.httpPort);
    t.equal(m.get('nbdmirror_busy_poll_window_seconds'), 0.01, 'back to --busy-poll after the pause');
    t.same(await c.pread(29 * 4096, 4096), Buffer.alloc(4096, 30), 'the paced writes landed');
    await c.disconnect();
  });
}

t.test('two nodes: link state, peer latency, peer traffic, out-of-sync bytes and resync in the metrics', async (t) => {
  const { a, b } = await makePair(t, { args: ['--peer-timeout', '1s'] });
  await b.start(['--role', 'secondary']);
  await a.start(['--role', 'primary']);
  await waitInSync(a, b);
  await writeBlocks(a, 200, 1);
  let ma = await scrape(a.httpPort);
  let mb = await scrape(b.httpPort);
  t.equal(ma.get('nbdmirror_replication_link_state{export="disk0",state="connected"}'), 1, 'primary: link connected');
  t.ok(ma.get('nbdmirror_peer_write_duration_seconds_count{export="disk0"}')! >= 200, 'primary: every mirrored write timed on the peer');
  t.equal(ma.get('nbdmirror_replication_out_of_sync_bytes{export="disk0"}'), 0);
  t.ok(mb.get(`nbdmirror_requests_total${req('write', 'peer')}`)! >= 200, 'secondary: the link writes counted as source="peer"');
  t.equal(mb.get(`nbdmirror_requests_total${req('write', 'client')}`) ?? 0, 0, 'secondary: no client writes');
  t.equal(mb.get('nbdmirror_replication_role{export="disk0",role="secondary"}'), 1);
  t.equal(mb.get('nbdmirror_replication_disk_state{export="disk0",state="UpToDate"}'), 1);
  t.equal(ma.get('nbdmirror_replication_epoch{export="disk0"}'), mb.get('nbdmirror_replication_epoch{export="disk0"}'), 'same epoch on both');

  await b.kill();
  await writeBlocks(a, 100, 2); // the first ones wait out the peer timeout, then the primary goes on degraded
  ma = await scrape(a.httpPort);
  const oos = ma.get('nbdmirror_replication_out_of_sync_bytes{export="disk0"}')!;
  t.ok(oos >= 100 * 4096, `degraded: ${oos} bytes out of sync`);
  t.equal(ma.get('nbdmirror_replication_link_state{export="disk0",state="connected"}'), 0, 'link no longer connected');

  await b.start();
  await waitInSync(a, b);
  ma = await scrape(a.httpPort);
  t.equal(ma.get('nbdmirror_replication_out_of_sync_bytes{export="disk0"}'), 0, 'resynced: nothing out of sync');
  t.ok(ma.get('nbdmirror_resync_sent_bytes_total{export="disk0"}')! >= oos, 'the resync sent at least the out-of-sync bytes');
  t.equal(ma.get('nbdmirror_resync_total_bytes{export="disk0"}'), 0, 'no resync under way');
  mb = await scrape(b.httpPort);
  t.ok(mb.get(`nbdmirror_request_bytes_total${req('write', 'peer')}`)! >= oos, 'the secondary took the resync as peer writes');
});

if (requireTool(t, 'prometheus')) {
  t.test('a real Prometheus scrapes both nodes and answers PromQL over the traffic', async (t) => {
    const { a, b } = await makePair(t);
    await b.start(['--role', 'secondary']);
    await a.start(['--role', 'primary']);
    await waitInSync(a, b);

    const prom = await startPrometheus(t, () =>
      [
        'global:',
        '  scrape_interval: 1s',
        'scrape_configs:',
        '  - job_name: nbdmirror',
        '    static_configs:',
        `      - targets: ['127.0.0.1:${a.httpPort}']`,
        '        labels: { node: a }',
        `      - targets: ['127.0.0.1:${b.httpPort}']`,
        '        labels: { node: b }',
        '',
      ].join('\n'),
    );
    const query = async (q: string): Promise<number | null> => {
      const v = (await prom.query(q)).data?.result?.[0]?.value[1];
      return v === undefined ? null : Number(v);
    };
    /** Poll q until pred holds (at most 40 s); the last value either way. */
    const until = async (q: string, pred: (v: number) => boolean): Promise<number | null> => {
      const deadline = Date.now() + 40_000;
      let v: number | null = null;
      while (Date.now() < deadline) {
        v = await query(q).catch(() => null);
        if (v !== null && pred(v)) return v;
        await new Promise((r) => setTimeout(r, 250));
      }
      return v;
    };

    t.equal(await until('count(up{job="nbdmirror"} == 1)', (v) => v === 2), 2, 'both nodes are up targets', { log: prom.log() });
    await writeBlocks(a, 300, 3);
    const writes = await until('sum(nbdmirror_requests_total{command="write",source="client"})', (v) => v >= 300);
    t.ok(writes !== null && writes >= 300, `client writes seen by Prometheus: ${writes}`);
    const mirrored = await until('sum by (node) (nbdmirror_requests_total{command="write",source="peer",node="b"})', (v) => v >= 300);
    t.ok(mirrored !== null && mirrored >= 300, `writes mirrored to node b: ${mirrored}`);
    const linked = await until('nbdmirror_replication_link_state{node="a",state="connected"}', (v) => v === 1);
    t.equal(linked, 1, 'PromQL sees node a connected to its peer');
    const p99 = await until(
      'histogram_quantile(0.99, sum by (le) (nbdmirror_peer_write_duration_seconds_bucket{node="a"}))',
      (v) => Number.isFinite(v) && v > 0,
    );
    t.ok(p99 !== null && p99 > 0 && p99 < 10, `peer write p99 from the histogram: ${p99} s`);
  });
}

t.test('split brain raises the metric flag on both nodes', async (t) => {
  const { a, b } = await makePair(t, { args: ['--peer-timeout', '1s'] });
  await b.start(['--role', 'secondary']);
  await a.start(['--role', 'primary']);
  await waitInSync(a, b);
  await a.stop();
  await b.stop();
  await b.start(['--role', 'primary']);
  await writeBlocks(b, 10, 4);
  await b.stop();
  await a.start(['--role', 'primary']);
  await writeBlocks(a, 10, 5);
  await b.start(['--role', 'primary']);
  await waitRep(a, (r) => r.splitBrain !== null);
  await waitRep(b, (r) => r.splitBrain !== null);
  t.equal((await scrape(a.httpPort)).get('nbdmirror_replication_split_brain{export="disk0"}'), 1, 'node a: split brain flag');
  t.equal((await scrape(b.httpPort)).get('nbdmirror_replication_split_brain{export="disk0"}'), 1, 'node b: split brain flag');
});
