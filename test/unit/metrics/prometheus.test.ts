// lib/metrics/prometheus.ts: the exposition built from request counters and a node snapshot has every
// nbdmirror_* family with the right type, values read at scrape time (a later scrape sees later numbers),
// histograms with cumulative buckets ending in +Inf, state gauges with one series per state, and passes
// `promtool check metrics` when promtool is installed (required under CI).

import t from 'tap';
import { spawnSync } from 'node:child_process';
import { LatencyHistogram } from '../../../lib/metrics/histogram';
import { createNodeMetrics, type MetricsSnapshot } from '../../../lib/metrics/prometheus';
import { NodeRequestStats } from '../../../lib/metrics/request-stats';
import { NBD_CMD_WRITE, NBD_ENOSPC } from '../../../lib/protocol/constants';
import { requireTool } from '../../helpers/requires';

function setup() {
  const requests = new NodeRequestStats();
  const peerWrites = new LatencyHistogram();
  let snap: MetricsSnapshot = {
    region: { capacityPages: 1024, usedPages: 100, dirtyPages: 40, pageSize: 4096, backpressureWaits: 3, oldestDirtySeconds: 1.5 },
    writebackBytes: 1 << 20,
    bypassBytes: 3 << 20,
    cache: { hits: 7, misses: 2, bytes: 8192, maxBytes: 1 << 26 },
    replication: [
      {
        export: 'disk0',
        role: 'primary',
        disk: 'UpToDate',
        linkState: 'syncing',
        epoch: 4,
        outOfSyncBytes: 65536,
        splitBrain: false,
        resync: { doneBytes: 4096, totalBytes: 69632, rate: 1e6, etaSeconds: 1 },
        resyncSentBytes: 4096,
        peerWrites,
      },
    ],
  };
  const m = createNodeMetrics({ requests, snapshot: () => snap }, { version: '9.9.9', nodeId: 'n1' });
  return { m, requests, peerWrites, set: (s: Partial<MetricsSnapshot>) => (snap = { ...snap, ...s }) };
}

/** The value of one sample line, e.g. 'nbdmirror_region_dirty_pages' or 'x{a="b"}'. */
function sample(text: string, series: string): number | undefined {
  const line = text.split('\n').find((l) => l.startsWith(`${series} `));
  return line === undefined ? undefined : Number(line.slice(series.length + 1));
}

