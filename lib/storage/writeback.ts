// The writeback worker: copies dirty region pages to the backing files in offset order, coalescing
// neighbouring blocks into large writes. It decides and keeps the books on the event loop; the backing writes
// themselves run in the writeback thread (writeback-io.ts) when there is one, else on the event loop. It runs between a high and a low watermark of dirty pages, when
// writers wait for free pages, when a page gets older than the age limit, and on demand for FLUSH/FUA.
// A page becomes clean (reusable) only after its backing write — and, in pmem durability, the backing
// fdatasync — completed.

import type { Logger } from '../log';
import type { DirectWrite } from './block-device';
import type { WritebackIo } from './writeback-io';
import { PAGE_SIZE, SLOT_DIRTY, type PmemStore, type StoreExport } from './pmem-store';

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

interface Run {
  e: StoreExport;
  block: number;
  slots: number[];
  seqs: number[];
}

/** Bytes a run writes: its pages, the last one cut at the export's end. */
function runLength(run: Run): number {
  return Math.min(run.slots.length * PAGE_SIZE, run.e.backing.size - run.block * PAGE_SIZE);
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
      const runs = this.pick(null, Infinity);
      if (runs.length === 0) {
        // Everything dirty is already being written; wait a moment for those writes.
        await new Promise((r) => setTimeout(r, 1));
        continue;
      }
      try {
        await this.write(runs);
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
      const runs = this.pick(e, maxSeq);
      if (runs.length > 0) {
        await this.write(runs);
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
  private pick(only: StoreExport | null, maxSeq: number): Run[] {
    const s = this.store;
    const r = s.region;
    const e = only ?? this.chooseExport();
    if (e === null || e.dirty.count === 0) return [];
    const runs: Run[] = [];
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
        const last = runs[runs.length - 1];
        if (last && last.block + last.slots.length === block && last.slots.length < MAX_RUN_PAGES) {
          last.slots.push(slot);
          last.seqs.push(r.slotSeq[slot]!);
        } else {
          if (taken >= BATCH_PAGES) break;
          runs.push({ e, block, slots: [slot], seqs: [r.slotSeq[slot]!] });
        }
        s.pin(slot);
        taken++;
      }
      block = e.dirty.nextSet(block + 1);
    }
    e.wbCursor = block < 0 ? 0 : block;
    return runs;
  }

  /** Write runs to their backing file (a few at a time); pages count as clean only when it is done. */
  private async write(runs: Run[]): Promise<void> {
    const s = this.store;
    let failed: unknown = null;
    const failedRuns = new Set<Run>();
    const fail = (run: Run, err: unknown): void => {
      failed ??= err;
      failedRuns.add(run);
    };
    // Runs the writeback thread can write with a plain pwrite go there; the rest are written here.
    const io = this.opts.io?.usable ? this.opts.io : null;
    const threaded: Array<{ run: Run; dw: DirectWrite; len: number }> = [];
    let local = runs;
    if (io !== null) {
      local = [];
      for (const run of runs) {
        const len = runLength(run);
        // Long runs are written here: one large write is cheap per page, and its pages are free sooner.
        const dw = run.slots.length >= THREAD_MAX_RUN_PAGES ? null : (run.e.backing.directWrite?.(run.block * PAGE_SIZE, len) ?? null);
        if (dw === null) local.push(run);
        else threaded.push({ run, dw, len });
      }
    }
    const inThread =
      threaded.length === 0
        ? null
        : io!.write(threaded.map((x) => ({ fd: x.dw.fd, offset: x.run.block * PAGE_SIZE, length: x.len, slots: x.run.slots })), s.waitingForSlots > 0).then(
            (errors) => {
              errors.forEach((err, i) => {
                const x = threaded[i]!;
                if (err !== null) return fail(x.run, err);
                x.dw.done();
                this.bytesWritten += x.len;
              });
            },
            // The thread died: these pages stay dirty and are retried on the event loop.
            (err: unknown) => {
              for (const x of threaded) fail(x.run, err);
            },
          );
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < local.length) {
        const run = local[next++]!;
        const len = runLength(run);
        if (run.e.backing.pwriteNow !== undefined) {
          // Straight from the region pages, synchronously: nothing can reuse them during the call.
          let pages = run.slots.map((slot) => s.region.page(slot));
          if (len < pages.length * PAGE_SIZE) pages = [...pages.slice(0, -1), pages[pages.length - 1]!.subarray(0, len % PAGE_SIZE)];
          try {
            if (run.e.backing.pwriteNow(pages, run.block * PAGE_SIZE)) {
              this.bytesWritten += len;
              continue;
            }
          } catch (err) {
            fail(run, err);
            continue;
          }
        }
        // Copy out of the region so a page reused later cannot change what this write puts on disk.
        const buf = Buffer.allocUnsafe(run.slots.length * PAGE_SIZE);
        run.slots.forEach((slot, i) => s.region.page(slot).copy(buf, i * PAGE_SIZE));
        try {
          await run.e.backing.pwrite(buf.subarray(0, len), run.block * PAGE_SIZE);
          this.bytesWritten += len;
        } catch (err) {
          fail(run, err);
        }
      }
    };
    await Promise.all([inThread, ...Array.from({ length: Math.min(RUNS_IN_FLIGHT, local.length) }, worker)]);
    if (failed === null && this.opts.syncBeforeClean) {
      const exports = new Set(runs.map((r) => r.e));
      try {
        for (const e of exports) await e.backing.flush();
      } catch (err) {
        failed = err;
        for (const run of runs) failedRuns.add(run);
      }
    }
    for (const run of runs) {
      const ok = !failedRuns.has(run);
      run.slots.forEach((slot, i) => s.unpin(slot, ok ? run.seqs[i]! : null));
    }
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
