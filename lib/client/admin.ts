// The operator's side of replication: `nbdmirror status | promote | demote | resync` talk to a node's HTTP
// endpoint (GET /v1/status, POST /v1/exports/NAME/{promote,demote,discard-my-data}). Two halves:
//   - AdminClient: the HTTP calls (global fetch, every request bounded by AbortSignal.timeout), turning what
//     can go wrong into one clear message: ConflictError for a 409, IoError for an unreachable server;
//   - pure functions that turn a status into text (full report, one-line summaries for --watch, the
//     progress of a resync) and decide whether a resync is done. They take the wire JSON defensively: the
//     server's status shape may grow, and a field missing here must not crash the CLI.

import { ConflictError, IoError, UsageError } from '../errors';
import type { LinkState } from '../replication/peer-link';
import type { ResyncProgress } from '../replication/resync';
import { humanSize } from './info';

export const DEFAULT_HTTP = 'http://127.0.0.1:9810';
/** Per-request bound unless the caller gives one (ms). */
export const DEFAULT_REQUEST_TIMEOUT_MS = 10_000;
/** The replication layer's block (the unit of the out-of-sync bitmap and of resync progress). */
export const REPLICATION_BLOCK = 4096;

// ---------------------------------------------------------------------------------------------------------
// The wire shapes (GET /v1/status → replication), as the CLI reads them.

export interface GenIds {
  current: string;
  bitmap: string;
  history: string[];
}

/** A resync under way, as /v1/status shows it (older servers may leave out the estimate). */
export type ResyncView = ResyncProgress & { remainingBlocks?: number; etaSeconds?: number | null };

export type { LinkState };

export interface LinkView {
  state: LinkState | string;
  peer: string;
  reason: string | null;
  verdict: string | null;
  /** Server clock (ms since the epoch) of the last state change. */
  since: number;
  resync: ResyncView | null;
  connects: number;
  lastResync: { bytesSent: number; bytesZeroed: number; blocks: number; ms: number } | null;
}

export interface SplitBrainView {
  detectedAt: string;
  local: GenIds;
  peer: GenIds;
  peerNode: string;
}

export interface ReplicaView {
  name: string;
  uuid: string;
  role: 'primary' | 'secondary' | string;
  epoch: number;
  disk: 'UpToDate' | 'Outdated' | 'Inconsistent' | string;
  gen?: GenIds;
  peerNode: string | null;
  outOfSync: { blocks: number; bytes: number };
  activityLog?: { hotExtents: number; transactions: number };
  splitBrain: SplitBrainView | null;
  link: LinkView | null;
  session: { node: string; nodeId: string; epoch: number; since: number } | null;
}

export interface ReplicationView {
  nodeId: string;
  peer: string | null;
  exports: ReplicaView[];
}

/** GET /v1/status: the CLI reads `replication`; the rest is passed through to --json untouched. */
export interface NodeStatusView {
  replication: ReplicationView;
  [key: string]: unknown;
}

// ---------------------------------------------------------------------------------------------------------
// HTTP

/**
 * The node's HTTP base URL from --http / NBDMIRROR_HTTP: `http://HOST:PORT`, or `HOST:PORT` as the server's
 * own --http flag takes it. Throws UsageError (exit 2) for anything else.
 */
