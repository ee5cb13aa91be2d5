// One export's replication state and its two faces. To NBD clients it is a BlockDevice that is writable only
// while this node is primary; writes then go to the local stack and to the peer concurrently and complete
// when both have them (DRBD protocol C). Without the peer they go on degraded: each block is marked in the
// out-of-sync bitmap before the local write, inside an activity-log extent made durable first. To the peer it
// answers the link handshake (epoch fencing, generation ids → verdict) and serves the hidden link export
// through which the primary's writes and resync arrive. Promotion, demotion and split-brain resolution
// change its role and generation ids, always persisted before anything depends on them.

import { randomBytes } from 'node:crypto';
import { ConflictError, ReadOnlyError, ShutdownError, UsageError } from '../errors';
import type { Logger } from '../log';
import { preadThen, type BlockDevice, type Capabilities, type Extent, type WriteFlags, type ZeroFlags } from '../storage/block-device';
import { ActivityLog, AL_EXTENT_SIZE } from './activity-log';
import { type DiskState, MetaStore, type Role } from './export-meta';
import {
  compareGenerations,
  discardLocalChanges,
  GEN_CREATED,
  type Generations,
  HISTORY_LENGTH,
  newGenId,
  sourceSynced,
  startDiverging,
  type SyncVerdict,
  targetSynced,
} from './generations';
import { OosMap } from './oos-map';
import { type LinkStatus, PeerLink, type PeerLinkOptions } from './peer-link';
import { RangeLock } from './range-lock';

/** A copy of a mirrored write that did not fail (see Replica.bothAnswered). */
const NO_ERROR: unique symbol = Symbol('no error');

/** Hidden export names the primary opens on its secondary: LINK_PREFIX + NAME + '/' + token. */
export const LINK_PREFIX = '.nbdmirror-link/';

/** The primary's half of the link handshake (POST /v1/exports/NAME/link). */
export interface LinkRequest {
  node: string;
  nodeId: string;
  exportUuid: string;
  size: number;
  epoch: number;
  gen: Generations;
  oosBlocks: number;
}

/** The secondary's answer when it accepts the link. */
export interface LinkResponse {
  token: string;
  exportName: string;
  verdict: SyncVerdict;
  /** Blocks the secondary itself has marked (its crash extents, discarded changes): resynced too. */
  ranges: Array<[number, number]>;
  node: string;
  nodeId: string;
  epoch: number;
}

interface Session {
  token: string;
  epoch: number;
  node: string;
  nodeId: string;
  since: number;
  /** Last request over the link (the primary sends keepalives), for "is a primary still attached?". */
  lastSeen: number;
  active: boolean;
}

export interface SplitBrain {
  detectedAt: string;
  local: Generations;
  peer: Generations;
  peerNode: string;
}

export interface ReplicaOptions {
  name: string;
  size: number;
  dataDir: string;
  /** The local stack (pmem layer over the backing file). */
  lower: BlockDevice;
  nodeUuid: string;
  nodeId: string;
  /** --role: the role at start, or null for the stored one. */
  role: Role | null;
  peer: PeerLinkOptions | null;
  log: Logger;
}

export interface ReplicaStatus {
  name: string;
  uuid: string;
  role: Role;
  epoch: number;
  disk: DiskState;
  gen: Generations;
  peerNode: string | null;
  outOfSync: { blocks: number; bytes: number };
  activityLog: { hotExtents: number; transactions: number };
  splitBrain: SplitBrain | null;
  link: LinkStatus | null;
  session: { node: string; nodeId: string; epoch: number; since: number } | null;
}

const FULL_CAPS_READONLY = (c: Capabilities): Capabilities => ({ ...c, readOnly: true });

export class Replica {
  readonly name: string;
  readonly lower: BlockDevice;
  readonly lock = new RangeLock();
  readonly link: PeerLink | null;
  /** The device NBD clients get. */
  readonly clientDevice: BlockDevice;
  private session: Session | null = null;
  private splitBrain: SplitBrain | null = null;
  private diverging: Promise<unknown> | null = null;
  /** Solo node (no peer configured): the generation id was made unique for this run's writes. */
  private soloMarked = false;
  private soloMarking: Promise<unknown> | null = null;
  private inFlight = 0;
  private idleWaiters: Array<() => void> = [];
  private closed = false;

