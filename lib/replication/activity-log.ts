// Activity log of one export (NAME.al), after DRBD's: the export is cut into 4 MiB extents, and before a write
// to an extent starts, that extent is recorded "hot" in this file, durably. After a crash of either node only
// hot extents can differ between the nodes (besides what the out-of-sync bitmap says), so a restart resyncs
// those instead of the whole export. At most `slots` extents are hot: a new extent evicts the least recently
// used one with no write in flight, once the caller's beforeEvict hook has made that extent's out-of-sync bits
// durable (from then on the bitmap alone covers it).
//
// Hot path: begin()/end() on extents that are already hot do no I/O, return no promise and allocate nothing
// (typed arrays for per-extent state and in-flight counts, an intrusive list of the idle hot extents in LRU
// order). A cold extent waits for a transaction; begin()s made in the same tick, or while a transaction is
// being written, share the next one (one pwrite + one fdatasync for all of them).
//
// File format (version 1); header integers big-endian (as in NAME.alloc), record integers little-endian:
//   [0, 4096)  header: magic "NBDMAL01"(8), version u32 @8, extent size u32 @12, slots u32 @16, reserved u32
//              @20, export size u64 @24, crc32 of [0, 32) u32 @32, zeros to 4096
//   then two record copies of R = roundup(24 + 4*slots, 4096) bytes, copy i at 4096 + i*R:
//              magic "ALR1"(4), crc32 of [8, 24+4n) u32 @4, sequence u64 @8, n u32 @16, reserved u32 @20,
//              then n hot extent numbers, u32 ascending
// Transaction s writes the whole hot list into copy s%2 and fdatasyncs it. The other copy keeps the previous
// record, so a torn write leaves a valid older record, and that one is safe: it lacks only extents whose
// writes had not started (they wait for durability) and still lists extents being made cold. Open takes the
// valid copy with the higher sequence; with no valid copy the file is damaged (CorruptStateError).

import { promises as fsp, constants as fsc } from 'node:fs';
import * as path from 'node:path';
import { crc32 } from '@node-rs/crc32';
import { CorruptStateError, IoError, ShutdownError } from '../errors';
import { ioError, readCheckedHeader, readFully, syncDir, writeFully } from '../storage/file-io';

export const AL_EXTENT_SIZE = 4 * 1024 * 1024;
export const AL_DEFAULT_SLOTS = 1024;
const AL_MAX_SLOTS = 1 << 20;

const AL_MAGIC = Buffer.from('NBDMAL01');
const AL_VERSION = 1;
const HEADER_SIZE = 4096;
const RECORD_MAGIC = 0x31524c41; // "ALR1" read as a little-endian u32
const RECORD_HEADER = 24;

// Extent states.
const COLD = 0;
/** A begin() waits for it; it has no slot yet (queued in wantQ). */
const WANTED = 1;
/** Has a slot; goes into the next transaction. */
const STAGED = 2;
/** In the transaction being written. */
const WRITING = 3;
/** In the durable record. */
const HOT = 4;
/** Hot, idle, and its beforeEvict hook runs; a begin() meanwhile cancels the eviction. */
const EVICTING = 5;

export interface ActivityLogOptions {
  dir: string;
  name: string;
  /** Export size in bytes. */
  size: number;
  /** Most extents hot at once (default 1024, i.e. 4 GiB of the export). */
  slots?: number;
  /** Called before an idle hot extent is made cold; the eviction waits for it (persist the extent's OOS bits). */
  beforeEvict?: (extent: number) => Promise<void>;
}

interface Waiter {
  e0: number;
  e1: number;
  resolve: () => void;
  reject: (err: Error) => void;
}

interface Deferred {
  promise: Promise<void>;
  resolve: () => void;
  reject: (err: Error) => void;
}