export function parseHttpBase(value: string): string {
  const raw = value.trim();
  if (raw === '') throw new UsageError('--http: empty address');
  const withScheme = /^[a-z][a-z0-9+.-]*:\/\//i.test(raw) ? raw : `http://${raw}`;
  let url: URL;
  try {
    url = new URL(withScheme);
  } catch {
    throw new UsageError(`--http: not a URL or HOST:PORT: "${value}"`);
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new UsageError(`--http: expected an http:// URL, got "${value}"`);
  if (url.hostname === '') throw new UsageError(`--http: no host in "${value}"`);
  if (url.search !== '' || url.hash !== '') throw new UsageError(`--http: unexpected query or fragment in "${value}"`);
  return `${url.protocol}//${url.host}${url.pathname.replace(/\/+$/, '')}`;
}

/** Short form of a fetch failure: the system error code and address when there is one. */
function describeFetchError(err: unknown, timeoutMs: number): string {
  const e = err as { name?: string; message?: string; cause?: { code?: string; message?: string; errors?: Array<{ message?: string }> } };
  if (e?.name === 'TimeoutError' || e?.name === 'AbortError') return `no answer within ${timeoutMs} ms`;
  const cause = e?.cause;
  // The Fetch standard blocks some ports (1, 6000, 10080, …) whatever the server.
  if (e?.cause?.message === 'bad port') return 'fetch refuses to connect to this port (a blocked port of the Fetch standard): use another --http port';
  if (cause !== undefined && cause !== null) {
    // An AggregateError (several addresses for one name) has the useful messages in .errors.
    const first = cause.errors?.[0]?.message;
    return cause.message !== undefined && cause.message !== '' ? cause.message : first ?? String(cause.code ?? 'unknown error');
  }
  return e?.message ?? String(err);
}

export interface AdminClientOptions {
  /** Per-request bound (ms). */
  timeoutMs?: number;
  /** Bearer token for the node's admin endpoints (its --admin-token). */
  token?: string | null;
}

export class AdminClient {
  readonly base: string;
  readonly timeoutMs: number;
  private readonly token: string | null;

  constructor(base: string, opts: AdminClientOptions = {}) {
    this.base = parseHttpBase(base);
    this.timeoutMs = opts.timeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS;
    this.token = opts.token === undefined || opts.token === '' ? null : opts.token;
  }

  /** GET /v1/status. IoError when the node cannot be reached or answers something that is not a status. */
  async status(timeoutMs = this.timeoutMs): Promise<NodeStatusView> {
    const { status, body } = await this.request('GET', '/v1/status', undefined, timeoutMs);
    if (status !== 200) throw new IoError(`GET ${this.base}/v1/status: HTTP ${status}${errorText(body)}`);
    if (!isObject(body) || !isObject(body.replication) || !Array.isArray(body.replication.exports)) {
      throw new IoError(`${this.base}/v1/status has no replication status: is this an nbdmirror server of this version?`);
    }
    return body as NodeStatusView;
  }

  /** The replication status of one export (UsageError-free: an unknown export is a failure, exit 1). */
  async replica(name: string, timeoutMs = this.timeoutMs): Promise<ReplicaView> {
    const s = await this.status(timeoutMs);
    const r = findExport(s.replication, name);
    if (r === undefined) throw new IoError(noExportMessage(this.base, name, s.replication));
    return r;
  }

  promote(name: string, force = false): Promise<ReplicaView> {
    return this.action(name, 'promote', force ? { force: true } : {});
  }

  demote(name: string): Promise<ReplicaView> {
    return this.action(name, 'demote', {});
  }

  discardMyData(name: string): Promise<ReplicaView> {
    return this.action(name, 'discard-my-data', {});
  }

  /** POST /v1/exports/NAME/ACTION: the new ReplicaStatus, ConflictError on 409, IoError otherwise. */
  private async action(name: string, action: string, body: Record<string, unknown>): Promise<ReplicaView> {
    const path = `/v1/exports/${encodeURIComponent(name)}/${action}`;
    const res = await this.request('POST', path, body, this.timeoutMs);
    if (res.status === 200 && isObject(res.body)) return res.body as unknown as ReplicaView;
    if (res.status === 409 && isObject(res.body)) {
      const { error, reason, ...details } = res.body;
      throw new ConflictError(
        `${action} ${name}: ${typeof error === 'string' ? error : 'refused'}`,
        typeof reason === 'string' ? reason : 'conflict',
        details,
      );
    }
    if (res.status === 401) {
      throw new IoError(`${action} ${name}: the node at ${this.base} requires its admin token: pass --token or set NBDMIRROR_ADMIN_TOKEN${errorText(res.body)}`);
    }
    if (res.status === 404) {
      // Either the export does not exist or the server does not know the action: tell which.
      let known: ReplicationView | null = null;
      try {
        known = (await this.status()).replication;
      } catch {
        // keep the plain message
      }
      if (known === null || findExport(known, name) === undefined) {
        throw new IoError(known === null ? `${action} ${name}: the server has no export "${name}"` : noExportMessage(this.base, name, known));
      }
      throw new IoError(`${action} ${name}: the server at ${this.base} does not support ${action} (HTTP 404)`);
    }
    throw new IoError(`${action} ${name}: HTTP ${res.status}${errorText(res.body)}`);
  }

  private async request(method: 'GET' | 'POST', path: string, body: unknown, timeoutMs: number): Promise<{ status: number; body: unknown }> {
    const url = `${this.base}${path}`;
    let res: Response;
    try {
      const headers: Record<string, string> = { accept: 'application/json' };
      if (body !== undefined) headers['content-type'] = 'application/json';
      if (this.token !== null) headers['authorization'] = `Bearer ${this.token}`;
      res = await fetch(url, {
        method,
        headers,
        ...(body === undefined ? {} : { body: JSON.stringify(body) }),
        signal: AbortSignal.timeout(timeoutMs),
      });
    } catch (err) {
      throw new IoError(
        `cannot reach the nbdmirror server at ${this.base} (${describeFetchError(err, timeoutMs)}): is it running, and is --http (or NBDMIRROR_HTTP) its HTTP address?`,
      );
    }
    let text: string;
    try {
      text = await res.text();
    } catch (err) {
      throw new IoError(`${method} ${url}: reading the answer failed (${describeFetchError(err, timeoutMs)})`);
    }
    let parsed: unknown = null;
    if (text !== '') {
      try {
        parsed = JSON.parse(text);
      } catch {
        throw new IoError(`${method} ${url}: HTTP ${res.status} with a body that is not JSON: is this an nbdmirror server?`);
      }
    }
    return { status: res.status, body: parsed };
  }
}

function isObject(x: unknown): x is Record<string, any> {
  return typeof x === 'object' && x !== null && !Array.isArray(x);
}

function errorText(body: unknown): string {
  return isObject(body) && typeof body.error === 'string' ? `: ${body.error}` : '';
}

export function findExport(rep: ReplicationView, name: string): ReplicaView | undefined {
  return rep.exports.find((e) => e?.name === name);
}

function noExportMessage(base: string, name: string, rep: ReplicationView): string {
  const names = rep.exports.map((e) => e.name);
  return `the server at ${base} has no export "${name}" (exports: ${names.length > 0 ? names.join(', ') : 'none'})`;
}

// ---------------------------------------------------------------------------------------------------------
// Numbers

/** 1.25 → "1.3s", 42 → "42s", 125 → "2m 05s", 3725 → "1h 02m", 93600 → "1d 02h". */
export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return '?';
  if (seconds < 10 && !Number.isInteger(seconds)) return `${Math.round(seconds * 10) / 10}s`;
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  const pad = (n: number): string => String(n).padStart(2, '0');
  if (s < 3600) return `${Math.floor(s / 60)}m ${pad(s % 60)}s`;
  if (s < 86_400) return `${Math.floor(s / 3600)}h ${pad(Math.floor((s % 3600) / 60))}m`;
  return `${Math.floor(s / 86_400)}d ${pad(Math.floor((s % 86_400) / 3600))}h`;
}