  private constructor(
    private readonly o: ReplicaOptions,
    private readonly meta: MetaStore,
    readonly oos: OosMap,
    readonly al: ActivityLog,
  ) {
    this.name = o.name;
    this.lower = o.lower;
    this.link = o.peer === null ? null : new PeerLink(this, o.peer, o.log.child({ component: 'link' }));
    this.clientDevice = new ReplicaDevice(this);
  }

  static async open(o: ReplicaOptions): Promise<Replica> {
    const initialRole: Role = o.peer === null ? 'primary' : 'secondary';
    const { store } = await MetaStore.open(o.dataDir, o.name, o.size, initialRole);
    const { map: oos } = await OosMap.open({ dir: o.dataDir, name: o.name, size: o.size });
    // An extent leaves the activity log only once its out-of-sync bits are on disk.
    const { log: al, recovered } = await ActivityLog.open({ dir: o.dataDir, name: o.name, size: o.size, beforeEvict: () => oos.persist() });
    if (recovered.length > 0) {
      // Writes were in flight in these extents when this node stopped: the copies may differ there.
      for (const e of recovered) oos.mark(e * AL_EXTENT_SIZE, Math.min(AL_EXTENT_SIZE, o.size - e * AL_EXTENT_SIZE));
      await oos.persist();
      await al.cool();
      o.log.warn({ extents: recovered.length }, 'activity log: writes were in flight at the last stop; those extents will be resynced');
    }
    if (o.role !== null && o.role !== store.meta.role) {
      const role = o.role;
      // Taking the primary role from the command line is a promotion: it raises the epoch.
      await store.update((m) => {
        if (role === 'primary') m.epoch += 1;
        m.role = role;
      });
    }
    return new Replica(o, store, oos, al);
  }

  get role(): Role {
    return this.meta.meta.role;
  }

  get generations(): Generations {
    return this.meta.meta.gen;
  }

  get oosCount(): number {
    return this.oos.count;
  }

  get log(): Logger {
    return this.o.log;
  }

  /**
   * Start the link loop when this node is primary and has a peer. A secondary tells its primary it is up,
   * so the primary reconnects now instead of at the end of its backoff.
   */
  start(): void {
    if (this.role === 'primary') this.link?.start();
    else this.link?.announce();
  }

  /** The peer (a secondary that just started) is up: reconnect now if the link is waiting. */
  peerUp(): void {
    if (this.role === 'primary' && !this.closed) this.link?.kick();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.link?.stop();
    this.endSession();
    await this.oos.close();
    await this.al.close();
  }

  // ---------------------------------------------------------------------------------------------------------
  // Client writes

  /** Writes may start only on a primary; counts them for demote(). */
  enter(): void {
    if (this.role !== 'primary') throw new ReadOnlyError(`export ${this.name} is secondary on this node (read-only); write to the primary`);
    if (this.closed) throw new ShutdownError('export is closing');
    this.inFlight++;
  }

  leave(): void {
    if (--this.inFlight === 0) for (const w of this.idleWaiters.splice(0)) w();
  }

  get solo(): boolean {
    return this.link === null;
  }

  /**
   * Solo node: the first write of this run gives the data a new generation id (the old one goes to the
   * history), so a peer added later is never taken for an up-to-date copy. Null when already done.
   */
  soloMark(): Promise<unknown> | null {
    if (this.soloMarked) return null;
    this.soloMarking ??= this.meta
      .update((m) => {
        m.gen = { current: newGenId(), bitmap: '', history: [m.gen.current, ...m.gen.history].filter((h) => h !== GEN_CREATED).slice(0, HISTORY_LENGTH) };
      })
      .then(
        () => {
          this.soloMarked = true;
        },
        (err: unknown) => {
          this.soloMarking = null;
          throw err;
        },
      );
    return this.soloMarking;
  }

  /** The peer will miss a write: start a new generation (once per divergence), persisted first. */
  private diverge(): Promise<unknown> | null {
    if (this.meta.meta.gen.bitmap !== '') return null;
    this.diverging ??= this.meta
      .update((m) => {
        m.gen = startDiverging(m.gen) ?? m.gen;
      })
      .finally(() => {
        this.diverging = null;
      });
    return this.diverging;
  }