export class ActivityLog {
  /** Number of extents of the export. */
  readonly extents: number;
  private readonly state: Uint8Array;
  /** begin() calls without end() per extent (including begins still waiting). */
  private readonly inflight: Uint32Array;
  // Idle hot extents (HOT, nothing in flight), least recently used at the head.
  private readonly prev: Int32Array;
  private readonly next: Int32Array;
  private readonly linked: Uint8Array;
  private head = -1;
  private tail = -1;
  // Extents holding a slot (STAGED, WRITING, HOT, EVICTING): members[0, occupied), memberPos[e] = index or -1.
  private readonly members: Int32Array;
  private readonly memberPos: Int32Array;
  private occupied = 0;
  // WANTED extents in the order they were asked for (stale entries skipped), and how many are WANTED.
  private wantQ: number[] = [];
  private wantHead = 0;
  private wanted = 0;
  private staged: number[] = [];
  private waiters: Waiter[] = [];
  private evictionsRunning = 0;
  private readonly evictionDone = new Set<Promise<void>>();
  /** The record on disk may differ from the members (an extent was dropped or a write failed). */
  private recordDirty = false;
  /** Resolved by the next transaction that starts (cool(), close()). */
  private nextTx: Deferred | null = null;
  private pumping = false;
  private scheduled = false;
  /** The last pump run (close() waits for it). */
  private pumpRun: Promise<void> = Promise.resolve();
  private writes = 0;
  private txCount = 0;
  /** Sequence number of the next transaction; it goes to copy seq % 2. */
  private seq: number;
  private readonly record: Buffer;
  private readonly sortScratch: Uint32Array;
  /** close() was called: begin() refuses. */
  private closing = false;
  /** The file is closed. */
  private closed = false;
  private closePromise: Promise<void> | null = null;

  private constructor(
    readonly file: string,
    readonly size: number,
    readonly slots: number,
    private readonly fh: fsp.FileHandle,
    private readonly recordBytes: number,
    lastSeq: number,
    recovered: readonly number[],
    private readonly beforeEvict: ((extent: number) => Promise<void>) | undefined,
  ) {
    const n = Math.ceil(size / AL_EXTENT_SIZE);
    this.extents = n;
    this.state = new Uint8Array(n);
    this.inflight = new Uint32Array(n);
    this.prev = new Int32Array(n);
    this.next = new Int32Array(n);
    this.linked = new Uint8Array(n);
    this.members = new Int32Array(slots);
    this.memberPos = new Int32Array(n).fill(-1);
    this.seq = lastSeq + 1;
    this.record = Buffer.alloc(recordBytes);
    this.sortScratch = new Uint32Array(slots);
    for (const e of recovered) {
      this.state[e] = HOT;
      this.addMember(e);
      this.link(e);
    }
  }

  /**
   * Open DIR/NAME.al, creating it empty when absent. `recovered`: the extents hot in the file, ascending;
   * after an unclean stop they may differ between the nodes. They stay hot until cool() or eviction.
   */
  static async open(opts: ActivityLogOptions): Promise<{ log: ActivityLog; recovered: number[] }> {
    const { size } = opts;
    const slots = opts.slots ?? AL_DEFAULT_SLOTS;
    if (!Number.isSafeInteger(size) || size < 0) throw new RangeError(`activity log: bad export size ${size}`);
    if (!Number.isInteger(slots) || slots < 1 || slots > AL_MAX_SLOTS) {
      throw new RangeError(`activity log: slots must be an integer in [1, ${AL_MAX_SLOTS}], got ${slots}`);
    }
    if (Math.ceil(size / AL_EXTENT_SIZE) >= 2 ** 31) throw new RangeError(`activity log: export of ${size} bytes is too large`);
    const file = path.join(opts.dir, `${opts.name}.al`);
    const extents = Math.ceil(size / AL_EXTENT_SIZE);

    let fh = await openExisting(file);
    let recovered: number[] = [];
    let lastSeq = 0;
    if (fh === null) {
      await createFile(opts.dir, file, size, slots, []);
      fh = await openExisting(file);
      if (fh === null) throw new IoError(`${file}: vanished right after it was created`);
    } else {
      try {
        const found = await load(fh, file, size, extents);
        recovered = found.extents;
        lastSeq = found.seq;
        if (found.slots !== slots) {
          // Reconfigured: carry the hot list over into a file laid out for the new slot count.
          if (recovered.length > slots) {
            throw new CorruptStateError(
              `${file}: ${recovered.length} extents are hot but the log now has ${slots} slots; ` +
                `restart with at least ${recovered.length} slots, or stop cleanly first`,
            );
          }
          await fh.close();
          fh = null;
          await createFile(opts.dir, file, size, slots, recovered);
          lastSeq = 0;
          fh = await openExisting(file);
          if (fh === null) throw new IoError(`${file}: vanished right after it was rewritten`);
        }
      } catch (err) {
        await fh?.close().catch(() => undefined);
        throw err;
      }
    }
    const log = new ActivityLog(file, size, slots, fh, recordSize(slots), lastSeq, recovered, opts.beforeEvict);
    return { log, recovered };
  }

