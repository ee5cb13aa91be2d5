// The primary's side of the replication link for one export: handshake over the peer's HTTP endpoint (node
// and export identity, epoch, generation ids → a verdict and a session token), then an NBD connection to the
// peer's hidden link export, then a resync of what the peer misses, then mirroring. Any failure tears the
// link down and the loop reconnects with backoff; a refusal (split brain, peer newer, peer primary) is kept
// in the state for status and retried slowly. A watchdog declares the peer gone when a request stays
// unanswered for the peer timeout, so writes go on degraded instead of hanging.

import { NbdClient } from '../client/nbd-client';
import type { Address } from '../config';
import { IoError } from '../errors';
import type { Logger } from '../log';
import { LatencyHistogram } from '../metrics/histogram';
import type { SyncVerdict } from './generations';
import { runResync, type ResyncProgress } from './resync';
import type { LinkRequest, LinkResponse, Replica } from './replica';

export type LinkState = 'idle' | 'connecting' | 'syncing' | 'connected' | 'refused' | 'stopped';

export interface PeerLinkOptions {
  nbd: Address;
  http: string;
  timeoutMs: number;
  resyncRate: number;
  /** Sent as a bearer token on every call to the peer's HTTP endpoint (both nodes share it); null = none. */
  adminToken: string | null;
  /** Called on every read from the link's NBD socket (the node's busy polling, see ConnectOptions.onRead). */
  onRead?: () => void;
}

export interface LinkStatus {
  state: LinkState;
  peer: string;
  /** Why the last attempt failed or was refused. */
  reason: string | null;
  verdict: SyncVerdict | null;
  since: number;
  resync: (ResyncProgress & { remainingBlocks: number; etaSeconds: number | null }) | null;
  connects: number;
  lastResync: { bytesSent: number; bytesZeroed: number; blocks: number; ms: number } | null;
}

/** A running resync logs its progress this often. */
const RESYNC_LOG_EVERY_MS = 5000;
/** Mirrored ranges wait at most about this long (or this many) for a FLUSH of the peer. */
const PEER_FLUSH_EVERY_MS = 1000;
const PEER_FLUSH_MAX_RANGES = 65536;
/** During a resync the peer is flushed after this many bytes, so a cut resync resumes near where it was. */
const RESYNC_FLUSH_BYTES = 2 * 1024 * 1024;
const RESYNC_UNFLUSHED_MAX = 8 * 1024 * 1024;
const BACKOFF_MIN_MS = 100;
const BACKOFF_MAX_MS = 5000;
const REFUSED_RETRY_MS = 5000;

export class PeerLink {
  private stateValue: LinkState = 'idle';
  private client: NbdClient | null = null;
  private reason: string | null = null;
  private verdict: SyncVerdict | null = null;
  private since = Date.now();
  private resync: ResyncProgress | null = null;
  private lastResync: LinkStatus['lastResync'] = null;
  private connects = 0;
  /** For the metrics: how long the peer takes to acknowledge mirrored writes, and bytes every resync sent. */
  readonly peerWrites = new LatencyHistogram();
  resyncSentBytes = 0;
  private resyncCounted = 0;
  private stopped = false;
  private loop: Promise<void> | null = null;
  private wake: (() => void) | null = null;
  /** kick() arrived while no sleep was under way: skip the next one. */
  private kicked = false;
  /** The current session reached the connected (mirroring) state. */
  private reachedConnected = false;
  /** Watchdog: requests in flight on the peer and when one last completed (or the first started). */
  private pending = 0;
  /** The background FLUSH of the peer under way. */
  private flushing: Promise<void> | null = null;
  private flushAgain = false;
  /** The token of the session the peer granted last (ended by stop()). */
  private sessionToken: string | null = null;
  private lastProgress = 0;
  private watchdog: NodeJS.Timeout | null = null;
  private lostCurrent: ((err: Error) => void) | null = null;

  constructor(
    private readonly replica: Replica,
    private readonly opts: PeerLinkOptions,
    private readonly log: Logger,
  ) {}

  get state(): LinkState {
    return this.stateValue;
  }

