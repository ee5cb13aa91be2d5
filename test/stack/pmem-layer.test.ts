// lib/storage/pmem-layer.ts stacked in-process as lib/node.ts stacks it: PmemLayer over PmemStore (a real
// region file in t.testdir()) + Writeback + ReadCache + a backing device (MemoryDevice, wrapped so tests can
// count, delay, gate or fail its operations; BackingFile for some). Checked: a seeded random model test with
// the smallest region (eviction, backpressure, read-modify-write and writeback all happen, many requests in
// flight); concurrent partial writes to one page; the read cache never serving stale data; extents; FAST_ZERO;
// both durability modes; backpressure with writeback blocked; writeback errors; crash recovery of the region
// file; and that a writeback of an older version of a block in flight can never land after a newer one
// (flushed) or after a TRIM of the block.

import t from 'tap';
import type { Test } from 'tap';
import * as path from 'node:path';
import { randomUUID } from 'node:crypto';
import { PmemRegion, PAGE_SIZE, SLOT_CLEAN, SLOT_DIRTY, type RecoveryReport } from '../../lib/storage/pmem-region';
import { PmemStore, type StoreExport } from '../../lib/storage/pmem-store';
import { PmemLayer, type Durability } from '../../lib/storage/pmem-layer';
import { ReadCache } from '../../lib/storage/read-cache';
import { Writeback } from '../../lib/storage/writeback';
import { MemoryDevice } from '../../lib/storage/memory-device';
import { BackingFile } from '../../lib/storage/backing-file';
import type { BlockDevice, Extent, WriteFlags, ZeroFlags } from '../../lib/storage/block-device';
import { NotSupportedError } from '../../lib/errors';
import { silentLogger } from '../../lib/log';
import { PassThroughDevice } from '../helpers/pass-through';
import { prng } from '../helpers/bytes';
import { tmpfsDir } from '../helpers/tmpfs';
import { requireThat } from '../helpers/requires';

const PS = 4096;
const KiB = 1024;
const MiB = 1024 * KiB;
const DATA = 0;
const HOLE_ZERO = 3;
const MIN_PAGES = 256;
const log = silentLogger();

// ---------------------------------------------------------------------------------------------------------
// Helpers

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Wait (bounded) until cond holds. */
async function until(cond: () => boolean, what: string, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(1);
  }
}

/** Whether p settles within ms (resolves early when it does). */
async function settled(p: Promise<unknown>, ms = 30): Promise<boolean> {
  let done = false;
  const watched = p.then(
    () => void (done = true),
    () => void (done = true),
  );
  await Promise.race([watched, sleep(ms)]);
  return done;
}

/** A gate that operations can be held at until the test opens it. */
class Gate {
  private waiters: Array<() => void> = [];
  isOpen = true;
  waiting = 0;
  close(): void {
    this.isOpen = false;
  }
  open(): void {
    this.isOpen = true;
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }
  async pass(): Promise<void> {
    if (this.isOpen) return;
    this.waiting++;
    await new Promise<void>((r) => this.waiters.push(r));
    this.waiting--;
  }
}

/**
 * A BlockDevice wrapper that records what reaches the device and lets a test hold or fail operations
 * before they do. The hooks run before the inner call; a hook that throws fails the operation.
 */
class Hooked extends PassThroughDevice {
  writes: Array<{ offset: number; length: number }> = [];
  reads = 0;
  /** Of `reads`, those answered synchronously (preadNow). */
  readsNow = 0;
  /** Of `reads`, those passed to the inner device's preadCb. */
  readsCb = 0;
  flushes = 0;
  /** Successful pwrite calls since the last successful flush: 0 means everything written is flushed. */
  writesSinceFlush = 0;
  beforeWrite: ((offset: number, length: number) => Promise<void>) | null = null;
  beforeRead: ((offset: number, length: number) => Promise<void>) | null = null;
  /** After the inner read: the bytes are read, the caller does not have them yet. */
  afterRead: ((offset: number, length: number) => Promise<void>) | null = null;
  beforeFlush: (() => Promise<void>) | null = null;
  /** Before trim and zero. */
  beforeDeallocate: ((offset: number, length: number) => Promise<void>) | null = null;

  override async pread(buf: Buffer, offset: number): Promise<void> {
    this.reads++;
    if (this.beforeRead) await this.beforeRead(offset, buf.length);
    await this.inner.pread(buf, offset);
    if (this.afterRead) await this.afterRead(offset, buf.length);
  }

  /** Callback reads pass through while no read hook is set; with one they take pread's way (hooks and all). */
  preadCb(buf: Buffer, offset: number, done: (err: Error | null) => void): void {
    if (this.beforeRead || this.afterRead || this.inner.preadCb === undefined) {
      this.pread(buf, offset).then(() => done(null), done);
      return;
    }
    this.reads++;
    this.readsCb++;
    this.inner.preadCb(buf, offset, done);
  }

  /** Synchronous reads pass through while no read hook is set (a hook may hold or fail the read). */
  preadNow(buf: Buffer, offset: number): boolean {
    if (this.beforeRead || this.afterRead || this.inner.preadNow === undefined || !this.inner.preadNow(buf, offset)) return false;
    this.reads++;
    this.readsNow++;
    return true;
  }

  extentsNow(offset: number, length: number): Extent[] | null {
    return this.inner.extentsNow?.(offset, length) ?? null;
  }

  /** While beforeWrite is set, synchronous writes this accepts still pass through (the rest go to pwrite). */
  nowWhileHooked: ((offset: number, length: number) => boolean) | null = null;

  /** Synchronous writes (the writeback's long runs, the layer's bypass) pass through while no write hook is set. */
  pwriteNow(bufs: readonly Buffer[], offset: number): boolean {
    let length = 0;
    for (const b of bufs) length += b.length;
    if (this.beforeWrite && !(this.nowWhileHooked?.(offset, length) ?? false)) return false;
    if (this.inner.pwriteNow === undefined || !this.inner.pwriteNow(bufs, offset)) return false;
    this.writes.push({ offset, length });
    this.writesSinceFlush++;
    return true;
  }

  override async pwrite(buf: Buffer, offset: number, flags: WriteFlags = {}): Promise<void> {
    if (this.beforeWrite) await this.beforeWrite(offset, buf.length);
    await this.inner.pwrite(buf, offset, flags);
    this.writes.push({ offset, length: buf.length });
    this.writesSinceFlush++;
  }

  override async flush(): Promise<void> {
    const pending = this.writesSinceFlush;
    if (this.beforeFlush) await this.beforeFlush();
    await this.inner.flush();
    this.flushes++;
    this.writesSinceFlush -= pending;
  }

  override async trim(offset: number, length: number, flags?: WriteFlags): Promise<void> {
    if (this.beforeDeallocate) await this.beforeDeallocate(offset, length);
    await this.inner.trim(offset, length, flags);
  }

  override async zero(offset: number, length: number, flags?: ZeroFlags): Promise<void> {
    if (this.beforeDeallocate) await this.beforeDeallocate(offset, length);
    await this.inner.zero(offset, length, flags);
  }

  /** Read straight from the inner device (bypassing hooks and counters). */
  async raw(offset: number, length: number): Promise<Buffer> {
    const b = Buffer.alloc(length, 0xee);
    await this.inner.pread(b, offset);
    return b;
  }
}

interface StackOptions {
  size?: number;
  pages?: number;
  durability?: Durability;
  /** Default: no watermark writeback (more than the region holds). */
  high?: number;
  low?: number;
  /** Default: effectively never. */
  maxAgeMs?: number;
  syncBeforeClean?: boolean;
  cacheBytes?: number;
  /** Default: Infinity (no write bypasses the region). */
  bypassMin?: number;
  inner?: BlockDevice;
  file?: string;
  uuid?: string;
}

interface Stack {
  file: string;
  uuid: string;
  region: PmemRegion;
  store: PmemStore;
  cache: ReadCache;
  wb: Writeback;
  se: StoreExport;
  layer: PmemLayer;
  dev: Hooked;
  /** Stop writeback and close the region file without writing anything back (a crash, as far as the file sees). */
  crash(): Promise<void>;
}

async function stack(t: Test, o: StackOptions = {}): Promise<Stack> {
  const pages = o.pages ?? MIN_PAGES;
  const file = o.file ?? path.join(t.testdir(), 'region.pmem');
  const uuid = o.uuid ?? randomUUID();
  const { region } = await PmemRegion.open({ file, nodeUuid: uuid, size: pages * PS, writeBack: async () => undefined });
  const cache = new ReadCache(o.cacheBytes ?? 64 * KiB);
  const store = new PmemStore(region, cache);
  const durability = o.durability ?? 'disk';
  const wb = new Writeback(
    store,
    {
      highPages: o.high ?? pages + 1,
      lowPages: o.low ?? 0,
      maxAgeMs: o.maxAgeMs ?? 1e9,
      syncBeforeClean: o.syncBeforeClean ?? durability === 'pmem',
    },
    log,
  );
  const dev = new Hooked(o.inner ?? new MemoryDevice({ size: o.size ?? 4 * MiB }));
  const se = store.addExport('disk', dev);
  // No bypass unless a test asks: many tests fill the region with one long write.
  const layer = new PmemLayer(store, se, wb, durability, o.bypassMin ?? Infinity);
  let closed = false;
  const crash = async (): Promise<void> => {
    if (closed) return;
    closed = true;
    // Stop the background pass without waiting for it: a crashed process does not finish its writes.
    void wb.stop();
    await region.close();
  };
  t.teardown(async () => {
    dev.beforeWrite = dev.beforeRead = dev.afterRead = dev.beforeFlush = dev.beforeDeallocate = null;
    if (!closed) {
      // A clean stop where possible; a test that left writes held at a gate must not hang the teardown.
      await Promise.race([wb.stop(), new Promise((r) => setTimeout(r, 1000).unref())]);
      await crash();
    }
  });
  return { file, uuid, region, store, cache, wb, se, layer, dev, crash };
}

async function read(dev: BlockDevice, offset: number, length: number): Promise<Buffer> {
  const b = Buffer.alloc(length, 0xee); // pre-filled so "left untouched" cannot pass for data
  await dev.pread(b, offset);
  return b;
}

