// The writeback thread (writeback-io.ts + writeback-worker.ts) over a real region file and a real BackingFile:
// pages written back by the thread land in the backing file (also runs cut at the export's end, and runs
// over holes that the event loop then marks allocated), long runs stay on the event loop, a failed job
// leaves its pages dirty with the error, and once the thread is gone the worker falls back to writing on the
// event loop.

import t from 'tap';
import type { Test } from 'tap';
import * as path from 'node:path';
import { randomUUID } from 'node:crypto';
import { BackingFile } from '../../lib/storage/backing-file';
import type { BlockDevice, DirectWrite } from '../../lib/storage/block-device';
import { PmemRegion, SLOT_DIRTY } from '../../lib/storage/pmem-region';
import { PmemStore, type StoreExport } from '../../lib/storage/pmem-store';
import { ReadCache } from '../../lib/storage/read-cache';
import { Writeback } from '../../lib/storage/writeback';
import { WritebackIo } from '../../lib/storage/writeback-io';
import { silentLogger } from '../../lib/log';

const PS = 4096;
const log = silentLogger();

interface Fixture {
  region: PmemRegion;
  store: PmemStore;
  wb: Writeback;
  io: WritebackIo;
  bf: BackingFile;
  e: StoreExport;
}

async function fixture(t: Test, size: number): Promise<Fixture> {
  const dir = t.testdir();
  const { region } = await PmemRegion.open({ file: path.join(dir, 'r.pmem'), nodeUuid: randomUUID(), size: 512 * PS, writeBack: async () => undefined });
  const io = new WritebackIo(region.file, region.geometry);
  const store = new PmemStore(region, new ReadCache(0));
  const wb = new Writeback(store, { highPages: 1e9, lowPages: 0, maxAgeMs: 1e9, syncBeforeClean: false, io }, log);
  const bf = await BackingFile.open({ dir, name: 'disk', size, readOnly: false, log });
  const e = store.addExport('disk', bf);
  t.teardown(async () => {
    await wb.stop();
    await io.close();
    await region.close();
    await bf.close();
  });
  return { region, store, wb, io, bf, e };
}

function fillPage(seed: number): Buffer {
  const b = Buffer.alloc(PS);
  for (let i = 0; i < PS; i++) b[i] = (seed * 7 + i) & 0xff;
  return b;
}

function dirty(f: Fixture, block: number, seed: number): number {
  const slot = f.store.tryTakeSlot();
  f.region.page(slot).set(fillPage(seed));
  f.store.installDirty(f.e, block, slot);
  return slot;
}

async function readBack(dev: BlockDevice, offset: number, length: number): Promise<Buffer> {
  const b = Buffer.alloc(length);
  await dev.pread(b, offset);
  return b;
}

t.test('the thread writes runs to the backing file; holes it filled are marked allocated afterwards', async (t) => {
  const size = 64 * PS + 1000; // a short tail block
  const f = await fixture(t, size);
  const blocks = [0, 1, 2, 7, 30, 31, 64];
  for (const b of blocks) dirty(f, b, b + 1);
  const directs: number[] = [];
  const orig = f.bf.directWrite.bind(f.bf);
  f.bf.directWrite = (offset: number, length: number): DirectWrite | null => {
    directs.push(offset);
    return orig(offset, length);
  };
  await f.wb.flushExport(f.e);
  t.same(directs, [0, 7 * PS, 30 * PS, 64 * PS], 'four runs went to the thread (adjacent blocks coalesced)');
  t.equal(f.store.dirtyCount, 0, 'every page clean');
  for (const b of blocks) {
    const len = Math.min(PS, size - b * PS);
    t.ok((await readBack(f.bf, b * PS, len)).equals(fillPage(b + 1).subarray(0, len)), `block ${b} is in the backing file`);
  }
  const ext = await f.bf.extents(0, 8 * PS);
  t.same(ext, [{ length: 3 * PS, flags: 0 }, { length: 4 * PS, flags: 3 }, { length: PS, flags: 0 }], 'written blocks are allocated, the rest still holes');
  t.equal(f.wb.bytesWritten, 6 * PS + (size - 64 * PS), 'bytes written counted, the tail cut at the export end');
});

