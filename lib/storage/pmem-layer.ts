// The per-export write path over the pmem region: a write is copied into region pages (read-modify-write
// for partial pages) and acknowledged when the region holds it; reads look in the region, then the read
// cache, then the backing file; TRIM/WRITE_ZEROES drop resident pages and deallocate in the backing file.
//
// Ordering rules that keep acknowledged data safe across a crash:
// - a dirty page is never overwritten in place (a crash mid-copy would tear the only copy): its new version
//   goes to another slot with a higher sequence number, then the old slot is released;
// - a clean page (equal to the backing file) may be overwritten in place: if torn, its checksum fails and
//   recovery falls back to the backing file, which holds the last acknowledged version;
// - a trimmed/zeroed block's page is released only after the backing file has deallocated the range, and
//   only once no writeback of it is in flight (which could otherwise land after the deallocation).

import { NotSupportedError } from '../errors';
import { preadThen, type BlockDevice, type Capabilities, type Extent, type WriteFlags, type ZeroFlags } from './block-device';
// The constants come from their own module: a re-export is a getter on an exports object in dictionary mode,
// which optimized code reads through a generic load on every use (a profile's largest runtime builtin).
import { PAGE_SIZE, SLOT_CLEAN, SLOT_DIRTY } from './pmem-region';
import type { PmemStore, StoreExport } from './pmem-store';
import type { Writeback } from './writeback';

export type Durability = 'disk' | 'pmem';

const RESOLVED = Promise.resolve();

/**
 * Reads up to this size fill the read cache. Longer ones (sequential scans, copies) would evict the small
 * random reads the cache is for, at the cost of a copy per page; the OS page cache serves them well.
 */
const CACHE_FILL_MAX = 64 << 10;

/** bypass(): the write went to the backing file; it may not; it may once writebacks of its blocks are done. */
const BYPASSED = 0;
const REFUSED = 1;
const BUSY = 2;
type Bypass = typeof BYPASSED | typeof REFUSED | typeof BUSY;
/** Waits for writebacks of its blocks a long write makes before it goes through the region instead. */
const BYPASS_WAIT_ROUNDS = 16;

/** Writes of at least this many bytes may bypass the region by default (see bypass()). */
export const BYPASS_MIN = 256 << 10;

/** Wait before the backing sync that settles pages written through by bypasses (see settleSoon), in ms. */
const SETTLE_DELAY_MS = 100;

/** CACHE prefetches at most this much per request. */
const CACHE_PREFETCH_MAX = 32 << 20;

export class PmemLayer implements BlockDevice {
  readonly size: number;
  readonly caps: Capabilities;
  /** Blocks with a read-modify-write (or trim) under way: later writes to them queue behind it. */
  private readonly pending = new Map<number, Promise<void>>();
  private readonly zeroPage = Buffer.alloc(PAGE_SIZE);
  /** preadNow's miss runs (see takeAtHand). */
  private readonly nowMisses: number[] = [];
  /** TRIM/WRITE_ZEROES under way (their pages are detached but still recoverable): no bypass meanwhile. */
  private dropping = 0;
  /** A write went straight to the backing file since the last FLUSH began (pmem durability must flush it). */
  private bypassedSinceFlush = false;
  /** Pages a bypass gave new versions that the backing file holds too (slot, seq pairs; see supersedeDirty). */
  private writtenThrough: number[] = [];
  /** The backing sync after which writtenThrough's pages are clean (see settleSoon). */
  private settleTimer: NodeJS.Timeout | null = null;
  private closed = false;

  constructor(
    private readonly store: PmemStore,
    private readonly e: StoreExport,
    private readonly writeback: Writeback,
    private readonly durability: Durability,
    /** Writes of at least this many bytes may bypass the region (Infinity: never; see bypass()). */
    private readonly bypassMin = BYPASS_MIN,
  ) {
    this.size = e.backing.size;
    this.caps = { ...e.backing.caps };
  }

  // ---------------------------------------------------------------------------------------------------------
  // Writes

  pwrite(buf: Buffer, offset: number, flags: WriteFlags = {}): Promise<void> {
    return this.pwriteFast(buf, offset, flags) ?? RESOLVED;
  }