/** Read through preadCb (the server's path for reads that wait); done must be called exactly once. */
function readCb(dev: BlockDevice, offset: number, length: number): Promise<Buffer> {
  const b = Buffer.alloc(length, 0xee);
  return new Promise((resolve, reject) => {
    let calls = 0;
    dev.preadCb!(b, offset, (err) => {
      if (++calls > 1) return reject(new Error('preadCb called done twice'));
      if (err !== null) reject(err);
      else resolve(b);
    });
  });
}

/** The bytes if the device can read them synchronously (preadNow), else null. */
function readNow(dev: BlockDevice, offset: number, length: number): Buffer | null {
  const b = Buffer.alloc(length, 0xee);
  return dev.preadNow?.(b, offset) === true ? b : null;
}

function pattern(length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = ((i * 31 + seed * 7) % 251) + 1; // never zero
  return b;
}

const isZero = (b: Buffer): boolean => b.every((x) => x === 0);

/** Bookkeeping invariants of store and region (call when no layer operation is in flight). */
function checkInvariants(s: Stack): string[] {
  const problems: string[] = [];
  const r = s.region;
  const free = (r as unknown as { freeList: number[] }).freeList;
  const freeSet = new Set(free);
  if (freeSet.size !== free.length) problems.push('a slot is on the free list twice');
  const inIndex = new Map<number, number>();
  for (const [block, slot] of s.se.index) {
    if (inIndex.has(slot)) problems.push(`slot ${slot} indexed for blocks ${inIndex.get(slot)} and ${block}`);
    inIndex.set(slot, block);
    if (freeSet.has(slot)) problems.push(`slot ${slot} of block ${block} is on the free list`);
    if (r.slotState[slot] !== SLOT_DIRTY && r.slotState[slot] !== SLOT_CLEAN) problems.push(`indexed slot ${slot} is free`);
    if (r.slotBlock[slot] !== block || r.slotExport[slot] !== s.se.id) problems.push(`slot ${slot} records another block`);
  }
  let dirty = 0;
  for (let slot = 0; slot < r.pageCount; slot++) {
    if (r.slotState[slot] === SLOT_DIRTY) dirty++;
    if (r.slotState[slot] !== 0 && !inIndex.has(slot)) problems.push(`slot ${slot} is in use but not indexed`);
  }
  if (dirty !== s.store.dirtyCount) problems.push(`dirtyCount ${s.store.dirtyCount} but ${dirty} dirty slots`);
  // The dirty-block bitmap the writeback sweeps is exact: set ⇔ the block's page is dirty.
  let dirtyBits = 0;
  for (let b = s.se.dirty.nextSet(0); b >= 0; b = s.se.dirty.nextSet(b + 1)) {
    dirtyBits++;
    const slot = s.se.index.get(b);
    if (slot === undefined || r.slotState[slot] !== SLOT_DIRTY) problems.push(`block ${b} marked dirty but its page is not`);
  }
  if (dirtyBits !== s.se.dirty.count) problems.push(`dirty bitmap count ${s.se.dirty.count} but ${dirtyBits} bits set`);
  if (dirtyBits !== dirty) problems.push(`${dirty} dirty slots but ${dirtyBits} dirty blocks`);
  // The oldest dirty page is found through the queue exactly as a scan of the slots finds it.
  let oldest = Infinity;
  for (let slot = 0; slot < r.pageCount; slot++) if (r.slotState[slot] === SLOT_DIRTY) oldest = Math.min(oldest, r.slotDirtySince[slot]!);
  const q = s.store.oldestDirtySlot();
  if ((q < 0 ? Infinity : r.slotDirtySince[q]) !== oldest) problems.push(`oldest dirty page: queue says ${q}, scan says since ${oldest}`);
  return problems;
}

/** Extents are contiguous from the start, non-empty, of known flags, and sum to at most length. */
function extentsShapeOk(ext: Extent[], length: number): boolean {
  const sum = ext.reduce((a, e) => a + e.length, 0);
  return ext.length > 0 && sum > 0 && sum <= length && ext.every((e) => e.length > 0 && (e.flags === DATA || e.flags === HOLE_ZERO));
}

// ---------------------------------------------------------------------------------------------------------
// The random model test

interface ModelRunOptions {
  seed: number;
  batches: number;
  size: number;
  durability: Durability;
  inner?: BlockDevice;
  file?: string;
  /** Check the backing device against the model after each flush (disk durability). */
  checkBackingOnFlush: boolean;
  /** Whether the backing device must (true) or must never (false) have been read synchronously. */
  syncBacking?: boolean;
  /** Long writes must have bypassed the region (some did not find any of their blocks resident). */
  bypass?: boolean;
  bypassMin?: number;
}

async function modelRun(t: Test, o: ModelRunOptions): Promise<void> {
  const s = await stack(t, {
    size: o.size,
    pages: MIN_PAGES,
    durability: o.durability,
    high: 192,
    low: 64,
    maxAgeMs: 30,
    cacheBytes: 24 * PS,
    ...(o.bypassMin !== undefined ? { bypassMin: o.bypassMin } : {}),
    ...(o.inner ? { inner: o.inner } : {}),
    ...(o.file ? { file: o.file } : {}),
  });
  const { layer, dev } = s;
  const size = o.size;
  const model = Buffer.alloc(size);
  const rnd = prng(o.seed);
  const int = (n: number): number => Math.floor(rnd() * n);
  const pool = Buffer.alloc(4 * MiB);
  for (let i = 0; i < pool.length; i += 4) pool.writeUInt32LE((rnd() * 2 ** 32) >>> 0, i);

  const counts = { write: 0, read: 0, readNow: 0, readCb: 0, trim: 0, zero: 0, zeroNoTrim: 0, fastRefused: 0, cache: 0, extents: 0, flush: 0, fua: 0 };
  let readMismatches = 0;
  let extentProblems = 0;
  let flushMismatches = 0;
  let invariantProblems: string[] = [];
  let firstProblem = '';
  const note = (msg: string): void => {
    if (firstProblem === '') firstProblem = msg;
  };

  /** A random range for an operation, or null if it would overlap one already in the batch. */
  const pickRange = (taken: Array<[number, number]>, kind: 'write' | 'other'): [number, number] | null => {
    let off: number;
    let len: number;
    const r = rnd();
    if (kind === 'write' && r < 0.04) {
      len = (64 + int(260)) * PS; // larger than the region when > 256 pages
      off = int(Math.floor((size - len) / PS)) * PS;
    } else if (r < 0.35) {
      len = 1 + int(PS); // within or across one page boundary, unaligned
      off = int(size - len);
    } else if (r < 0.55) {
      len = 512 * (1 + int(8)); // sectors
      off = 512 * int(Math.floor((size - len) / 512));
    } else if (r < 0.85) {
      len = PS * (1 + int(16)); // whole pages
      off = PS * int(Math.floor((size - len) / PS));
    } else {
      len = 1 + int(20 * PS); // unaligned, spanning pages
      off = int(size - len);
    }
    if (rnd() < 0.03) off = size - len; // the export's (short) tail page
    if (off < 0 || len <= 0 || off + len > size) return null;
    for (const [a, b] of taken) if (off < b && a < off + len) return null;
    taken.push([off, off + len]);
    return [off, len];
  };

  for (let batch = 0; batch < o.batches; batch++) {
    if (rnd() < 0.05) {
      // FLUSH alone: everything acknowledged before it is covered.
      counts.flush++;
      const flushesBefore = dev.flushes;
      await layer.flush();
      if (o.checkBackingOnFlush) {
        const backing = await dev.raw(0, size);
        if (!backing.equals(model)) {
          flushMismatches++;
          note(`batch ${batch}: after flush the backing device differs from the model`);
        }
        if (dev.flushes <= flushesBefore) {
          flushMismatches++;
          note(`batch ${batch}: flush did not flush the backing device`);
        }
      }
      continue;
    }
    const taken: Array<[number, number]> = [];
    const apply: Array<() => void> = [];
    const ops: Array<Promise<void>> = [];
    const n = 1 + int(12);
    for (let i = 0; i < n; i++) {
      const k = rnd();
      if (k < 0.45) {
        const r = pickRange(taken, 'write');
        if (!r) continue;
        const [off, len] = r;
        const at = int(pool.length - len);
        const buf = Buffer.from(pool.subarray(at, at + len));
        const fua = rnd() < 0.03;
        counts.write++;
        if (fua) counts.fua++;
        ops.push(layer.pwrite(buf, off, fua ? { fua: true } : {}));
        apply.push(() => buf.copy(model, off));
      } else if (k < 0.72) {
        const r = pickRange(taken, 'other');
        if (!r) continue;
        const [off, len] = r;
        const want = Buffer.from(model.subarray(off, off + len)); // nothing else in the batch touches it
        counts.read++;
        // Half the reads go the way the server's request loop takes them: synchronously if the layer can.
        const now = rnd() < 0.5 ? readNow(layer, off, len) : null;
        if (now !== null) counts.readNow++;
        // Of the others, half take the callback path the server uses for reads that wait (preadCb).
        const cb = now === null && rnd() < 0.5;
        if (cb) counts.readCb++;
        ops.push(
          (now !== null ? Promise.resolve(now) : cb ? readCb(layer, off, len) : read(layer, off, len)).then((got) => {
            if (!got.equals(want)) {
              readMismatches++;
              let i = 0;
              while (got[i] === want[i]) i++;
              note(`batch ${batch}: read ${off}+${len} differs at byte ${off + i} (page ${Math.floor((off + i) / PS)})`);
            }
          }),
        );
      } else if (k < 0.8) {
        const r = pickRange(taken, 'other');
        if (!r) continue;
        const [off, len] = r;
        counts.trim++;
        ops.push(layer.trim(off, len, rnd() < 0.1 ? { fua: true } : {}));
        apply.push(() => {
          // Whole pages only (a trim is advisory); the export's short tail page counts as whole.
          const first = Math.ceil(off / PS) * PS;
          const end = off + len >= size ? size : Math.floor((off + len) / PS) * PS;
          if (end > first) model.fill(0, first, end);
        });
      } else if (k < 0.9) {
        const r = pickRange(taken, 'other');
        if (!r) continue;
        const [off, len] = r;
        const mayTrim = rnd() < 0.5;
        const fastZero = rnd() < 0.3;
        if (fastZero && !mayTrim) {
          counts.fastRefused++;
          ops.push(
            layer.zero(off, len, { fastZero: true }).then(
              () => {
                extentProblems++;
                note(`batch ${batch}: FAST_ZERO without mayTrim succeeded`);
              },
              (err: unknown) => {
                if (!(err instanceof NotSupportedError)) throw err;
              },
            ),
          );
          continue; // nothing changes
        }
        if (mayTrim) counts.zero++;
        else counts.zeroNoTrim++;
        ops.push(layer.zero(off, len, { mayTrim, fastZero }));
        apply.push(() => model.fill(0, off, off + len));
      } else if (k < 0.93) {
        const r = pickRange(taken, 'other');
        if (!r) continue;
        counts.cache++;
        ops.push(layer.cache(r[0], r[1]));
      } else {
        const r = pickRange(taken, 'other');
        if (!r) continue;
        const [off, len] = r;
        counts.extents++;
        const now = rnd() < 0.5 ? layer.extentsNow(off, len) : null; // as a READ asks, when it can
        ops.push(
          (now !== null ? Promise.resolve(now) : layer.extents(off, len)).then((ext) => {
            if (!extentsShapeOk(ext, len)) {
              extentProblems++;
              note(`batch ${batch}: bad extents shape ${JSON.stringify(ext)} for ${off}+${len}`);
              return;
            }
            // A hole must read as zeros (the bytes of this range are not touched by the rest of the batch).
            let p = off;
            for (const e of ext) {
              if (e.flags === HOLE_ZERO && !isZero(model.subarray(p, p + e.length))) {
                extentProblems++;
                note(`batch ${batch}: ${p}+${e.length} reported as a hole but holds data`);
              }
              p += e.length;
            }
          }),
        );
      }
    }
    await Promise.all(ops);
    for (const f of apply) f();
    if (batch % 25 === 0) {
      const p = checkInvariants(s);
      if (p.length > 0 && invariantProblems.length === 0) invariantProblems = p.map((x) => `batch ${batch}: ${x}`);
      // Quiet point: every resident page is reported as data.
      const ext = await layer.extents(0, size);
      let pos = 0;
      for (const e of ext) {
        if (e.flags === HOLE_ZERO) {
          for (let b = Math.floor(pos / PS); b * PS < pos + e.length; b++) {
            if (s.se.index.has(b) && b * PS >= pos && (b + 1) * PS <= pos + e.length) {
              extentProblems++;
              note(`batch ${batch}: resident page ${b} reported as a hole`);
            }
          }
        }
        pos += e.length;
      }
    }
  }
  const totalOps = Object.values(counts).reduce((a, b) => a + b, 0);
  t.ok(totalOps >= o.batches * 3, `${totalOps} operations: ${JSON.stringify(counts)}`);
  t.equal(readMismatches, 0, `every read matched the model${firstProblem ? ` (first problem: ${firstProblem})` : ''}`);
  t.equal(extentProblems, 0, 'extents and FAST_ZERO behaved');
  t.equal(flushMismatches, 0, 'after every flush the backing device held the model');
  t.same(invariantProblems, [], 'store bookkeeping invariants held');
  // The paths this test exists for were all taken.
  if (size > MIN_PAGES * PS) t.ok(s.store.backpressureWaits > 0, `writers waited for pages (${s.store.backpressureWaits} waits)`);
  t.ok(s.wb.bytesWritten > MIN_PAGES * PS, `writeback wrote ${s.wb.bytesWritten} bytes`);
  t.ok(s.cache.hits > 0, `the read cache served ${s.cache.hits} blocks`);
  t.ok(dev.reads > 0, 'the backing device was read (misses and read-modify-write)');
  t.ok(counts.readNow > 0, `${counts.readNow} reads were answered synchronously`);
  t.ok(counts.readCb > 0, `${counts.readCb} reads went through preadCb`);
  if (dev.inner.preadCb !== undefined) t.ok(dev.readsCb > 0, `${dev.readsCb} of them reached the backing file's preadCb`);
  t.comment(`${s.store.bypassBytes} bytes of long writes went straight to the backing device`);
  if (o.bypass) t.ok(s.store.bypassBytes > 0, `long writes bypassed the region (${s.store.bypassBytes} bytes)`);
  if (o.syncBacking) t.ok(dev.readsNow > 0, `${dev.readsNow} of them read the backing device synchronously`);
  else if (o.syncBacking === false) t.equal(dev.readsNow, 0, 'the backing device was never read synchronously (it is on a disk)');
  // Everything reads back, and after close (a final writeback) the backing device holds it all.
  t.ok((await read(layer, 0, size)).equals(model), 'a full read equals the model');
  await layer.close();
  t.equal(s.store.dirtyCount, 0, 'nothing dirty after close');
  t.ok((await dev.raw(0, size)).equals(model), 'the backing device equals the model after close');
  t.same(checkInvariants(s), [], 'invariants at the end');
}