/** Bytes per second, e.g. "85.3 MiB/s". */
export function formatRate(bytesPerSecond: number): string {
  if (!Number.isFinite(bytesPerSecond) || bytesPerSecond <= 0) return '0 bytes/s';
  return `${humanSize(Math.round(bytesPerSecond))}/s`;
}

export interface ResyncProgressView {
  /** 0..100, one decimal. */
  percent: number;
  doneBlocks: number;
  totalBlocks: number;
  remainingBytes: number;
  totalBytes: number;
  rate: number;
  etaSeconds: number | null;
}

/** The progress of a running resync (primary side), or null when none runs. */
export function resyncProgress(r: ReplicaView): ResyncProgressView | null {
  const rs = r.link?.resync;
  if (rs === null || rs === undefined) return null;
  const done = num(rs.doneBlocks);
  const remaining = typeof rs.remainingBlocks === 'number' ? rs.remainingBlocks : Math.max(0, num(rs.totalBlocks) - done);
  // Blocks written during the resync are marked again, so the total is whatever is larger.
  const total = Math.max(num(rs.totalBlocks), done + remaining);
  const percent = total === 0 ? 100 : Math.min(100, Math.floor((done / total) * 1000) / 10);
  const rate = num(rs.rate);
  const eta = rate <= 0 ? null : typeof rs.etaSeconds === 'number' ? rs.etaSeconds : Math.ceil((remaining * REPLICATION_BLOCK) / rate);
  return {
    percent,
    doneBlocks: done,
    totalBlocks: total,
    remainingBytes: remaining * REPLICATION_BLOCK,
    totalBytes: total * REPLICATION_BLOCK,
    rate,
    etaSeconds: eta,
  };
}

