// The node's Prometheus registry (prom-client, one Registry per node, nothing global). Request counters come
// from RequestStats (incremented by the connections), everything that is state — region, cache, roles, link,
// resync — is read from one snapshot of the node taken at scrape time, never updated per request.

import { Counter, collectDefaultMetrics, Gauge, Histogram, type MetricObjectWithValues, type MetricType, type MetricValueWithName, Registry } from 'prom-client';
import { type LatencyHistogram, LATENCY_BUCKETS } from './histogram';
import { COMMAND_LABELS, type NodeRequestStats } from './request-stats';

const ROLES = ['primary', 'secondary'] as const;
const DISK_STATES = ['UpToDate', 'Outdated', 'Inconsistent'] as const;
const LINK_STATES = ['idle', 'connecting', 'syncing', 'connected', 'refused', 'stopped'] as const;

export interface ReplicationSnapshot {
  export: string;
  role: string;
  disk: string;
  /** null on a node without a link for this export (secondary, or no peer configured). */
  linkState: string | null;
  epoch: number;
  outOfSyncBytes: number;
  splitBrain: boolean;
  /** The resync under way, if any. */
  resync: { doneBytes: number; totalBytes: number; rate: number; etaSeconds: number | null } | null;
  /** Bytes sent (and zeroed) by every resync of this run. */
  resyncSentBytes: number;
  /** Latency of mirrored writes on the peer (null without a link). */
  peerWrites: LatencyHistogram | null;
}

export interface MetricsSnapshot {
  region: { capacityPages: number; usedPages: number; dirtyPages: number; pageSize: number; backpressureWaits: number; oldestDirtySeconds: number | null };
  writebackBytes: number;
  /** Bytes of long writes that went straight to the backing files, past the region. */
  bypassBytes: number;
  cache: { hits: number; misses: number; bytes: number; maxBytes: number };
  replication: ReplicationSnapshot[];
}

export interface MetricsSource {
  requests: NodeRequestStats;
  snapshot(): MetricsSnapshot;
  /** The event loop's busy polling (see BusyPoll), when the node has it. */
  busyPoll?: { readonly polledSeconds: number; readonly currentWindowMs: number };
}

type Values = Array<MetricValueWithName<string>>;

/** A histogram whose buckets are read from LatencyHistograms at scrape time (see histogram.ts for why). */
class ViewHistogram extends Histogram<string> {
  private readonly metricName: string;
  private readonly helpText: string;

  constructor(
    cfg: { name: string; help: string; labelNames: string[]; registers: Registry[] },
    private readonly read: () => Array<{ labels: Record<string, string>; h: LatencyHistogram }>,
  ) {
    super({ ...cfg, buckets: [...LATENCY_BUCKETS] });
    this.metricName = cfg.name;
    this.helpText = cfg.help;
  }

  private values(): Values {
    const out: Values = [];
    for (const { labels, h } of this.read()) {
      const s = h.snapshot();
      h.bounds.forEach((le, i) => out.push({ labels: { ...labels, le }, value: s.cumulative[i]!, metricName: `${this.metricName}_bucket` }));
      out.push({ labels: { ...labels, le: '+Inf' }, value: s.cumulative[h.bounds.length]!, metricName: `${this.metricName}_bucket` });
      out.push({ labels, value: s.sum, metricName: `${this.metricName}_sum` });
      out.push({ labels, value: s.count, metricName: `${this.metricName}_count` });
    }
    return out;
  }

  override async get(): Promise<MetricObjectWithValues<MetricValueWithName<string>>> {
    return { name: this.metricName, help: this.helpText, type: (this as unknown as { type: MetricType }).type, values: this.values(), aggregator: 'sum', collect: () => undefined };
  }

  // prom-client's text exposition asks for this one when it exists.
  async getForPromString(): Promise<MetricObjectWithValues<MetricValueWithName<string>>> {
    return this.get();
  }
}

export interface NodeMetrics {
  readonly registry: Registry;
  /** The exposition text for GET /metrics. */
  text(): Promise<string>;
  readonly contentType: string;
}