  /**
   * Begin a write to [offset, offset+length): every extent it touches becomes hot, durably, before the write
   * may start. null when they all were hot already (no I/O, no promise); else a promise that resolves once
   * the record is durable. Pair each begin() with one end() of the same range once the promise resolved (or
   * at once for null). If the promise rejects, the begin is undone: do not call end().
   */
  begin(offset: number, length: number): Promise<void> | null {
    if (!(offset >= 0 && length >= 0 && offset + length <= this.size)) {
      throw new RangeError(`range [${offset}, +${length}) outside the export (${this.size} bytes)`);
    }
    if (this.closing) return Promise.reject(new ShutdownError(`${this.file}: activity log is closed`));
    this.writes++;
    if (length === 0) return null;
    const e0 = Math.floor(offset / AL_EXTENT_SIZE);
    const e1 = Math.floor((offset + length - 1) / AL_EXTENT_SIZE);
    if (e1 - e0 >= this.slots) {
      this.writes--;
      throw new RangeError(`a write over ${e1 - e0 + 1} extents cannot fit a log of ${this.slots} slots`);
    }
    let ready = true;
    for (let e = e0; e <= e1; e++) {
      if (this.inflight[e]!++ === 0) this.unlink(e);
      const s = this.state[e];
      if (s === HOT) continue;
      if (s === EVICTING) {
        this.state[e] = HOT; // the eviction is cancelled when its hook returns
        continue;
      }
      ready = false;
      if (s === COLD) {
        this.state[e] = WANTED;
        this.wanted++;
        this.wantQ.push(e);
      }
    }
    if (ready) return null;
    return new Promise<void>((resolve, reject) => {
      this.waiters.push({ e0, e1, resolve, reject });
      this.schedule();
    });
  }

  /** Every extent of [offset, offset+length) is hot (durably recorded): a begin() of it would return null. */
  allHot(offset: number, length: number): boolean {
    if (this.closing || !(offset >= 0 && length > 0 && offset + length <= this.size)) return false;
    const e1 = Math.floor((offset + length - 1) / AL_EXTENT_SIZE);
    for (let e = Math.floor(offset / AL_EXTENT_SIZE); e <= e1; e++) {
      const s = this.state[e];
      if (s !== HOT && s !== EVICTING) return false;
    }
    return true;
  }

  /** The write begun with this range finished (on both nodes, or recorded out of sync). */
  end(offset: number, length: number): void {
    if (!(offset >= 0 && length >= 0 && offset + length <= this.size)) {
      throw new RangeError(`range [${offset}, +${length}) outside the export (${this.size} bytes)`);
    }
    if (this.writes === 0) throw new Error('activity log: end() without begin()');
    if (length > 0) {
      const e0 = Math.floor(offset / AL_EXTENT_SIZE);
      const e1 = Math.floor((offset + length - 1) / AL_EXTENT_SIZE);
      for (let e = e0; e <= e1; e++) {
        if (this.inflight[e] === 0) throw new Error(`activity log: end() without begin() for extent ${e}`);
      }
      this.release(e0, e1);
    }
    this.writes--;
  }

