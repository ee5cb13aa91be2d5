// The node's page store over the pmem region: which (export, block) lives in which slot, slot allocation
// with eviction of clean pages, backpressure when every page is dirty, and the counters the metrics read.
// One store per node, shared by its exports (pmem-layer.ts) and the writeback worker (writeback.ts).

import type { BlockDevice } from './block-device';
import { PAGE_SIZE, PmemRegion, SLOT_CLEAN, SLOT_DIRTY, SLOT_FREE } from './pmem-region';
import type { ReadCache } from './read-cache';

export interface StoreExport {
  readonly id: number;
  readonly name: string;
  readonly backing: BlockDevice;
  /** block → slot of every block resident in the region. */
  readonly index: Map<number, number>;
  /** Bumped on every change of the export's contents; a cache fill that saw it move is dropped. */
  generation: number;
}

export interface StoreStats {
  capacityPages: number;
  freePages: number;
  dirtyPages: number;
  cleanPages: number;
  backpressureWaits: number;
  oldestDirtyMs: number | null;
}

export class PmemStore {
  readonly exports: StoreExport[] = [];
  dirtyCount = 0;
  backpressureWaits = 0;
  /** Clean slots in the order they became clean: eviction takes the oldest unpinned one. */
  private readonly cleanQueue = new CleanQueue();
  private slotWaiters: Array<{ resolve: () => void; reject: (err: unknown) => void }> = [];
  private unpinWaiters = new Map<number, Array<() => void>>();
  /** Slots to release once their writeback finishes (superseded or invalidated while pinned). */
  private readonly releaseOnUnpin: Uint8Array;
  /** Slots out of service (superseded or invalidated) whose entry is not yet cleared. */
  private readonly detached: Uint8Array;
  /**
   * Writebacks in flight per (export, block), whatever version of the block they write (key: blockKey).
   * A superseded version keeps its pin until its backing write finishes; without this count a newer version
   * of the same block could be written (and a TRIM of it done) meanwhile, and the older write land last.
   */
  private readonly writing = new Map<number, number>();
  /** The writing key of each pinned slot, kept from pin() so unpin() never depends on the slot's entry. */
  private readonly pinKey: Float64Array;
  private writingIdleWaiters: Array<() => void> = [];
  /** Called when writes are waiting for slots or dirty pages pile up: the writeback worker's kick. */
  onPressure: () => void = () => undefined;
  /** Dirty page count at which installDirty kicks writeback (its high watermark). */
  kickAt = Infinity;
  private kickQueued = false;

  constructor(
    readonly region: PmemRegion,
    readonly cache: ReadCache,
  ) {
    this.releaseOnUnpin = new Uint8Array(region.pageCount);
    this.detached = new Uint8Array(region.pageCount);
    this.pinKey = new Float64Array(region.pageCount);
  }

  addExport(name: string, backing: BlockDevice): StoreExport {
    const e: StoreExport = { id: this.region.exportId(name), name, backing, index: new Map(), generation: 0 };
    this.exports[e.id] = e;
    return e;
  }

  get waitingForSlots(): number {
    return this.slotWaiters.length;
  }

  /**
 * A slot for new data: free, else the oldest clean unpinned page, else -1. An evicted page is not copied into
 * the read cache: under streaming writes that copy (a 4 KiB allocation per page) cost more than it saved.
 */
  tryTakeSlot(): number {
    const r = this.region;
    const free = r.takeFree();
    if (free >= 0) return free;
    // Each clean page is looked at once at most; pinned ones go back to the end of the queue.
    for (let tries = this.cleanQueue.size; tries > 0; tries--) {
      const slot = this.cleanQueue.shift();
      if (slot < 0) break;
      if (r.slotPins[slot] !== 0) {
        this.cleanQueue.add(slot);
        continue;
      }
      const e = this.exports[r.slotExport[slot]!]!;
      const block = r.slotBlock[slot]!;
      e.index.delete(block);
      // Not pushed to the free list: the caller fills and commits it at once.
      r.clearEntry(slot);
      return slot;
    }
    return -1;
  }

