// The writeback worker: copies dirty region pages to the backing files in offset order, coalescing
// neighbouring blocks into large writes. It decides and keeps the books on the event loop; the backing writes
// themselves run in the writeback thread (writeback-io.ts) when there is one, else on the event loop. It runs between a high and a low watermark of dirty pages, when
// writers wait for free pages, when a page gets older than the age limit, and on demand for FLUSH/FUA.
// A page becomes clean (reusable) only after its backing write — and, in pmem durability, the backing
// fdatasync — completed.

import type { Logger } from '../log';
import type { DirectWrite } from './block-device';
import type { WritebackIo } from './writeback-io';
import { PAGE_SIZE, SLOT_DIRTY } from './pmem-region';
import type { PmemStore, StoreExport } from './pmem-store';

export interface WritebackOptions {
  /** Start writing back at this many dirty pages… */
  highPages: number;
  /** …and stop at this many. */
  lowPages: number;
  /** Write back any page dirty for longer than this (ms). */
  maxAgeMs: number;
  /** fdatasync the backing file before pages count as clean (the region is the only copy until then). */
  syncBeforeClean: boolean;
  /** The writeback thread; without it (or once it died) backing writes run on the event loop. */
  io?: WritebackIo;
}

/**
 * Pages written back per batch (one export, in block order). Backing writes are mostly synchronous, so a
 * batch is an event-loop stall: 256 pages keep it near a millisecond.
 */
const BATCH_PAGES = 256;
/** Runs this long or longer are written on the event loop, not in the writeback thread (see write()). */
const THREAD_MAX_RUN_PAGES = 32;
/** Longest coalesced backing write, in pages (1 MiB). */
const MAX_RUN_PAGES = 256;
/** Backing writes in flight at once per batch. */
const RUNS_IN_FLIGHT = 4;
/** Pause before retrying a failed writeback (ms): a full disk is not fixed in a microsecond. */
const RETRY_MS = 200;

/** Batches kept for reuse. */
const MAX_SPARE_BATCHES = 4;
/** Pages in one batch at most: a run that starts below BATCH_PAGES may still grow to MAX_RUN_PAGES. */
const MAX_BATCH_SLOTS = BATCH_PAGES + MAX_RUN_PAGES - 1;

/**
 * One export's pages picked for writeback, as runs of adjacent blocks, in flat arrays that are reused from
 * batch to batch. A batch lives until its backing writes are done, often across several scavenges while the
 * writeback thread (at low priority) has its turn: an object and two arrays per run, as it had been, were
 * promoted to V8's old generation and grew the heap by tens of MiB between major collections.
 */
class Batch {
  e!: StoreExport;
  runs = 0;
  /** Run r writes slots[first[r]] .. slots[first[r + 1] - 1] to blocks block[r] onwards. */
  readonly block = new Float64Array(BATCH_PAGES);
  readonly first = new Int32Array(BATCH_PAGES + 1);
  readonly slots = new Int32Array(MAX_BATCH_SLOTS);
  /** The sequence number of each slot when picked: it becomes clean only if it still holds that one. */
  readonly seqs = new Float64Array(MAX_BATCH_SLOTS);
  /** Per run: its write failed (the pages stay dirty). */
  readonly failed = new Uint8Array(BATCH_PAGES);
  /** Per run written by the writeback thread: the backing file's permission and bookkeeping for it. */
  readonly direct: Array<DirectWrite | null> = [];

  pages(r: number): number {
    return this.first[r + 1]! - this.first[r]!;
  }

  /** Bytes run r writes: its pages, the last one cut at the export's end. */
  length(r: number): number {
    return Math.min(this.pages(r) * PAGE_SIZE, this.e.backing.size - this.block[r]! * PAGE_SIZE);
  }

  offset(r: number): number {
    return this.block[r]! * PAGE_SIZE;
  }

  /** Run r's slots, a view into the batch (valid until the batch is reused, after its writes). */
  runSlots(r: number): Int32Array {
    return this.slots.subarray(this.first[r]!, this.first[r + 1]!);
  }
}

export class Writeback {
  bytesWritten = 0;
  private running = false;
  private draining = false;
  private stopped = false;
  private timer: NodeJS.Timeout;
  private idleWaiters: Array<() => void> = [];
  /** Woken whenever a batch of backing writes finishes. */
  private batchWaiters: Array<() => void> = [];
  /** Batches done with, for reuse (the background pass and FLUSHes may each have one in flight). */
  private readonly spareBatches: Batch[] = [];

  constructor(
    private readonly store: PmemStore,
    private readonly opts: WritebackOptions,
    private readonly log: Logger,
  ) {
    store.onPressure = () => this.kick();
    store.kickAt = Math.max(1, opts.highPages);
    this.timer = setInterval(() => this.kick(), Math.max(50, Math.min(1000, opts.maxAgeMs / 2)));
    this.timer.unref();
  }