  /** Extents currently hot (durably recorded), ascending. */
  hot(): number[] {
    const out: number[] = [];
    for (let i = 0; i < this.occupied; i++) {
      const e = this.members[i]!;
      const s = this.state[e];
      if (s === HOT || s === EVICTING) out.push(e);
    }
    return out.sort((a, b) => a - b);
  }

  /** Writes in flight: begin() calls without their end(). */
  get inFlight(): number {
    return this.writes;
  }

  /** Durable transactions written since open. */
  get transactions(): number {
    return this.txCount;
  }

  /** Make every hot extent with no write in flight cold, and persist that (after a clean stop or a resync). */
  async cool(): Promise<void> {
    if (this.closed) throw new ShutdownError(`${this.file}: activity log is closed`);
    for (let e = this.head; e >= 0; ) {
      const nx = this.next[e]!;
      this.linked[e] = 0;
      this.state[e] = COLD;
      this.removeMember(e);
      e = nx;
    }
    this.head = this.tail = -1;
    this.recordDirty = true;
    await this.requestTx();
  }

  /**
   * Refuse new begin()s (and fail the ones still waiting), let evictions and the transaction under way finish,
   * cool() when no write is in flight, then close the file.
   */
  close(): Promise<void> {
    this.closePromise ??= (async () => {
      this.closing = true;
      try {
        this.failWaiters(() => true, new ShutdownError(`${this.file}: activity log is closing`));
        while (this.evictionDone.size > 0) await Promise.all([...this.evictionDone]);
        // Let the transaction under way finish; write one more only if something is left to record.
        while (this.pumping || this.scheduled) await this.pumpRun;
        if (this.staged.length > 0 || this.recordDirty) await this.requestTx();
        if (this.writes === 0) await this.cool();
      } finally {
        this.closed = true;
        await this.fh.close();
      }
    })();
    return this.closePromise;
  }

  // -------------------------------------------------------------------------------------------------------

  /** Drop one in-flight count of extents [e0, e1]; extents left idle and hot become eviction candidates. */
  private release(e0: number, e1: number): void {
    let kick = false;
    for (let e = e0; e <= e1; e++) {
      if (--this.inflight[e]! !== 0) continue;
      const s = this.state[e];
      if (s === HOT) {
        this.link(e);
        if (this.wanted > 0) kick = true;
      } else if (s === WANTED) {
        this.state[e] = COLD; // nobody waits for it any more; its queue entry is skipped
        this.wanted--;
      }
    }
    if (kick) this.schedule();
  }

  private schedule(): void {
    if (this.scheduled || this.pumping || this.closed) return;
    this.scheduled = true;
    // A microtask, so that every begin() of this tick joins the same transaction.
    queueMicrotask(() => {
      this.scheduled = false;
      this.pumpRun = this.pump();
    });
  }

  private requestTx(): Promise<void> {
    if (this.nextTx === null) {
      let resolve!: () => void;
      let reject!: (err: Error) => void;
      const promise = new Promise<void>((res, rej) => {
        resolve = res;
        reject = rej;
      });
      this.nextTx = { promise, resolve, reject };
    }
    const p = this.nextTx.promise;
    this.schedule();
    return p;
  }

  /** Admit waiting extents into slots and write transactions until nothing more is to be written. */
  private async pump(): Promise<void> {
    if (this.pumping) return;
    this.pumping = true;
    let failed = false;
    try {
      for (;;) {
        this.admit();
        // After a failed write, retry only for new work or an explicit request (cool, close), never in a loop.
        if (this.staged.length === 0 && this.nextTx === null && (!this.recordDirty || failed)) break;
        if (!(await this.transaction())) failed = true;
      }
    } catch (err) {
      // A bug, not I/O (transaction() handles that): fail whoever waits rather than leave them hanging.
      const e = err instanceof Error ? err : new Error(String(err));
      this.failWaiters(() => true, e);
      const d = this.nextTx;
      this.nextTx = null;
      d?.reject(e);
    } finally {
      this.pumping = false;
    }
  }