t.test('random model test: MemoryDevice, disk durability, minimum region, short tail page', async (t) => {
  await modelRun(t, { seed: 0xc0ffee, batches: 900, size: 512 * PS - 1234, durability: 'disk', checkBackingOnFlush: true, syncBacking: true });
});

t.test('random model test: second seed, a 1 MiB export (the region could hold all of it)', async (t) => {
  await modelRun(t, { seed: 7, batches: 250, size: 1 * MiB, durability: 'disk', checkBackingOnFlush: true });
});

/** The model test over a real BackingFile in dir: synchronous backing reads exactly when dir is in memory. */
async function backingFileModelRun(t: Test, dir: string, seed: number): Promise<void> {
  const size = 640 * PS + 512;
  const bf = await BackingFile.open({ dir, name: 'disk', size, readOnly: false, log });
  t.teardown(() => bf.close());
  await modelRun(t, { seed, batches: 180, size, durability: 'pmem', inner: bf, file: path.join(dir, 'region.pmem'), checkBackingOnFlush: false, syncBacking: bf.inMemory });
  // The backing file itself (not just the open handle) holds the data: reopen it and compare with the layer.
  const layerView = await read(bf, 0, size);
  await bf.close();
  const again = await BackingFile.open({ dir, name: 'disk', size, readOnly: false, log });
  t.teardown(() => again.close());
  t.ok((await read(again, 0, size)).equals(layerView), 'the reopened backing file holds what was written back');
}

t.test('random model test: BackingFile, pmem durability (real async I/O underneath)', async (t) => {
  await backingFileModelRun(t, t.testdir(), 99);
});

t.test('random model test: BackingFile on tmpfs (synchronous reads of the file)', async (t) => {
  const dir = tmpfsDir(t, 'pmem-layer');
  if (!requireThat(t, dir !== null, '/dev/shm is not a tmpfs')) return;
  await backingFileModelRun(t, dir!, 1234);
});

t.test('random model test: two exports share the region (eviction and writeback across exports)', async (t) => {
  const size = 300 * PS;
  const s = await stack(t, { size, maxAgeMs: 30, cacheBytes: 16 * PS });
  const dev2 = new Hooked(new MemoryDevice({ size: size + 5000 }));
  const se2 = s.store.addExport('second', dev2);
  const layer2 = new PmemLayer(s.store, se2, s.wb, 'disk');
  const sides = [
    { layer: s.layer, dev: s.dev, model: Buffer.alloc(size), size },
    { layer: layer2, dev: dev2, model: Buffer.alloc(size + 5000), size: size + 5000 },
  ];
  const rnd = prng(4242);
  const int = (n: number): number => Math.floor(rnd() * n);
  let mismatches = 0;
  let ops = 0;
  for (let round = 0; round < 150; round++) {
    // Each export gets its own batch of non-overlapping operations; both batches run at once.
    const all: Array<Promise<void>> = [];
    const apply: Array<() => void> = [];
    for (const side of sides) {
      const taken: Array<[number, number]> = [];
      for (let i = 0; i < 6; i++) {
        const len = rnd() < 0.5 ? 1 + int(2 * PS) : PS * (1 + int(12));
        const off = int(side.size - len);
        if (taken.some(([a, b]) => off < b && a < off + len)) continue;
        taken.push([off, off + len]);
        ops++;
        const k = rnd();
        if (k < 0.6) {
          const buf = pattern(len, round * 100 + i);
          all.push(side.layer.pwrite(buf, off));
          apply.push(() => buf.copy(side.model, off));
        } else if (k < 0.75) {
          all.push(side.layer.zero(off, len, { mayTrim: rnd() < 0.5 }));
          apply.push(() => side.model.fill(0, off, off + len));
        } else {
          const want = Buffer.from(side.model.subarray(off, off + len));
          all.push(read(side.layer, off, len).then((got) => void (got.equals(want) || mismatches++)));
        }
      }
    }
    await Promise.all(all);
    for (const f of apply) f();
    if (round % 50 === 49) await sides[round % 2]!.layer.flush();
  }
  t.ok(ops > 1000, `${ops} operations`);
  t.equal(mismatches, 0, 'every read matched its export');
  t.ok(s.store.backpressureWaits > 0, 'the exports competed for pages');
  for (const [i, side] of sides.entries()) {
    t.ok((await read(side.layer, 0, side.size)).equals(side.model), `export ${i}: a full read equals its model`);
    await side.layer.close();
    t.ok((await side.dev.raw(0, side.size)).equals(side.model), `export ${i}: its backing device equals its model`);
  }
  t.equal(s.store.dirtyCount, 0);
});

// ---------------------------------------------------------------------------------------------------------
// Focused cases

