// lib/storage/writeback.ts over a PmemStore on a real region file: the watermark hysteresis (start at high,
// keep going down to low, do not start between them), the age trigger, coalescing of adjacent dirty pages into
// few large backing writes (at most 1 MiB each, at most 4 in flight), flushExport with a sequence limit,
// syncBeforeClean, the oldest export first, retry after a failed backing write, and stop().

import t from 'tap';
import type { Test } from 'tap';
import * as path from 'node:path';
import { randomUUID } from 'node:crypto';
import { PmemRegion, SLOT_CLEAN, SLOT_DIRTY } from '../../../lib/storage/pmem-region';
import { PmemStore, type StoreExport } from '../../../lib/storage/pmem-store';
import { ReadCache } from '../../../lib/storage/read-cache';
import { Writeback, type WritebackOptions } from '../../../lib/storage/writeback';
import { MemoryDevice } from '../../../lib/storage/memory-device';
import type { WriteFlags } from '../../../lib/storage/block-device';
import { silentLogger } from '../../../lib/log';
import { prng } from '../../helpers/bytes';
import { PassThroughDevice } from '../../helpers/pass-through';

const PS = 4096;
const MiB = 1024 * 1024;

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function until(cond: () => boolean, what: string, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(1);
  }
}

/** A MemoryDevice that records its writes and flushes and can hold or fail writes. */
class Recorder extends PassThroughDevice<MemoryDevice> {
  writes: Array<{ offset: number; length: number }> = [];
  flushes = 0;
  inFlight = 0;
  maxInFlight = 0;
  hold: Promise<void> | null = null;
  failNext = 0;

  constructor(size: number) {
    super(new MemoryDevice({ size }));
  }

  override async pwrite(buf: Buffer, offset: number, flags?: WriteFlags): Promise<void> {
    this.inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    try {
      if (this.hold) await this.hold;
      if (this.failNext > 0) {
        this.failNext--;
        throw Object.assign(new Error('EIO: i/o error'), { code: 'EIO' });
      }
      await this.inner.pwrite(buf, offset, flags);
      this.writes.push({ offset, length: buf.length });
    } finally {
      this.inFlight--;
    }
  }

  override async flush(): Promise<void> {
    this.flushes++;
  }

  get bytesWritten(): number {
    return this.writes.reduce((a, w) => a + w.length, 0);
  }
}

interface Fixture {
  region: PmemRegion;
  store: PmemStore;
  wb: Writeback;
  dev: Recorder;
  e: StoreExport;
}

async function fixture(t: Test, o: { pages?: number; size?: number } & Partial<WritebackOptions> = {}): Promise<Fixture> {
  const pages = o.pages ?? 1024;
  const { region } = await PmemRegion.open({
    file: path.join(t.testdir(), 'region.pmem'),
    nodeUuid: randomUUID(),
    size: pages * PS,
    writeBack: async () => undefined,
  });
  const store = new PmemStore(region, new ReadCache(0));
  const wb = new Writeback(
    store,
    { highPages: o.highPages ?? pages + 1, lowPages: o.lowPages ?? 0, maxAgeMs: o.maxAgeMs ?? 1e9, syncBeforeClean: o.syncBeforeClean ?? false },
    silentLogger(),
  );
  const dev = new Recorder(o.size ?? 8 * MiB);
  const e = store.addExport('disk', dev);
  t.teardown(async () => {
    dev.hold = null;
    await wb.stop();
    await region.close();
  });
  return { region, store, wb, dev, e };
}

/** Make block dirty in the region with every byte = fill (as the layer's full-page write does). */
function dirty(f: Fixture, block: number, fill: number, e: StoreExport = f.e): number {
  const slot = f.store.tryTakeSlot();
  if (slot < 0) throw new Error('region full');
  f.region.page(slot).fill(fill);
  f.store.installDirty(e, block, slot);
  return slot;
}

function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