  /** Give free slots to WANTED extents in the order they were asked for; evict idle ones for the rest. */
  private admit(): void {
    for (;;) {
      if (this.wanted === 0) break;
      while (this.wantHead < this.wantQ.length && this.state[this.wantQ[this.wantHead]!] !== WANTED) this.wantHead++;
      if (this.wantHead >= this.wantQ.length) break; // cannot happen: every WANTED extent is queued
      if (this.occupied >= this.slots) {
        if (this.beforeEvict !== undefined || this.head < 0) break;
        this.drop(this.head); // no hook: evict at once
        continue;
      }
      const e = this.wantQ[this.wantHead++]!;
      this.state[e] = STAGED;
      this.wanted--;
      this.addMember(e);
      this.staged.push(e);
    }
    if (this.wanted === 0) {
      this.wantQ = [];
      this.wantHead = 0;
    } else if (this.wantHead > 1024 && this.wantHead * 2 > this.wantQ.length) {
      this.wantQ = this.wantQ.slice(this.wantHead);
      this.wantHead = 0;
    }
    // Extents still waiting for a slot: start one eviction each (counting those under way).
    while (this.beforeEvict !== undefined && this.evictionsRunning < this.wanted && this.head >= 0) {
      this.startEviction(this.head);
    }
  }

  private startEviction(e: number): void {
    this.unlink(e);
    this.state[e] = EVICTING;
    this.evictionsRunning++;
    let hook: Promise<void>;
    try {
      hook = Promise.resolve(this.beforeEvict!(e));
    } catch (err) {
      hook = Promise.reject(err);
    }
    const done = hook.then(
      () => this.evicted(e, null),
      (err: unknown) => this.evicted(e, err),
    );
    this.evictionDone.add(done);
    void done.finally(() => this.evictionDone.delete(done));
  }

  private evicted(e: number, err: unknown): void {
    this.evictionsRunning--;
    if (err === null) {
      // Still idle: the extent leaves the log with the next transaction. Else a begin() took it back.
      if (this.state[e] === EVICTING) this.drop(e);
    } else {
      if (this.state[e] === EVICTING) {
        this.state[e] = HOT;
        this.linkHead(e);
      }
      const error = err instanceof Error ? err : new Error(String(err));
      // The writers waiting for a slot cannot get one this way: fail them rather than retry forever.
      this.failWaiters((w) => this.needsSlot(w), error);
    }
    this.schedule();
  }

  /** Make an idle hot (or evicting) extent cold in memory; the next record leaves it out. */
  private drop(e: number): void {
    this.unlink(e);
    this.state[e] = COLD;
    this.removeMember(e);
    this.recordDirty = true;
  }

  private needsSlot(w: Waiter): boolean {
    for (let e = w.e0; e <= w.e1; e++) if (this.state[e] === WANTED) return true;
    return false;
  }

  /** Reject the waiters matching `which`, undoing their begin(). */
  private failWaiters(which: (w: Waiter) => boolean, err: Error): void {
    const failed: Waiter[] = [];
    let kept = 0;
    for (const w of this.waiters) {
      if (which(w)) failed.push(w);
      else this.waiters[kept++] = w;
    }
    this.waiters.length = kept;
    for (const w of failed) {
      this.release(w.e0, w.e1);
      this.writes--;
      w.reject(err);
    }
  }