t.test('families, types and values read at scrape time', async (t) => {
  const { m, requests, peerWrites, set } = setup();
  const w = requests.for('disk0', 'client');
  const t0 = w.begin(NBD_CMD_WRITE);
  w.end(NBD_CMD_WRITE, 4096, t0);
  w.error(NBD_CMD_WRITE, NBD_ENOSPC);
  peerWrites.observe(0.0003);
  requests.connectionsAccepted = 5;
  requests.connectionsOpen = 2;
  requests.replyPoolWrites.pool = 7;
  requests.replyPoolWrites.partial = 2;

  const text = await m.text();
  const types = new Map([...text.matchAll(/^# TYPE (\S+) (\S+)$/gm)].map((x) => [x[1]!, x[2]!]));
  for (const [name, type] of [
    ['nbdmirror_requests_total', 'counter'],
    ['nbdmirror_request_bytes_total', 'counter'],
    ['nbdmirror_request_errors_total', 'counter'],
    ['nbdmirror_request_duration_seconds', 'histogram'],
    ['nbdmirror_requests_in_flight', 'gauge'],
    ['nbdmirror_connections_open', 'gauge'],
    ['nbdmirror_connections_accepted_total', 'counter'],
    ['nbdmirror_reply_pool_writes_total', 'counter'],
    ['nbdmirror_reply_pool_partial_writes_total', 'counter'],
    ['nbdmirror_region_dirty_pages', 'gauge'],
    ['nbdmirror_writeback_lag_seconds', 'gauge'],
    ['nbdmirror_writeback_bytes_total', 'counter'],
    ['nbdmirror_write_bypass_bytes_total', 'counter'],
    ['nbdmirror_cache_hits_total', 'counter'],
    ['nbdmirror_replication_link_state', 'gauge'],
    ['nbdmirror_replication_split_brain', 'gauge'],
    ['nbdmirror_peer_write_duration_seconds', 'histogram'],
    ['nbdmirror_resync_sent_bytes_total', 'counter'],
    ['process_cpu_seconds_total', 'counter'],
  ] as const) {
    t.equal(types.get(name), type, `${name} is a ${type}`);
  }
  t.equal(sample(text, 'nbdmirror_requests_total{export="disk0",command="write",source="client"}'), 1);
  t.equal(sample(text, 'nbdmirror_request_bytes_total{export="disk0",command="write",source="client"}'), 4096);
  t.equal(sample(text, 'nbdmirror_request_errors_total{export="disk0",command="write",source="client",errno="ENOSPC"}'), 1);
  t.equal(sample(text, 'nbdmirror_request_duration_seconds_count{export="disk0",command="write",source="client"}'), 1);
  t.equal(sample(text, 'nbdmirror_request_duration_seconds_bucket{export="disk0",command="write",source="client",le="+Inf"}'), 1);
  t.equal(sample(text, 'nbdmirror_connections_accepted_total'), 5);
  t.equal(sample(text, 'nbdmirror_connections_open'), 2);
  t.equal(sample(text, 'nbdmirror_reply_pool_writes_total'), 7);
  t.equal(sample(text, 'nbdmirror_reply_pool_partial_writes_total'), 2);
  t.equal(sample(text, 'nbdmirror_region_dirty_pages'), 40);
  t.equal(sample(text, 'nbdmirror_region_used_pages'), 100);
  t.equal(sample(text, 'nbdmirror_writeback_lag_seconds'), 1.5);
  t.equal(sample(text, 'nbdmirror_region_backpressure_waits_total'), 3);
  t.equal(sample(text, 'nbdmirror_replication_link_state{export="disk0",state="syncing"}'), 1);
  t.equal(sample(text, 'nbdmirror_replication_link_state{export="disk0",state="connected"}'), 0);
  t.equal(sample(text, 'nbdmirror_replication_role{export="disk0",role="primary"}'), 1);
  t.equal(sample(text, 'nbdmirror_replication_epoch{export="disk0"}'), 4);
  t.equal(sample(text, 'nbdmirror_resync_total_bytes{export="disk0"}'), 69632);
  t.equal(sample(text, 'nbdmirror_resync_eta_seconds{export="disk0"}'), 1);
  t.equal(sample(text, 'nbdmirror_peer_write_duration_seconds_bucket{export="disk0",le="0.0005"}'), 1);
  t.equal(sample(text, 'nbdmirror_peer_write_duration_seconds_bucket{export="disk0",le="0.00025"}'), 0);
  t.equal(sample(text, 'nbdmirror_build_info{version="9.9.9",node_id="n1"}'), 1);
  t.notOk(/nodejs_active_handles_total/.test(text), 'the gauges named like counters are left out');

  // State is read at scrape time: a later scrape sees the later snapshot, counters their later totals.
  set({ replication: [setupRep()] });
  const t1 = w.begin(NBD_CMD_WRITE);
  w.end(NBD_CMD_WRITE, 4096, t1);
  const text2 = await m.text();
  t.equal(sample(text2, 'nbdmirror_requests_total{export="disk0",command="write",source="client"}'), 2);
  t.equal(sample(text2, 'nbdmirror_replication_split_brain{export="disk0"}'), 1);
  t.equal(sample(text2, 'nbdmirror_resync_eta_seconds{export="disk0"}'), undefined, 'no ETA series without a resync');
  t.equal(sample(text2, 'nbdmirror_replication_link_state{export="disk0",state="refused"}'), 1);
});

function setupRep(): MetricsSnapshot['replication'][number] {
  return {
    export: 'disk0',
    role: 'primary',
    disk: 'UpToDate',
    linkState: 'refused',
    epoch: 4,
    outOfSyncBytes: 0,
    splitBrain: true,
    resync: null,
    resyncSentBytes: 4096,
    peerWrites: null,
  };
}

if (requireTool(t, 'promtool')) {
  t.test('promtool check metrics accepts the exposition', async (t) => {
    const { m, requests } = setup();
    const w = requests.for('disk0', 'client');
    w.end(NBD_CMD_WRITE, 4096, w.begin(NBD_CMD_WRITE));
    requests.for('disk0', 'peer').error(NBD_CMD_WRITE, NBD_ENOSPC);
    const r = spawnSync('promtool', ['check', 'metrics'], { input: await m.text(), encoding: 'utf8', timeout: 30_000 });
    t.equal(r.status, 0, 'promtool check metrics: no problems', { stdout: r.stdout, stderr: r.stderr });
  });
}