  /** The peer client when writes are to be mirrored (syncing or connected), else null. */
  active(): NbdClient | null {
    return this.client;
  }

  start(): void {
    if (this.loop !== null) return;
    this.stopped = false;
    this.loop = this.run();
  }

  /** Stop the link: tear the connection down and end the loop. */
  async stop(): Promise<void> {
    this.stopped = true;
    this.wake?.();
    // A clean stop flushes the peer first, so nothing sent needs a resync at the next start.
    const c = this.client;
    if (c !== null && this.replica.unflushedState().ranges > 0) {
      await Promise.race([this.replica.flushPeer(c), new Promise((r) => setTimeout(r, this.opts.timeoutMs).unref())]).catch(() => undefined);
    }
    this.teardown(new IoError('link stopped'));
    // Tell the peer the session is over, so it can be promoted without waiting for it to time out.
    if (c !== null && this.sessionToken !== null) await this.post('unlink', { token: this.sessionToken }).catch(() => undefined);
    await this.loop;
    this.loop = null;
    this.setState('stopped');
  }

  /** Count a peer request for the watchdog; rejections pass through. */
  track<T>(p: Promise<T>): Promise<T> {
    this.trackStart();
    return p.finally(() => this.trackEnd());
  }

  /** track() for a request completed by callbacks: call trackEnd() once when it settles. */
  trackStart(): void {
    if (this.pending++ === 0) this.lastProgress = Date.now();
  }

  trackEnd(): void {
    this.pending--;
    this.lastProgress = Date.now();
  }

  /** A mirrored request failed: the peer can no longer be trusted to follow; drop the link. */
  lost(err: unknown): void {
    if (this.client === null) return;
    const e = err instanceof Error ? err : new Error(String(err));
    this.log.warn({ err: e.message }, 'peer request failed: going on degraded');
    this.teardown(e);
  }

  status(): LinkStatus {
    let resync: LinkStatus['resync'] = null;
    if (this.resync !== null) {
      const remaining = this.replica.oosCount;
      const rate = this.resync.rate;
      resync = { ...this.resync, remainingBlocks: remaining, etaSeconds: rate > 0 ? Math.ceil((remaining * 4096) / rate) : null };
    }
    return {
      state: this.stateValue,
      peer: `nbd://${this.opts.nbd.host}:${this.opts.nbd.port}`,
      reason: this.reason,
      verdict: this.verdict,
      since: this.since,
      resync,
      connects: this.connects,
      lastResync: this.lastResync,
    };
  }

  private setState(s: LinkState, reason: string | null = this.reason): void {
    if (s !== this.stateValue) this.since = Date.now();
    this.stateValue = s;
    this.reason = reason;
  }

  private teardown(err: Error): void {
    const c = this.client;
    this.client = null;
    if (c !== null) {
      this.replica.linkLost();
      void c.close();
    }
    this.lostCurrent?.(err);
  }