function num(x: unknown): number {
  return typeof x === 'number' && Number.isFinite(x) ? x : 0;
}

/** "42.0% (12.5 MiB of 30 MiB left), 85.3 MiB/s, ETA 2m 05s" */
export function formatProgress(p: ResyncProgressView): string {
  const done = `${p.percent.toFixed(1)}% (${humanSize(p.remainingBytes)} of ${humanSize(p.totalBytes)} left)`;
  if (p.rate <= 0) return `${done}, rate not known yet`;
  return `${done}, ${formatRate(p.rate)}, ETA ${p.etaSeconds === null ? '?' : formatDuration(p.etaSeconds)}`;
}

/**
 * Resync speed measured by the CLI from successive samples of the done blocks (the server's own figure can
 * be 0, e.g. while it only sends zeroes, or before its first window ends). Pure: the caller gives the time.
 */
export class RateMeter {
  private samples: Array<{ t: number; bytes: number }> = [];

  constructor(private readonly windowMs = 5000) {}

  /** Add a sample (t in ms, cumulative bytes); returns bytes per second over the window, 0 while unknown. */
  add(t: number, bytes: number): number {
    const last = this.samples[this.samples.length - 1];
    // A smaller total is a new resync: start over.
    if (last !== undefined && (bytes < last.bytes || t < last.t)) this.samples = [];
    this.samples.push({ t, bytes });
    while (this.samples.length > 2 && t - this.samples[1]!.t >= this.windowMs) this.samples.shift();
    const first = this.samples[0]!;
    const dt = t - first.t;
    return dt > 0 ? ((bytes - first.bytes) * 1000) / dt : 0;
  }

  reset(): void {
    this.samples = [];
  }
}

/**
 * The status with a measured rate (and the ETA it gives) filled in where the server reports none. Samples
 * the meter when a resync runs and resets it when none does.
 */
export function withMeasuredRate(r: ReplicaView, meter: RateMeter, now: number): ReplicaView {
  const rs = r.link?.resync;
  if (rs === null || rs === undefined) {
    meter.reset();
    return r;
  }
  const measured = meter.add(now, num(rs.doneBlocks) * REPLICATION_BLOCK);
  if (num(rs.rate) > 0 || measured <= 0) return r;
  const remaining = typeof rs.remainingBlocks === 'number' ? rs.remainingBlocks : Math.max(0, num(rs.totalBlocks) - num(rs.doneBlocks));
  const resync: ResyncView = { ...rs, rate: measured, etaSeconds: Math.ceil((remaining * REPLICATION_BLOCK) / measured) };
  return { ...r, link: { ...r.link!, resync } };
}

// ---------------------------------------------------------------------------------------------------------
// Text