  /** The write, synchronously when every page can be installed at once (the common case); see BlockDevice. */
  pwriteFast(buf: Buffer, offset: number, flags: WriteFlags = {}): Promise<void> | null {
    if (buf.length === 0) return null;
    const first = Math.floor(offset / PAGE_SIZE);
    const last = Math.floor((offset + buf.length - 1) / PAGE_SIZE);
    this.store.cache.invalidate(this.e.id, first, last);
    if (buf.length >= this.bypassMin) {
      const b = this.bypass(buf, offset, first, last);
      if (b === BYPASSED) return flags.fua ? this.bypassedFua() : null;
      if (b === BUSY) return this.bypassWhenIdle(buf, offset, first, last, flags);
    }
    let block = first;
    let inPage = offset - first * PAGE_SIZE;
    for (let pos = 0; pos < buf.length; block++, inPage = 0) {
      const n = Math.min(PAGE_SIZE - inPage, buf.length - pos);
      if ((this.pending.size !== 0 && this.pending.has(block)) || this.installNow(block, inPage, buf, pos, n) < 0) {
        return this.pwriteRest(buf, offset, pos, flags);
      }
      pos += n;
    }
    if (flags.fua) {
      if (this.durability !== 'pmem') return this.writeback.flushExport(this.e);
      this.store.region.sync();
    }
    return null;
  }

  /**
   * A long write of whole pages goes straight to the backing file, if that takes it at once
   * (BackingFile.pwriteNow: a copy into the OS page cache). That survives a crash of this process as well as
   * the region does, and saves a copy, a checksum and the later writeback per page, which streaming writes
   * otherwise pay through a region far smaller than the export (bcache bypasses its cache for sequential I/O
   * for the same reason). No older version of a block may land after it: the write is refused while any
   * block of it is queued for a read-modify-write, or while a TRIM/WRITE_ZEROES (whose detached pages recovery
   * could still write back) is under way; while a block of it is being written back it waits (BUSY, see
   * bypassWhenIdle). The range's clean pages leave the region right after the backing write, before the write
   * is acknowledged: a crash in between recovers their older bytes over a write nobody was told about, which
   * is allowed. Its dirty pages leave too in disk durability; in pmem durability one may be the only copy of
   * flushed data until the backing file is synced, so each gets its new version in the region first, the way
   * any write supersedes a dirty page (after random writes a dirty page sits every few blocks, and refusing
   * the bypass for one sent the whole write through the region). FLUSH and FUA then also flush the backing
   * file, in pmem durability too (see makeDurable).
   */
  private bypass(buf: Buffer, offset: number, first: number, last: number): Bypass {
    const e = this.e;
    const pwriteNow = e.backing.pwriteNow;
    if (pwriteNow === undefined || this.dropping !== 0 || offset % PAGE_SIZE !== 0) return REFUSED;
    const end = offset + buf.length;
    if (end % PAGE_SIZE !== 0 && end !== this.size) return REFUSED;
    if (this.pending.size !== 0) for (const b of this.pending.keys()) if (b >= first && b <= last) return REFUSED;
    const busy = e.writing.nextSet(first);
    if (busy >= 0 && busy <= last) return BUSY;
    // A pinned slot is being written back, so its block is in `writing`: no page of the range is pinned.
    const resident = e.index.size !== 0;
    const keepDirty = resident && this.durability === 'pmem';
    const mark = this.writtenThrough.length;
    let written = false;
    try {
      written = (!keepDirty || this.supersedeDirty(buf, offset, first, last)) && pwriteNow.call(e.backing, [buf], offset);
    } finally {
      // Not in the backing file (no slot for a new version, refused, or failed): none may be settled clean.
      if (!written) this.writtenThrough.length = mark;
    }
    if (!written) return REFUSED;
    if (resident) this.dropPages(first, last, keepDirty);
    if (keepDirty) this.settleSoon();
    e.generation++; // a read of these blocks in flight must not fill the cache with what it read before
    this.bypassedSinceFlush = true;
    this.store.bypassBytes += buf.length;
    return BYPASSED;
  }

  /**
   * FUA of a bypassed write: the backing file's flush, and in pmem durability the region's sync first (the
   * write may have given dirty pages new versions there, see supersedeDirty).
   */
  private bypassedFua(): Promise<void> {
    return this.durability === 'pmem' ? this.makeDurable() : this.e.backing.flush();
  }