  /**
   * A mirrored mutation: ordered against overlapping ones by the range lock, covered by the activity log,
   * sent to both copies when the link is up, else marked out of sync before the local write.
   */
  async mutate(offset: number, length: number, local: () => Promise<void>, remote: (peer: NonNullable<ReturnType<PeerLink['active']>>) => Promise<unknown>): Promise<void> {
    const waited = this.lock.acquire(offset, length);
    if (waited) await waited;
    try {
      const begun = this.al.begin(offset, length);
      if (begun) await begun;
      try {
        const peer = this.link!.active();
        if (peer === null) {
          const d = this.diverge();
          if (d) await d;
          this.oos.mark(offset, length);
          await local();
          return;
        }
        const t0 = performance.now();
        const link = this.link!;
        const mirrored = link.track(remote(peer)).then(() => {
          link.peerWrites.observe((performance.now() - t0) / 1000);
          this.noteUnflushed(offset, length, peer);
        });
        const [l, r] = await Promise.allSettled([local(), mirrored]);
        if (l.status === 'rejected' || r.status === 'rejected') {
          await this.bothAnswered(offset, length, l.status === 'rejected' ? l.reason : NO_ERROR, r.status === 'rejected' ? r.reason : NO_ERROR);
        }
      } finally {
        this.al.end(offset, length);
      }
    } finally {
      this.lock.release(offset, length);
    }
  }

  /**
   * mutate() for a WRITE in the common case, without its chain of promises: this node is primary, the link is
   * up, every extent of the range is hot and no other write holds the range. Null when any of that does not
   * hold (the caller goes through mutate()). The rules are mutate()'s: the write goes to the peer first, the
   * range stays locked and its extents active until both copies answered.
   */
  mirrorWrite(buf: Buffer, offset: number, flags: WriteFlags | undefined): Promise<void> | null {
    const length = buf.length;
    const link = this.link;
    const peer = link === null ? null : link.active();
    if (peer === null || this.role !== 'primary' || this.closed || length === 0) return null;
    if (!this.al.allHot(offset, length) || !this.lock.tryAcquire(offset, length)) return null;
    this.inFlight++;
    this.al.begin(offset, length); // null: every extent is hot
    return new Promise<void>((resolve, reject) => new MirroredWrite(this, link!, peer, buf, offset, flags, resolve, reject).start());
  }

  /** Both copies answered a mirrorWrite(). */
  settleMirrored(w: MirroredWrite): void {
    if (w.localError === NO_ERROR && w.remoteError === NO_ERROR) {
      this.endMirrored(w);
      w.resolve();
      return;
    }
    this.bothAnswered(w.offset, w.buf.length, w.localError, w.remoteError)
      .finally(() => this.endMirrored(w))
      .then(w.resolve, w.reject);
  }

  /**
   * A mirrored mutation's two copies answered and one failed (NO_ERROR: that copy succeeded). A failed peer
   * leaves the range out of sync, in a new generation, and drops the link; a failed local copy too (the peer
   * may hold what this copy failed to take: resync makes them equal again), and rejects with its error.
   */
  private async bothAnswered(offset: number, length: number, localError: unknown, remoteError: unknown): Promise<void> {
    if (remoteError !== NO_ERROR) {
      const d = this.diverge();
      if (d) await d;
      this.oos.mark(offset, length);
      this.link!.lost(remoteError);
    }
    if (localError !== NO_ERROR) {
      this.oos.mark(offset, length);
      throw localError;
    }
  }

  private endMirrored(w: MirroredWrite): void {
    this.al.end(w.offset, w.buf.length);
    this.lock.release(w.offset, w.buf.length);
    this.leave();
  }

  async flushBoth(): Promise<void> {
    const peer = this.link?.active() ?? null;
    if (peer === null) return this.lower.flush();
    const [l, r] = await Promise.allSettled([this.lower.flush(), this.flushPeer(peer)]);
    if (r.status === 'rejected') this.link!.lost(r.reason);
    if (l.status === 'rejected') throw l.reason;
  }