/** What a refusal reason (409 `reason` of the peer's link endpoint) means, for people. */
const REFUSAL_TEXT: Record<string, string> = {
  'split-brain': 'split brain: both nodes wrote while apart',
  'peer-primary': 'the peer is primary too',
  'peer-newer': 'the peer holds data this node lacks',
  'stale-epoch': 'the peer has seen a newer epoch (a newer primary)',
  'size-mismatch': 'the export has a different size on the peer',
  unrelated: 'the copies share no history',
};

export function explainReason(reason: string | null | undefined): string {
  if (reason === null || reason === undefined || reason === '') return '';
  return REFUSAL_TEXT[reason] ?? reason;
}

/** The command that resolves a split brain, run on the node whose changes are to be dropped. */
export function discardCommand(name: string): string {
  return `nbdmirror resync ${name} --discard-my-data`;
}

/** True when the export is in a split brain as this node sees it (recorded, or the link refused for it). */
export function inSplitBrain(r: ReplicaView): boolean {
  return r.splitBrain !== null && r.splitBrain !== undefined ? true : r.link?.state === 'refused' && r.link.reason === 'split-brain';
}

/** The loud lines shown for a split brain (none when there is none). The first starts "SPLIT BRAIN:". */
export function splitBrainLines(r: ReplicaView): string[] {
  if (!inSplitBrain(r)) return [];
  const sb = r.splitBrain;
  const where = sb !== null && sb !== undefined ? ` (detected ${sb.detectedAt}, peer node ${sb.peerNode})` : '';
  return [
    `SPLIT BRAIN: export ${r.name}: both nodes wrote to it while apart${where}. Replication is stopped; nothing has been discarded.`,
    `  Decide which node's changes are to be thrown away, and run on THAT node:  ${discardCommand(r.name)}`,
    `  Its copy is then resynced from the other node (which stays or becomes primary).`,
  ];
}

function ago(sinceMs: number | undefined, now: number): string {
  if (typeof sinceMs !== 'number' || !Number.isFinite(sinceMs) || sinceMs <= 0) return '';
  return ` (for ${formatDuration(Math.max(0, (now - sinceMs) / 1000))})`;
}

/** The link line: what the replication link of a primary is doing. */
export function formatLink(r: ReplicaView, now = Date.now()): string {
  const l = r.link;
  if (l === null || l === undefined) {
    return r.role === 'primary' ? 'none (this node runs without --peer: writes are not mirrored)' : 'none (this node is secondary: the primary connects to it)';
  }
  const reason = explainReason(l.reason);
  switch (l.state) {
    case 'connected':
      return `connected to ${l.peer}${ago(l.since, now)}`;
    case 'syncing':
      return `syncing to ${l.peer}${l.verdict !== null && l.verdict !== undefined ? ` (${l.verdict} resync)` : ''}`;
    case 'connecting':
      return `connecting to ${l.peer}${reason !== '' ? `, last error: ${reason}` : ''}${r.role === 'primary' ? ' (degraded: writes are not mirrored)' : ''}`;
    case 'refused':
      return `REFUSED by ${l.peer}${reason !== '' ? `: ${reason}` : ''}${ago(l.since, now)}`;
    default:
      return `${l.state}${reason !== '' ? ` (${reason})` : ''}`;
  }
}

function formatOutOfSync(r: ReplicaView): string {
  const blocks = num(r.outOfSync?.blocks);
  if (blocks === 0) return '0 bytes';
  return `${humanSize(num(r.outOfSync?.bytes))} (${blocks} block${blocks === 1 ? '' : 's'})`;
}

const LABEL = 15;
const row = (label: string, value: string): string => `  ${`${label}:`.padEnd(LABEL)}${value}`;