  /** Start a background pass if there is reason to (watermark, waiting writers, old pages). */
  kick(): void {
    if (this.running || this.stopped) return;
    if (!this.needed()) return;
    this.running = true;
    void this.loop().finally(() => {
      this.running = false;
      const w = this.idleWaiters;
      this.idleWaiters = [];
      for (const f of w) f();
    });
  }

  private needed(): boolean {
    const s = this.store;
    if (s.dirtyCount >= this.opts.highPages) this.draining = true;
    if (s.dirtyCount <= this.opts.lowPages) this.draining = false;
    if (this.draining || s.waitingForSlots > 0) return s.dirtyCount > 0;
    const age = s.oldestDirtyMs();
    return age !== null && age >= this.opts.maxAgeMs;
  }

  private async loop(): Promise<void> {
    while (!this.stopped && this.needed()) {
      const batch = this.pick(null, Infinity);
      if (batch === null) {
        // Everything dirty is already being written; wait a moment for those writes.
        await new Promise((r) => setTimeout(r, 1));
        continue;
      }
      try {
        await this.write(batch);
        // Backing writes may have been synchronous: let the event loop serve requests between batches.
        await new Promise((r) => setImmediate(r));
      } catch (err) {
        // The pages stay dirty and are retried; a full disk must not lose region data. Writers stuck
        // waiting for a free page get the error instead of hanging until space is freed.
        this.log.error({ err }, 'writeback failed; retrying');
        this.store.failSlotWaiters(err);
        await new Promise((r) => setTimeout(r, RETRY_MS));
      }
    }
  }

  /**
   * Write back every page of export e that was committed with a sequence number ≤ maxSeq (all of them by
   * default), then fdatasync its backing file: what FLUSH and FUA need in disk durability.
   */
  async flushExport(e: StoreExport, maxSeq = Infinity): Promise<void> {
    for (;;) {
      const batch = this.pick(e, maxSeq);
      if (batch !== null) {
        await this.write(batch);
        continue;
      }
      if (!this.pinnedDirty(e, maxSeq)) break;
      // Some of them are being written by another pass: wait for a batch to finish and look again.
      await new Promise<void>((r) => this.batchWaiters.push(r));
    }
    await e.backing.flush();
  }

  private pinnedDirty(e: StoreExport, maxSeq: number): boolean {
    const r = this.store.region;
    for (let block = e.dirty.nextSet(0); block >= 0; block = e.dirty.nextSet(block + 1)) {
      const slot = e.index.get(block)!;
      // Pinned, or held back by pick() because an older version of its block is being written.
      if (r.slotSeq[slot]! <= maxSeq && (r.slotPins[slot] !== 0 || this.store.isWriting(e.id, block))) return true;
    }
    return false;
  }

  /** The export to write back next: the one holding the oldest dirty page that can be written now. */
  private chooseExport(): StoreExport | null {
    const s = this.store;
    const r = s.region;
    let only: StoreExport | null = null;
    let live = 0;
    for (const x of s.exports) {
      if (x === undefined || x.dirty.count === 0) continue;
      only = x;
      live++;
    }
    if (live <= 1) return only;
    for (const slot of s.oldestDirtySlots(1024)) {
      if (r.slotState[slot] === SLOT_DIRTY && r.slotPins[slot] === 0 && !s.isWriting(r.slotExport[slot]!, r.slotBlock[slot]!)) {
        return s.exports[r.slotExport[slot]!] ?? null;
      }
    }
    return only;
  }

  /**
   * Choose dirty unpinned pages of one export, pin them, and group them into runs of adjacent blocks. The
   * worker sweeps each export's dirty bitmap in offset order from where the last batch stopped (an elevator),
   * so pages dirtied in random order still coalesce and every page is reached within one sweep.
   */
  private pick(only: StoreExport | null, maxSeq: number): Batch | null {
    const s = this.store;
    const r = s.region;
    const e = only ?? this.chooseExport();
    if (e === null || e.dirty.count === 0) return null;
    const batch = this.spareBatches.pop() ?? new Batch();
    batch.e = e;
    batch.runs = 0;
    const { block: runBlock, first, slots, seqs } = batch;
    let runs = 0;
    let taken = 0;
    const start = e.wbCursor;
    let wrapped = false;
    let block = e.dirty.nextSet(start);
    for (;;) {
      if (block < 0) {
        if (wrapped || start === 0) break;
        wrapped = true;
        block = e.dirty.nextSet(0);
        continue;
      }
      if (wrapped && block >= start) break;
      const slot = e.index.get(block)!;
      // Not: pinned (being written), newer than the flush asks for, or an older version of the block still
      // being written (writing this one now could let the older write land last, leaving the backing file
      // stale under a page marked clean).
      if (r.slotPins[slot] === 0 && r.slotSeq[slot]! <= maxSeq && !s.isWriting(e.id, block)) {
        const extend = runs > 0 && runBlock[runs - 1]! + (taken - first[runs - 1]!) === block && taken - first[runs - 1]! < MAX_RUN_PAGES;
        if (!extend) {
          if (taken >= BATCH_PAGES) break;
          runBlock[runs] = block;
          first[runs] = taken;
          runs++;
        }
        slots[taken] = slot;
        seqs[taken] = r.slotSeq[slot]!;
        taken++;
        first[runs] = taken;
        s.pin(slot);
      }
      block = e.dirty.nextSet(block + 1);
    }
    e.wbCursor = block < 0 ? 0 : block;
    if (runs === 0) {
      if (this.spareBatches.length < MAX_SPARE_BATCHES) this.spareBatches.push(batch);
      return null;
    }
    batch.runs = runs;
    return batch;
  }