  // The peer acknowledges a write once its region holds it; only its FLUSH makes it durable there (with
  // --durability disk the region is volatile). Like DRBD's transfer log, every range the peer acknowledged
  // since its last completed FLUSH is remembered, and marked out of sync if the link is lost before that
  // FLUSH: a peer that lost power lost those writes, and the resync must send them again. Ranges are noted
  // when acknowledged, because a FLUSH covers only writes completed before it was sent (NBD spec). Flat
  // [offset, length] pairs; `unflushedBase` counts the pairs dropped so far, so a FLUSH's ticket stays valid
  // while more are added.
  private unflushed: number[] = [];
  private unflushedBase = 0;
  private unflushedBytes = 0;
  private unflushedSince = 0;

  /** The peer (over the link connection `via`) acknowledged a range. */
  noteUnflushed(offset: number, length: number, via: NonNullable<ReturnType<PeerLink['active']>>): void {
    if (via !== this.link?.active()) {
      // That session is already gone (its range list was marked): mark this range too.
      const d = this.diverge();
      if (d) d.catch((err: unknown) => this.log.error({ err }, 'starting a new generation failed'));
      this.oos.mark(offset, length);
      return;
    }
    if (this.unflushed.length === 0) this.unflushedSince = Date.now();
    this.unflushed.push(offset, length);
    this.unflushedBytes += length;
  }

  /** What the peer acknowledged but has not flushed: ranges, bytes, and how long (ms) the oldest waited. */
  unflushedState(now = Date.now()): { ranges: number; bytes: number; ageMs: number } {
    const ranges = this.unflushed.length / 2;
    return { ranges, bytes: this.unflushedBytes, ageMs: ranges === 0 ? 0 : now - this.unflushedSince };
  }

  /** FLUSH the peer; on success everything it acknowledged before the FLUSH was sent is durable there. */
  async flushPeer(peer: NonNullable<ReturnType<PeerLink['active']>>): Promise<void> {
    const ticket = this.unflushedBase + this.unflushed.length / 2;
    await this.link!.track(peer.flush());
    const n = ticket - this.unflushedBase;
    if (n > 0) {
      for (let i = 1; i < 2 * n; i += 2) this.unflushedBytes -= this.unflushed[i]!;
      this.unflushed.splice(0, 2 * n);
      this.unflushedBase = ticket;
      if (this.unflushed.length > 0) this.unflushedSince = Date.now();
    }
  }

  /** The link is gone: what the peer may not have made durable is out of sync (called before any reconnect). */
  linkLost(): void {
    const u = this.unflushed;
    if (u.length === 0) return;
    const d = this.diverge();
    if (d) d.catch((err: unknown) => this.log.error({ err }, 'starting a new generation failed'));
    let bytes = 0;
    for (let i = 0; i < u.length; i += 2) {
      this.oos.mark(u[i]!, u[i + 1]!);
      bytes += u[i + 1]!;
    }
    this.unflushedBase += u.length / 2;
    this.unflushed = [];
    this.unflushedBytes = 0;
    this.log.info({ ranges: u.length / 2, bytes }, 'link lost before the peer flushed these writes: marked out of sync');
  }

  // ---------------------------------------------------------------------------------------------------------
  // Primary side of the link (called by PeerLink)

  linkRequest(): LinkRequest {
    const m = this.meta.meta;
    return { node: this.o.nodeUuid, nodeId: this.o.nodeId, exportUuid: m.uuid, size: m.size, epoch: m.epoch, gen: m.gen, oosBlocks: this.oos.count };
  }

  linkUp(granted: LinkResponse): void {
    this.splitBrain = null;
    if (granted.verdict === 'full') this.oos.markAll();
    else this.oos.markRanges(granted.ranges);
  }

  async linkDown(): Promise<void> {
    await this.oos.persist().catch((err: unknown) => this.log.error({ err }, 'persisting the out-of-sync bitmap failed'));
  }

  /** The peer took everything: the bitmap id goes to the history (unless a block was marked meanwhile). */
  async resyncDone(): Promise<void> {
    if (this.oos.count > 0) return;
    await this.meta.update((m) => {
      m.gen = sourceSynced(m.gen);
    });
  }