  /** A slot for new data, waiting for writeback when the region is full of dirty pages (backpressure). */
  async takeSlot(): Promise<number> {
    for (;;) {
      const slot = this.tryTakeSlot();
      if (slot >= 0) return slot;
      this.backpressureWaits++;
      await new Promise<void>((resolve, reject) => {
        this.slotWaiters.push({ resolve, reject });
        this.onPressure();
      });
    }
  }

  /** Return a slot taken with takeSlot but not used. */
  giveBack(slot: number): void {
    this.region.release(slot);
    this.notifySlots();
  }

  /** Wake writers waiting for slots (called when pages become clean or free). */
  notifySlots(): void {
    const w = this.slotWaiters;
    if (w.length === 0) return;
    this.slotWaiters = [];
    for (const f of w) f.resolve();
  }

  /** Writeback is failing (e.g. the backing disk is full): writers waiting for a page get the error. */
  failSlotWaiters(err: unknown): void {
    const w = this.slotWaiters;
    this.slotWaiters = [];
    for (const f of w) f.reject(err);
  }

  /** Slot holds new dirty data for (e, block): make it the block's page and retire the old one. */
  installDirty(e: StoreExport, block: number, slot: number): void {
    const r = this.region;
    r.commit(slot, e.id, block);
    const old = e.index.get(block);
    e.index.set(block, slot);
    if (r.slotState[slot] !== SLOT_DIRTY) {
      if (r.slotState[slot] === SLOT_CLEAN) this.cleanQueue.delete(slot);
      r.slotState[slot] = SLOT_DIRTY;
      r.slotDirtySince[slot] = Date.now();
      if (++this.dirtyCount >= this.kickAt && !this.kickQueued) {
        // Deferred: the writer finishes its own bookkeeping before a writeback pass can look at the slots.
        this.kickQueued = true;
        setImmediate(() => {
          this.kickQueued = false;
          this.onPressure();
        });
      }
    }
    if (old !== undefined && old !== slot) this.retire(old);
    e.generation++;
  }

  /** Drop a slot that no longer holds the current version of its block (its replacement is committed). */
  retire(slot: number): void {
    this.detach(slot);
    this.releaseDetached(slot);
  }

  /**
   * Take a slot out of service (no longer dirty, clean or evictable) but keep its page table entry, so a
   * crash before releaseDetached still recovers its data. The caller has removed it from the index.
   */
  detach(slot: number): void {
    const r = this.region;
    if (r.slotState[slot] === SLOT_DIRTY) this.dirtyCount--;
    else if (r.slotState[slot] === SLOT_CLEAN) this.cleanQueue.delete(slot);
    r.slotState[slot] = SLOT_FREE;
    this.detached[slot] = 1;
  }

  /** Release a detached slot: clear its entry and free it, or do so when its writeback finishes. */
  releaseDetached(slot: number): void {
    const r = this.region;
    if (r.slotPins[slot] !== 0) {
      // A writeback is reading it. Until it finishes the entry stays; recovery resolves duplicates by
      // sequence number (the newer page wins).
      this.releaseOnUnpin[slot] = 1;
      return;
    }
    this.detached[slot] = 0;
    r.release(slot);
    this.notifySlots();
  }

  pin(slot: number): void {
    const r = this.region;
    r.slotPins[slot]!++;
    const k = blockKey(r.slotExport[slot]!, r.slotBlock[slot]!);
    this.pinKey[slot] = k;
    this.writing.set(k, (this.writing.get(k) ?? 0) + 1);
  }

  /** Whether a writeback of any version of the block is in flight (a new one must wait for it). */
  isWriting(exportId: number, block: number): boolean {
    return this.writing.has(blockKey(exportId, block));
  }