  /** Write the current hot list as one record copy + fdatasync. False if it failed. */
  private async transaction(): Promise<boolean> {
    const writing = this.staged;
    this.staged = [];
    for (const e of writing) this.state[e] = WRITING;
    this.recordDirty = false;
    const done = this.nextTx;
    this.nextTx = null;
    const seq = this.seq;
    const len = this.encode(seq);
    try {
      await writeFully(this.fh, this.record.subarray(0, len), HEADER_SIZE + (seq % 2) * this.recordBytes);
      await this.fh.datasync();
    } catch (cause) {
      // The copy may be torn: the next attempt rewrites the same copy with the same sequence, so the other
      // copy (the last good record) is never touched. Nothing new counts as hot; waiting writers fail.
      const err = new IoError(`${this.file}: writing the activity log failed: ${(cause as Error).message}`, { cause });
      for (const e of writing) {
        if (this.state[e] === WRITING) {
          this.state[e] = COLD;
          this.removeMember(e);
        }
      }
      this.recordDirty = true;
      this.failWaiters(() => true, err);
      done?.reject(err);
      return false;
    }
    this.seq++;
    this.txCount++;
    for (const e of writing) {
      if (this.state[e] !== WRITING) continue;
      this.state[e] = HOT;
      if (this.inflight[e] === 0) this.link(e);
    }
    done?.resolve();
    // Wake the writers whose extents are all hot now.
    let kept = 0;
    const ready: Waiter[] = [];
    for (const w of this.waiters) {
      let all = true;
      for (let e = w.e0; e <= w.e1 && all; e++) all = this.state[e] === HOT;
      if (all) ready.push(w);
      else this.waiters[kept++] = w;
    }
    this.waiters.length = kept;
    for (const w of ready) w.resolve();
    return true;
  }

  /** Encode the record for sequence `seq` into this.record; returns its length. */
  private encode(seq: number): number {
    const n = this.occupied;
    const list = this.sortScratch.subarray(0, n);
    for (let i = 0; i < n; i++) list[i] = this.members[i]!;
    list.sort();
    return encodeRecord(this.record, seq, list);
  }

  private addMember(e: number): void {
    this.memberPos[e] = this.occupied;
    this.members[this.occupied++] = e;
  }

  private removeMember(e: number): void {
    const i = this.memberPos[e]!;
    if (i < 0) return;
    const last = this.members[--this.occupied]!;
    this.members[i] = last;
    this.memberPos[last] = i;
    this.memberPos[e] = -1;
  }

  /** Append to the idle list as the most recently used. */
  private link(e: number): void {
    if (this.linked[e]) return;
    this.prev[e] = this.tail;
    this.next[e] = -1;
    if (this.tail >= 0) this.next[this.tail] = e;
    else this.head = e;
    this.tail = e;
    this.linked[e] = 1;
  }

  /** Insert at the head of the idle list (next to be evicted). */
  private linkHead(e: number): void {
    if (this.linked[e]) return;
    this.prev[e] = -1;
    this.next[e] = this.head;
    if (this.head >= 0) this.prev[this.head] = e;
    else this.tail = e;
    this.head = e;
    this.linked[e] = 1;
  }

  private unlink(e: number): void {
    if (!this.linked[e]) return;
    const p = this.prev[e]!;
    const nx = this.next[e]!;
    if (p >= 0) this.next[p] = nx;
    else this.head = nx;
    if (nx >= 0) this.prev[nx] = p;
    else this.tail = p;
    this.linked[e] = 0;
  }
}

function recordSize(slots: number): number {
  return Math.ceil((RECORD_HEADER + 4 * slots) / 4096) * 4096;
}

function encodeRecord(buf: Buffer, seq: number, extents: ArrayLike<number>): number {
  const n = extents.length;
  buf.writeUInt32LE(RECORD_MAGIC, 0);
  buf.writeUInt32LE(seq % 2 ** 32, 8);
  buf.writeUInt32LE(Math.floor(seq / 2 ** 32), 12);
  buf.writeUInt32LE(n, 16);
  buf.writeUInt32LE(0, 20);
  for (let i = 0; i < n; i++) buf.writeUInt32LE(extents[i]!, RECORD_HEADER + 4 * i);
  const len = RECORD_HEADER + 4 * n;
  buf.writeUInt32LE(crc32(buf.subarray(8, len)), 4);
  return len;
}