  async linkRefused(reason: string, body: Record<string, unknown>): Promise<void> {
    if (reason === 'split-brain' || body.splitBrain === true) {
      this.noteSplitBrain(this.meta.meta.gen, (body.gen as Generations | undefined) ?? this.meta.meta.gen, String(body.node ?? 'peer'));
    }
    const peerEpoch = typeof body.epoch === 'number' ? body.epoch : -1;
    const m = this.meta.meta;
    const peerGen = body.gen as Generations | undefined;
    if (reason === 'stale-epoch' && this.role === 'primary' && peerGen !== undefined && peerEpoch >= m.epoch) {
      // The secondary saw a newer epoch (it was promoted, then demoted or told to discard its changes). The
      // generation ids, not the epoch, say whose data wins: if they make this node the source, it takes an
      // epoch above the peer's and links again; otherwise the refusal stands.
      const v = compareGenerations(m.gen, peerGen);
      if (v === 'in-sync' || v === 'bitmap' || v === 'full') {
        await this.meta.update((n) => {
          n.epoch = peerEpoch + 1;
        });
        this.log.warn({ epoch: peerEpoch + 1, verdict: v }, 'the peer had seen a newer epoch: this primary moved past it');
        this.link?.kick();
      }
      return;
    }
    if (reason === 'peer-primary' && peerEpoch > m.epoch && m.gen.bitmap === '' && this.oos.count === 0 && this.role === 'primary') {
      // The peer was promoted after this node last held the role, and this node has written nothing since
      // they agreed: step down instead of becoming a second primary.
      this.log.warn({ peerEpoch, epoch: m.epoch }, 'the peer is primary with a higher epoch: this node becomes secondary');
      await this.demote();
    }
  }

  private noteSplitBrain(local: Generations, peer: Generations, peerNode: string): void {
    if (this.splitBrain === null) {
      this.log.error(
        { local, peer, peerNode },
        'SPLIT BRAIN: both nodes wrote to this export while apart. The link is refused and no data is discarded; ' +
          'run `nbdmirror resync --discard-my-data` on the node whose changes are to be thrown away',
      );
    }
    this.splitBrain = { detectedAt: new Date().toISOString(), local, peer, peerNode };
  }

  // ---------------------------------------------------------------------------------------------------------
  // Secondary side of the link (HTTP handlers and the hidden export)

  async acceptLink(req: LinkRequest): Promise<LinkResponse> {
    const m = this.meta.meta;
    const verdict = compareGenerations(req.gen, m.gen);
    const refuse = (reason: string, message: string): never => {
      throw new ConflictError(message, reason, { epoch: m.epoch, gen: m.gen, node: this.o.nodeUuid, splitBrain: verdict === 'split-brain' });
    };
    if (verdict === 'split-brain') this.noteSplitBrain(m.gen, req.gen, req.node);
    if (this.role === 'primary') refuse('peer-primary', `export ${this.name} is primary here too (epoch ${m.epoch})`);
    if (req.epoch < m.epoch) refuse('stale-epoch', `the link's epoch ${req.epoch} is older than ${m.epoch} seen here`);
    if (req.size !== m.size) refuse('size-mismatch', `export ${this.name} is ${m.size} bytes here, ${req.size} on the primary`);
    if (verdict === 'split-brain') refuse('split-brain', 'split brain: both nodes wrote while apart');
    if (verdict === 'peer-newer') refuse('peer-newer', 'this copy holds data the primary lacks: promote this node instead, or discard its changes');
    if (verdict === 'unrelated') refuse('unrelated', 'the copies share no history');
    const adopt = m.gen.current === GEN_CREATED;
    if (!adopt && req.exportUuid !== m.uuid) refuse('unrelated', `export uuid ${m.uuid} here, ${req.exportUuid} on the primary`);
    const ranges = this.oos.ranges();
    // A copy left inconsistent by an interrupted resync with nothing marked anywhere lost track: copy it all.
    const effective: SyncVerdict = verdict === 'in-sync' && m.disk === 'Inconsistent' && ranges.length === 0 && req.oosBlocks === 0 ? 'full' : verdict;
    const needSync = effective !== 'in-sync' || ranges.length > 0 || req.oosBlocks > 0;
    await this.meta.update((n) => {
      n.epoch = req.epoch;
      n.peer = req.node;
      if (adopt) n.uuid = req.exportUuid;
      if (needSync) n.disk = 'Inconsistent';
    });
    this.splitBrain = null;
    this.endSession();
    const token = randomBytes(16).toString('hex');
    this.session = { token, epoch: req.epoch, node: req.node, nodeId: req.nodeId, since: Date.now(), lastSeen: Date.now(), active: true };
    this.log.info({ primary: req.nodeId, epoch: req.epoch, verdict: effective, ownBlocks: this.oos.count }, 'replication link accepted');
    return { token, exportName: `${LINK_PREFIX}${this.name}/${token}`, verdict: effective, ranges, node: this.o.nodeUuid, nodeId: this.o.nodeId, epoch: req.epoch };
  }

