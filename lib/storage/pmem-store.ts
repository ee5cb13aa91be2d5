// The node's page store over the pmem region: which (export, block) lives in which slot, slot allocation
// with eviction of clean pages, backpressure when every page is dirty, and the counters the metrics read.
// One store per node, shared by its exports (pmem-layer.ts) and the writeback worker (writeback.ts).

import { BlockBitmap } from './block-bitmap';
import { BufferPool } from './buffer-pool';
import { BlockIndex } from './block-index';
import { SlotFifo } from './slot-fifo';
import type { BlockDevice } from './block-device';
import { PAGE_SIZE, PmemRegion, SLOT_CLEAN, SLOT_DIRTY, SLOT_FREE } from './pmem-region';
import type { ReadCache } from './read-cache';

/**
 * Free scratch kept for long reads next to resident pages (one buffer per read in flight). A fresh buffer per
 * 1 MiB read was external memory that only major collections reclaim: concurrent marking took 12% of the CPU
 * samples at 1 MiB reads after random writes.
 */
const SCRATCH_POOL_BYTES = 8 * 1024 * 1024;

export interface StoreExport {
  readonly id: number;
  readonly name: string;
  readonly backing: BlockDevice;
  /** block → slot of every block resident in the region. */
  readonly index: BlockIndex;
  /** Blocks whose resident page is dirty (exact: set ⇔ index → a SLOT_DIRTY slot). */
  readonly dirty: BlockBitmap;
  /**
   * Blocks with a writeback in flight, whatever version of the block it writes. A superseded version keeps
   * its pin until its backing write finishes; without this a newer version of the same block could be
   * written (and a TRIM of it done) meanwhile, and the older write land last.
   */
  readonly writing: BlockBitmap;
  /** Where the writeback worker's next sweep over `dirty` starts (it goes round in offset order). */
  wbCursor: number;
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
  /** Bytes written straight to backing files, past the region (PmemLayer bypass). */
  bypassBytes = 0;
  /** Scratch buffers for long reads of every export (PmemLayer.readSpan), at most SCRATCH_POOL_BYTES kept free. */
  readonly scratch = new BufferPool(SCRATCH_POOL_BYTES);
  readonly exports: StoreExport[] = [];
  dirtyCount = 0;
  backpressureWaits = 0;
  /** Clean slots in the order they became clean: eviction takes the oldest unpinned one. */
  private readonly cleanQueue: CleanQueue;
  /** Slots in the order they became dirty: its head is the oldest dirty page (writeback age, stats). */
  private readonly dirtyQueue: SlotFifo;
  private slotWaiters: Array<{ resolve: () => void; reject: (err: unknown) => void }> = [];
  private unpinWaiters = new Map<number, Array<() => void>>();
  /** Slots to release once their writeback finishes (superseded or invalidated while pinned). */
  private readonly releaseOnUnpin: Uint8Array;
  /** Slots out of service (superseded or invalidated) whose entry is not yet cleared. */
  private readonly detached: Uint8Array;
  /** Second and later writebacks in flight of one block (key: blockKey): rare, the worker avoids them. */
  private readonly writingExtra = new Map<number, number>();
  /** The block of each pinned slot, kept from pin() so unpin() never depends on the slot's entry. */
  private readonly pinExport: Int32Array;
  private readonly pinBlock: Float64Array;
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
    this.cleanQueue = new CleanQueue(region.pageCount);
    this.dirtyQueue = new SlotFifo((slot, seq) => region.slotState[slot] === SLOT_DIRTY && region.slotSeq[slot] === seq);
    this.releaseOnUnpin = new Uint8Array(region.pageCount);
    this.detached = new Uint8Array(region.pageCount);
    this.pinExport = new Int32Array(region.pageCount);
    this.pinBlock = new Float64Array(region.pageCount);
  }

  addExport(name: string, backing: BlockDevice): StoreExport {
    const e: StoreExport = {
      id: this.region.exportId(name),
      name,
      backing,
      index: new BlockIndex(),
      dirty: new BlockBitmap(Math.ceil(backing.size / PAGE_SIZE)),
      writing: new BlockBitmap(Math.ceil(backing.size / PAGE_SIZE)),
      wbCursor: 0,
      generation: 0,
    };
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
      this.dirtyQueue.push(slot, r.slotSeq[slot]!);
      if (++this.dirtyCount >= this.kickAt && !this.kickQueued) {
        // Deferred: the writer finishes its own bookkeeping before a writeback pass can look at the slots.
        this.kickQueued = true;
        setImmediate(() => {
          this.kickQueued = false;
          this.onPressure();
        });
      }
    }
    e.dirty.set(block);
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
    if (r.slotState[slot] === SLOT_DIRTY) {
      this.dirtyCount--;
      // Still dirty only if the block's current page (a replacement) is.
      const e = this.exports[r.slotExport[slot]!]!;
      const block = r.slotBlock[slot]!;
      const cur = e.index.get(block);
      if (cur === undefined || cur === slot || r.slotState[cur] !== SLOT_DIRTY) e.dirty.clear(block);
    } else if (r.slotState[slot] === SLOT_CLEAN) this.cleanQueue.delete(slot);
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
    const e = this.exports[r.slotExport[slot]!]!;
    const block = r.slotBlock[slot]!;
    if (!e.writing.set(block)) {
      const k = blockKey(e.id, block);
      this.writingExtra.set(k, (this.writingExtra.get(k) ?? 0) + 1);
    }
    this.pinExport[slot] = e.id;
    this.pinBlock[slot] = block;
  }

  /** Whether a writeback of any version of the block is in flight (a new one must wait for it). */
  isWriting(exportId: number, block: number): boolean {
    return this.exports[exportId]!.writing.get(block);
  }

  /** Resolves when no writeback of any version of blocks first..last of e is in flight. */
  async waitBlocksIdle(e: StoreExport, first: number, last: number): Promise<void> {
    const busy = (): boolean => {
      const b = e.writing.nextSet(first);
      return b >= 0 && b <= last;
    };
    while (busy()) await new Promise<void>((resolve) => this.writingIdleWaiters.push(resolve));
  }

  /** Writeback of slot finished; if it still holds seq, the page is now clean. */
  unpin(slot: number, writtenSeq: number | null): void {
    const r = this.region;
    r.slotPins[slot]!--;
    // The block recorded at pin(): the slot's entry may have been cleared since.
    const e = this.exports[this.pinExport[slot]!]!;
    const block = this.pinBlock[slot]!;
    const k = blockKey(e.id, block);
    const extra = this.writingExtra.size === 0 ? 0 : (this.writingExtra.get(k) ?? 0);
    let writers = 0;
    if (extra > 0) {
      writers = extra;
      if (extra > 1) this.writingExtra.set(k, extra - 1);
      else this.writingExtra.delete(k);
    } else {
      e.writing.clear(block);
    }
    if (r.slotPins[slot] === 0) {
      if (this.releaseOnUnpin[slot]) {
        this.releaseOnUnpin[slot] = 0;
        this.detached[slot] = 0;
        r.release(slot);
      } else if (writtenSeq !== null) {
        this.settle(slot, writtenSeq);
      }
      const waiters = this.unpinWaiters.size === 0 ? undefined : this.unpinWaiters.get(slot);
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

  /**
   * The backing file holds (durably, where that is asked for) what slot held at sequence number seq: if the
   * slot still holds that version of its block and no writeback has it, the page is clean from now on.
   */
  settle(slot: number, seq: number): void {
    const r = this.region;
    if (r.slotPins[slot] !== 0 || this.detached[slot] || r.slotState[slot] !== SLOT_DIRTY || r.slotSeq[slot] !== seq) return;
    r.slotState[slot] = SLOT_CLEAN;
    this.dirtyCount--;
    this.cleanQueue.add(slot);
    // A dirty slot that is not detached is its block's current page.
    this.exports[r.slotExport[slot]!]!.dirty.clear(r.slotBlock[slot]!);
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

  /** The oldest dirty slot, or -1 when nothing is dirty. */
  oldestDirtySlot(): number {
    return this.dirtyQueue.first();
  }

  /**
   * Up to limit dirty slots from the oldest on (some may have stopped being dirty since: check the state);
   * the writeback worker looks here for the export whose turn it is.
   */
  oldestDirtySlots(limit: number): number[] {
    this.oldestDirtySlot(); // drops stale entries at the head
    return this.dirtyQueue.peek(limit);
  }

  /** Age in ms of the oldest dirty page, or null. */
  oldestDirtyMs(now = Date.now()): number | null {
    const slot = this.oldestDirtySlot();
    return slot < 0 ? null : now - this.region.slotDirtySince[slot]!;
  }

  stats(now = Date.now()): StoreStats {
    const r = this.region;
    const slot = this.oldestDirtySlot();
    const oldest = slot < 0 ? Infinity : r.slotDirtySince[slot]!;
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

/**
 * Clean slots in the order they became clean: a FIFO with lazy deletion. Each add stamps the slot with a new
 * ticket; a queue entry counts only while its ticket is the slot's current one, so a slot deleted and added
 * again is taken at its new place, not its old one.
 */
class CleanQueue {
  private readonly fifo: SlotFifo;
  private n = 0;
  private nextTicket = 1;
  /** The ticket of each member slot; 0 = not a member. */
  private readonly member: Float64Array;

  constructor(slots: number) {
    const member = new Float64Array(slots);
    this.member = member;
    this.fifo = new SlotFifo((slot, ticket) => member[slot] === ticket);
  }

  get size(): number {
    return this.n;
  }

  add(slot: number): void {
    if (this.member[slot] !== 0) return;
    const ticket = this.nextTicket++;
    this.member[slot] = ticket;
    this.n++;
    this.fifo.push(slot, ticket);
  }

  delete(slot: number): void {
    if (this.member[slot] === 0) return;
    this.member[slot] = 0;
    this.n--;
  }

  /** The oldest member, removed; -1 when empty. */
  shift(): number {
    const slot = this.fifo.shift();
    if (slot >= 0) {
      this.member[slot] = 0;
      this.n--;
    }
    return slot;
  }
}