t.test('long runs (32 pages or more) are written on the event loop, short ones in the thread', async (t) => {
  const f = await fixture(t, 128 * PS);
  for (let b = 0; b < 40; b++) dirty(f, b, b);
  dirty(f, 100, 100);
  const threaded: number[] = [];
  const write = f.io.write.bind(f.io);
  f.io.write = (jobs, urgent) => {
    for (const j of jobs) threaded.push(j.offset / PS);
    return write(jobs, urgent);
  };
  await f.wb.flushExport(f.e);
  t.same(threaded, [100], 'only the one-page run went to the thread');
  for (const b of [0, 39, 100]) t.ok((await readBack(f.bf, b * PS, PS)).equals(fillPage(b)), `block ${b} written`);
});

t.test('a failed job leaves its pages dirty and reports the error; the next pass retries', async (t) => {
  const f = await fixture(t, 32 * PS);
  const slot = dirty(f, 3, 9);
  const orig = f.bf.directWrite.bind(f.bf);
  let broken = true;
  f.bf.directWrite = (offset: number, length: number): DirectWrite | null => {
    const dw = orig(offset, length);
    // A descriptor that is not open: the thread's pwritev fails with EBADF.
    return dw === null || !broken ? dw : { fd: 1_000_000, done: dw.done };
  };
  await t.rejects(f.wb.flushExport(f.e), { code: 'EBADF' }, 'the error comes back with its code');
  t.equal(f.region.slotState[slot], SLOT_DIRTY, 'the page is still dirty');
  broken = false;
  await f.wb.flushExport(f.e);
  t.ok((await readBack(f.bf, 3 * PS, PS)).equals(fillPage(9)), 'written on the retry');
});

t.test('one batch: each job gets its own result, a failure between successes included', async (t) => {
  const f = await fixture(t, 32 * PS);
  const a = f.store.tryTakeSlot();
  const b = f.store.tryTakeSlot();
  f.region.page(a).set(fillPage(1));
  f.region.page(b).set(fillPage(2));
  const dw = f.bf.directWrite(0, 32 * PS)!;
  const results = await f.io.write([
    { fd: dw.fd, offset: 4 * PS, length: PS, slots: [a] },
    { fd: 1_000_000, offset: 0, length: PS, slots: [a] },
    { fd: dw.fd, offset: 6 * PS, length: 2 * PS - 100, slots: Int32Array.from([b, a]) },
    { fd: 1_000_001, offset: 0, length: PS, slots: [b] },
  ]);
  dw.done();
  t.same(
    results.map((r) => (r === null ? null : (r as NodeJS.ErrnoException).code)),
    [null, 'EBADF', null, 'EBADF'],
  );
  t.ok((await readBack(f.bf, 4 * PS, PS)).equals(fillPage(1)), 'the first job wrote its page');
  const two = await readBack(f.bf, 6 * PS, 2 * PS);
  t.ok(two.subarray(0, PS).equals(fillPage(2)), 'the third job wrote its pages in slot order');
  t.ok(two.subarray(PS, 2 * PS - 100).equals(fillPage(1).subarray(0, PS - 100)), '…the last one cut at its length');
  t.ok(two.subarray(2 * PS - 100).equals(Buffer.alloc(100)), '…and nothing beyond it');
  t.same(await f.io.write([]), [], 'an empty batch has no results');
});

t.test('after the thread is gone, writeback goes on on the event loop', async (t) => {
  const f = await fixture(t, 32 * PS);
  await f.io.close();
  t.equal(f.io.usable, false);
  await t.rejects(f.io.write([]), /closed/, 'the closed thread refuses work');
  dirty(f, 5, 4);
  await f.wb.flushExport(f.e);
  t.ok((await readBack(f.bf, 5 * PS, PS)).equals(fillPage(4)), 'written without the thread');
});