/** The full text for one export, as `nbdmirror status` prints it. */
export function formatExport(r: ReplicaView, now = Date.now()): string {
  const lines = [`export ${r.name}`];
  lines.push(row('role', `${r.role} (epoch ${r.epoch})`));
  lines.push(row('disk', r.disk));
  // A secondary's own link is idle (the primary connects to it): shown only when it does something.
  const l = r.link;
  if (r.role === 'primary' || (l !== null && l !== undefined && l.state !== 'idle' && l.state !== 'stopped')) lines.push(row('link', formatLink(r, now)));
  const p = resyncProgress(r);
  if (p !== null) lines.push(row('resync', formatProgress(p)));
  lines.push(row('out of sync', formatOutOfSync(r)));
  if (r.role === 'secondary') {
    const s = r.session;
    const attached = typeof s?.since === 'number' && s.since > 0 ? `, attached for ${formatDuration(Math.max(0, (now - s.since) / 1000))}` : '';
    lines.push(row('primary', s === null || s === undefined ? 'none attached' : `${s.nodeId} (epoch ${s.epoch}${attached})`));
  }
  if (r.peerNode !== null && r.peerNode !== undefined) lines.push(row('peer node', r.peerNode));
  const last = r.link?.lastResync;
  if (last !== null && last !== undefined) {
    lines.push(row('last resync', `${humanSize(num(last.bytesSent) + num(last.bytesZeroed))} (${num(last.blocks)} blocks) in ${formatDuration(num(last.ms) / 1000)}`));
  }
  const sb = splitBrainLines(r);
  if (sb.length > 0) lines.push(...sb);
  return lines.join('\n');
}

/** The whole `nbdmirror status` text. */
export function formatStatus(rep: ReplicationView, now = Date.now()): string {
  const head = [`node:    ${rep.nodeId}`, `peer:    ${rep.peer ?? 'none (standalone)'}`];
  const blocks = rep.exports.map((r) => formatExport(r, now));
  return [head.join('\n'), ...(blocks.length > 0 ? blocks : ['no exports'])].join('\n\n');
}

/**
 * One line per export for `status --watch` off a TTY and for change logs: only what matters, nothing that
 * moves by itself (no "for 5s"), so that comparing two lines tells whether something changed. With
 * progress: false a running resync is just "resyncing" (a progress bar shows the numbers).
 */
export function summaryLine(r: ReplicaView, opts: { progress?: boolean } = {}): string {
  const parts = [`${r.name}: ${r.role} ${r.disk} epoch ${r.epoch}`];
  const l = r.link;
  if (l !== null && l !== undefined && (r.role === 'primary' || (l.state !== 'idle' && l.state !== 'stopped'))) {
    const reason = l.state === 'refused' || l.state === 'connecting' ? explainReason(l.reason) : '';
    parts.push(`link ${l.state}${reason !== '' ? ` (${reason})` : ''}`);
  }
  if (r.role === 'secondary') {
    parts.push(r.session !== null && r.session !== undefined ? `primary ${r.session.nodeId} attached` : 'no primary attached');
  }
  // While a resync runs its progress says how much is left; the bitmap count would only repeat it.
  const p = resyncProgress(r);
  if (p === null) parts.push(`out of sync ${humanSize(num(r.outOfSync?.bytes))}`);
  else parts.push(opts.progress === false ? 'resyncing' : `resync ${formatProgress(p)}`);
  let line = parts.join(', ');
  if (inSplitBrain(r)) line = `${line} -- SPLIT BRAIN: run \`${discardCommand(r.name)}\` on the node whose changes are to be dropped`;
  return line;
}