t.test('concurrent partial writes to one page all survive', async (t) => {
  const s = await stack(t, { size: 64 * PS });
  const { layer, dev } = s;
  const base = pattern(64 * PS, 1);
  await dev.inner.pwrite(base, 0); // the backing device holds data: a read-modify-write must keep it
  const expect = Buffer.from(base);
  const pieces = (page: number, seed: number, size = 512): Array<Promise<void>> =>
    Array.from({ length: PS / size }, (_, i) => {
      const buf = pattern(size, seed + i);
      buf.copy(expect, page * PS + i * size);
      return layer.pwrite(buf, page * PS + i * size);
    });
  // 1. A page that is not resident: read from the backing device once, modified eight times.
  await Promise.all(pieces(3, 10));
  // 2. A page that is resident and dirty: copy-on-write eight times.
  await layer.pwrite(pattern(100, 5), 5 * PS + 7);
  pattern(100, 5).copy(expect, 5 * PS + 7);
  await Promise.all(pieces(5, 20));
  // 3. A page that is resident and clean (written back): modified in place.
  await layer.pwrite(pattern(PS, 6), 6 * PS);
  pattern(PS, 6).copy(expect, 6 * PS);
  await layer.flush();
  t.equal(s.region.slotState[s.se.index.get(6)!], SLOT_CLEAN, 'page 6 is clean');
  await Promise.all(pieces(6, 30));
  // 4. Odd sizes, unaligned, some spanning two pages, all at once, including into pages 3, 5, 6 again.
  const odd: Array<Promise<void>> = [];
  for (let i = 0; i < 16; i++) {
    const off = 2 * PS + i * 700 + 11;
    const buf = pattern(600, 100 + i);
    buf.copy(expect, off);
    odd.push(layer.pwrite(buf, off));
  }
  await Promise.all(odd);
  // 5. 512-byte sectors of eight pages at once (64 writes in flight), in a shuffled order.
  const order = Array.from({ length: 64 }, (_, i) => i).sort((a, b) => ((a * 37) % 64) - ((b * 37) % 64));
  await Promise.all(
    order.map((i) => {
      const off = 16 * PS + i * 512;
      const buf = pattern(512, 200 + i);
      buf.copy(expect, off);
      return layer.pwrite(buf, off);
    }),
  );
  t.ok((await read(layer, 0, 64 * PS)).equals(expect), 'every byte of every write is there');
  await layer.flush();
  t.ok((await dev.raw(0, 64 * PS)).equals(expect), 'and in the backing device after flush');
  t.same(checkInvariants(s), []);
});

t.test('concurrent partial writes to one page while the region is full and writeback is slow', async (t) => {
  const s = await stack(t, { size: 2 * MiB });
  const { layer, dev } = s;
  const expect = Buffer.alloc(2 * MiB);
  const fill = pattern(MIN_PAGES * PS, 3);
  await layer.pwrite(fill, 0); // every page dirty
  fill.copy(expect, 0);
  t.equal(s.store.dirtyCount, MIN_PAGES);
  dev.beforeWrite = () => sleep(5);
  const writes = Array.from({ length: 8 }, (_, i) => {
    const buf = pattern(512, 50 + i);
    buf.copy(expect, 300 * PS + i * 512);
    return layer.pwrite(buf, 300 * PS + i * 512); // a page that is not resident: needs a page and a base
  });
  await Promise.all(writes);
  t.ok(s.store.backpressureWaits > 0, 'the writes waited for a page');
  t.ok((await read(layer, 0, 2 * MiB)).equals(expect));
  await layer.close();
  t.ok((await dev.raw(0, 2 * MiB)).equals(expect));
});

t.test('reads never see stale data from the cache: write → writeback → eviction → read', async (t) => {
  const s = await stack(t, { size: 2 * MiB, cacheBytes: 1 * MiB });
  const { layer, dev } = s;
  const a = pattern(PS, 1);
  const b = pattern(PS, 2);
  await dev.inner.pwrite(a, 0);
  t.ok((await read(layer, 0, PS)).equals(a), 'first read fills the cache from the backing device');
  t.equal(s.cache.bytes, PS, 'block 0 cached');
  await layer.pwrite(b, 0);
  t.ok((await read(layer, 0, PS)).equals(b), 'a write invalidates the cached block');
  await layer.flush(); // written back, clean
  // Fill the region with other pages: block 0's clean page is evicted into the cache.
  await layer.pwrite(pattern(MIN_PAGES * PS, 9), PS);
  t.notOk(s.se.index.has(0), 'block 0 was evicted from the region');
  const hits = s.cache.hits;
  t.ok((await read(layer, 0, PS)).equals(b), 'read after eviction: the new data');
  t.equal(s.cache.hits, hits, 'from the backing file: eviction does not copy pages into the cache');
  t.ok((await read(layer, 0, PS)).equals(b), 'read again: the new data');
  t.equal(s.cache.hits, hits + 1, 'now served by the cache');
  // Overwrite the evicted block partially: the read-modify-write base is the cached (new) data.
  await layer.pwrite(Buffer.alloc(10, 0x77), 100);
  const c = Buffer.from(b);
  c.fill(0x77, 100, 110);
  t.ok((await read(layer, 0, PS)).equals(c), 'read-modify-write of an evicted page');
  await layer.flush();
  t.ok((await dev.raw(0, PS)).equals(c));
  // Trim drops a cached block too.
  await layer.flush();
  await layer.pwrite(pattern(MIN_PAGES * PS, 10), PS); // evict block 0 again
  t.notOk(s.se.index.has(0));
  await layer.trim(0, PS);
  t.ok(isZero(await read(layer, 0, PS)), 'a trimmed block reads as zeros, not from the cache');
});

t.test('reads never see stale data from the cache: a write races a cache fill', async (t) => {
  const s = await stack(t, { size: 2 * MiB, cacheBytes: 1 * MiB });
  const { layer, dev } = s;
  const old = pattern(2 * PS, 1);
  const fresh = pattern(PS, 2);
  await dev.inner.pwrite(old, 0);
  const gate = new Gate();
  gate.close();
  dev.beforeRead = () => gate.pass();
  const racing = read(layer, 0, 2 * PS); // misses both blocks; the backing read is held
  await until(() => gate.waiting === 1, 'the read to reach the backing device');
  dev.beforeRead = null;
  await layer.pwrite(fresh, PS); // block 1 changes while the read is in flight
  await layer.flush();
  await layer.pwrite(pattern(MIN_PAGES * PS, 5), 4 * PS); // evict block 1: the cache gets the new data
  t.notOk(s.se.index.has(1), 'block 1 evicted');
  gate.open();
  const got = await racing;
  t.ok(got.subarray(0, PS).equals(old.subarray(0, PS)), 'the racing read got block 0');
  t.ok(got.subarray(PS).equals(old.subarray(PS)) || got.subarray(PS).equals(fresh), 'and either version of block 1');
  t.ok((await read(layer, PS, PS)).equals(fresh), 'the stale fill was not kept: block 1 reads new');
  t.ok((await read(layer, 0, PS)).equals(old.subarray(0, PS)), 'block 0 unchanged');
});

t.test('reads never see stale data from the cache: a read racing a TRIM or ZERO does not keep the old data', async (t) => {
  const s = await stack(t, { size: 2 * MiB, cacheBytes: 1 * MiB });
  const { layer, dev } = s;
  const old = pattern(8 * PS, 1);
  await dev.inner.pwrite(old, 0);
  for (const [name, op] of [
    ['trim', () => layer.trim(PS, 2 * PS)],
    ['zero', () => layer.zero(4 * PS, 2 * PS, { mayTrim: true })],
    ['zero without trim', () => layer.zero(PS, 2 * PS)],
  ] as Array<[string, () => Promise<void>]>) {
    await dev.inner.pwrite(old, 0);
    s.cache.invalidate(s.se.id, 0, 100);
    const gate = new Gate();
    gate.close();
    dev.beforeDeallocate = () => gate.pass();
    const dealloc = op();
    await until(() => gate.waiting === 1, `${name} to reach the backing device`);
    dev.beforeDeallocate = null;
    // A read while the backing op is held: it may see old data, but must not leave it in the cache.
    await read(layer, 0, 8 * PS);
    gate.open();
    await dealloc;
    const want = Buffer.from(old);
    if (name === 'zero') want.fill(0, 4 * PS, 6 * PS);
    else want.fill(0, PS, 3 * PS);
    t.ok((await read(layer, 0, 8 * PS)).equals(want), `${name}: once it completed, reads see zeros`);
  }
});

t.test('bypass: a long write of whole pages none of which is resident goes straight to the backing device', async (t) => {
  const s = await stack(t, { size: 4 * MiB, durability: 'pmem', bypassMin: 64 * KiB });
  const { layer, dev } = s;
  const a = pattern(256 * KiB, 1);
  await layer.pwrite(a, 0);
  t.equal(s.store.bypassBytes, 256 * KiB, 'bypassed');
  t.equal(s.se.index.size, 0, 'no region page was used');
  t.ok((await dev.raw(0, 256 * KiB)).equals(a), 'the backing device holds it at once');
  t.ok((await read(layer, 0, 256 * KiB)).equals(a), 'and it reads back');
  t.ok(dev.writesSinceFlush > 0, 'not flushed yet');
  const flushes = dev.flushes;
  await layer.flush();
  t.equal(dev.flushes, flushes + 1, 'FLUSH in pmem durability flushed the backing device, since a write bypassed the region');
  t.equal(dev.writesSinceFlush, 0);
  await layer.flush();
  t.equal(dev.flushes, flushes + 1, 'the next FLUSH, with nothing bypassed since, does not');
  await layer.pwrite(pattern(64 * KiB, 2), 1 * MiB, { fua: true });
  t.equal(dev.flushes, flushes + 2, 'FUA on a bypassed write flushes the backing device');
  t.equal(dev.writesSinceFlush, 0);
  // The export's short tail counts as whole pages (the export here ends on a page).
  await layer.pwrite(pattern(64 * KiB, 3), 4 * MiB - 64 * KiB);
  t.equal(s.store.bypassBytes, 256 * KiB + 128 * KiB, 'a write that ends at the export end');
});

t.test('bypass is refused: short, unaligned, a TRIM under way; the data is right either way', async (t) => {
  const s = await stack(t, { size: 4 * MiB, durability: 'disk', bypassMin: 64 * KiB });
  const { layer, dev } = s;
  const expect = Buffer.alloc(4 * MiB);
  const write = async (buf: Buffer, off: number): Promise<void> => {
    await layer.pwrite(buf, off);
    buf.copy(expect, off);
  };
  await write(pattern(60 * KiB, 1), 0);
  t.equal(s.store.bypassBytes, 0, 'shorter than bypassMin: through the region');
  await write(pattern(128 * KiB, 2), 512 * KiB + 512);
  t.equal(s.store.bypassBytes, 0, 'not page-aligned: through the region');
  await write(pattern(PS, 3), 1 * MiB + 8 * PS);
  await write(pattern(128 * KiB, 4), 1 * MiB);
  t.equal(s.store.bypassBytes, 128 * KiB, 'over a dirty resident block (disk durability): bypassed, the page left the region');
  // A TRIM under way elsewhere in the export: its detached pages could still be written back by a recovery.
  await write(pattern(PS, 5), 3 * MiB);
  const gate = new Gate();
  gate.close();
  dev.beforeDeallocate = () => gate.pass();
  const trim = layer.trim(3 * MiB, PS);
  await until(() => gate.waiting > 0, 'the trim to reach the backing device');
  await write(pattern(128 * KiB, 6), 2 * MiB);
  t.equal(s.store.bypassBytes, 128 * KiB, 'no bypass while a TRIM is under way');
  gate.open();
  await trim;
  expect.fill(0, 3 * MiB, 3 * MiB + PS);
  dev.beforeDeallocate = null;
  await write(pattern(128 * KiB, 7), 2 * MiB + 256 * KiB);
  t.equal(s.store.bypassBytes, 256 * KiB, 'and again once it is done');
  t.ok((await read(layer, 0, 4 * MiB)).equals(expect), 'everything reads back');
  await layer.close();
  t.ok((await dev.raw(0, 4 * MiB)).equals(expect), 'and the backing device holds it after close');
});

