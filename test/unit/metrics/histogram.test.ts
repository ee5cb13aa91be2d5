// lib/metrics/histogram.ts and request-stats.ts: observations land in the right bucket (upper bound
// inclusive, as Prometheus's `le`), cumulative counts, sum and count; request counting per command,
// refused requests, errors by errno name, requests in flight.

import t from 'tap';
import { LatencyHistogram, LATENCY_BUCKETS } from '../../../lib/metrics/histogram';
import { COMMAND_LABELS, NodeRequestStats, RequestStats } from '../../../lib/metrics/request-stats';
import { NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_WRITE, NBD_EIO, NBD_EINVAL } from '../../../lib/protocol/constants';

t.test('buckets: upper bound inclusive, +Inf for the rest, cumulative snapshot', async (t) => {
  const h = new LatencyHistogram([0.001, 0.01, 0.1]);
  for (const v of [0, 0.001, 0.0011, 0.01, 0.05, 0.1, 0.2, 30]) h.observe(v);
  const s = h.snapshot();
  t.same(s.cumulative, [2, 4, 6, 8], 'le=0.001: 0 and 0.001; le=0.01: +0.0011, 0.01; le=0.1: +0.05, 0.1; +Inf: +0.2, 30');
  t.equal(s.count, 8);
  t.ok(Math.abs(s.sum - 30.3621) < 1e-9, `sum ${s.sum}`);
  t.throws(() => new LatencyHistogram([0.1, 0.1]), RangeError, 'bounds must increase');
  t.ok(LATENCY_BUCKETS.every((b, i) => i === 0 || b > LATENCY_BUCKETS[i - 1]!), 'default bounds increase');
});

t.test('request stats: counts, bytes, latency, in flight, refusals and errors', async (t) => {
  const s = new RequestStats('disk0', 'client');
  const t0 = s.begin(NBD_CMD_WRITE);
  const t1 = s.begin(NBD_CMD_WRITE);
  t.equal(s.inFlight[NBD_CMD_WRITE], 2, 'two writes in flight');
  s.end(NBD_CMD_WRITE, 4096, t0);
  s.end(NBD_CMD_WRITE, 8192, t1);
  t.equal(s.inFlight[NBD_CMD_WRITE], 0);
  t.equal(s.requests[NBD_CMD_WRITE], 2);
  t.equal(s.bytes[NBD_CMD_WRITE], 12288);
  t.equal(s.latency[NBD_CMD_WRITE]!.count, 2, 'both latencies observed');
  s.refused(NBD_CMD_READ);
  s.error(NBD_CMD_READ, NBD_EINVAL);
  const t2 = s.begin(NBD_CMD_FLUSH);
  s.error(NBD_CMD_FLUSH, NBD_EIO);
  s.end(NBD_CMD_FLUSH, 0, t2);
  t.equal(s.requests[NBD_CMD_READ], 1, 'a refused read is a request');
  t.equal(s.latency[NBD_CMD_READ]!.count, 0, 'but has no latency');
  t.same([...s.errors], [
    [`${NBD_CMD_READ} EINVAL`, 1],
    [`${NBD_CMD_FLUSH} EIO`, 1],
  ]);
  t.ok(COMMAND_LABELS.some(([c, l]) => c === NBD_CMD_WRITE && l === 'write'));
});

t.test('node stats: one RequestStats per export and source', async (t) => {
  const n = new NodeRequestStats();
  t.equal(n.for('a', 'client'), n.for('a', 'client'), 'same object on every lookup');
  t.not(n.for('a', 'client'), n.for('a', 'peer'), 'peer traffic counted apart');
  n.for('b', 'client');
  t.same(n.all().map((s) => `${s.exportName}/${s.source}`).sort(), ['a/client', 'a/peer', 'b/client']);
});