/** "12:34:56" (local time) for change logs. */
export function clock(d: Date): string {
  const pad = (n: number): string => String(n).padStart(2, '0');
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

// ---------------------------------------------------------------------------------------------------------
// Resync: is it done?

/** What `resync` saw when it started, so that an old refusal is told apart from a new one. */
export interface SyncBaseline {
  /** link.since of a link already refused at the start (a refusal with a later since is a new one). */
  refusedSince: number | null;
  /** splitBrain.detectedAt already recorded at the start. */
  splitBrainAt: string | null;
}

export function syncBaseline(r: ReplicaView): SyncBaseline {
  return {
    refusedSince: r.link?.state === 'refused' ? r.link.since : null,
    splitBrainAt: r.splitBrain?.detectedAt ?? null,
  };
}

export type SyncPhase =
  | { kind: 'in-sync'; message: string }
  | { kind: 'failed'; message: string }
  | { kind: 'waiting'; message: string; progress: ResyncProgressView | null };

/**
 * Where a resync stands on this node. In sync: on a primary, the link is connected and nothing is out of
 * sync; on a secondary, the copy is UpToDate and a primary is attached. Failed: the link was refused (or a
 * split brain noted) after the command started — a refusal it found already there may be about to be
 * retried (the peer may just have discarded its data), so that one is waited out once.
 */
export function syncPhase(r: ReplicaView, base: SyncBaseline): SyncPhase {
  const name = r.name;
  const oos = num(r.outOfSync?.blocks);
  if (r.role === 'primary') {
    const l = r.link;
    if (l === null || l === undefined) {
      return { kind: 'failed', message: `export ${name} is primary on a node without --peer: there is no peer to resync with` };
    }
    if (l.state === 'connected' && oos === 0) return { kind: 'in-sync', message: `${name}: in sync with ${l.peer}` };
    if (l.state === 'refused' && l.since !== base.refusedSince) {
      const hint = l.reason === 'split-brain' ? `; resolve it with \`${discardCommand(name)}\` on the node whose changes are to be dropped` : '';
      return { kind: 'failed', message: `${name}: the peer ${l.peer} refused the replication link: ${explainReason(l.reason) || 'refused'}${hint}` };
    }
    const p = resyncProgress(r);
    if (p !== null) return { kind: 'waiting', message: `${name}: resync ${formatProgress(p)}`, progress: p };
    const reason = explainReason(l.reason);
    switch (l.state) {
      case 'refused':
        return { kind: 'waiting', message: `${name}: the link was refused (${reason || 'refused'}); waiting for the next attempt`, progress: null };
      case 'connected':
        return { kind: 'waiting', message: `${name}: connected, ${humanSize(num(r.outOfSync?.bytes))} out of sync`, progress: null };
      case 'syncing':
        return { kind: 'waiting', message: `${name}: resync starting (${humanSize(num(r.outOfSync?.bytes))} out of sync)`, progress: null };
      default:
        return { kind: 'waiting', message: `${name}: link ${l.state}${reason !== '' ? ` (${reason})` : ''}, ${humanSize(num(r.outOfSync?.bytes))} out of sync`, progress: null };
    }
  }
  const attached = r.session !== null && r.session !== undefined;
  if (r.disk === 'UpToDate' && attached) return { kind: 'in-sync', message: `${name}: up to date, primary ${r.session!.nodeId} attached` };
  if (r.splitBrain !== null && r.splitBrain !== undefined && r.splitBrain.detectedAt !== base.splitBrainAt) {
    return {
      kind: 'failed',
      message: `${name}: split brain with ${r.splitBrain.peerNode}: the link was refused; resolve it with \`${discardCommand(name)}\` on the node whose changes are to be dropped`,
    };
  }
  if (!attached) {
    return { kind: 'waiting', message: `${name}: secondary, ${r.disk}: waiting for the primary to connect (see \`nbdmirror status\` on the primary for its link)`, progress: null };
  }
  return { kind: 'waiting', message: `${name}: secondary, ${r.disk}: primary ${r.session!.nodeId} attached, resync in progress`, progress: null };
}

/** The line printed when a resync command ends well. */
export function formatSynced(r: ReplicaView): string {
  const last = r.link?.lastResync;
  const moved = last !== null && last !== undefined && r.role === 'primary' ? `; last resync ${humanSize(num(last.bytesSent) + num(last.bytesZeroed))} in ${formatDuration(num(last.ms) / 1000)}` : '';
  const with_ = r.role === 'primary' ? `peer ${r.link?.peer ?? '?'}` : `primary ${r.session?.nodeId ?? '?'}`;
  return `${r.name}: in sync (${r.role}, ${r.disk}, epoch ${r.epoch}, ${with_}${moved})`;
}