  /**
   * For a bypass in pmem durability: the dirty pages of blocks first..last get their part of buf as a new
   * version in the region. False when a slot is not at hand for one (the region path then installs every
   * page again, the ones done here included). The new versions are what the backing file gets too: once it
   * is synced they are clean (see settleSoon), so the next long write over them drops them instead of
   * copying them again, and the writeback never writes them.
   */
  private supersedeDirty(buf: Buffer, offset: number, first: number, last: number): boolean {
    const r = this.store.region;
    const dirty = this.e.dirty;
    const through = this.writtenThrough;
    for (let b = dirty.nextSet(first); b >= 0 && b <= last; b = dirty.nextSet(b + 1)) {
      const pos = b * PAGE_SIZE - offset;
      const slot = this.installNow(b, 0, buf, pos, Math.min(PAGE_SIZE, buf.length - pos));
      if (slot < 0) return false; // bypass() forgets the pairs pushed here
      through.push(slot, r.slotSeq[slot]!);
    }
    return true;
  }

  /**
   * The pages supersedeDirty wrote through become clean after the backing file's next sync. Syncs are a
   * little apart so that one covers many long writes.
   */
  private settleSoon(): void {
    if (this.settleTimer !== null || this.writtenThrough.length === 0) return;
    this.settleTimer = setTimeout(() => {
      const pairs = this.writtenThrough;
      this.writtenThrough = [];
      this.e.backing.flush().then(
        () => {
          for (let i = 0; i < pairs.length; i += 2) this.store.settle(pairs[i]!, pairs[i + 1]!);
        },
        // They stay dirty: the writeback writes them back (and reports the backing file's failure).
        () => undefined,
      ).finally(() => {
        this.settleTimer = null;
        if (!this.closed) this.settleSoon();
      });
    }, SETTLE_DELAY_MS);
    this.settleTimer.unref();
  }

  /**
   * A long write whose bypass only waits for the writeback of some of its blocks (after random writes the
   * writeback keeps pages of most ranges in flight): wait for those, then bypass, or else go through the
   * region after all. The region would take the write at once only when it has free pages, and then cost
   * every page a copy, a checksum and a writeback.
   */
  private async bypassWhenIdle(buf: Buffer, offset: number, first: number, last: number, flags: WriteFlags): Promise<void> {
    // A block written back is clean afterwards and not picked again unless rewritten, so this ends quickly;
    // the bound is for a range that clients keep rewriting while the writeback keeps taking it.
    for (let round = 0; round < BYPASS_WAIT_ROUNDS; round++) {
      await this.store.waitBlocksIdle(this.e, first, last);
      // A read meanwhile may have cached these blocks' old bytes.
      this.store.cache.invalidate(this.e.id, first, last);
      const b = this.bypass(buf, offset, first, last);
      if (b === BYPASSED) {
        if (flags.fua) await this.bypassedFua();
        return;
      }
      if (b === REFUSED) break;
    }
    return this.pwriteRest(buf, offset, 0, flags);
  }

  /**
   * The resident pages of blocks first..last leave the region (their page table entries are cleared); the
   * dirty ones stay when keepDirty (they hold the bypassed write already, see bypass).
   */
  private dropPages(first: number, last: number, keepDirty: boolean): void {
    const e = this.e;
    const state = this.store.region.slotState;
    for (let b = first; b <= last; b++) {
      const slot = e.index.get(b);
      if (slot === undefined || (keepDirty && state[slot] === SLOT_DIRTY)) continue;
      e.index.delete(b);
      this.store.retire(slot);
    }
  }

  /** The pages of a write from pos on, the slow way: queued per block behind read-modify-writes and waits. */
  private async pwriteRest(buf: Buffer, offset: number, pos: number, flags: WriteFlags): Promise<void> {
    while (pos < buf.length) {
      const off = offset + pos;
      const block = Math.floor(off / PAGE_SIZE);
      const inPage = off - block * PAGE_SIZE;
      const n = Math.min(PAGE_SIZE - inPage, buf.length - pos);
      const src = buf.subarray(pos, pos + n);
      if (this.pending.size === 0 || !this.pending.has(block)) {
        if (this.installNow(block, inPage, src, 0, n) < 0) await this.queue(block, () => this.installSlow(block, inPage, src));
      } else {
        await this.queue(block, () => this.installSlow(block, inPage, src));
      }
      pos += n;
    }
    if (flags.fua) await this.makeDurable();
  }