t.test('watermarks: nothing below high; from high down to low, even with pages added meanwhile; not between them', async (t) => {
  const f = await fixture(t, { highPages: 100, lowPages: 40 });
  for (let b = 0; b < 99; b++) dirty(f, b * 2, 1); // every other block: 99 runs of one page
  f.wb.kick();
  await sleep(20);
  t.equal(f.dev.writes.length, 0, '99 dirty pages (below high): no writeback');
  t.equal(f.store.dirtyCount, 99);
  // Reaching high starts a pass; hold its writes and add pages meanwhile.
  const gate = deferred();
  f.dev.hold = gate.promise;
  dirty(f, 198, 1);
  f.wb.kick();
  await until(() => f.dev.inFlight > 0, 'the pass to start');
  for (let b = 0; b < 60; b++) dirty(f, 1000 + b * 2, 2);
  t.equal(f.store.dirtyCount, 160);
  f.dev.hold = null;
  gate.resolve();
  // The first batch took the 100 pages; 60 remain (< high, > low): hysteresis keeps the pass going.
  await until(() => f.store.dirtyCount === 0, 'the pass to write everything down to low');
  await sleep(10);
  t.equal(f.dev.bytesWritten, 160 * PS, 'all 160 pages were written, in one pass');
  // Between the watermarks, with the pass over: nothing starts.
  const before = f.dev.writes.length;
  for (let b = 0; b < 70; b++) dirty(f, 1500 + b * 2, 3);
  f.wb.kick();
  await sleep(20);
  t.equal(f.dev.writes.length, before, '70 dirty pages (between low and high) after a drain: no writeback');
  t.equal(f.store.dirtyCount, 70);
  for (let b = 70; b < 100; b++) dirty(f, 1500 + b * 2, 3);
  f.wb.kick();
  await until(() => f.store.dirtyCount <= 40, 'draining at high again');
  t.pass('high again: drained to low');
});

t.test('the age limit writes back old pages without any watermark', async (t) => {
  const f = await fixture(t, { maxAgeMs: 300 });
  const start = Date.now();
  dirty(f, 5, 1);
  dirty(f, 6, 1);
  const age = f.store.stats().oldestDirtyMs;
  t.ok(age !== null && age >= 0 && age < 300, `stats report the oldest dirty page's age (${age} ms)`);
  f.wb.kick();
  await sleep(10);
  t.equal(f.dev.writes.length, 0, 'young pages stay dirty');
  await until(() => f.store.dirtyCount === 0, 'the timer to write the old pages back', 3000);
  t.ok(Date.now() - start >= 300, `written back after the age limit (${Date.now() - start} ms)`);
  t.same(f.dev.writes, [{ offset: 5 * PS, length: 2 * PS }], 'one write of both pages');
  t.equal(f.store.stats().oldestDirtyMs, null, 'no dirty page left');
  t.equal(f.store.stats().cleanPages, 2);
});

t.test('coalescing: sequential dirty pages go out as few large writes, at most 1 MiB each', async (t) => {
  const f = await fixture(t);
  // Dirty 600 sequential blocks in a shuffled order, so their slots are scattered in the region.
  const rnd = prng(3);
  const blocks = Array.from({ length: 600 }, (_, i) => 100 + i);
  for (let i = blocks.length - 1; i > 0; i--) {
    const j = Math.floor(rnd() * (i + 1));
    [blocks[i], blocks[j]] = [blocks[j]!, blocks[i]!];
  }
  for (const b of blocks) dirty(f, b, (b % 250) + 1);
  // Two more groups with gaps between them.
  for (const b of [1000, 1001, 1002, 1010, 2000]) dirty(f, b, 7);
  await f.wb.flushExport(f.e);
  const writes = [...f.dev.writes].sort((a, b) => a.offset - b.offset);
  t.same(
    writes,
    [
      { offset: 100 * PS, length: 256 * PS },
      { offset: 356 * PS, length: 256 * PS },
      { offset: 612 * PS, length: 88 * PS },
      { offset: 1000 * PS, length: 3 * PS },
      { offset: 1010 * PS, length: PS },
      { offset: 2000 * PS, length: PS },
    ],
    '605 pages in 6 writes',
  );
  t.ok(f.dev.maxInFlight <= 4, `at most 4 backing writes in flight (${f.dev.maxInFlight})`);
  t.equal(f.wb.bytesWritten, 605 * PS);
  t.equal(f.dev.flushes, 1, 'flushExport flushes the backing device once');
  t.equal(f.store.dirtyCount, 0);
  const data = Buffer.alloc(PS);
  let wrong = 0;
  for (const b of blocks) {
    await f.dev.inner.pread(data, b * PS);
    if (!data.every((x) => x === (b % 250) + 1)) wrong++;
  }
  t.equal(wrong, 0, 'each page landed at its block');
});

t.test('at most 4 backing writes of a batch are in flight at once', async (t) => {
  const f = await fixture(t);
  for (let i = 0; i < 10; i++) dirty(f, i * 10, 1); // ten runs of one page
  const gate = deferred();
  f.dev.hold = gate.promise;
  const flushing = f.wb.flushExport(f.e);
  await until(() => f.dev.inFlight === 4, 'four writes');
  await sleep(10);
  t.equal(f.dev.inFlight, 4, 'no fifth write starts while four are held');
  f.dev.hold = null;
  gate.resolve();
  await flushing;
  t.equal(f.dev.writes.length, 10);
  t.equal(f.dev.maxInFlight, 4);
});