t.test('bypass over clean resident pages: they leave the region first, so a crash cannot bring them back', async (t) => {
  const s = await stack(t, { size: 4 * MiB, durability: 'pmem', bypassMin: 64 * KiB });
  const { layer, dev } = s;
  const old = pattern(128 * KiB, 1);
  await layer.pwrite(old.subarray(0, 60 * KiB), 0); // short: into the region
  await s.wb.flushExport(s.se); // written back: clean pages
  t.ok(s.se.index.size > 0 && s.store.dirtyCount === 0, `${s.se.index.size} clean pages resident`);
  const fresh = pattern(128 * KiB, 2);
  await layer.pwrite(fresh, 0);
  t.equal(s.store.bypassBytes, 128 * KiB, 'bypassed although clean pages of it were resident');
  t.equal(s.se.index.size, 0, 'the clean pages left the region');
  t.ok((await read(layer, 0, 128 * KiB)).equals(fresh), 'reads see the new data');
  // A dirty page in the range (pmem durability) gets the write's bytes as a new version in the region.
  await layer.pwrite(pattern(PS, 3), 256 * KiB);
  const over = pattern(128 * KiB, 4);
  await layer.pwrite(over, 256 * KiB);
  t.equal(s.store.bypassBytes, 256 * KiB, 'bypassed over a dirty page too');
  // Crash now: recovery must not write the dropped clean pages' old bytes over the bypassed write.
  await s.crash();
  let report: RecoveryReport | null = null;
  const { region } = await PmemRegion.open({ file: s.file, nodeUuid: s.uuid, size: MIN_PAGES * PS, writeBack: async (r) => void (report = r) });
  t.teardown(() => region.close());
  const pages = (report as RecoveryReport | null)?.pages ?? [];
  const blocks = pages.map((p) => p.block);
  t.same(blocks, [64], `only block 64 is recovered, none of the bypassed blocks 0..31 (recovered: ${blocks.join(',')})`);
  t.ok(pages[0]?.data.equals(over.subarray(0, PS)), "with the second write's bytes, not the page it superseded");
  t.ok((await dev.raw(0, 128 * KiB)).equals(fresh), 'the backing device holds the bypassed write');
});

t.test('bypass over dirty pages (pmem durability): new versions in the region, clean once the backing device is synced', async (t) => {
  const s = await stack(t, { size: 4 * MiB, durability: 'pmem', bypassMin: 64 * KiB });
  const { layer, dev, se, store } = s;
  await layer.pwrite(pattern(PS, 1), 8 * PS);
  await layer.pwrite(pattern(PS, 1), 40 * PS);
  await layer.flush(); // flushed: in pmem durability the region pages are these writes' only durable copy
  const before = se.index.get(8)!;
  const flushes = dev.flushes;
  const fresh = pattern(128 * KiB, 2);
  await layer.pwrite(fresh, 0);
  t.equal(store.bypassBytes, 128 * KiB, 'bypassed');
  const after = se.index.get(8);
  t.ok(after !== undefined && after !== before, 'block 8 has a new slot: the flushed page was not overwritten');
  t.ok(store.region.page(after!).equals(fresh.subarray(8 * PS, 9 * PS)), "the new version holds the write's bytes");
  t.equal(store.dirtyCount, 2, 'both pages still dirty: the backing device is not synced yet');
  t.equal(dev.flushes, flushes, 'and is not synced by the write itself');
  t.ok((await dev.raw(0, 128 * KiB)).equals(fresh), 'the backing device holds the write');
  t.ok((await read(layer, 0, 128 * KiB)).equals(fresh), 'reads see it');
  const fresh2 = pattern(128 * KiB, 3);
  await layer.pwrite(fresh2, 32 * PS); // over block 40: a new version there too
  const short = pattern(PS, 5);
  await layer.pwrite(short, 40 * PS); // rewritten through the region before the sync: not what the device holds
  await until(() => store.dirtyCount === 1, 'block 8 to settle');
  t.ok(dev.flushes > flushes, 'the backing device was synced before');
  t.ok(!se.dirty.get(8) && se.index.get(8) !== undefined, 'block 8 is clean and resident');
  t.ok(se.dirty.get(40), 'block 40, rewritten since, stays dirty');
  // A long write over a settled (clean) page drops it instead of copying it again.
  await layer.pwrite(fresh2, 0);
  t.equal(se.index.get(8), undefined, 'the next long write over block 8 dropped it from the region');
  // FUA on a bypassed write in pmem durability: the region (new versions) is synced, then the backing device.
  let syncs = 0;
  const regionSync = store.region.sync.bind(store.region);
  store.region.sync = () => {
    syncs++;
    regionSync();
  };
  const f = dev.flushes;
  await layer.pwrite(fresh, 0, { fua: true });
  t.ok(syncs > 0 && dev.flushes > f, `FUA synced the region (${syncs}) and flushed the backing device`);
  const want = Buffer.alloc(4 * MiB);
  fresh.copy(want, 0);
  fresh2.copy(want, 32 * PS);
  short.copy(want, 40 * PS);
  t.ok((await read(layer, 0, 4 * MiB)).equals(want), 'everything reads back');
  await layer.close();
  t.ok((await dev.raw(0, 4 * MiB)).equals(want), 'and the backing device holds it after close');
});

t.test('bypass over dirty pages (pmem durability): when the backing write fails, the new versions are not settled clean', async (t) => {
  const s = await stack(t, { size: 4 * MiB, durability: 'pmem', bypassMin: 64 * KiB });
  const { layer, dev, se } = s;
  await layer.pwrite(pattern(PS, 1), 8 * PS);
  const pwriteNow = dev.pwriteNow.bind(dev);
  dev.pwriteNow = () => {
    throw Object.assign(new Error('EIO: i/o error, write'), { code: 'EIO' });
  };
  await t.rejects(async () => layer.pwrite(pattern(128 * KiB, 2), 0), { code: 'EIO' }, 'the write fails');
  dev.pwriteNow = pwriteNow;
  t.ok(se.dirty.get(8), 'block 8 is dirty');
  // A bypass elsewhere starts a settling sync; block 8's new version never reached the device.
  const flushes = dev.flushes;
  await layer.pwrite(pattern(PS, 3), 100 * PS);
  await layer.pwrite(pattern(128 * KiB, 4), 96 * PS);
  await until(() => !se.dirty.get(100), 'block 100 to settle');
  t.ok(dev.flushes > flushes, 'the backing device was synced');
  t.ok(se.dirty.get(8), 'block 8 is still dirty: its writeback will put it in the backing device');
  await layer.close();
  t.ok((await dev.raw(8 * PS, PS)).equals(pattern(128 * KiB, 2).subarray(8 * PS, 9 * PS)), "written back at close: the region's version of block 8");
});

t.test('bypass over dirty pages (disk durability): they leave the region after the backing write, and a crash does not bring them back', async (t) => {
  const s = await stack(t, { size: 4 * MiB, durability: 'disk', bypassMin: 64 * KiB });
  const { layer, dev } = s;
  await layer.pwrite(pattern(PS, 1), 8 * PS);
  await layer.pwrite(pattern(PS, 1), 40 * PS);
  t.equal(s.store.dirtyCount, 2, 'two dirty pages');
  const fresh = pattern(128 * KiB, 2);
  await layer.pwrite(fresh, 0);
  t.equal(s.store.bypassBytes, 128 * KiB, 'bypassed although a dirty page of it was resident');
  t.equal(s.store.dirtyCount, 1, 'the dirty page of its range left the region; the other stays');
  t.equal(s.se.index.get(8), undefined, 'block 8 is no longer resident');
  t.ok(s.se.index.get(40) !== undefined, 'block 40 still is');
  t.ok((await read(layer, 0, 128 * KiB)).equals(fresh), 'reads see the new data');
  await s.crash();
  let report: RecoveryReport | null = null;
  const { region } = await PmemRegion.open({ file: s.file, nodeUuid: s.uuid, size: MIN_PAGES * PS, writeBack: async (r) => void (report = r) });
  t.teardown(() => region.close());
  const blocks = (report as RecoveryReport | null)?.pages.map((p) => p.block) ?? [];
  t.same(blocks, [40], 'only the dirty page outside the bypassed range is recovered');
  t.ok((await dev.raw(0, 128 * KiB)).equals(fresh), 'the backing device holds the bypassed write');
});

/**
 * Start a FLUSH whose writeback of single pages is held in the device (until gate.open()); long synchronous
 * writes (a bypass) still pass. Resolves once a held writeback has reached the device.
 */
async function flushHoldingWriteback(s: Stack, what: string): Promise<{ gate: Gate; flushing: Promise<void> }> {
  const gate = new Gate();
  gate.close();
  s.dev.beforeWrite = () => gate.pass();
  s.dev.nowWhileHooked = (_offset, length) => length >= 64 * KiB;
  const flushing = s.layer.flush();
  await until(() => gate.waiting > 0, `the writeback of ${what} to be held`);
  return { gate, flushing };
}