  /**
   * Install buf[pos, pos+n) at inPage of block without waiting, if possible: a whole page, or a partial page
   * whose base is resident, with a slot at hand. Returns the slot, or -1 when the caller must take the slow
   * path.
   */
  private installNow(block: number, inPage: number, buf: Buffer, pos: number, n: number): number {
    const s = this.store;
    const r = s.region;
    const slot = this.e.index.get(block);
    if (slot !== undefined) {
      if (r.slotState[slot] === SLOT_CLEAN && r.slotPins[slot] === 0) {
        copyInto(r.page(slot), inPage, buf, pos, n);
        s.installDirty(this.e, block, slot);
        return slot;
      }
      const ns = s.tryTakeSlot();
      if (ns < 0) return -1;
      const page = r.page(ns);
      if (n < PAGE_SIZE) page.set(r.page(slot));
      copyInto(page, inPage, buf, pos, n);
      s.installDirty(this.e, block, ns);
      return ns;
    }
    if (n < PAGE_SIZE) return -1;
    const ns = s.tryTakeSlot();
    if (ns < 0) return -1;
    copyInto(r.page(ns), 0, buf, pos, n);
    s.installDirty(this.e, block, ns);
    return ns;
  }

  /** Install after reading the base page and/or waiting for a free slot. Runs queued per block. */
  private async installSlow(block: number, inPage: number, src: Buffer): Promise<void> {
    const partial = src.length < PAGE_SIZE;
    for (;;) {
      if (this.installNow(block, inPage, src, 0, src.length) >= 0) return;
      let base: Buffer | null = null;
      if (partial && !this.e.index.has(block)) {
        base = Buffer.allocUnsafe(PAGE_SIZE);
        await this.readBase(block, base);
      }
      const ns = await this.store.takeSlot();
      // Synchronous from here: the slot must be filled and committed before anything else can take it.
      const r = this.store.region;
      const resident = this.e.index.get(block);
      if (partial && resident === undefined && base === null) {
        // The resident base page was evicted while we waited: read the base again.
        this.store.giveBack(ns);
        continue;
      }
      const page = r.page(ns);
      if (partial) {
        if (resident !== undefined) r.page(resident).copy(page);
        else base!.copy(page);
      }
      src.copy(page, inPage);
      this.store.installDirty(this.e, block, ns);
      return;
    }
  }

  /** Run fn after every operation already queued on block; the queue entry is dropped when it is the last. */
  private queue(block: number, fn: () => Promise<void>): Promise<void> {
    const prev = this.pending.get(block);
    const p = prev === undefined ? fn() : prev.then(fn);
    const tail = p.then(
      () => undefined,
      () => undefined,
    );
    this.pending.set(block, tail);
    void tail.then(() => {
      if (this.pending.get(block) === tail) this.pending.delete(block);
    });
    return p;
  }

  /** The current contents of a non-resident block: read cache, else the backing file. */
  private async readBase(block: number, dst: Buffer): Promise<void> {
    if (this.store.cache.readInto(this.e.id, block, dst, 0)) return;
    const off = block * PAGE_SIZE;
    const len = Math.min(PAGE_SIZE, this.size - off);
    if (len < PAGE_SIZE) dst.fill(0, len);
    await this.e.backing.pread(dst.subarray(0, len), off);
  }

  // ---------------------------------------------------------------------------------------------------------
  // Reads

  async pread(buf: Buffer, offset: number): Promise<void> {
    const misses: number[] = [];
    this.takeAtHand(buf, offset, misses);
    if (misses.length !== 0) await this.preadMisses(buf, misses);
  }