  /** Write a batch to its backing file (a few runs at a time); pages count as clean only when it is done. */
  private async write(batch: Batch): Promise<void> {
    const s = this.store;
    const e = batch.e;
    const runs = batch.runs;
    let failed: unknown = null;
    batch.failed.fill(0, 0, runs);
    const fail = (r: number, err: unknown): void => {
      failed ??= err;
      batch.failed[r] = 1;
    };
    // Runs the writeback thread can write with a plain pwrite go there; the rest are written here.
    const io = this.opts.io?.usable ? this.opts.io : null;
    const threaded: number[] = [];
    const local: number[] = [];
    for (let r = 0; r < runs; r++) {
      // Long runs are written here: one large write is cheap per page, and its pages are free sooner.
      const dw = io === null || batch.pages(r) >= THREAD_MAX_RUN_PAGES ? null : (e.backing.directWrite?.(batch.offset(r), batch.length(r)) ?? null);
      batch.direct[r] = dw;
      if (dw === null) local.push(r);
      else threaded.push(r);
    }
    const inThread =
      threaded.length === 0
        ? null
        : io!.write(threaded.map((r) => ({ fd: batch.direct[r]!.fd, offset: batch.offset(r), length: batch.length(r), slots: batch.runSlots(r) })), s.waitingForSlots > 0).then(
            (errors) => {
              errors.forEach((err, i) => {
                const r = threaded[i]!;
                if (err !== null) return fail(r, err);
                batch.direct[r]!.done();
                this.bytesWritten += batch.length(r);
              });
            },
            // The thread died: these pages stay dirty and are retried on the event loop.
            (err: unknown) => {
              for (const r of threaded) fail(r, err);
            },
          );
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < local.length) {
        const r = local[next++]!;
        const len = batch.length(r);
        const off = batch.offset(r);
        const slots = batch.runSlots(r);
        if (e.backing.pwriteNow !== undefined) {
          // Straight from the region pages, synchronously: nothing can reuse them during the call.
          const pages = Array.from(slots, (slot) => s.region.page(slot));
          // The export's last block may be short: only its first len % PAGE_SIZE bytes exist in the file.
          if (len < pages.length * PAGE_SIZE) pages[pages.length - 1] = pages[pages.length - 1]!.subarray(0, len % PAGE_SIZE);
          try {
            if (e.backing.pwriteNow(pages, off)) {
              this.bytesWritten += len;
              continue;
            }
          } catch (err) {
            fail(r, err);
            continue;
          }
        }
        // Copy out of the region so a page reused later cannot change what this write puts on disk.
        const buf = Buffer.allocUnsafe(slots.length * PAGE_SIZE);
        slots.forEach((slot, i) => s.region.page(slot).copy(buf, i * PAGE_SIZE));
        try {
          await e.backing.pwrite(buf.subarray(0, len), off);
          this.bytesWritten += len;
        } catch (err) {
          fail(r, err);
        }
      }
    };
    await Promise.all([inThread, ...Array.from({ length: Math.min(RUNS_IN_FLIGHT, local.length) }, worker)]);
    if (failed === null && this.opts.syncBeforeClean) {
      try {
        await e.backing.flush();
      } catch (err) {
        failed = err;
        batch.failed.fill(1, 0, runs);
      }
    }
    const { first, slots, seqs } = batch;
    for (let r = 0; r < runs; r++) {
      const ok = batch.failed[r] === 0;
      for (let i = first[r]!; i < first[r + 1]!; i++) s.unpin(slots[i]!, ok ? seqs[i]! : null);
    }
    batch.direct.fill(null);
    if (this.spareBatches.length < MAX_SPARE_BATCHES) this.spareBatches.push(batch);
    const w = this.batchWaiters;
    this.batchWaiters = [];
    for (const f of w) f();
    if (failed !== null) throw failed;
  }

  /** Stop the background pass (after this, only flushExport writes). */
  async stop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.timer);
    if (this.running) await new Promise<void>((r) => this.idleWaiters.push(r));
  }
}