/** The record in copy `index`, or null if it is torn, damaged or does not belong there. */
function decodeRecord(buf: Buffer, index: number, slots: number, extents: number): { seq: number; extents: number[] } | null {
  if (buf.readUInt32LE(0) !== RECORD_MAGIC) return null;
  const n = buf.readUInt32LE(16);
  if (n > slots || RECORD_HEADER + 4 * n > buf.length) return null;
  if (buf.readUInt32LE(4) !== crc32(buf.subarray(8, RECORD_HEADER + 4 * n))) return null;
  const seq = buf.readUInt32LE(8) + buf.readUInt32LE(12) * 2 ** 32;
  if (seq % 2 !== index) return null;
  const list: number[] = [];
  for (let i = 0; i < n; i++) {
    const e = buf.readUInt32LE(RECORD_HEADER + 4 * i);
    if (e >= extents || (i > 0 && e <= list[i - 1]!)) return null;
    list.push(e);
  }
  return { seq, extents: list };
}

function encodeHeader(size: number, slots: number): Buffer {
  const header = Buffer.alloc(HEADER_SIZE);
  AL_MAGIC.copy(header, 0);
  header.writeUInt32BE(AL_VERSION, 8);
  header.writeUInt32BE(AL_EXTENT_SIZE, 12);
  header.writeUInt32BE(slots, 16);
  header.writeBigUInt64BE(BigInt(size), 24);
  header.writeUInt32BE(crc32(header.subarray(0, 32)), 32);
  return header;
}

/** Read and check the header and both copies; the newest valid record and the file's slot count. */
async function load(
  fh: fsp.FileHandle,
  file: string,
  size: number,
  extents: number,
): Promise<{ seq: number; extents: number[]; slots: number }> {
  const corrupt = (what: string): CorruptStateError =>
    new CorruptStateError(`${file}: ${what}; move the file away (and resync the whole export) to start over`);
  const { header, fileLength: actualLength } = await readCheckedHeader(fh, file, { size: HEADER_SIZE, magic: AL_MAGIC, version: AL_VERSION, crcAt: 32, kind: 'an activity log' }, corrupt);
  const extentSize = header.readUInt32BE(12);
  if (extentSize !== AL_EXTENT_SIZE) throw corrupt(`extent size ${extentSize}, expected ${AL_EXTENT_SIZE}`);
  const fileSize = Number(header.readBigUInt64BE(24));
  if (fileSize !== size) throw corrupt(`made for an export of ${fileSize} bytes, the export has ${size}`);
  const slots = header.readUInt32BE(16);
  if (slots < 1 || slots > AL_MAX_SLOTS) throw corrupt(`bad slot count ${slots}`);
  const r = recordSize(slots);
  if (actualLength !== HEADER_SIZE + 2 * r) throw corrupt(`${actualLength} bytes, expected ${HEADER_SIZE + 2 * r}`);
  const copies = Buffer.alloc(2 * r);
  await readFully(fh, file, copies, HEADER_SIZE);
  const a = decodeRecord(copies.subarray(0, r), 0, slots, extents);
  const b = decodeRecord(copies.subarray(r), 1, slots, extents);
  const best = a === null ? b : b === null ? a : a.seq > b.seq ? a : b;
  if (best === null) throw corrupt('neither record copy is valid');
  return { seq: best.seq, extents: best.extents, slots };
}

async function openExisting(file: string): Promise<fsp.FileHandle | null> {
  try {
    return await fsp.open(file, fsc.O_RDWR);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw ioError(file, err);
  }
}

/** Write a new log (header, copy 0 = sequence 0 holding `hot`, copy 1 empty) as FILE.tmp, then rename it. */
async function createFile(dir: string, file: string, size: number, slots: number, hot: readonly number[]): Promise<void> {
  const r = recordSize(slots);
  const buf = Buffer.alloc(HEADER_SIZE + 2 * r);
  encodeHeader(size, slots).copy(buf, 0);
  encodeRecord(buf.subarray(HEADER_SIZE, HEADER_SIZE + r), 0, hot);
  const tmp = `${file}.tmp`;
  try {
    const fh = await fsp.open(tmp, fsc.O_RDWR | fsc.O_CREAT | fsc.O_TRUNC, 0o600);
    try {
      await writeFully(fh, buf, 0);
      await fh.datasync();
    } finally {
      await fh.close();
    }
    await fsp.rename(tmp, file);
    await syncDir(dir);
  } catch (err) {
    throw ioError(file, err);
  }
}