  /** Read what takeAtHand left (misses: pos, offset, length triples) from the backing file; fill the cache. */
  private async preadMisses(buf: Buffer, misses: readonly number[]): Promise<void> {
    const e = this.e;
    const generation = e.generation;
    if (misses.length > 3 && denseMisses(misses)) {
      await new Promise<void>((resolve, reject) => this.readSpan(buf, misses, (err) => (err === null ? resolve() : reject(err))));
    } else {
      const reads: Array<Promise<void>> = [];
      for (let i = 0; i < misses.length; i += 3) {
        const pos = misses[i]!;
        const len = misses[i + 2]!;
        reads.push(e.backing.pread(pos === 0 && len === buf.length ? buf : buf.subarray(pos, pos + len), misses[i + 1]!));
      }
      await Promise.all(reads);
    }
    this.fillMisses(buf, misses, generation);
  }

  /** Keep the misses' whole pages in the cache, unless the export changed while they were read (stale data). */
  private fillMisses(buf: Buffer, misses: readonly number[], generation: number): void {
    if (this.e.generation !== generation || buf.length > CACHE_FILL_MAX) return;
    for (let i = 0; i < misses.length; i += 3) this.fillCache(buf, misses[i]!, misses[i + 2]!, misses[i + 1]!);
  }

  /**
   * pread with a callback (see BlockDevice.preadCb): what the region and the cache hold, and one backing read
   * for the rest when it is one run or dense enough for readSpan, without a promise; sparse runs as pread.
   */
  preadCb(buf: Buffer, offset: number, done: (err: Error | null) => void): void {
    const e = this.e;
    const backingCb = e.backing.preadCb;
    if (backingCb === undefined) {
      this.pread(buf, offset).then(() => done(null), done);
      return;
    }
    const misses: number[] = [];
    this.takeAtHand(buf, offset, misses);
    if (misses.length === 0) return done(null);
    const generation = e.generation;
    const finish = (err: Error | null): void => {
      if (err === null) this.fillMisses(buf, misses, generation);
      done(err);
    };
    if (misses.length === 3) {
      const pos = misses[0]!;
      const len = misses[2]!;
      backingCb.call(e.backing, pos === 0 && len === buf.length ? buf : buf.subarray(pos, pos + len), misses[1]!, finish);
    } else if (denseMisses(misses)) {
      this.readSpan(buf, misses, finish);
    } else {
      this.preadMisses(buf, misses).then(() => done(null), done);
    }
  }

  /**
   * The read without waiting (see BlockDevice.preadNow): region and read cache first, the rest from the
   * backing file if it can read it at once. Nothing can change the export while this runs, so the cache
   * fills need no generation check.
   */
  preadNow(buf: Buffer, offset: number): boolean {
    const backing = this.e.backing;
    if (backing.preadNow === undefined) return false;
    const misses = this.nowMisses; // synchronous, so one array serves every call
    misses.length = 0;
    this.takeAtHand(buf, offset, misses);
    const fill = buf.length <= CACHE_FILL_MAX;
    for (let i = 0; i < misses.length; i += 3) {
      const pos = misses[i]!;
      const off = misses[i + 1]!;
      const len = misses[i + 2]!;
      if (!backing.preadNow(pos === 0 && len === buf.length ? buf : buf.subarray(pos, pos + len), off)) return false;
      if (fill) this.fillCache(buf, pos, len, off);
    }
    return true;
  }

  /**
   * Copy into buf what the region (and, for a short read, the read cache) holds of [offset, offset+buf.length),
   * and append the rest to misses as runs: flat triples (position in buf, export offset, length), adjacent
   * misses merged.
   */
  private takeAtHand(buf: Buffer, offset: number, misses: number[]): void {
    if (buf.length > CACHE_FILL_MAX) {
      this.takeDirty(buf, offset, misses);
      return;
    }
    const s = this.store;
    const r = s.region;
    const e = this.e;
    let pos = 0;
    while (pos < buf.length) {
      const off = offset + pos;
      const block = Math.floor(off / PAGE_SIZE);
      const inPage = off - block * PAGE_SIZE;
      const n = Math.min(PAGE_SIZE - inPage, buf.length - pos);
      const slot = e.index.get(block);
      if (slot !== undefined) {
        r.page(slot).copy(buf, pos, inPage, inPage + n);
      } else if (!s.cache.readInto(e.id, block, buf, pos, inPage, inPage + n)) {
        const k = misses.length;
        if (k !== 0 && misses[k - 3]! + misses[k - 1]! === pos) misses[k - 1]! += n;
        else misses.push(pos, off, n);
      }
      pos += n;
    }
  }