  /** Resolves when no writeback of any version of blocks first..last of e is in flight. */
  async waitBlocksIdle(e: StoreExport, first: number, last: number): Promise<void> {
    const lo = blockKey(e.id, first);
    const hi = blockKey(e.id, last);
    const busy = (): boolean => {
      for (const k of this.writing.keys()) if (k >= lo && k <= hi) return true;
      return false;
    };
    while (busy()) await new Promise<void>((resolve) => this.writingIdleWaiters.push(resolve));
  }

  /** Writeback of slot finished; if it still holds seq, the page is now clean. */
  unpin(slot: number, writtenSeq: number | null): void {
    const r = this.region;
    r.slotPins[slot]!--;
    const k = this.pinKey[slot]!;
    const writers = (this.writing.get(k) ?? 1) - 1;
    if (writers > 0) this.writing.set(k, writers);
    else this.writing.delete(k);
    if (r.slotPins[slot] === 0) {
      if (this.releaseOnUnpin[slot]) {
        this.releaseOnUnpin[slot] = 0;
        this.detached[slot] = 0;
        r.release(slot);
      } else if (writtenSeq !== null && !this.detached[slot] && r.slotState[slot] === SLOT_DIRTY && r.slotSeq[slot] === writtenSeq) {
        r.slotState[slot] = SLOT_CLEAN;
        this.dirtyCount--;
        this.cleanQueue.add(slot);
      }
      const waiters = this.unpinWaiters.get(slot);
      if (waiters) {
        this.unpinWaiters.delete(slot);
        for (const f of waiters) f();
      }
    }
    if (writers === 0 && this.writingIdleWaiters.length > 0) {
      const w = this.writingIdleWaiters;
      this.writingIdleWaiters = [];
      for (const f of w) f();
    }
    this.notifySlots();
  }

  /** Resolves when no writeback holds slot. */
  async waitUnpinned(slot: number): Promise<void> {
    while (this.region.slotPins[slot] !== 0) {
      await new Promise<void>((resolve) => {
        const list = this.unpinWaiters.get(slot) ?? [];
        list.push(resolve);
        this.unpinWaiters.set(slot, list);
      });
    }
  }

  stats(now = Date.now()): StoreStats {
    const r = this.region;
    let oldest = Infinity;
    if (this.dirtyCount > 0) {
      for (let s = 0; s < r.pageCount; s++) if (r.slotState[s] === SLOT_DIRTY && r.slotDirtySince[s]! < oldest) oldest = r.slotDirtySince[s]!;
    }
    return {
      capacityPages: r.pageCount,
      freePages: r.freeCount,
      dirtyPages: this.dirtyCount,
      cleanPages: this.cleanQueue.size,
      backpressureWaits: this.backpressureWaits,
      oldestDirtyMs: oldest === Infinity ? null : now - oldest,
    };
  }
}

/** One number per (export, block), as the read cache keys them: ids below 2^13 and blocks below 2^40 stay exact. */
function blockKey(exportId: number, block: number): number {
  return exportId * 2 ** 40 + block;
}

export { PAGE_SIZE, SLOT_CLEAN, SLOT_DIRTY, SLOT_FREE };

/**
 * Clean slots in the order they became clean. A Set would do, but V8's ordered hash tables keep deleted
 * entries as holes until they rehash, so taking the oldest entry again and again scans a growing run of
 * holes. This is a FIFO of slot numbers with lazy deletion: membership lives in a flag per slot.
 */
class CleanQueue {
  private fifo: number[] = [];
  private head = 0;
  private readonly member = new Map<number, true>();

  get size(): number {
    return this.member.size;
  }

  add(slot: number): void {
    if (this.member.has(slot)) return;
    this.member.set(slot, true);
    this.fifo.push(slot);
  }

  delete(slot: number): void {
    this.member.delete(slot);
  }

  /** The oldest member, removed; -1 when empty. */
  shift(): number {
    while (this.head < this.fifo.length) {
      const slot = this.fifo[this.head++]!;
      if (this.head > 4096 && this.head * 2 > this.fifo.length) {
        this.fifo = this.fifo.slice(this.head);
        this.head = 0;
      }
      if (this.member.delete(slot)) return slot;
    }
    return -1;
  }
}