  private sleep(ms: number): Promise<void> {
    if (this.kicked) {
      this.kicked = false;
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        this.wake = null;
        resolve();
      }, ms);
      this.wake = () => {
        clearTimeout(t);
        this.wake = null;
        resolve();
      };
    });
  }

  /** On a secondary: tell the peer this node is up (best effort, once), so its link reconnects at once. */
  announce(): void {
    void this.post('peer-up', {}).catch((err: unknown) => this.log.debug({ err: (err as Error).message }, 'peer not reachable to announce this node'));
  }

  /** Reconnect now (after a promotion or an operator's resync request) instead of at the next backoff. */
  kick(): void {
    if (this.wake !== null) this.wake();
    else this.kicked = true;
  }

  private async run(): Promise<void> {
    let backoff = BACKOFF_MIN_MS;
    while (!this.stopped) {
      let refused = false;
      this.reachedConnected = false;
      try {
        refused = await this.once();
        backoff = BACKOFF_MIN_MS;
      } catch (err) {
        // A session that got as far as mirroring starts the backoff over: only failed attempts grow it.
        if (this.reachedConnected) backoff = BACKOFF_MIN_MS;
        const msg = (err as Error).message;
        if (this.stateValue !== 'connecting' || this.reason !== msg) this.log.info({ reason: msg }, 'link down; will retry');
        this.setState(this.stopped ? 'stopped' : 'connecting', msg);
      }
      if (this.stopped) break;
      await this.sleep(refused ? REFUSED_RETRY_MS : backoff);
      backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
    }
  }

  /** One link session. Resolves true when refused by the peer, false when it ended otherwise. */
  private async once(): Promise<boolean> {
    this.setState('connecting', this.reason);
    const req: LinkRequest = this.replica.linkRequest();
    const res = await this.post<LinkResponse>('link', req);
    if (!res.ok) {
      const body = res.body as { reason?: string; error?: string; epoch?: number };
      // 401: the nodes were given different --admin-token values.
      const reason = body.reason ?? (res.status === 401 ? 'unauthorized' : 'refused');
      if (this.stateValue !== 'refused' || this.reason !== reason) {
        this.log.error({ reason, detail: body.error }, 'the peer refused the replication link');
      }
      this.setState('refused', reason);
      await this.replica.linkRefused(reason, body);
      return true;
    }
    const granted = res.body as LinkResponse;
    this.verdict = granted.verdict;
    this.sessionToken = granted.token;
    const client = await NbdClient.connect(this.opts.nbd, {
      exportName: granted.exportName,
      connectTimeoutMs: this.opts.timeoutMs,
      metaContexts: [],
      maxInFlight: 256,
      onRead: this.opts.onRead,
    });
    if (this.stopped) {
      await client.close();
      return false;
    }
    this.connects++;
    const lost = new Promise<Error>((resolve) => {
      this.lostCurrent = resolve;
      void client.closed.then((e) => resolve(e ?? new IoError('peer closed the link')));
    });
    this.client = client;
    this.startWatchdog();
    try {
      // From here client writes are mirrored; the blocks marked before are resynced.
      this.replica.linkUp(granted);
      const hasWork = this.replica.oosCount > 0;
      if (hasWork) {
        this.setState('syncing', null);
        this.log.info({ verdict: granted.verdict, blocks: this.replica.oosCount }, 'resync started');
        const started = Date.now();
        this.resyncCounted = 0;
        let lastLog = started;
        const done = await Promise.race([
          runResync({
            local: this.replica.lower,
            oos: this.replica.oos,
            lock: this.replica.lock,
            peer: client,
            rateLimit: this.opts.resyncRate,
            cancelled: () => this.client !== client,
            track: (p) => this.track(p),
            onSent: (off, len) => {
              this.replica.noteUnflushed(off, len, client);
              // Resync progress counts once durable on the peer: flush it every few MiB.
              if (this.replica.unflushedState().bytes >= RESYNC_FLUSH_BYTES) void this.backgroundFlush(client);
            },
            // At most RESYNC_UNFLUSHED_MAX may wait for a FLUSH: a cut resync sends at most that again.
            throttle: () => (this.replica.unflushedState().bytes >= RESYNC_UNFLUSHED_MAX ? this.backgroundFlush(client) : null),
            onProgress: (p) => {
              this.resync = p;
              const bytes = p.bytesSent + p.bytesZeroed;
              this.resyncSentBytes += bytes - this.resyncCounted;
              this.resyncCounted = bytes;
              const now = Date.now();
              if (now - lastLog >= RESYNC_LOG_EVERY_MS) {
                lastLog = now;
                const remaining = this.replica.oosCount;
                this.log.info(
                  { doneBlocks: p.doneBlocks, remainingBlocks: remaining, bytes, rate: Math.round(p.rate), etaSeconds: p.rate > 0 ? Math.ceil((remaining * 4096) / p.rate) : null },
                  'resync progress',
                );
              }
            },
          }),
          lost.then((e) => Promise.reject(e)),
        ]);
        this.resync = null;
        this.lastResync = { bytesSent: done.bytesSent, bytesZeroed: done.bytesZeroed, blocks: done.doneBlocks, ms: Date.now() - started };
        this.log.info(this.lastResync, 'resync finished');
      }
      const synced = await this.post('synced', { token: granted.token, current: this.replica.generations.current });
      if (!synced.ok) throw new IoError(`peer refused the end of resync: ${JSON.stringify(synced.body)}`);
      await this.replica.resyncDone();
      this.setState('connected', null);
      this.reachedConnected = true;
      this.log.info('peer connected and up to date');
      const err = await lost;
      if (!this.stopped) this.log.warn({ err: err.message }, 'link lost');
      throw err;
    } finally {
      this.resync = null;
      this.stopWatchdog();
      this.lostCurrent = null;
      if (this.client === client) this.client = null;
      this.replica.linkLost(); // (empty already when teardown() ended the session)
      await client.close().catch(() => undefined);
      await this.replica.linkDown();
    }
  }

  private startWatchdog(): void {
    this.pending = 0;
    this.lastProgress = Date.now();
    const every = Math.max(25, Math.floor(this.opts.timeoutMs / 4));
    this.watchdog = setInterval(() => {
      // An idle link still proves both ends alive: a small read now and then (the peer's watchdog of us,
      // and ours of it, since a request in flight is what the timeout measures).
      const c = this.client;
      if (c !== null && this.pending === 0 && Date.now() - this.lastProgress > every) {
        void this.track(c.pread(0, 512)).catch((err: unknown) => this.lost(err));
      }
      // Writes the peer holds only in its region become durable there at least every second, which also
      // bounds what a lost link has to mark out of sync.
      const u = this.replica.unflushedState();
      if (c !== null && u.ranges > 0 && (u.ageMs >= PEER_FLUSH_EVERY_MS || u.ranges >= PEER_FLUSH_MAX_RANGES)) void this.backgroundFlush(c);
      if (this.pending > 0 && Date.now() - this.lastProgress > this.opts.timeoutMs) {
        this.log.warn({ timeoutMs: this.opts.timeoutMs, pending: this.pending }, 'peer timed out: marking it out of date');
        this.teardown(new IoError(`peer did not answer within ${this.opts.timeoutMs} ms`));
        void this.post('outdate', this.replica.linkRequest()).catch(() => undefined);
      }
    }, every);
    this.watchdog.unref();
  }

  /** FLUSH the peer without waiting for it (one at a time); a failure drops the link. */
  private backgroundFlush(c: NbdClient): Promise<void> {
    if (this.flushing !== null) {
      // One at a time; asked again meanwhile: another right after, for what this one will not cover.
      this.flushAgain = true;
      return this.flushing;
    }
    const p = this.replica
      .flushPeer(c)
      .catch((err: unknown) => this.lost(err))
      .finally(() => {
        this.flushing = null;
        if (this.flushAgain && this.client === c) {
          this.flushAgain = false;
          void this.backgroundFlush(c);
        }
      });
    this.flushing = p;
    return p;
  }

  private stopWatchdog(): void {
    if (this.watchdog !== null) clearInterval(this.watchdog);
    this.watchdog = null;
  }

  private async post<T>(what: string, body: unknown): Promise<{ ok: boolean; status: number; body: T | Record<string, unknown> }> {
    const url = `${this.opts.http}/v1/exports/${encodeURIComponent(this.replica.name)}/${what}`;
    let res: Response;
    try {
      res = await fetch(url, {
        method: 'POST',
        headers: this.opts.adminToken === null ? { 'content-type': 'application/json' } : { 'content-type': 'application/json', authorization: `Bearer ${this.opts.adminToken}` },
        body: JSON.stringify(body),
        signal: AbortSignal.timeout(Math.max(this.opts.timeoutMs, 1000)),
      });
    } catch (err) {
      throw new IoError(`peer HTTP ${url}: ${(err as Error).message}`);
    }
    let parsed: T | Record<string, unknown>;
    try {
      parsed = (await res.json()) as T;
    } catch {
      throw new IoError(`peer HTTP ${url}: status ${res.status} without a JSON body`);
    }
    if (res.status >= 500) throw new IoError(`peer HTTP ${url}: status ${res.status}`);
    return { ok: res.ok, status: res.status, body: parsed };
  }
}