  /**
   * takeAtHand for a long read, which the read cache does not keep: only the dirty pages come from the
   * region, everything else is read from the backing file in as few runs as possible. A clean page holds
   * what the backing file holds (it became clean when its writeback's pwrite returned), and after random
   * writes one sits every few blocks: taking those split the read, or cost a copy aside and back around one
   * long read (readSpan), and looking every block up in the index cost a cache miss each. The dirty bitmap
   * finds the dirty blocks a word at a time. A page being dropped by a TRIM/WRITE_ZEROES is out of the index
   * and the bitmap already, as for a short read.
   */
  private takeDirty(buf: Buffer, offset: number, misses: number[]): void {
    const e = this.e;
    const r = this.store.region;
    const len = buf.length;
    const last = Math.floor((offset + len - 1) / PAGE_SIZE);
    let from = 0; // start of the current miss run in buf
    for (let b = e.dirty.nextSet(Math.floor(offset / PAGE_SIZE)); b >= 0 && b <= last; b = e.dirty.nextSet(b + 1)) {
      const slot = e.index.get(b);
      if (slot === undefined) continue; // not resident after all: read it from the file with its neighbours
      const start = Math.max(b * PAGE_SIZE - offset, 0);
      const end = Math.min((b + 1) * PAGE_SIZE - offset, len);
      if (start > from) misses.push(from, offset + from, start - from);
      const inPage = offset + start - b * PAGE_SIZE;
      r.page(slot).copy(buf, start, inPage, inPage + (end - start));
      from = end;
    }
    if (from < len) misses.push(from, offset + from, len - from);
  }

  /**
   * Several runs of misses (with pages taken from the region or the cache in between: for a long read, the
   * dirty pages of a region that holds part of the export) are read from the backing file in one read of
   * their whole span, not one read each: every async read is a thread-pool hand-off, and a 1 MiB read beside
   * a busy region split into dozens. The bytes between the runs, already taken from the region or the cache
   * when the read began, are kept aside and put back over what the backing file returned for them (possibly
   * an older version).
   */
  private readSpan(buf: Buffer, misses: readonly number[], done: (err: Error | null) => void): void {
    const start = misses[0]!;
    const k = misses.length;
    const end = misses[k - 3]! + misses[k - 1]!;
    const gaps = end - start - missBytes(misses);
    const kept = this.store.scratch.take(gaps);
    let at = 0;
    for (let i = 3; i < k; i += 3) at += buf.copy(kept, at, misses[i - 3]! + misses[i - 1]!, misses[i]!);
    const after = (err: Error | null): void => {
      if (err === null) {
        at = 0;
        for (let i = 3; i < k; i += 3) {
          const from = misses[i - 3]! + misses[i - 1]!;
          at += kept.copy(buf, from, at, at + (misses[i]! - from));
        }
      }
      this.store.scratch.give(kept);
      done(err);
    };
    preadThen(this.e.backing, buf.subarray(start, end), misses[1]!, after);
  }

  /** Put the whole, non-resident pages of buf[pos, pos+len) (the bytes at off) in the read cache. */
  private fillCache(buf: Buffer, pos: number, len: number, off: number): void {
    const s = this.store;
    if (s.cache.maxBytes === 0) return;
    const end = off + len;
    for (let b = Math.ceil(off / PAGE_SIZE); (b + 1) * PAGE_SIZE <= end; b++) {
      if (this.e.index.has(b)) continue;
      s.cache.insert(this.e.id, b, buf, pos + (b * PAGE_SIZE - off));
    }
  }

  async cache(offset: number, length: number): Promise<void> {
    const n = Math.min(length, CACHE_PREFETCH_MAX);
    const scratch = Buffer.allocUnsafe(Math.min(n, 1 << 20));
    for (let pos = 0; pos < n; pos += scratch.length) {
      await this.pread(scratch.subarray(0, Math.min(scratch.length, n - pos)), offset + pos);
    }
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    return this.withResident(await this.e.backing.extents(offset, length), offset, length);
  }

  extentsNow(offset: number, length: number): Extent[] | null {
    const backing = this.e.backing.extentsNow?.(offset, length);
    return backing == null ? null : this.withResident(backing, offset, length);
  }