t.test('the export tail page is clipped to the export size', async (t) => {
  const size = 10 * PS + 100;
  const f = await fixture(t, { size });
  dirty(f, 9, 5);
  dirty(f, 10, 6);
  await f.wb.flushExport(f.e);
  t.same(f.dev.writes, [{ offset: 9 * PS, length: PS + 100 }], 'one write that ends at the export size');
  const tail = Buffer.alloc(100);
  await f.dev.inner.pread(tail, 10 * PS);
  t.ok(tail.every((x) => x === 6));
});

t.test('flushExport with maxSeq writes only pages committed up to it; other exports are left alone', async (t) => {
  const f = await fixture(t);
  const other = f.store.addExport('other', new Recorder(MiB));
  dirty(f, 1, 1);
  dirty(f, 2, 1);
  const limit = f.region.slotSeq[f.e.index.get(2)!]!;
  dirty(f, 3, 1);
  dirty(f, 9, 1, other);
  await f.wb.flushExport(f.e, limit);
  t.same(f.dev.writes, [{ offset: PS, length: 2 * PS }], 'blocks 1 and 2 only');
  t.equal(f.region.slotState[f.e.index.get(3)!], SLOT_DIRTY, 'block 3 (committed later) is still dirty');
  t.equal(f.region.slotState[other.index.get(9)!], SLOT_DIRTY, "the other export's page is untouched");
  t.equal(f.region.slotState[f.e.index.get(1)!], SLOT_CLEAN);
  await f.wb.flushExport(f.e);
  t.equal(f.store.dirtyCount, 1, "only the other export's page is dirty");
});

t.test('syncBeforeClean: a background pass flushes the backing device before pages count as clean', async (t) => {
  for (const sync of [false, true]) {
    const f = await fixture(t, { highPages: 1, lowPages: 0, syncBeforeClean: sync });
    dirty(f, 1, 1);
    f.wb.kick();
    await until(() => f.store.dirtyCount === 0, 'clean');
    t.equal(f.dev.flushes, sync ? 1 : 0, `syncBeforeClean ${sync}: ${sync ? 'one' : 'no'} backing flush`);
  }
});

t.test('the export with the oldest dirty page is written back first', async (t) => {
  const f = await fixture(t, { highPages: 3, lowPages: 0 });
  const otherDev = new Recorder(MiB);
  const other = f.store.addExport('other', otherDev);
  dirty(f, 1, 1, other);
  await sleep(5);
  dirty(f, 1, 1);
  dirty(f, 2, 1);
  const order: string[] = [];
  const origA = f.dev.pwrite.bind(f.dev);
  f.dev.pwrite = async (b, o, fl) => {
    order.push('disk');
    await origA(b, o, fl);
  };
  const origB = otherDev.pwrite.bind(otherDev);
  otherDev.pwrite = async (b, o, fl) => {
    order.push('other');
    await origB(b, o, fl);
  };
  f.wb.kick();
  await until(() => f.store.dirtyCount === 0, 'everything written');
  t.same(order, ['other', 'disk'], 'the other export (older page) first, then disk in one write');
});

t.test('a failed backing write leaves pages dirty and is retried by the background pass', async (t) => {
  const f = await fixture(t, { highPages: 1, lowPages: 0 });
  f.dev.failNext = 1;
  dirty(f, 4, 9);
  f.wb.kick();
  await until(() => f.dev.failNext === 0, 'the failed attempt');
  t.equal(f.store.dirtyCount, 1, 'the page is still dirty after the failure');
  t.equal(f.dev.writes.length, 0);
  await until(() => f.store.dirtyCount === 0, 'the retry', 3000);
  t.same(f.dev.writes, [{ offset: 4 * PS, length: PS }], 'written by the retry');
  f.dev.failNext = 1;
  dirty(f, 5, 9);
  await t.rejects(f.wb.flushExport(f.e), { code: 'EIO' }, 'flushExport reports the failure');
});

t.test('stop waits for the running pass and ends background writeback', async (t) => {
  const f = await fixture(t, { highPages: 1, lowPages: 0, maxAgeMs: 1 });
  const gate = deferred();
  f.dev.hold = gate.promise;
  dirty(f, 1, 1);
  f.wb.kick();
  await until(() => f.dev.inFlight === 1, 'the pass to start');
  let stopped = false;
  const stopping = f.wb.stop().then(() => (stopped = true));
  await sleep(10);
  t.notOk(stopped, 'stop waits for the pass');
  f.dev.hold = null;
  gate.resolve();
  await stopping;
  t.equal(f.store.dirtyCount, 0);
  dirty(f, 2, 1);
  f.wb.kick();
  await sleep(80);
  t.equal(f.store.dirtyCount, 1, 'after stop, neither kick nor the timer write back');
  await f.wb.flushExport(f.e);
  t.equal(f.store.dirtyCount, 0, 'flushExport still works after stop');
});