  /** The primary finished the resync of this copy. */
  async synced(body: { token?: unknown; current?: unknown }): Promise<void> {
    const s = this.currentSession(body.token);
    if (typeof body.current !== 'string') throw new UsageError('synced: missing current generation id');
    const current = body.current;
    // UpToDate only once the resynced data is durable here, not just in the region.
    await this.lower.flush();
    await this.meta.update((m) => {
      m.gen = targetSynced(m.gen, current);
      m.disk = 'UpToDate';
    });
    this.oos.clearAll();
    await this.oos.persist();
    this.log.info({ primary: s.nodeId }, 'resync complete: this copy is up to date');
  }

  /** The primary goes on without this node: its copy is out of date. */
  async outdate(body: { epoch?: unknown; node?: unknown }): Promise<void> {
    const m = this.meta.meta;
    if (this.role !== 'secondary') throw new ConflictError(`export ${this.name} is primary here`, 'peer-primary', { epoch: m.epoch });
    if (typeof body.epoch !== 'number' || body.epoch < m.epoch) throw new ConflictError('stale epoch', 'stale-epoch', { epoch: m.epoch });
    this.endSession();
    if (m.disk === 'UpToDate') {
      await this.meta.update((n) => {
        n.disk = 'Outdated';
      });
      this.log.warn('the primary went on without this node: copy marked Outdated');
    }
  }

  /** The primary stops cleanly and ends its session: this node may be promoted at once. */
  unlink(body: { token?: unknown }): void {
    const s = this.currentSession(body.token);
    this.endSession();
    this.log.info({ primary: s.nodeId }, 'the primary ended the replication link (clean stop)');
  }

  private currentSession(token: unknown): Session {
    const s = this.session;
    if (s === null || !s.active || s.token !== token) throw new ConflictError('no such link session', 'no-session');
    return s;
  }

  /** The device behind the hidden link export for `token`, or undefined. */
  linkDevice(token: string): BlockDevice | undefined {
    const s = this.session;
    if (s === null || !s.active || s.token !== token || this.role !== 'secondary') return undefined;
    return new LinkDevice(this, s);
  }

  /** Writes over the link are taken only in a live session whose epoch is still the highest seen. */
  checkSession(s: Session): void {
    s.lastSeen = Date.now();
    if (!s.active || this.session !== s || this.role !== 'secondary' || s.epoch < this.meta.meta.epoch) {
      throw new ShutdownError('replication link session ended (fenced by a newer epoch or a role change)');
    }
  }

  /** A primary is attached: its session is active and it sent something within two peer timeouts. */
  private liveSession(): boolean {
    const s = this.session;
    return s !== null && s.active && Date.now() - s.lastSeen < 2 * (this.o.peer?.timeoutMs ?? 5000);
  }

  private endSession(): void {
    if (this.session !== null) this.session.active = false;
    this.session = null;
  }

  // ---------------------------------------------------------------------------------------------------------
  // Operator actions

  async promote(force: boolean): Promise<void> {
    const m = this.meta.meta;
    if (m.role === 'primary') return;
    if (m.disk !== 'UpToDate' && !force) {
      throw new ConflictError(`export ${this.name} is ${m.disk} here: promoting it could serve stale data (use --force to override)`, 'not-up-to-date', { disk: m.disk });
    }
    if (this.liveSession() && !force) {
      throw new ConflictError(`export ${this.name} is linked to a live primary (${this.session?.nodeId}): demote it first (or --force)`, 'peer-primary');
    }
    this.endSession();
    await this.meta.update((n) => {
      n.role = 'primary';
      n.epoch += 1;
      if (force) n.disk = 'UpToDate';
    });
    this.log.warn({ epoch: this.meta.meta.epoch, force }, 'promoted to primary');
    this.link?.start();
    this.link?.kick();
  }