  /** The backing file's extents of [offset, offset+length) with the region's resident blocks as data. */
  private withResident(backing: Extent[], offset: number, length: number): Extent[] {
    // Resident blocks only turn holes into data: with none (the common case of a written export) there is
    // nothing to look up.
    if (allData(backing)) return backing;
    const first = Math.floor(offset / PAGE_SIZE);
    const last = Math.floor((offset + length - 1) / PAGE_SIZE);
    const index = this.e.index;
    const resident: number[] = [];
    if (last - first + 1 <= index.size) {
      // Small range (every READ asks, to send holes): look its blocks up.
      for (let b = first; b <= last; b++) if (index.has(b)) resident.push(b);
    } else {
      for (const b of index.keys()) if (b >= first && b <= last) resident.push(b);
      resident.sort((a, b) => a - b);
    }
    if (resident.length === 0) return backing;
    return overlayData(backing, offset, resident);
  }

  // ---------------------------------------------------------------------------------------------------------
  // Trim, zero, flush

  async trim(offset: number, length: number, flags: WriteFlags = {}): Promise<void> {
    // Partial pages are left alone, as the backing file does: a trim is advisory.
    await this.dropWholePages(offset, length, () => this.e.backing.trim(offset, length));
    if (flags.fua) await this.makeDurable();
  }

  async zero(offset: number, length: number, flags: ZeroFlags = {}): Promise<void> {
    // Refuse before touching anything: dropping pages first would lose their data.
    if (flags.fastZero && !flags.mayTrim) throw new NotSupportedError('zeroing without deallocation is not fast');
    const end = offset + length;
    const firstWhole = Math.ceil(offset / PAGE_SIZE) * PAGE_SIZE;
    const endWhole = end >= this.size ? end : Math.floor(end / PAGE_SIZE) * PAGE_SIZE;
    if (endWhole <= firstWhole) {
      await this.writeZeros(offset, length);
    } else {
      await this.writeZeros(offset, firstWhole - offset);
      await this.writeZeros(endWhole, end - endWhole);
      const f: ZeroFlags = { mayTrim: flags.mayTrim ?? false };
      await this.dropWholePages(firstWhole, endWhole - firstWhole, () => this.e.backing.zero(firstWhole, endWhole - firstWhole, f));
    }
    if (flags.fua) await this.makeDurable();
  }

  private async writeZeros(offset: number, length: number): Promise<void> {
    for (let pos = 0; pos < length; pos += PAGE_SIZE) {
      const n = Math.min(PAGE_SIZE, length - pos);
      await this.pwrite(this.zeroPage.subarray(0, n), offset + pos);
    }
  }

  /**
   * Take the resident pages of the whole blocks in [offset, offset+length) out of the region around
   * backingOp: detach them (no longer served or written back), wait for in-flight writebacks of them,
   * run backingOp, then release them. A crash before the release recovers their data, which is right
   * for an operation that was never acknowledged.
   */
  private async dropWholePages(offset: number, length: number, backingOp: () => Promise<void>): Promise<void> {
    this.dropping++;
    try {
      await this.dropWholePagesNow(offset, length, backingOp);
    } finally {
      this.dropping--;
    }
  }

  private async dropWholePagesNow(offset: number, length: number, backingOp: () => Promise<void>): Promise<void> {
    const e = this.e;
    const s = this.store;
    const first = Math.ceil(offset / PAGE_SIZE);
    const end = offset + length;
    const last = (end >= this.size ? Math.ceil(this.size / PAGE_SIZE) : Math.floor(end / PAGE_SIZE)) - 1;
    if (last >= first) {
      // Queued read-modify-writes on these blocks finish first.
      const waits: Array<Promise<void>> = [];
      for (const [b, p] of this.pending) if (b >= first && b <= last) waits.push(p);
      await Promise.all(waits);
    }
    const dropped: number[] = [];
    if (last >= first) {
      const take = (b: number, slot: number): void => {
        e.index.delete(b);
        s.detach(slot);
        dropped.push(slot);
      };
      if (last - first + 1 > e.index.size) {
        for (const [b, slot] of [...e.index]) if (b >= first && b <= last) take(b, slot);
      } else {
        for (let b = first; b <= last; b++) {
          const slot = e.index.get(b);
          if (slot !== undefined) take(b, slot);
        }
      }
      e.generation++;
      s.cache.invalidate(e.id, first, last);
      // Wait for every writeback of these blocks, not only of the dropped slots: a superseded version's
      // write may still be in flight and would otherwise land after the backing op.
      await s.waitBlocksIdle(e, first, last);
    }
    try {
      await backingOp();
    } finally {
      for (const slot of dropped) s.releaseDetached(slot);
      if (last >= first) {
        // A read that missed while backingOp ran read the old bytes from the backing file: make it drop
        // its cache fill (generation), and drop any fill it already made, or the old data would be served
        // from the cache after the TRIM/WRITE_ZEROES completed.
        e.generation++;
        s.cache.invalidate(e.id, first, last);
      }
    }
  }