t.test('bypass: a long write over a page being written back waits for that writeback, then bypasses', async (t) => {
  const s = await stack(t, { size: 4 * MiB, durability: 'disk', bypassMin: 64 * KiB });
  const { layer, dev } = s;
  await layer.pwrite(pattern(PS, 1), 8 * PS);
  const { gate, flushing } = await flushHoldingWriteback(s, 'block 8');
  const fresh = pattern(128 * KiB, 2);
  let done = false;
  const writing = layer.pwrite(fresh, 0).then(() => void (done = true));
  await new Promise((r) => setTimeout(r, 30));
  t.notOk(done, 'the write waits while a block of it is being written back (its older bytes would land later)');
  t.equal(s.store.bypassBytes, 0, 'nothing bypassed yet');
  gate.open();
  await writing;
  await flushing;
  dev.beforeWrite = null;
  t.equal(s.store.bypassBytes, 128 * KiB, 'then it bypassed the region');
  t.ok((await read(layer, 0, 128 * KiB)).equals(fresh), 'reads see the new data');
  await layer.flush();
  t.ok((await dev.raw(0, 128 * KiB)).equals(fresh), 'after a FLUSH the backing device holds it');
  t.equal(s.store.dirtyCount, 0);
});

t.test('bypass over a dirty page while a FLUSH waits for other writebacks: the FLUSH makes the bypassed write durable', async (t) => {
  const s = await stack(t, { size: 4 * MiB, durability: 'disk', bypassMin: 64 * KiB });
  const { layer, dev } = s;
  await layer.pwrite(pattern(PS, 3), 100 * PS);
  const { gate, flushing } = await flushHoldingWriteback(s, 'block 100');
  // Written while the FLUSH is under way (it covers only what completed before it, but writes back all it
  // finds), then superseded by a long write: the dirty page leaves the region unwritten, and the FLUSH's
  // fdatasync comes after the bypassed write.
  await layer.pwrite(pattern(PS, 1), 8 * PS);
  const fresh = pattern(128 * KiB, 2);
  await layer.pwrite(fresh, 0);
  t.equal(s.store.bypassBytes, 128 * KiB, 'bypassed during the FLUSH');
  gate.open();
  await flushing;
  t.equal(dev.writesSinceFlush, 0, 'everything written to the device, the bypassed write included, was flushed');
  t.ok((await dev.raw(0, 128 * KiB)).equals(fresh));
});

t.test('bypass: a read in flight when a bypassed write lands does not leave its old data in the cache', async (t) => {
  const s = await stack(t, { size: 4 * MiB, bypassMin: 64 * KiB, cacheBytes: 1 * MiB });
  const { layer, dev } = s;
  const old = pattern(64 * KiB, 1);
  await dev.inner.pwrite(old, 0);
  const gate = new Gate();
  gate.close();
  dev.afterRead = () => gate.pass();
  const reading = read(layer, 0, 64 * KiB); // misses: read from the backing device, then held
  await until(() => gate.waiting > 0, 'the read to have read the old data');
  dev.afterRead = null;
  const fresh = pattern(64 * KiB, 2);
  await layer.pwrite(fresh, 0);
  t.equal(s.store.bypassBytes, 64 * KiB, 'the write bypassed the region');
  gate.open();
  await reading; // old or new: the two were concurrent
  t.ok((await read(layer, 0, 64 * KiB)).equals(fresh), 'a read after both sees the new data, not a stale cache fill');
});

t.test('random model test: long writes bypass the region (larger export, bypass from 8 pages)', async (t) => {
  await modelRun(t, { seed: 31337, batches: 300, size: 4 * MiB, durability: 'disk', checkBackingOnFlush: true, syncBacking: true, bypassMin: 8 * PS, bypass: true });
});

t.test('a long read with resident pages between its misses reads the backing device once, and keeps the region\'s data', async (t) => {
  const s = await stack(t, { size: 4 * MiB, cacheBytes: 0 });
  const { layer, dev } = s;
  const old = pattern(256 * KiB, 1);
  await dev.inner.pwrite(old, 0); // the backing device: the old version of every page
  const expect = Buffer.alloc(512 * KiB); // beyond the first 256 KiB: never written, zeros
  old.copy(expect);
  for (let b = 0; b < 64; b += 4) {
    // Every fourth page newer in the region (dirty: the backing device still has the old bytes there).
    const p = pattern(PS, 100 + b);
    await layer.pwrite(p, b * PS);
    p.copy(expect, b * PS);
  }
  const reads = dev.reads;
  const got = await read(layer, 0, 256 * KiB); // the async path (what a long READ takes)
  t.ok(got.equals(expect.subarray(0, 256 * KiB)), 'the resident pages come from the region, the rest from the backing device');
  t.equal(dev.reads - reads, 1, 'one backing read for the 16 runs of misses');
  const cbReads = dev.reads;
  const scratch = s.store.scratch;
  const [held, reused] = [scratch.heldBytes, scratch.reused];
  t.ok((await readCb(layer, 0, 256 * KiB)).equals(expect.subarray(0, 256 * KiB)), 'the same through preadCb');
  t.equal(dev.reads - cbReads, 1, 'one backing read there too');
  t.ok(scratch.reused === reused + 1 && scratch.heldBytes === held, 'the bytes kept aside went back to the scratch pool');
  // Sparse misses (less than half the span) are read run by run instead.
  for (let b = 64; b < 128; b++) if (b % 16 !== 0) await layer.pwrite(pattern(PS, 300 + b), b * PS);
  for (let b = 64; b < 128; b++) if (b % 16 !== 0) pattern(PS, 300 + b).copy(expect, b * PS);
  const before = dev.reads;
  t.ok((await read(layer, 0, 512 * KiB)).subarray(256 * KiB).equals(expect.subarray(256 * KiB, 512 * KiB)), 'sparse misses read right');
  t.ok(dev.reads - before > 1, `sparse misses: ${dev.reads - before} backing reads`);
});

t.test('long reads in flight together through a busy region each keep their own bytes (reused buffers), cache or not', async (t) => {
  const s = await stack(t, { size: 4 * MiB, cacheBytes: 1 * MiB });
  const { layer, dev } = s;
  const base = pattern(2 * MiB, 7);
  await dev.inner.pwrite(base, 0);
  const expect = Buffer.from(base);
  for (let b = 0; b < 512; b += 3) {
    const p = pattern(PS, 1000 + b); // every third page newer in the region
    await layer.pwrite(p, b * PS);
    p.copy(expect, b * PS);
  }
  // Short reads put some of the other pages in the read cache; long reads do not look there (same bytes).
  for (let b = 1; b < 512; b += 9) t.ok((await read(layer, b * PS, PS)).equals(expect.subarray(b * PS, (b + 1) * PS)));
  const offs = [0, 256 * KiB, 512 * KiB, 768 * KiB, 1 * MiB, 1280 * KiB, 1536 * KiB, 1792 * KiB, 100 * PS + 17, 3 * PS];
  for (let round = 0; round < 4; round++) {
    const reads = dev.reads;
    // The last round through preadCb, the way the server reads.
    const got = await Promise.all(offs.map((o) => (round === 3 ? readCb : read)(layer, o, 256 * KiB)));
    offs.forEach((o, i) => t.ok(got[i]!.equals(expect.subarray(o, o + 256 * KiB)), `round ${round}: the read at ${o}`));
    t.equal(dev.reads - reads, offs.length, `round ${round}: one backing read each`);
  }
});

t.test('a long read takes only the dirty pages from the region: clean ones are read with the backing file', async (t) => {
  const s = await stack(t, { size: 4 * MiB });
  const { layer, dev } = s;
  const span = 1 * MiB;
  const pages = span / PS;
  await dev.inner.pwrite(pattern(span, 3), 0);
  const expect = pattern(span, 3);
  const put = async (b: number, seed: number): Promise<void> => {
    const p = pattern(PS, seed);
    await layer.pwrite(p, b * PS);
    p.copy(expect, b * PS);
  };
  for (let b = 0; b < pages; b += 3) await put(b, 500 + b);
  await put(pages - 1, 499);
  await layer.flush(); // written back: every resident page is clean, the backing device holds the same bytes
  t.ok(s.se.index.has(0) && s.se.index.has(pages - 1) && s.se.dirty.nextSet(0) === -1, 'resident and clean at both ends');
  const seen: Array<[number, number]> = [];
  dev.beforeRead = async (offset, length) => void seen.push([offset, length]);
  t.ok((await read(layer, 0, span)).equals(expect), 'clean pages: the right bytes');
  t.same(seen, [[0, span]], 'one backing read of the whole span, around none of the clean pages');
  // Newer bytes in pages 0, 100 and 200: dirty, so only the region has them.
  for (const b of [0, 100, 200]) await put(b, 900 + b);
  seen.length = 0;
  t.ok((await read(layer, 0, span)).equals(expect), 'dirty pages come from the region');
  t.same(seen, [[PS, span - PS]], 'the leading dirty page is not read from the backing file, the rest in one read');
  // A long read starting inside a dirty page and ending inside a clean one.
  seen.length = 0;
  t.ok((await read(layer, 100 * PS + 123, 200 * KiB)).equals(expect.subarray(100 * PS + 123, 100 * PS + 123 + 200 * KiB)), 'unaligned');
  t.same(seen, [[101 * PS, 200 * KiB - (PS - 123)]], 'the rest of the span after the dirty page');
});

t.test('extents: resident pages are data, trimmed pages holes, zero with and without trim', async (t) => {
  const s = await stack(t, { size: 64 * PS });
  const { layer } = s;
  t.same(await layer.extents(0, 64 * PS), [{ length: 64 * PS, flags: HOLE_ZERO }], 'all hole at first');
  await layer.pwrite(pattern(2 * PS, 1), 4 * PS);
  await layer.pwrite(pattern(10, 1), 9 * PS + 5); // a partial write makes the whole page resident
  t.same(
    await layer.extents(0, 64 * PS),
    [
      { length: 4 * PS, flags: HOLE_ZERO },
      { length: 2 * PS, flags: DATA },
      { length: 3 * PS, flags: HOLE_ZERO },
      { length: PS, flags: DATA },
      { length: 54 * PS, flags: HOLE_ZERO },
    ],
    'resident (not yet written back) pages are data',
  );
  t.same(await layer.extents(4 * PS + 100, 10), [{ length: 10, flags: DATA }], 'a sub-page query inside a resident page');
  await layer.flush();
  t.same((await layer.extents(0, 16 * PS)).slice(0, 2), [{ length: 4 * PS, flags: HOLE_ZERO }, { length: 2 * PS, flags: DATA }], 'still data once written back');
  await layer.trim(4 * PS, PS);
  await layer.zero(9 * PS, PS, { mayTrim: true });
  await layer.zero(20 * PS, 2 * PS); // NO_HOLE: zeros as data
  t.same(
    await layer.extents(0, 64 * PS),
    [
      { length: 5 * PS, flags: HOLE_ZERO },
      { length: PS, flags: DATA },
      { length: 14 * PS, flags: HOLE_ZERO },
      { length: 2 * PS, flags: DATA },
      { length: 42 * PS, flags: HOLE_ZERO },
    ],
    'trimmed and trim-zeroed pages are holes; NO_HOLE zeros are data',
  );
  t.notOk(s.se.index.has(4) || s.se.index.has(9), 'trimmed pages left the region');
  t.ok(isZero(await read(layer, 4 * PS, PS)) && isZero(await read(layer, 9 * PS, PS)) && isZero(await read(layer, 20 * PS, 2 * PS)));
  t.ok((await read(layer, 5 * PS, PS)).equals(pattern(2 * PS, 1).subarray(PS)), 'the neighbour kept its data');
});