  async demote(): Promise<void> {
    if (this.meta.meta.role === 'secondary') return;
    await this.meta.update((n) => {
      n.role = 'secondary';
    });
    // New writes are refused from here; wait for those already running, then drop the link.
    if (this.inFlight > 0) await new Promise<void>((r) => this.idleWaiters.push(r));
    await this.link?.stop();
    await this.oos.persist();
    this.log.warn('demoted to secondary');
  }

  /**
   * Split-brain resolution on the node whose changes are thrown away: it becomes secondary and goes back to
   * the generation its changes were made on, keeping its out-of-sync blocks so the peer resyncs them.
   */
  async discardMyData(): Promise<void> {
    await this.demote();
    await this.meta.update((n) => {
      n.gen = discardLocalChanges(n.gen);
      n.disk = 'Outdated';
    });
    this.splitBrain = null;
    this.log.warn({ gen: this.meta.meta.gen }, 'local changes will be discarded: the peer resyncs this copy');
  }

  status(): ReplicaStatus {
    const m = this.meta.meta;
    const s = this.session;
    return {
      name: this.name,
      uuid: m.uuid,
      role: m.role,
      epoch: m.epoch,
      disk: m.disk,
      gen: m.gen,
      peerNode: m.peer,
      outOfSync: { blocks: this.oos.count, bytes: this.oos.bytes },
      activityLog: { hotExtents: this.al.hot().length, transactions: this.al.transactions },
      splitBrain: this.splitBrain,
      link: this.link?.status() ?? null,
      session: s !== null && this.liveSession() ? { node: s.node, nodeId: s.nodeId, epoch: s.epoch, since: s.since } : null,
    };
  }
}

/** One Replica.mirrorWrite(): its two copies complete by callbacks; the second to answer settles it. */
class MirroredWrite {
  localError: unknown = NO_ERROR;
  remoteError: unknown = NO_ERROR;
  private waiting = 2;
  private readonly t0 = performance.now();

  constructor(
    private readonly r: Replica,
    private readonly link: PeerLink,
    private readonly peer: NonNullable<ReturnType<PeerLink['active']>>,
    readonly buf: Buffer,
    readonly offset: number,
    private readonly flags: WriteFlags | undefined,
    readonly resolve: () => void,
    readonly reject: (err: unknown) => void,
  ) {}

  start(): void {
    this.link.trackStart();
    this.peer.pwriteCallbacks(this.buf, this.offset, this.flags?.fua === true, this.remoteOk, this.remoteFailed);
    const lower = this.r.lower;
    let p: Promise<void> | null;
    try {
      p = lower.pwriteFast !== undefined ? lower.pwriteFast(this.buf, this.offset, this.flags) : lower.pwrite(this.buf, this.offset, this.flags);
    } catch (err) {
      this.localFailed(err);
      return;
    }
    if (p === null) this.answered();
    else p.then(this.answeredLocal, this.localFailed);
  }

  private readonly remoteOk = (): void => {
    const link = this.link;
    link.trackEnd();
    link.peerWrites.observe((performance.now() - this.t0) / 1000);
    this.r.noteUnflushed(this.offset, this.buf.length, this.peer);
    this.answered();
  };

  private readonly remoteFailed = (err: Error): void => {
    this.link.trackEnd();
    this.remoteError = err;
    this.answered();
  };

  private readonly answeredLocal = (): void => this.answered();

  private readonly localFailed = (err: unknown): void => {
    this.localError = err;
    this.answered();
  };

  private answered(): void {
    if (--this.waiting === 0) this.r.settleMirrored(this);
  }
}

/** What NBD clients see: writable only on the primary; mirrored when a peer is configured. */
class ReplicaDevice implements BlockDevice {
  readonly size: number;

  constructor(private readonly r: Replica) {
    this.size = r.lower.size;
  }

  get caps(): Capabilities {
    return this.r.role === 'primary' ? this.r.lower.caps : FULL_CAPS_READONLY(this.r.lower.caps);
  }

  pread(buf: Buffer, offset: number): Promise<void> {
    return this.r.lower.pread(buf, offset);
  }

  preadNow(buf: Buffer, offset: number): boolean {
    return this.r.lower.preadNow?.(buf, offset) ?? false;
  }

  preadCb(buf: Buffer, offset: number, done: (err: Error | null) => void): void {
    preadThen(this.r.lower, buf, offset, done);
  }