export function createNodeMetrics(src: MetricsSource, info: { version: string; nodeId: string }): NodeMetrics {
  const registry = new Registry();
  const registers = [registry];
  collectDefaultMetrics({ register: registry });
  // These three are gauges named like counters (promtool rejects them); the per-type nodejs_active_handles,
  // nodejs_active_requests and nodejs_active_resources gauges carry the same numbers.
  for (const n of ['nodejs_active_handles_total', 'nodejs_active_requests_total', 'nodejs_active_resources_total']) registry.removeSingleMetric(n);

  // One snapshot per scrape: every collect() of a scrape runs within the same few ms.
  let snap: MetricsSnapshot | null = null;
  let snapAt = 0;
  const state = (): MetricsSnapshot => {
    const now = Date.now();
    if (snap === null || now - snapAt > 100) {
      snap = src.snapshot();
      snapAt = now;
    }
    return snap;
  };
  /** A gauge set from the snapshot at scrape time. */
  const gauge = (name: string, help: string, labelNames: string[], fill: (g: Gauge<string>, s: MetricsSnapshot) => void): void => {
    new Gauge({
      name,
      help,
      labelNames,
      registers,
      collect() {
        this.reset();
        fill(this, state());
      },
    });
  };
  /** A counter whose running total lives elsewhere (copied at scrape time). */
  const counter = (name: string, help: string, labelNames: string[], fill: (set: (labels: Record<string, string>, v: number) => void) => void): void => {
    new Counter({
      name,
      help,
      labelNames,
      registers,
      collect() {
        this.reset();
        fill((labels, v) => this.inc(labels, v));
      },
    });
  };

  new Gauge({ name: 'nbdmirror_build_info', help: 'Always 1; the labels say which nbdmirror runs', labelNames: ['version', 'node_id'], registers }).set(
    { version: info.version, node_id: info.nodeId },
    1,
  );

  // --- NBD requests, per export, command and source (client or peer link)
  const perCommand = (pick: (s: ReturnType<NodeRequestStats['all']>[number], cmd: number) => number) => (set: (l: Record<string, string>, v: number) => void) => {
    for (const s of src.requests.all()) {
      for (const [cmd, command] of COMMAND_LABELS) set({ export: s.exportName, command, source: s.source }, pick(s, cmd));
    }
  };
  const reqLabels = ['export', 'command', 'source'];
  counter('nbdmirror_requests_total', 'NBD requests answered (including errors)', reqLabels, perCommand((s, c) => s.requests[c]!));
  counter('nbdmirror_request_bytes_total', 'Bytes requested: payload of reads and writes, range of trim, write_zeroes and cache', reqLabels, perCommand((s, c) => s.bytes[c]!));
  counter('nbdmirror_request_errors_total', 'NBD requests answered with an error, by NBD errno', [...reqLabels, 'errno'], (set) => {
    const label = new Map(COMMAND_LABELS);
    for (const s of src.requests.all()) {
      for (const [key, n] of s.errors) {
        const [cmd, errno] = key.split(' ');
        set({ export: s.exportName, command: label.get(Number(cmd)) ?? `cmd_${cmd}`, source: s.source, errno: errno! }, n);
      }
    }
  });
  new ViewHistogram({ name: 'nbdmirror_request_duration_seconds', help: 'Time from a request reaching the device to its reply being queued', labelNames: reqLabels, registers }, () =>
    src.requests.all().flatMap((s) => COMMAND_LABELS.map(([cmd, command]) => ({ labels: { export: s.exportName, command, source: s.source }, h: s.latency[cmd]! }))),
  );
  gauge('nbdmirror_requests_in_flight', 'NBD requests being served', ['export', 'source'], (g) => {
    for (const s of src.requests.all()) g.set({ export: s.exportName, source: s.source }, s.inFlight.reduce((a, b) => a + b, 0));
  });
  gauge('nbdmirror_connections_open', 'NBD connections open (clients and peer link)', [], (g) => g.set(src.requests.connectionsOpen));
  counter('nbdmirror_connections_accepted_total', 'NBD connections accepted', [], (set) => set({}, src.requests.connectionsAccepted));
  counter('nbdmirror_reply_pool_writes_total', 'Reply batches written from the thread pool (long replies while several connections are open)', [], (set) =>
    set({}, src.requests.replyPoolWrites.pool),
  );
  counter('nbdmirror_reply_pool_partial_writes_total', 'Reply batches from the thread pool the socket took only in part (the rest went through the event loop)', [], (set) =>
    set({}, src.requests.replyPoolWrites.partial),
  );

  counter('nbdmirror_busy_poll_seconds_total', 'Time the event loop spent polling for requests instead of sleeping (--busy-poll)', [], (set) =>
    set({}, src.busyPoll?.polledSeconds ?? 0),
  );
  gauge('nbdmirror_busy_poll_window_seconds', 'How long the event loop polls after a request now: --busy-poll, grown up to 4 times that while requests keep arriving just after a window', [], (g) =>
    g.set((src.busyPoll?.currentWindowMs ?? 0) / 1000),
  );

  // --- Region, writeback, read cache
  gauge('nbdmirror_region_capacity_pages', 'Pages in the pmem region', [], (g, s) => g.set(s.region.capacityPages));
  gauge('nbdmirror_region_used_pages', 'Region pages holding data (dirty or clean)', [], (g, s) => g.set(s.region.usedPages));
  gauge('nbdmirror_region_dirty_pages', 'Region pages not yet written back', [], (g, s) => g.set(s.region.dirtyPages));
  gauge('nbdmirror_region_page_size_bytes', 'Size of a region page', [], (g, s) => g.set(s.region.pageSize));
  counter('nbdmirror_region_backpressure_waits_total', 'Writes that waited for writeback because every region page was dirty', [], (set) =>
    set({}, state().region.backpressureWaits),
  );
  gauge('nbdmirror_writeback_lag_seconds', 'Age of the oldest dirty region page (0 when none)', [], (g, s) => g.set(s.region.oldestDirtySeconds ?? 0));
  counter('nbdmirror_writeback_bytes_total', 'Bytes written back from the region to the backing files', [], (set) => set({}, state().writebackBytes));
  counter('nbdmirror_write_bypass_bytes_total', 'Bytes of long writes that went straight to the backing files, past the region', [], (set) => set({}, state().bypassBytes));
  counter('nbdmirror_cache_hits_total', 'Reads served from the read cache (per 4 KiB block)', [], (set) => set({}, state().cache.hits));
  counter('nbdmirror_cache_misses_total', 'Reads the read cache could not serve (per 4 KiB block)', [], (set) => set({}, state().cache.misses));
  gauge('nbdmirror_cache_bytes', 'Bytes held by the read cache', [], (g, s) => g.set(s.cache.bytes));
  gauge('nbdmirror_cache_capacity_bytes', 'Read cache size limit (--cache-size)', [], (g, s) => g.set(s.cache.maxBytes));

  // --- Replication, per export. States are one series per possible value, 1 for the current one.
  gauge('nbdmirror_replication_role', 'Role of this node for the export (1 for the current role)', ['export', 'role'], (g, s) => {
    for (const r of s.replication) for (const role of ROLES) g.set({ export: r.export, role }, r.role === role ? 1 : 0);
  });
  gauge('nbdmirror_replication_disk_state', 'State of this copy (1 for the current state)', ['export', 'state'], (g, s) => {
    for (const r of s.replication) for (const st of DISK_STATES) g.set({ export: r.export, state: st }, r.disk === st ? 1 : 0);
  });
  gauge('nbdmirror_replication_link_state', 'State of the link to the peer, on the primary (1 for the current state)', ['export', 'state'], (g, s) => {
    for (const r of s.replication) {
      if (r.linkState !== null) for (const st of LINK_STATES) g.set({ export: r.export, state: st }, r.linkState === st ? 1 : 0);
    }
  });
  gauge('nbdmirror_replication_epoch', 'Highest epoch this node has seen for the export', ['export'], (g, s) => {
    for (const r of s.replication) g.set({ export: r.export }, r.epoch);
  });
  gauge('nbdmirror_replication_out_of_sync_bytes', 'Bytes marked out of sync with the peer', ['export'], (g, s) => {
    for (const r of s.replication) g.set({ export: r.export }, r.outOfSyncBytes);
  });
  gauge('nbdmirror_replication_split_brain', '1 while split brain is detected (both nodes wrote while apart)', ['export'], (g, s) => {
    for (const r of s.replication) g.set({ export: r.export }, r.splitBrain ? 1 : 0);
  });
  gauge('nbdmirror_resync_done_bytes', 'Bytes the resync under way has sent so far (0 when none)', ['export'], (g, s) => {
    for (const r of s.replication) g.set({ export: r.export }, r.resync?.doneBytes ?? 0);
  });
  gauge('nbdmirror_resync_total_bytes', 'Bytes the resync under way has to send (0 when none)', ['export'], (g, s) => {
    for (const r of s.replication) g.set({ export: r.export }, r.resync?.totalBytes ?? 0);
  });
  gauge('nbdmirror_resync_rate_bytes_per_second', 'Rate of the resync under way (0 when none)', ['export'], (g, s) => {
    for (const r of s.replication) g.set({ export: r.export }, r.resync?.rate ?? 0);
  });
  gauge('nbdmirror_resync_eta_seconds', 'Estimated time left for the resync under way (absent when unknown)', ['export'], (g, s) => {
    for (const r of s.replication) if (r.resync?.etaSeconds != null) g.set({ export: r.export }, r.resync.etaSeconds);
  });
  counter('nbdmirror_resync_sent_bytes_total', 'Bytes sent (or zeroed) to the peer by resyncs', ['export'], (set) => {
    for (const r of state().replication) set({ export: r.export }, r.resyncSentBytes);
  });
  new ViewHistogram({ name: 'nbdmirror_peer_write_duration_seconds', help: 'Time for the peer to acknowledge a mirrored write', labelNames: ['export'], registers }, () =>
    state().replication.flatMap((r) => (r.peerWrites === null ? [] : [{ labels: { export: r.export }, h: r.peerWrites }])),
  );

  return {
    registry,
    contentType: registry.contentType,
    text: () => {
      snap = null; // a fresh snapshot for every scrape
      return registry.metrics();
    },
  };
}