t.test('trim and zero leave partial edge pages as they should', async (t) => {
  const s = await stack(t, { size: 16 * PS });
  const { layer } = s;
  const data = pattern(16 * PS, 4);
  await layer.pwrite(data, 0);
  await layer.trim(PS + 100, 3 * PS); // whole pages 2 and 3 only
  const want = Buffer.from(data);
  want.fill(0, 2 * PS, 4 * PS);
  t.ok((await read(layer, 0, 16 * PS)).equals(want), 'trim: the partial pages 1 and 4 are untouched');
  await layer.zero(8 * PS + 100, 2 * PS, { mayTrim: true }); // partial 8, whole 9, partial 10
  want.fill(0, 8 * PS + 100, 10 * PS + 100);
  t.ok((await read(layer, 0, 16 * PS)).equals(want), 'zero: every byte of the range, nothing else');
  await layer.zero(15 * PS + 1, PS - 1, { mayTrim: true }); // to the end of the export
  want.fill(0, 15 * PS + 1);
  t.ok((await read(layer, 0, 16 * PS)).equals(want));
  await layer.close();
  t.ok((await s.dev.raw(0, 16 * PS)).equals(want), 'the backing device agrees after close');
});

t.test('FAST_ZERO without mayTrim: NotSupportedError and nothing changed', async (t) => {
  const s = await stack(t, { size: 32 * PS, cacheBytes: 1 * MiB });
  const { layer, dev, store } = s;
  const data = pattern(32 * PS, 8);
  await layer.pwrite(data, 0);
  await layer.flush(); // clean pages; backing holds data
  await layer.pwrite(pattern(3 * PS, 9), 4 * PS); // and some dirty ones
  const want = await read(layer, 0, 32 * PS);
  const index = [...s.se.index];
  const states = Array.from(s.region.slotState);
  const dirty = store.dirtyCount;
  const writes = dev.writes.length;
  const backing = await dev.raw(0, 32 * PS);
  const extents = await layer.extents(0, 32 * PS);
  for (const [off, len] of [
    [4 * PS, 3 * PS],
    [4 * PS + 100, 3 * PS],
    [100, 200],
    [0, 32 * PS],
  ] as Array<[number, number]>) {
    await t.rejects(layer.zero(off, len, { fastZero: true }), NotSupportedError, `zero ${off}+${len} with fastZero`);
    await t.rejects(layer.zero(off, len, { fastZero: true, mayTrim: false, fua: true }), NotSupportedError);
  }
  t.ok((await read(layer, 0, 32 * PS)).equals(want), 'the data reads the same');
  t.same([...s.se.index], index, 'the same pages are resident in the same slots');
  t.same(Array.from(s.region.slotState), states, 'no slot changed state');
  t.equal(store.dirtyCount, dirty);
  t.equal(dev.writes.length, writes, 'nothing written to the backing device');
  t.ok((await dev.raw(0, 32 * PS)).equals(backing));
  t.same(await layer.extents(0, 32 * PS), extents);
  await layer.zero(4 * PS, 3 * PS, { fastZero: true, mayTrim: true });
  t.ok(isZero(await read(layer, 4 * PS, 3 * PS)), 'with mayTrim a fast zero is done');
});

t.test('durability disk: flush and FUA put every written byte in the backing device, then flush it', async (t) => {
  const s = await stack(t, { size: 4 * MiB, durability: 'disk' });
  const { layer, dev } = s;
  const expect = Buffer.alloc(4 * MiB);
  const rnd = prng(5);
  for (let i = 0; i < 300; i++) {
    const len = 1 + Math.floor(rnd() * 3 * PS);
    const off = Math.floor(rnd() * (4 * MiB - len));
    const buf = pattern(len, i);
    buf.copy(expect, off);
    await layer.pwrite(buf, off);
  }
  t.ok(s.store.dirtyCount > 0, `${s.store.dirtyCount} pages dirty before the flush`);
  await layer.flush();
  t.equal(s.store.dirtyCount, 0, 'nothing dirty after the flush');
  t.ok((await dev.raw(0, 4 * MiB)).equals(expect), 'the backing device holds every byte');
  t.ok(dev.flushes > 0, 'the backing device was flushed');
  t.equal(dev.writesSinceFlush, 0, 'after its last write');
  // FUA: the write and everything before it.
  await layer.pwrite(pattern(100, 1), 5 * PS);
  pattern(100, 1).copy(expect, 5 * PS);
  const fua = pattern(3 * PS, 2);
  fua.copy(expect, 100 * PS + 17);
  await layer.pwrite(fua, 100 * PS + 17, { fua: true });
  t.ok((await dev.raw(0, 4 * MiB)).equals(expect), 'after a FUA write the backing device holds it');
  t.equal(dev.writesSinceFlush, 0, 'and is flushed');
  await layer.trim(100 * PS, 8 * PS, { fua: true });
  expect.fill(0, 100 * PS, 108 * PS);
  await layer.zero(200 * PS + 1, 100, { fua: true });
  expect.fill(0, 200 * PS + 1, 200 * PS + 101);
  t.ok((await dev.raw(0, 4 * MiB)).equals(expect), 'FUA trim and zero');
  t.equal(dev.writesSinceFlush, 0);
});

t.test('durability disk: a flush waits for a writeback already under way', async (t) => {
  const s = await stack(t, { size: 4 * MiB, high: 1, low: 0 });
  const { layer, dev } = s;
  const gate = new Gate();
  gate.close();
  dev.beforeWrite = () => gate.pass();
  await layer.pwrite(pattern(8 * PS, 1), 0);
  s.wb.kick(); // a background pass takes the pages
  await until(() => gate.waiting > 0, 'background writeback to start');
  const flush = layer.flush();
  t.notOk(await settled(flush), 'the flush waits for the pages being written');
  gate.open();
  await flush;
  t.ok((await dev.raw(0, 8 * PS)).equals(pattern(8 * PS, 1)));
  t.equal(dev.writesSinceFlush, 0);
});

t.test('durability pmem: flush does not wait for writeback; pages become clean only after the backing flush', async (t) => {
  const s = await stack(t, { size: 4 * MiB, durability: 'pmem', high: 1, low: 0 });
  const { layer, dev, store } = s;
  const gate = new Gate();
  gate.close();
  t.teardown(() => gate.open());
  dev.beforeWrite = () => gate.pass();
  await layer.pwrite(pattern(16 * PS, 1), 0, { fua: true }); // FUA in pmem durability: the region is enough
  await layer.flush();
  t.equal(dev.writes.length, 0, 'flush and FUA wrote nothing to the backing device');
  t.equal(dev.flushes, 0, 'nor flushed it');
  // Writeback: the backing writes go through, the backing flush is held.
  gate.open();
  const flushGate = new Gate();
  flushGate.close();
  dev.beforeFlush = () => flushGate.pass();
  s.wb.kick();
  await until(() => flushGate.waiting > 0, 'writeback to reach the backing flush');
  t.ok((await dev.raw(0, 16 * PS)).equals(pattern(16 * PS, 1)), 'the data is written to the backing device');
  t.equal(store.dirtyCount, 16, 'but the pages stay dirty until it is synced');
  t.equal(store.stats().cleanPages, 0);
  // While writeback waits for the sync, flush() still returns at once.
  await layer.pwrite(pattern(PS, 2), 100 * PS);
  t.ok(await settled(layer.flush(), 5000), 'flush does not wait for writeback');
  flushGate.open();
  await until(() => store.dirtyCount <= 1, 'pages to become clean');
  t.ok(store.stats().cleanPages >= 16, 'clean after the backing flush');
  t.ok(dev.flushes > 0);
});

t.test('backpressure: with writeback blocked a full region makes writes wait; they finish when it proceeds', async (t) => {
  const s = await stack(t, { size: 4 * MiB });
  const { layer, dev, store } = s;
  const gate = new Gate();
  gate.close();
  t.teardown(() => gate.open());
  dev.beforeWrite = () => gate.pass();
  await layer.pwrite(pattern(MIN_PAGES * PS, 1), 0);
  t.equal(store.dirtyCount, MIN_PAGES, 'the region is full of dirty pages');
  t.equal(store.stats().freePages, 0);
  const more = [layer.pwrite(pattern(8 * PS, 2), 300 * PS), layer.pwrite(pattern(100, 3), 400 * PS + 5), layer.zero(500 * PS + 3, 10)];
  t.notOk(await settled(Promise.race(more), 50), 'the writes wait');
  t.ok(store.waitingForSlots > 0, `${store.waitingForSlots} writers waiting for pages`);
  t.ok(store.backpressureWaits > 0);
  t.ok(gate.waiting > 0, 'writeback was started by the pressure and is held');
  gate.open();
  await Promise.all(more);
  const got = await read(layer, 0, 4 * MiB);
  t.ok(got.subarray(0, MIN_PAGES * PS).equals(pattern(MIN_PAGES * PS, 1)));
  t.ok(got.subarray(300 * PS, 308 * PS).equals(pattern(8 * PS, 2)));
  t.ok(got.subarray(400 * PS + 5, 400 * PS + 105).equals(pattern(100, 3)));
  t.ok(isZero(got.subarray(500 * PS, 501 * PS)));
  t.same(checkInvariants(s), []);
});