  pwriteFast(buf: Buffer, offset: number, flags?: WriteFlags): Promise<void> | null {
    const r = this.r;
    if (r.solo) {
      if (r.role === 'primary' && r.soloMark() === null && r.lower.pwriteFast !== undefined) return r.lower.pwriteFast(buf, offset, flags);
    } else {
      const p = r.mirrorWrite(buf, offset, flags);
      if (p !== null) return p;
    }
    return this.pwrite(buf, offset, flags);
  }

  pwrite(buf: Buffer, offset: number, flags?: WriteFlags): Promise<void> {
    const fua = flags?.fua === true;
    return this.run(offset, buf.length, () => this.r.lower.pwrite(buf, offset, flags), (p) => p.pwrite(buf, offset, { fua }));
  }

  trim(offset: number, length: number, flags?: WriteFlags): Promise<void> {
    return this.run(offset, length, () => this.r.lower.trim(offset, length, flags), (p) => p.trim(offset, length, { fua: flags?.fua === true }));
  }

  zero(offset: number, length: number, flags?: ZeroFlags): Promise<void> {
    // The peer zeroes the slow way if it must: the fast-zero promise is about this node's answer.
    return this.run(
      offset,
      length,
      () => this.r.lower.zero(offset, length, flags),
      (p) => p.zero(offset, length, { fua: flags?.fua === true, noHole: flags?.mayTrim === false }),
    );
  }

  flush(): Promise<void> {
    return this.r.flushBoth();
  }

  cache(offset: number, length: number): Promise<void> {
    return this.r.lower.cache(offset, length);
  }

  extents(offset: number, length: number): Promise<Extent[]> {
    return this.r.lower.extents(offset, length);
  }

  extentsNow(offset: number, length: number): Extent[] | null {
    return this.r.lower.extentsNow?.(offset, length) ?? null;
  }

  close(): Promise<void> {
    return Promise.resolve();
  }

  private async run(offset: number, length: number, local: () => Promise<void>, remote: Parameters<Replica['mutate']>[3]): Promise<void> {
    const r = this.r;
    r.enter();
    try {
      if (r.solo) {
        const m = r.soloMark();
        if (m) await m;
        return await local();
      }
      return await r.mutate(offset, length, local, remote);
    } finally {
      r.leave();
    }
  }
}

/** The secondary's stack as the primary's link session sees it: writable, fenced by the session. */
class LinkDevice implements BlockDevice {
  readonly size: number;
  readonly caps: Capabilities;

  constructor(
    private readonly r: Replica,
    private readonly s: Parameters<Replica['checkSession']>[0],
  ) {
    this.size = r.lower.size;
    this.caps = { ...r.lower.caps, readOnly: false };
  }

  pread(buf: Buffer, offset: number): Promise<void> {
    this.r.checkSession(this.s);
    return this.r.lower.pread(buf, offset);
  }

  pwriteFast(buf: Buffer, offset: number, flags?: WriteFlags): Promise<void> | null {
    this.r.checkSession(this.s);
    const l = this.r.lower;
    return l.pwriteFast !== undefined ? l.pwriteFast(buf, offset, flags) : l.pwrite(buf, offset, flags);
  }

  async pwrite(buf: Buffer, offset: number, flags?: WriteFlags): Promise<void> {
    this.r.checkSession(this.s);
    return this.r.lower.pwrite(buf, offset, flags);
  }

  async trim(offset: number, length: number, flags?: WriteFlags): Promise<void> {
    this.r.checkSession(this.s);
    return this.r.lower.trim(offset, length, flags);
  }

  async zero(offset: number, length: number, flags?: ZeroFlags): Promise<void> {
    this.r.checkSession(this.s);
    return this.r.lower.zero(offset, length, { ...flags, fastZero: false });
  }

  flush(): Promise<void> {
    // Not fenced: a flush changes no data, and the server flushes a link connection as it closes, which
    // may be after a newer session replaced this one.
    return this.r.lower.flush();
  }

  cache(offset: number, length: number): Promise<void> {
    return this.r.lower.cache(offset, length);
  }

  extents(offset: number, length: number): Promise<Extent[]> {
    return this.r.lower.extents(offset, length);
  }

  close(): Promise<void> {
    return Promise.resolve();
  }
}