  /** FLUSH: disk durability writes back and fdatasyncs; pmem durability only has to persist the region. */
  async flush(): Promise<void> {
    await this.makeDurable();
  }

  private async makeDurable(): Promise<void> {
    if (this.durability === 'pmem') {
      this.store.region.sync();
      if (this.bypassedSinceFlush) {
        this.bypassedSinceFlush = false; // a bypass from now on sets it again, for the next flush
        await this.e.backing.flush();
      }
    } else {
      await this.writeback.flushExport(this.e); // ends with a flush of the backing file
    }
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.settleTimer !== null) clearTimeout(this.settleTimer); // no effect once its sync is under way
    await this.writeback.flushExport(this.e);
  }
}

/** TypedArray#set, held once: see copyInto. */
const setBytes = Uint8Array.prototype.set;

/**
 * dst[at, at+n) = src[pos, pos+n). The common case (a request payload that is exactly one page) uses
 * TypedArray#set, a plain memcpy; Buffer#copy validates and dispatches per call, which showed in profiles.
 * It is called through the function itself: looked up on dst, the optimized write path compiled the
 * lookup as a generic inline-cache call on every write (the largest runtime builtin in its profile).
 */
function copyInto(dst: Buffer, at: number, src: Buffer, pos: number, n: number): void {
  if (pos === 0 && n === src.length) setBytes.call(dst, src, at);
  else src.copy(dst, at, pos, pos + n);
}

/** Bytes in miss runs (flat triples: position, offset, length). */
function missBytes(misses: readonly number[]): number {
  let bytes = 0;
  for (let i = 2; i < misses.length; i += 3) bytes += misses[i]!;
  return bytes;
}

/** The misses make up at least half their span: reading the span at once reads at most as much again. */
function denseMisses(misses: readonly number[]): boolean {
  const k = misses.length;
  return 2 * missBytes(misses) >= misses[k - 3]! + misses[k - 1]! - misses[0]!;
}

/** Whether every extent is plain data (no hole, no zero flag). */
function allData(extents: readonly Extent[]): boolean {
  for (const x of extents) if (x.flags !== 0) return false;
  return true;
}

/** Mark the (sorted) resident blocks as data within backing extents that start at offset. */
function overlayData(backing: Extent[], offset: number, resident: number[]): Extent[] {
  const out: Extent[] = [];
  const push = (length: number, flags: number): void => {
    if (length <= 0) return;
    const prev = out[out.length - 1];
    if (prev && prev.flags === flags) prev.length += length;
    else out.push({ length, flags });
  };
  let pos = offset;
  let i = 0;
  for (const ext of backing) {
    const end = pos + ext.length;
    if (ext.flags === 0) {
      push(ext.length, 0);
    } else {
      let cur = pos;
      while (i < resident.length && resident[i]! * PAGE_SIZE < end) {
        const bStart = Math.max(resident[i]! * PAGE_SIZE, cur);
        const bEnd = Math.min((resident[i]! + 1) * PAGE_SIZE, end);
        if (bEnd > cur) {
          push(bStart - cur, ext.flags);
          push(bEnd - bStart, 0);
          cur = bEnd;
        }
        if ((resident[i]! + 1) * PAGE_SIZE <= end) i++;
        else break;
      }
      push(end - cur, ext.flags);
    }
    while (i < resident.length && (resident[i]! + 1) * PAGE_SIZE <= end) i++;
    pos = end;
  }
  return out;
}

export { overlayData };