t.test('writeback errors: pages stay dirty, flush and waiting writers fail, all is written once the disk recovers', async (t) => {
  const s = await stack(t, { size: 4 * MiB });
  const { layer, dev, store } = s;
  let full = true;
  const enospc = (): Error => Object.assign(new Error('ENOSPC: no space left on device'), { code: 'ENOSPC' });
  dev.beforeWrite = async () => {
    if (full) throw enospc();
  };
  const acked = pattern(MIN_PAGES * PS, 1);
  await layer.pwrite(acked, 0);
  t.equal(store.dirtyCount, MIN_PAGES);
  // Writers that need a page wait for writeback, which fails: they get the error rather than hang.
  const waiting = [layer.pwrite(pattern(PS, 2), 1000 * PS), layer.pwrite(pattern(10, 3), 900 * PS + 1)];
  for (const w of waiting) await t.rejects(w, { code: 'ENOSPC' }, 'a waiting writer gets ENOSPC');
  t.equal(store.dirtyCount, MIN_PAGES, 'the acknowledged pages stay dirty');
  await t.rejects(layer.flush(), { code: 'ENOSPC' }, 'flush fails');
  // Page 0 is dirty: its new version needs a page too, so the write fails (its bytes stay as they were).
  await t.rejects(layer.pwrite(pattern(PS, 4), 0, { fua: true }), { code: 'ENOSPC' }, 'an overwrite of a dirty page fails');
  t.equal(store.dirtyCount, MIN_PAGES);
  t.ok(isZero(await dev.raw(0, MIN_PAGES * PS)), 'nothing reached the backing device');
  t.ok((await read(layer, 0, MIN_PAGES * PS)).equals(acked), 'reads still see the acknowledged data');
  full = false;
  await layer.flush();
  t.equal(store.dirtyCount, 0, 'everything written back once the disk has space');
  t.ok((await dev.raw(0, MIN_PAGES * PS)).equals(acked), 'the backing device holds every acknowledged byte');
  t.ok(dev.writesSinceFlush === 0 && dev.flushes > 0, 'and was flushed');
  await layer.pwrite(pattern(PS, 5), 1000 * PS);
  t.ok((await read(layer, 1000 * PS, PS)).equals(pattern(PS, 5)), 'writes work again');
});

t.test('a writeback of an older version in flight never lands after a newer flushed one', async (t) => {
  const s = await stack(t, { size: 4 * MiB });
  const { layer, dev } = s;
  const v1 = pattern(PS, 1);
  const v2 = pattern(PS, 2);
  // Hold only the first backing write (v1's).
  const gate = new Gate();
  gate.close();
  t.teardown(() => gate.open());
  let first = true;
  dev.beforeWrite = async () => {
    if (first) {
      first = false;
      await gate.pass();
    }
  };
  await layer.pwrite(v1, 0);
  const flush1 = layer.flush(); // writes v1 back; held
  await until(() => gate.waiting === 1, 'v1 writeback to be under way');
  await layer.pwrite(v2, 0);
  const flush2 = layer.flush();
  // v2 must not be written (and flush2 must not return) while v1's write is in flight: v1 could land last.
  const early = await settled(flush2);
  gate.open();
  await Promise.all([flush1, flush2]);
  t.ok((await dev.raw(0, PS)).equals(v2), 'the backing device holds v2 after both flushes');
  t.ok((await read(layer, 0, PS)).equals(v2), 'and the layer reads v2');
  t.equal(s.store.dirtyCount, 0);
  t.notOk(early, 'flush2 waited for the older write of the same block');
  // Evict block 0 and read it back from below the region.
  await layer.pwrite(pattern(MIN_PAGES * PS, 3), PS);
  await layer.flush();
  await layer.pwrite(pattern(MIN_PAGES * PS, 4), PS);
  t.notOk(s.se.index.has(0), 'block 0 evicted');
  t.ok((await read(layer, 0, PS)).equals(v2), 'read from cache/backing: v2');
});

t.test('a writeback of an older version in flight never lands after a TRIM of the block', async (t) => {
  const s = await stack(t, { size: 4 * MiB, cacheBytes: 0 });
  const { layer, dev } = s;
  const gate = new Gate();
  gate.close();
  t.teardown(() => gate.open());
  dev.beforeWrite = () => gate.pass();
  await layer.pwrite(pattern(PS, 1), 0);
  const flush1 = layer.flush(); // v1 write held
  await until(() => gate.waiting === 1, 'v1 writeback to be under way');
  await layer.pwrite(pattern(PS, 2), 0);
  const trim = layer.trim(0, PS);
  const zero = layer.zero(0, PS, { mayTrim: true });
  await sleep(20);
  gate.open();
  await Promise.all([flush1, trim, zero]);
  await layer.flush();
  t.ok(isZero(await read(layer, 0, PS)), 'the block reads as zeros');
  t.ok(isZero(await dev.raw(0, PS)), 'the backing device holds zeros, not the older version');
});

// ---------------------------------------------------------------------------------------------------------
// Crash recovery of the region file

/** What lib/node.ts's recover() does, against any BlockDevice. */
async function writeBackTo(dev: BlockDevice, report: RecoveryReport): Promise<void> {
  for (const p of report.pages) {
    const off = p.block * PAGE_SIZE;
    if (off >= dev.size) continue;
    await dev.pwrite(p.data.subarray(0, Math.min(PAGE_SIZE, dev.size - off)), off);
  }
  await dev.flush();
}

t.test('crash: reopening the region file recovers every acknowledged write', async (t) => {
  const size = 2 * MiB + 512;
  const s = await stack(t, { size, durability: 'pmem' });
  const { layer, dev } = s;
  const model = Buffer.alloc(size);
  const rnd = prng(31337);
  const randomWrite = async (i: number, maxBlock: number): Promise<void> => {
    const len = rnd() < 0.5 ? 1 + Math.floor(rnd() * PS) : PS * (1 + Math.floor(rnd() * 4));
    const span = Math.min(size, maxBlock * PS) - len;
    const off = rnd() < 0.5 ? Math.floor(rnd() * span) : PS * Math.floor(rnd() * Math.floor(span / PS));
    const buf = pattern(len, i);
    await layer.pwrite(buf, off);
    buf.copy(model, off);
  };
  // Phase A: writes and trims over the whole export; the region fills, writeback runs under pressure.
  for (let i = 0; i < 500; i++) {
    if (rnd() < 0.85) {
      await randomWrite(i, Infinity);
    } else {
      const len = PS * (1 + Math.floor(rnd() * 4));
      const off = PS * Math.floor(rnd() * Math.floor((size - len) / PS));
      await layer.trim(off, len);
      model.fill(0, off, off + len);
    }
  }
  t.ok(s.store.backpressureWaits > 0, 'phase A ran the region full');
  await s.wb.flushExport(s.se); // a clean base: every page in the region is clean now
  // Phase B: dirty pages in the first 160 blocks (they all fit in the region: nothing waits).
  for (let i = 0; i < 150; i++) await randomWrite(1000 + i, 160);
  const dirtyB = s.store.dirtyCount;
  // A writeback of all of them starts and is held at the backing device: those pages are pinned.
  const gate = new Gate();
  gate.close();
  dev.beforeWrite = () => gate.pass();
  const held = s.wb.flushExport(s.se);
  held.catch(() => undefined);
  await until(() => gate.waiting > 0, 'the writeback to be under way');
  // Phase C: overwrite pages while their older versions are being written (copy-on-write of pinned pages).
  for (let i = 0; i < 40; i++) await randomWrite(2000 + i, 160);
  t.ok(dirtyB > 0, `${dirtyB} pages dirty before the crash, ${s.store.dirtyCount} after phase C`);
  // The crash: the region file is closed with everything in it; nothing more reaches the backing device.
  await s.crash();
  const after = new Hooked(dev.inner);
  let report: RecoveryReport | null = null;
  const { region } = await PmemRegion.open({
    file: s.file,
    nodeUuid: s.uuid,
    size: MIN_PAGES * PS,
    writeBack: async (r) => {
      report = r;
      await writeBackTo(after, r);
    },
  });
  t.teardown(() => region.close());
  const r = report as RecoveryReport | null;
  t.ok(r !== null && r.pages.length >= dirtyB, `recovered ${r?.pages.length} pages (superseded ${r?.superseded}, torn ${r?.torn})`);
  t.equal(r?.torn, 0, 'nothing torn');
  t.ok((r?.superseded ?? 0) > 0, 'older versions held by the writeback were superseded by newer ones');
  t.ok(r?.pages.every((p) => p.exportName === 'disk'), 'pages are attributed to the export');
  const seqs = r?.pages.map((p) => p.seq) ?? [];
  t.ok(seqs.every((x, i) => i === 0 || seqs[i - 1]! < x), 'in sequence order');
  t.ok((await after.raw(0, size)).equals(model), 'the backing device holds every acknowledged byte after recovery');
});

t.test('crash with a layer over BackingFile: recover into the reopened file', async (t) => {
  const dir = t.testdir();
  const size = 2 * MiB;
  const bf = await BackingFile.open({ dir, name: 'disk', size, readOnly: false, log });
  // One t.testdir() per test: calling it again would empty the directory under the open backing file.
  const s = await stack(t, { inner: bf, file: path.join(dir, 'region.pmem'), durability: 'disk', high: 64, low: 16, maxAgeMs: 10 });
  const model = Buffer.alloc(size);
  for (let i = 0; i < 200; i++) {
    const off = ((i * 7919) % 500) * PS + (i % 3) * 1000;
    const buf = pattern(PS + 500, i);
    await s.layer.pwrite(buf, off);
    buf.copy(model, off);
    if (i === 150) await s.layer.flush();
  }
  // Let a background pass finish (in-process, the old mapping must not be touched once the file is reopened).
  await s.wb.stop();
  t.ok(s.store.dirtyCount > 0, `${s.store.dirtyCount} pages dirty at the crash`);
  await s.crash();
  await bf.close();
  const bf2 = await BackingFile.open({ dir, name: 'disk', size, readOnly: false, log });
  t.teardown(() => bf2.close());
  let pages = 0;
  const { region } = await PmemRegion.open({
    file: s.file,
    nodeUuid: s.uuid,
    size: MIN_PAGES * PS,
    writeBack: async (r) => {
      pages = r.pages.length;
      await writeBackTo(bf2, r);
    },
  });
  t.teardown(() => region.close());
  t.ok(pages > 0, `${pages} pages recovered`);
  const got = await read(bf2, 0, size);
  t.ok(got.equals(model), 'the backing file holds every acknowledged write');
});

