// lib/storage/backing-file.ts against real files in t.testdir(): creation, locking, data at unaligned offsets,
// deallocation through the allocation map (TRIM, WRITE_ZEROES), the rule that stale bytes of a deallocated block
// never reappear (also under concurrent writes and across reopen), rebuilding a lost map from the file's own
// holes, flush coalescing, the short tail block, a seeded random model test with a reopen in the middle, and
// synchronous reads (preadNow) exactly when the image is on tmpfs.

import t from 'tap';
import type { Test } from 'tap';
import * as path from 'node:path';
import { promises as fsp, readFileSync, statSync, statfsSync, unlinkSync, openSync, closeSync, writeSync, ftruncateSync } from 'node:fs';
import * as fsext from 'fs-ext';
import pino from 'pino';
import { ALLOC_BLOCK_SIZE, BackingFile, checkCapacity, lockDataDir } from '../../lib/storage/backing-file';
import { LockedError, NotSupportedError, UsageError, toNbdErrno } from '../../lib/errors';
import { silentLogger } from '../../lib/log';
import type { Extent } from '../../lib/storage/block-device';
import { prng } from '../helpers/bytes';
import { tmpfsDir } from '../helpers/tmpfs';
import { requireThat } from '../helpers/requires';

const BS = 4096;
const KiB = 1024;
const MiB = 1024 * 1024;
const DATA = 0;
const HOLE_ZERO = 3; // NBD_STATE_HOLE | NBD_STATE_ZERO, written out
const log = silentLogger();

async function open(t: Test, dir: string, size: number, name = 'disk', readOnly = false): Promise<BackingFile> {
  const dev = await BackingFile.open({ dir, name, size, readOnly, log });
  t.teardown(() => dev.close()); // close() is idempotent, so tests may close earlier
  return dev;
}

async function read(dev: BackingFile, offset: number, length: number): Promise<Buffer> {
  const b = Buffer.alloc(length, 0xee); // pre-filled so "left untouched" cannot pass for zeros
  await dev.pread(b, offset);
  return b;
}

const isZero = (b: Buffer): boolean => b.every((x) => x === 0);
const filled = (b: Buffer, v: number): boolean => b.every((x) => x === v);

function pattern(length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = ((i * 31 + seed * 7) % 251) + 1; // never zero
  return b;
}

function flagsPerBlock(ext: Extent[]): number[] {
  const out: number[] = [];
  for (const e of ext) for (let i = 0; i < Math.ceil(e.length / BS); i++) out.push(e.flags);
  return out;
}

/** Whether the test directory's filesystem reports holes through SEEK_HOLE (ext4, xfs, btrfs, tmpfs do). */
function fsReportsHoles(dir: string): boolean {
  const file = path.join(dir, 'hole-probe');
  const fd = openSync(file, 'w+');
  try {
    ftruncateSync(fd, 4 * BS);
    writeSync(fd, Buffer.alloc(BS, 1), 0, BS, 0);
    return fsext.seekSync(fd, 0, 4 /* SEEK_HOLE */) === BS;
  } finally {
    closeSync(fd);
    unlinkSync(file);
  }
}

t.test('create: a sparse image of the given size and a fresh map', async (t) => {
  const dir = t.testdir();
  const size = 4 * MiB;
  const dev = await open(t, dir, size);
  t.equal(ALLOC_BLOCK_SIZE, 4096);
  t.equal(dev.size, size);
  t.equal(dev.name, 'disk');
  t.same(dev.caps, {
    readOnly: false, flush: true, fua: true, trim: true, zero: true, fastZero: true, cache: true, multiConn: true, extents: true,
  });
  const st = statSync(path.join(dir, 'disk.img'));
  t.equal(st.size, size, 'image has the export size');
  t.ok(st.blocks * 512 < size / 4, `sparse: ${st.blocks * 512} bytes allocated on disk`);
  const map = readFileSync(path.join(dir, 'disk.alloc'));
  t.equal(map.length, 32 + size / BS / 8, '32-byte header plus one bit per block');
  t.equal(map.subarray(0, 8).toString('latin1'), 'NBDMALOC', 'magic');
  t.equal(map.readUInt32BE(8), 1, 'version 1');
  t.equal(map.readUInt32BE(12), 4096, 'block size');
  t.equal(Number(map.readBigUInt64BE(16)), size, 'export size');
  t.ok(isZero(map.subarray(32)), 'nothing allocated');
  t.same(await dev.extents(0, size), [{ length: size, flags: HOLE_ZERO }]);
  t.ok(isZero(await read(dev, 0, size)), 'reads zeros');
});

t.test('reopen keeps data and allocation', async (t) => {
  const dir = t.testdir();
  const dev = await open(t, dir, MiB);
  await dev.pwrite(pattern(5000, 1), 70000);
  await dev.close();
  const again = await open(t, dir, MiB);
  t.same(await read(again, 70000, 5000), pattern(5000, 1));
  t.same(flagsPerBlock(await again.extents(16 * BS, 4 * BS)), [HOLE_ZERO, DATA, DATA, HOLE_ZERO], '70000..75000 lies in blocks 17 and 18');
  t.ok(isZero(await read(again, 0, 70000)));
});

t.test('size mismatch is a UsageError and leaves the image alone', async (t) => {
  const dir = t.testdir();
  const dev = await open(t, dir, MiB);
  await dev.pwrite(Buffer.alloc(10, 7), 0);
  await dev.close();
  await t.rejects(BackingFile.open({ dir, name: 'disk', size: 2 * MiB, readOnly: false, log }), UsageError);
  const err = await BackingFile.open({ dir, name: 'disk', size: MiB - 512, readOnly: false, log }).catch((e: unknown) => e);
  t.match((err as Error).message, /holds 1048576 bytes but the export is configured as 1048064.*resizing is not supported/);
  t.equal(statSync(path.join(dir, 'disk.img')).size, MiB, 'not resized');
  const again = await open(t, dir, MiB);
  t.ok(filled(await read(again, 0, 10), 7), 'the failed opens released the lock and kept the data');
});

t.test('a second open of an open export: LockedError (flock)', async (t) => {
  const dir = t.testdir();
  const first = await open(t, dir, MiB);
  const err = await BackingFile.open({ dir, name: 'disk', size: MiB, readOnly: false, log }).catch((e: unknown) => e);
  t.ok(err instanceof LockedError, 'LockedError');
  t.match((err as Error).message, /disk\.img is locked by another process/);
  t.equal(toNbdErrno(err), 5, 'EIO if it ever reached the wire');
  await t.rejects(BackingFile.open({ dir, name: 'disk', size: MiB, readOnly: true, log }), LockedError, 'read-only too');
  const other = await open(t, dir, MiB, 'other');
  t.equal(other.name, 'other', 'another export in the same directory opens');
  await first.close();
  const again = await open(t, dir, MiB);
  t.equal(again.size, MiB, 'opens once the first is closed');
});

t.test('lockDataDir: one holder at a time', async (t) => {
  const dir = path.join(t.testdir(), 'nested', 'data');
  const fh = await lockDataDir(dir);
  t.equal(readFileSync(path.join(dir, '.lock'), 'utf8'), `${process.pid}\n`, 'creates the directory and writes our pid');
  const err = await lockDataDir(dir).catch((e: unknown) => e);
  t.ok(err instanceof LockedError, 'second lock: LockedError');
  t.match((err as Error).message, /data dir .* is locked by another process/);
  await fh.close();
  const fh2 = await lockDataDir(dir);
  t.pass('locks again after release');
  await fh2.close();
});

t.test('writes and reads at unaligned offsets', async (t) => {
  const dir = t.testdir();
  const dev = await open(t, dir, MiB);
  // Disjoint ranges: single bytes, across a block boundary, several blocks with ragged ends, the last bytes.
  const cases: [number, number][] = [[0, 1], [1, 1], [4095, 2], [5000, 10000], [BS * 10 + 17, 3 * BS + 5], [MiB - 3, 3]];
  for (const [i, [off, len]] of cases.entries()) await dev.pwrite(pattern(len, i), off);
  for (const [i, [off, len]] of cases.entries()) t.same(await read(dev, off, len), pattern(len, i), `${len} bytes at ${off}`);
  t.ok(isZero(await read(dev, 2, 4093)), 'zeros between byte 1 and 4095');
  t.ok(isZero(await read(dev, 4097, 5000 - 4097)), 'zeros between 4097 and 5000');
  t.ok(isZero(await read(dev, 15000, BS * 10 + 17 - 15000)), 'zeros between writes');
  t.ok(isZero(await read(dev, 14 * BS, MiB - 3 - 14 * BS)), 'zeros up to the last write');
  t.same(flagsPerBlock(await dev.extents(0, 16 * BS)), [0, 0, 0, 0, 3, 3, 3, 3, 3, 3, 0, 0, 0, 0, 3, 3]);
  t.same((await dev.extents(MiB - BS, BS)), [{ length: BS, flags: DATA }], 'the last block');
  const span = await read(dev, 4000, 2000);
  const expect = Buffer.alloc(2000);
  pattern(2, 2).copy(expect, 95);
  pattern(10000, 3).copy(expect, 1000, 0, 1000);
  t.same(span, expect, 'one read across several writes and a gap');
});

t.test('trim: whole blocks become holes that read zeros; partial blocks keep their data', async (t) => {
  const dir = t.testdir();
  const dev = await open(t, dir, MiB);
  await dev.pwrite(Buffer.alloc(16 * BS, 0xaa), 0);
  await dev.trim(BS, 2 * BS);
  t.same(await dev.extents(0, 4 * BS), [{ length: BS, flags: DATA }, { length: 2 * BS, flags: HOLE_ZERO }, { length: BS, flags: DATA }]);
  t.ok(isZero(await read(dev, BS, 2 * BS)), 'trimmed blocks read zeros');
  t.ok(filled(await read(dev, 0, BS), 0xaa) && filled(await read(dev, 3 * BS, BS), 0xaa), 'neighbours intact');

  await dev.trim(5 * BS + 100, 3 * BS); // whole blocks 6 and 7 only
  t.same(flagsPerBlock(await dev.extents(4 * BS, 6 * BS)), [DATA, DATA, HOLE_ZERO, HOLE_ZERO, DATA, DATA]);
  t.ok(filled(await read(dev, 5 * BS, BS), 0xaa), 'the partial head block keeps all its data (trim is advisory)');
  t.ok(filled(await read(dev, 8 * BS, 100), 0xaa), 'the partial tail block keeps its data');
  await dev.trim(10 * BS + 1, BS - 2);
  t.ok(filled(await read(dev, 10 * BS, BS), 0xaa), 'a trim inside one block changes nothing');
  await dev.trim(12 * BS, 2 * BS, { fua: true });
  t.ok(isZero(await read(dev, 12 * BS, 2 * BS)), 'trim with FUA');
  await dev.close();
  const again = await open(t, dir, MiB);
  t.same(flagsPerBlock(await again.extents(0, 16 * BS)), [0, 3, 3, 0, 0, 0, 3, 3, 0, 0, 0, 0, 3, 3, 0, 0], 'holes survive reopen');
  t.ok(isZero(await read(again, BS, 2 * BS)), 'and still read zeros although the file keeps the old bytes');
});

t.test('zero: mayTrim deallocates, NO_HOLE writes zeros, FAST_ZERO without mayTrim is refused', async (t) => {
  const dir = t.testdir();
  const dev = await open(t, dir, MiB);
  await dev.pwrite(Buffer.alloc(32 * BS, 0xaa), 0);

  await dev.zero(100, 3 * BS, { mayTrim: true });
  t.ok(isZero(await read(dev, 100, 3 * BS)), 'mayTrim: the range reads zeros');
  t.equal((await read(dev, 99, 1))[0], 0xaa, 'byte before intact');
  t.equal((await read(dev, 100 + 3 * BS, 1))[0], 0xaa, 'byte after intact');
  t.same(flagsPerBlock(await dev.extents(0, 4 * BS)), [DATA, HOLE_ZERO, HOLE_ZERO, DATA], 'whole blocks became holes, edges zeroed in place');

  await dev.zero(8 * BS, 2 * BS);
  t.ok(isZero(await read(dev, 8 * BS, 2 * BS)), 'NO_HOLE: reads zeros');
  t.same(await dev.extents(8 * BS, 2 * BS), [{ length: 2 * BS, flags: DATA }], 'NO_HOLE: stays data');

  const err = await dev.zero(12 * BS, BS, { fastZero: true }).catch((e: unknown) => e);
  t.ok(err instanceof NotSupportedError, 'fastZero without mayTrim: NotSupportedError');
  t.equal(toNbdErrno(err), 95, 'ENOTSUP on the wire');
  t.ok(filled(await read(dev, 12 * BS, BS), 0xaa), 'and nothing was zeroed');

  await dev.zero(14 * BS, 2 * BS, { mayTrim: true, fastZero: true, fua: true });
  t.same(await dev.extents(14 * BS, 2 * BS), [{ length: 2 * BS, flags: HOLE_ZERO }], 'fastZero with mayTrim deallocates');

  await dev.zero(20 * BS + 10, 100, { mayTrim: true });
  t.ok(isZero(await read(dev, 20 * BS + 10, 100)), 'mayTrim inside one block zeroes in place');
  t.same(await dev.extents(20 * BS, BS), [{ length: BS, flags: DATA }]);

  await dev.zero(40 * BS, 4 * BS);
  t.same(await dev.extents(40 * BS, 4 * BS), [{ length: 4 * BS, flags: DATA }], 'NO_HOLE over never-written blocks allocates them');
  t.ok(isZero(await read(dev, 40 * BS, 4 * BS)));

  await dev.zero(0, MiB, { mayTrim: true });
  t.same(await dev.extents(0, MiB), [{ length: MiB, flags: HOLE_ZERO }], 'zeroing everything leaves one hole');
});

t.test('a write into part of a deallocated block: zeros around it, never stale bytes, also after reopen', async (t) => {
  const dir = t.testdir();
  const dev = await open(t, dir, MiB);
  await dev.pwrite(Buffer.alloc(8 * BS, 0xaa), 0);
  await dev.trim(0, 8 * BS);
  await dev.pwrite(Buffer.alloc(100, 0xbb), 3 * BS + 1000);
  await dev.pwrite(Buffer.alloc(BS, 0xcc), 5 * BS + 2048); // straddles blocks 5 and 6
  const expect = (): Buffer => {
    const b = Buffer.alloc(8 * BS);
    b.fill(0xbb, 3 * BS + 1000, 3 * BS + 1100);
    b.fill(0xcc, 5 * BS + 2048, 6 * BS + 2048);
    return b;
  };
  t.same(await read(dev, 0, 8 * BS), expect(), 'only the new bytes; zeros around them');
  t.same(flagsPerBlock(await dev.extents(0, 8 * BS)), [3, 3, 3, 0, 3, 0, 0, 3]);
  const raw = readFileSync(path.join(dir, 'disk.img')).subarray(0, 8 * BS);
  t.same(raw.subarray(3 * BS, 4 * BS), expect().subarray(3 * BS, 4 * BS), 'the file itself holds zeros around the write in block 3');
  t.same(raw.subarray(5 * BS, 7 * BS), expect().subarray(5 * BS, 7 * BS), 'and in blocks 5 and 6');
  t.ok(filled(raw.subarray(0, BS), 0xaa), 'a still-deallocated block keeps stale bytes in the file (the map hides them)');
  await dev.close();
  const again = await open(t, dir, MiB);
  t.same(await read(again, 0, 8 * BS), expect(), 'the same after close and reopen');
});

t.test('concurrent partial writes into the same deallocated block all survive', async (t) => {
  const dir = t.testdir();
  const dev = await open(t, dir, MiB);
  await dev.pwrite(Buffer.alloc(64 * BS, 0xaa), 0);
  await dev.trim(0, 64 * BS);
  const expect = Buffer.alloc(64 * BS);
  let rounds = 0;
  // 20 blocks: 8 × 512 bytes issued at once, in shuffled order.
  const rnd = prng(8);
  for (let block = 0; block < 20; block++) {
    const order = [0, 1, 2, 3, 4, 5, 6, 7].sort(() => rnd() - 0.5);
    await Promise.all(order.map((i) => {
      const off = block * BS + i * 512;
      const data = Buffer.alloc(512, 1 + ((block * 8 + i) % 250));
      data.copy(expect, off);
      return dev.pwrite(data, off);
    }));
    rounds++;
  }
  // Blocks 20..29: 10 writes of 700 bytes each spread across pairs of deallocated blocks, plus writes into
  // never-touched blocks and allocated blocks, all in flight together.
  const writes: Promise<void>[] = [];
  for (let i = 0; i < 20; i++) {
    const off = 20 * BS + 300 + i * 1900;
    const data = pattern(700, i + 100);
    data.copy(expect, off);
    writes.push(dev.pwrite(data, off));
  }
  const fresh = pattern(512, 999);
  fresh.copy(expect, 50 * BS + 1000);
  writes.push(dev.pwrite(fresh, 50 * BS + 1000));
  await Promise.all(writes);
  t.equal(rounds, 20);
  t.same(await read(dev, 0, 64 * BS), expect, 'every write is there and every other byte is zero');
  await dev.close();
  const again = await open(t, dir, MiB);
  t.same(await read(again, 0, 64 * BS), expect, 'also after reopen');
});

t.test('a lost or corrupt map is rebuilt from SEEK_DATA/SEEK_HOLE; data intact', async (t) => {
  const dir = t.testdir();
  const holes = fsReportsHoles(dir);
  const size = MiB;
  const mapPath = path.join(dir, 'disk.alloc');
  const dev = await open(t, dir, size);
  await dev.pwrite(pattern(BS, 1), 0);
  await dev.pwrite(pattern(100, 2), 5 * BS + 7);
  await dev.pwrite(pattern(3 * BS, 3), 100 * BS);
  await dev.close();
  const expectedFlags = (): number[] => {
    const f = new Array<number>(size / BS).fill(holes ? HOLE_ZERO : DATA);
    for (const b of [0, 5, 100, 101, 102]) f[b] = DATA;
    return f;
  };
  const check = async (what: string): Promise<void> => {
    const again = await open(t, dir, size);
    t.same(await read(again, 0, BS), pattern(BS, 1), `${what}: block 0`);
    t.same(await read(again, 5 * BS + 7, 100), pattern(100, 2), `${what}: the small write`);
    t.same(await read(again, 100 * BS, 3 * BS), pattern(3 * BS, 3), `${what}: blocks 100-102`);
    t.ok(isZero(await read(again, 6 * BS, 94 * BS)), `${what}: zeros between`);
    t.same(flagsPerBlock(await again.extents(0, size)), expectedFlags(), `${what}: allocation follows the file's data (holes reported: ${holes})`);
    await again.close();
    const map = readFileSync(mapPath);
    t.equal(map.length, 32 + size / BS / 8, `${what}: map rewritten at full length`);
    t.equal(map.subarray(0, 8).toString('latin1'), 'NBDMALOC', `${what}: with a valid header`);
  };
  unlinkSync(mapPath);
  await check('map deleted');

  const corrupt = readFileSync(mapPath);
  corrupt.write('XXXXXXXX', 0, 'latin1');
  await fsp.writeFile(mapPath, corrupt);
  await check('bad magic');

  const wrongVersion = readFileSync(mapPath);
  wrongVersion.writeUInt32BE(2, 8);
  await fsp.writeFile(mapPath, wrongVersion);
  await check('unknown version');

  const wrongSize = readFileSync(mapPath);
  wrongSize.writeBigUInt64BE(BigInt(2 * size), 16);
  await fsp.writeFile(mapPath, wrongSize);
  await check('size in the header differs');

  await fsp.writeFile(mapPath, readFileSync(mapPath).subarray(0, 40));
  await check('truncated map');
});

t.test('flush', async (t) => {
  const dir = t.testdir();
  const dev = await open(t, dir, MiB);
  // Count and gate the image's fdatasync calls (white box: the handle is private).
  const img = (dev as unknown as { img: fsp.FileHandle }).img;
  const realSync = img.datasync.bind(img);
  let calls = 0;
  let gate: Promise<void> | null = null;
  let failNext = false;
  img.datasync = async (): Promise<void> => {
    calls++;
    if (failNext) {
      failNext = false;
      throw Object.assign(new Error('EIO: injected'), { code: 'EIO' });
    }
    if (gate) await gate;
    return realSync();
  };
  const settle = (): Promise<void> => new Promise((r) => setImmediate(r));

  await dev.flush();
  t.equal(calls, 0, 'nothing written: no sync');
  await dev.pwrite(Buffer.alloc(10, 1), 0);
  await dev.flush();
  t.equal(calls, 1, 'a write, then a flush: one sync');
  await dev.flush();
  t.equal(calls, 1, 'a second flush with nothing new: no sync');

  await dev.pwrite(Buffer.alloc(10, 2), 0);
  let release = (): void => undefined;
  gate = new Promise((r) => (release = r));
  const done: string[] = [];
  const f1 = dev.flush().then(() => done.push('f1'));
  t.equal(calls, 2, 'f1 started a sync');
  const f2 = dev.flush().then(() => done.push('f2'));
  await settle();
  t.same(done, [], 'f2 waits for the sync in flight instead of returning early');
  t.equal(calls, 2, 'and does not start its own while nothing new was written');
  await dev.pwrite(Buffer.alloc(10, 3), 0); // completes while the sync is in flight
  const f3 = dev.flush().then(() => done.push('f3'));
  await settle();
  t.same(done, [], 'f3 waits too');
  gate = null;
  release();
  await Promise.all([f1, f2, f3]);
  t.same(done.sort(), ['f1', 'f2', 'f3']);
  t.equal(calls, 3, 'exactly one more sync covers the write made during the first');

  await dev.pwrite(Buffer.alloc(10, 4), 0, { fua: true });
  t.equal(calls, 4, 'FUA syncs');

  await dev.pwrite(Buffer.alloc(10, 5), 0);
  failNext = true;
  await t.rejects(dev.flush(), { message: /injected/ }, 'a failed sync rejects the flush');
  await dev.flush();
  t.equal(calls, 6, 'the next flush retries, since the data may not be durable');
  img.datasync = realSync;
});

t.test('cache', async (t) => {
  const dir = t.testdir();
  const size = 64 * MiB + 512;
  const dev = await open(t, dir, size);
  await dev.pwrite(pattern(3 * BS, 4), 10 * BS + 5);
  await dev.cache(0, 20 * BS);
  await dev.cache(0, 0);
  await dev.cache(size - 512, 512);
  await dev.cache(0, size); // past the prefetch limit it is only a hint
  await dev.cache(1, 0xffffffff > size ? size - 1 : 0xffffffff);
  t.same(await read(dev, 10 * BS + 5, 3 * BS), pattern(3 * BS, 4), 'data unchanged');
  t.same(await dev.extents(0, 20 * BS), [
    { length: 10 * BS, flags: HOLE_ZERO },
    { length: 4 * BS, flags: DATA },
    { length: 6 * BS, flags: HOLE_ZERO },
  ], 'cache allocates nothing');
});

t.test('a size that is not a multiple of 4096: the short tail block', async (t) => {
  const dir = t.testdir();
  const size = MiB + 512;
  const dev = await open(t, dir, size);
  t.same(await dev.extents(0, size), [{ length: size, flags: HOLE_ZERO }]);
  await dev.pwrite(Buffer.alloc(100, 0xaa), size - 100);
  t.same(await dev.extents(MiB - BS, BS + 512), [{ length: BS, flags: HOLE_ZERO }, { length: 512, flags: DATA }], 'tail extent is 512 bytes');
  t.ok(isZero(await read(dev, MiB, 412)), 'padding of the tail block is zeros');
  t.ok(filled(await read(dev, size - 100, 100), 0xaa));
  t.equal(statSync(path.join(dir, 'disk.img')).size, size, 'padding never grows the file past the size');

  await dev.trim(MiB, 512);
  t.same(await dev.extents(MiB, 512), [{ length: 512, flags: HOLE_ZERO }], 'trim of the tail block: it counts as whole');
  t.ok(isZero(await read(dev, MiB, 512)));

  await dev.pwrite(Buffer.alloc(BS, 0xbb), MiB - BS + 256); // last whole block into the tail
  const expect = Buffer.alloc(BS + 512);
  expect.fill(0xbb, 256, 256 + BS);
  t.same(await read(dev, MiB - BS, BS + 512), expect, 'a write across into the tail');
  await dev.zero(MiB - BS, BS + 512, { mayTrim: true });
  t.same(await dev.extents(MiB - BS, BS + 512), [{ length: BS + 512, flags: HOLE_ZERO }], 'zero to the end deallocates the tail too');
  t.ok(isZero(await read(dev, MiB - BS, BS + 512)));
  await dev.pwrite(Buffer.alloc(10, 0xcc), MiB + 100);
  await dev.close();
  const again = await open(t, dir, size);
  const tail = await read(again, MiB, 512);
  t.ok(filled(tail.subarray(100, 110), 0xcc) && isZero(tail.subarray(0, 100)) && isZero(tail.subarray(110)), 'tail after reopen');
  t.equal(statSync(path.join(dir, 'disk.img')).size, size);

  const tiny = await open(t, dir, 512, 'tiny');
  t.same(await tiny.extents(0, 512), [{ length: 512, flags: HOLE_ZERO }], 'a 512-byte export');
  await tiny.pwrite(Buffer.alloc(512, 9), 0);
  t.ok(filled(await read(tiny, 0, 512), 9));
  await tiny.zero(0, 512, { mayTrim: true });
  t.same(await tiny.extents(0, 512), [{ length: 512, flags: HOLE_ZERO }]);
});

t.test('a read-only open', async (t) => {
  const dir = t.testdir();
  const rw = await open(t, dir, MiB);
  await rw.pwrite(Buffer.alloc(10, 5), 0);
  await rw.close();
  const ro = await open(t, dir, MiB, 'disk', true);
  t.equal(ro.caps.readOnly, true);
  t.ok(filled(await read(ro, 0, 10), 5), 'reads the data');
  await ro.flush();
  t.pass('flush is harmless');
});

t.test('checkCapacity', async (t) => {
  const dir = t.testdir();
  const lines: string[] = [];
  const capture = pino({ level: 'warn' }, { write: (s: string) => void lines.push(s) });
  const st = statfsSync(dir);
  const total = st.blocks * st.bsize;
  const avail = st.bavail * st.bsize;
  t.throws(() => checkCapacity(dir, total + 1, 'huge', capture), UsageError, 'larger than the filesystem');
  t.throws(() => checkCapacity(dir, total + 1, 'huge', capture), { message: /export huge: .* cannot fit on the filesystem/ });
  checkCapacity(dir, MiB, 'small', capture);
  t.same(lines, [], 'no warning for a small export');
  checkCapacity(dir, total, 'full', capture);
  t.equal(lines.length, total > avail ? 1 : 0, 'a warning when the export exceeds the free space');
  if (lines[0] !== undefined) t.match(JSON.parse(lines[0]) as object, { export: 'full', size: total, msg: /larger than the free space/ });
});

t.test('random operations against a Buffer model (seeded, 2000 ops, reopen halfway)', async (t) => {
  const dir = t.testdir();
  const size = 256 * KiB + 1536; // 65 blocks, the last one short
  const blocks = Math.ceil(size / BS);
  let dev = await open(t, dir, size);
  const model = Buffer.alloc(size);
  const rnd = prng(0xb10c);
  const int = (n: number): number => Math.floor(rnd() * n);
  const stats = { write: 0, trim: 0, zero: 0, read: 0, extents: 0, reopen: 0, mismatches: 0, badExtents: 0 };

  const range = (): [number, number] => {
    const offset = rnd() < 0.3 ? int(blocks) * BS : int(size);
    const max = rnd() < 0.25 ? 5 * BS : 1200;
    return [Math.min(offset, size), Math.min(size - Math.min(offset, size), int(max) + 1)];
  };

  for (let i = 0; i < 2000; i++) {
    if (i === 1000) {
      await dev.close();
      dev = await open(t, dir, size);
      stats.reopen++;
    }
    const [offset, length] = range();
    const op = int(10);
    if (op < 3) {
      const data = Buffer.alloc(length);
      for (let j = 0; j < length; j++) data[j] = int(256);
      await dev.pwrite(data, offset, { fua: rnd() < 0.01 });
      data.copy(model, offset);
      stats.write++;
    } else if (op < 5) {
      await dev.trim(offset, length);
      // The model's own idea of TRIM: whole blocks inside the range (the tail block counts) become zeros.
      const first = Math.ceil(offset / BS);
      const end = offset + length >= size ? blocks : Math.floor((offset + length) / BS);
      if (end > first) model.fill(0, first * BS, Math.min(end * BS, size));
      stats.trim++;
    } else if (op < 6) {
      await dev.zero(offset, length, { mayTrim: rnd() < 0.6 });
      model.fill(0, offset, offset + length);
      stats.zero++;
    } else if (op < 9) {
      const got = await read(dev, offset, length);
      if (!got.equals(model.subarray(offset, offset + length))) stats.mismatches++;
      stats.read++;
    } else {
      const ext = await dev.extents(offset, length);
      let p = offset;
      let ok = ext.reduce((s, e) => s + e.length, 0) === length;
      for (const [k, e] of ext.entries()) {
        if (e.length <= 0 || (k > 0 && e.flags === ext[k - 1]!.flags)) ok = false;
        if (e.flags === HOLE_ZERO && !isZero(model.subarray(p, p + e.length))) ok = false;
        p += e.length;
      }
      if (!ok) stats.badExtents++;
      stats.extents++;
    }
  }

  // Disjoint concurrent batches: 60 rounds of up to 8 operations in flight over non-overlapping ranges that
  // often share blocks, so padding writes race each other and zeroing of the same blocks.
  let concurrentOps = 0;
  for (let round = 0; round < 60; round++) {
    const cuts = Array.from({ length: 16 }, () => int(size)).sort((a, b) => a - b);
    const ops: Promise<void>[] = [];
    for (let k = 0; k + 1 < cuts.length; k += 2) {
      const offset = cuts[k]!;
      const length = cuts[k + 1]! - offset;
      const kind = int(4);
      if (kind < 2) {
        const data = Buffer.alloc(length, 1 + int(255));
        data.copy(model, offset);
        ops.push(dev.pwrite(data, offset));
      } else if (kind === 2) {
        model.fill(0, offset, offset + length);
        ops.push(dev.zero(offset, length, { mayTrim: rnd() < 0.5 }));
      } else {
        const first = Math.ceil(offset / BS);
        const end = offset + length >= size ? blocks : Math.floor((offset + length) / BS);
        if (end > first) model.fill(0, first * BS, Math.min(end * BS, size));
        ops.push(dev.trim(offset, length));
      }
      concurrentOps++;
    }
    await Promise.all(ops);
    if (!(await read(dev, 0, size)).equals(model)) stats.mismatches++;
  }

  t.equal(stats.mismatches, 0, 'every read matched the model');
  t.equal(stats.badExtents, 0, 'every extent list was well formed and its holes are zeros in the model');
  t.ok(stats.write > 400 && stats.trim > 250 && stats.zero > 100 && stats.read > 400 && stats.extents > 100, JSON.stringify(stats));
  t.ok(concurrentOps >= 400, `${concurrentOps} operations issued concurrently`);
  t.equal(stats.reopen, 1);
  await dev.close();
  const last = await open(t, dir, size);
  t.ok((await read(last, 0, size)).equals(model), 'the image matches the model after a final reopen');
});

t.test('allocating a trimmed block that still holds old bytes syncs its data before the map bit', async (t) => {
  const dir = t.testdir();
  const dev = await open(t, dir, 1 << 20);
  // White box: count the image's fdatasync calls (the handle is private).
  const img = (dev as unknown as { img: { datasync: () => Promise<void> } }).img;
  const realSync = img.datasync.bind(img);
  let syncs = 0;
  img.datasync = async (): Promise<void> => {
    syncs++;
    await realSync();
  };
  await dev.pwrite(Buffer.alloc(4096, 0x77), 0);
  await dev.trim(0, 4096);
  syncs = 0;
  await dev.pwrite(Buffer.alloc(512, 0x11), 1024);
  t.equal(syncs, 1, 'stale block: data synced before the map says allocated');
  t.ok((await read(dev, 0, 4096)).equals(Buffer.concat([Buffer.alloc(1024), Buffer.alloc(512, 0x11), Buffer.alloc(2560)])));
  syncs = 0;
  await dev.pwrite(Buffer.alloc(512, 0x22), 100 * 4096 + 7);
  if (fsReportsHoles(dir)) t.equal(syncs, 0, 'a block that is a hole in the file needs no sync');
  else t.pass('filesystem does not report holes: every deallocated block counts as stale');
  img.datasync = realSync;
  await dev.close();
});

t.test('pwriteNow: synchronous into allocated blocks or whole blocks over holes; otherwise declines', async (t) => {
  const dir = t.testdir();
  const dev = await open(t, dir, 1 << 20);
  const a = Buffer.alloc(4096, 0x31);
  const b = Buffer.alloc(4096, 0x32);
  t.equal(dev.pwriteNow([a, b], 8 * 4096), true, 'two whole blocks over a hole');
  t.same((await dev.extents(8 * 4096, 2 * 4096)).map((e) => e.flags), [0], 'now allocated');
  t.equal(dev.pwriteNow([Buffer.alloc(512, 1)], 8 * 4096 + 512), true, 'a partial write into allocated space');
  t.equal(dev.pwriteNow([Buffer.alloc(512, 1)], 20 * 4096), false, 'a partial block over a hole needs zero padding');
  t.equal(dev.pwriteNow([Buffer.alloc(4096, 1)], 30 * 4096 + 1), false, 'unaligned over a hole');
  await dev.pwrite(Buffer.alloc(4096, 0x77), 40 * 4096);
  await dev.trim(40 * 4096, 4096);
  if (fsReportsHoles(dir)) t.equal(dev.pwriteNow([a], 40 * 4096), false, 'a trimmed block with old bytes: async path');
  await dev.close();
  const again = await open(t, dir, 1 << 20);
  const back = await read(again, 8 * 4096, 2 * 4096);
  t.ok(back.subarray(0, 512).equals(a.subarray(0, 512)));
  t.ok(back.subarray(512, 1024).equals(Buffer.alloc(512, 1)));
  t.ok(back.subarray(4096).equals(b), 'data and allocation survive a reopen');
  await again.close();
});

t.test('stale blocks are known without an lseek per write, and found again after a reopen', async (t) => {
  const dir = t.testdir();
  if (!fsReportsHoles(dir)) return t.pass('filesystem does not report holes: every deallocated block counts as stale');
  const dev = await open(t, dir, 4 * MiB);
  // White box: count the lseeks (fs-ext's module object is what backing-file.ts calls through).
  const mod = require('fs-ext') as { seekSync: (fd: number, off: number, whence: number) => number };
  const realSeek = mod.seekSync;
  let seeks = 0;
  mod.seekSync = (fd, off, whence) => {
    seeks++;
    return realSeek(fd, off, whence);
  };
  t.teardown(() => {
    mod.seekSync = realSeek;
  });
  const chunk = 64 * KiB;
  for (let off = 0; off < 2 * MiB; off += chunk) t.equal(dev.pwriteNow([pattern(chunk, off)], off), true);
  t.equal(seeks, 0, 'filling a fresh image: no lseek');

  // A direct write of the writeback thread's kind: granted, written, done; then trimmed.
  const grant = dev.directWrite(3 * MiB, BS);
  t.ok(grant !== null, 'a whole block over a hole may be written directly');
  writeSync(grant!.fd, Buffer.alloc(BS, 0x42), 0, BS, 3 * MiB);
  grant!.done();
  await dev.trim(3 * MiB, BS);
  t.equal(dev.pwriteNow([Buffer.alloc(BS, 0x43)], 3 * MiB), false, 'the trimmed block holds old bytes: the async path');
  await dev.trim(chunk, 2 * chunk);
  t.equal(dev.pwriteNow([Buffer.alloc(chunk, 0x44)], chunk), false, 'a trimmed block inside the filled part');
  t.equal(dev.pwriteNow([Buffer.alloc(BS, 0x45)], 3 * MiB + 8 * BS), true, 'a hole next to them: directly');
  await dev.trim(3 * MiB + 16 * BS, 16 * BS);
  t.equal(dev.pwriteNow([Buffer.alloc(BS, 0x46)], 3 * MiB + 20 * BS), true, 'a trimmed hole (never written) is no stale block');
  await dev.pwrite(Buffer.alloc(BS, 0x43), 3 * MiB);
  t.equal(dev.pwriteNow([Buffer.alloc(BS, 0x47)], 3 * MiB), true, 'written again: allocated, no longer stale');
  t.equal(seeks, 0, 'and still no lseek');
  await dev.close();

  mod.seekSync = realSeek;
  const again = await open(t, dir, 4 * MiB);
  t.equal(again.pwriteNow([Buffer.alloc(BS, 0x48)], chunk + 5 * BS), false, 'after a reopen: the trimmed blocks are still known stale');
  t.equal(again.pwriteNow([Buffer.alloc(BS, 0x49)], 3 * MiB + 40 * BS), true, 'and holes are not');
  const got = await read(again, chunk, 2 * chunk);
  t.ok(isZero(got), 'the trimmed blocks read zeros');
  await again.pwrite(Buffer.alloc(BS, 0x4a), chunk + 5 * BS);
  t.ok(filled(await read(again, chunk + 5 * BS, BS), 0x4a));
  t.ok(isZero(await read(again, chunk + 4 * BS, BS)), 'its stale neighbour still reads zeros');
  t.ok(filled(await read(again, 3 * MiB, BS), 0x47));
  await again.close();
});

t.test('preadCb: data, holes and the short tail, each done once; close waits for reads in flight', async (t) => {
  const dir = t.testdir();
  const size = 2 * MiB + 1000;
  const dev = await open(t, dir, size);
  const data = pattern(size, 5);
  await dev.pwrite(data.subarray(0, MiB), 0);
  await dev.pwrite(data.subarray(MiB + 64 * KiB), MiB + 64 * KiB); // a hole of 64 KiB between, and the tail
  const model = Buffer.from(data);
  model.fill(0, MiB, MiB + 64 * KiB);
  const readCb = (offset: number, length: number): Promise<Buffer> => {
    const b = Buffer.alloc(length, 0xee);
    let calls = 0;
    return new Promise((resolve, reject) => {
      dev.preadCb(b, offset, (err) => {
        if (++calls > 1) return reject(new Error('done called twice'));
        if (err !== null) reject(err);
        else setImmediate(() => resolve(b)); // a second call would show up by then
      });
    });
  };
  for (const [off, len] of [
    [0, MiB],
    [12_345, 256 * KiB],
    [MiB - 4 * KiB, 72 * KiB],
    [MiB + 8 * KiB, 16 * KiB],
    [size - 5000, 5000],
    [0, size],
  ] as const) {
    t.ok((await readCb(off, len)).equals(model.subarray(off, off + len)), `[${off}, +${len})`);
  }
  // close() right after reads are issued: they complete with the data, before close returns.
  const order: string[] = [];
  const reads = [0, 1, 2, 3].map((i) => readCb(i * 256 * KiB, 256 * KiB).then((b) => (order.push(`read ${i}`), b)));
  const closing = dev.close().then(() => order.push('closed'));
  const got = await Promise.all(reads);
  await closing;
  got.forEach((b, i) => t.ok(b.equals(model.subarray(i * 256 * KiB, (i + 1) * 256 * KiB)), `read ${i} during close`));
  t.equal(order[order.length - 1], 'closed', 'close returned after the reads');
  const after = Buffer.alloc(4096);
  const err = await new Promise<Error | null>((resolve) => dev.preadCb(after, 0, resolve));
  t.ok(err !== null, 'a read after close fails instead of reading whatever file got the descriptor number');
});

t.test('preadCb: adjacent reads of one tick go out as one preadv; a failed or short one is redone read by read', async (t) => {
  const dir = t.testdir();
  const size = 8 * MiB;
  const dev = await open(t, dir, size);
  const data = pattern(size, 11);
  await dev.pwrite(data, 0);
  // Count the thread-pool reads by spying on node:fs, which the backing file calls through at each read.
  const fs = require('node:fs') as typeof import('node:fs');
  const { read: realRead, readv: realReadv } = fs;
  const calls: string[] = [];
  let failNext: 'error' | 'short' | null = null;
  fs.readv = ((fd: number, bufs: Buffer[], pos: number, cb: (err: Error | null, n: number, b: Buffer[]) => void) => {
    calls.push(`readv ${bufs.length}x @${pos} ${bufs.reduce((n, b) => n + b.length, 0)}`);
    const fail = failNext;
    failNext = null;
    if (fail === 'error') return process.nextTick(() => cb(Object.assign(new Error('EIO (injected)'), { code: 'EIO' }), 0, bufs));
    // A short read: only the first buffer and half of the second, as a preadv may return.
    const use = fail === 'short' ? [bufs[0]!, bufs[1]!.subarray(0, bufs[1]!.length / 2)] : bufs;
    realReadv(fd, use, pos, (err, n) => cb(err, n, bufs));
  }) as typeof fs.readv;
  fs.read = ((fd: number, buf: Buffer, off: number, len: number, pos: number, cb: (err: Error | null, n: number) => void) => {
    calls.push(`read @${pos}`);
    realRead(fd, buf, off, len, pos, cb);
  }) as typeof fs.read;
  t.teardown(() => {
    fs.readv = realReadv;
    fs.read = realRead;
  });
  const readCb = (offset: number, length: number): Promise<Buffer> => {
    const b = Buffer.alloc(length, 0xee);
    return new Promise((resolve, reject) => dev.preadCb(b, offset, (err) => (err !== null ? reject(err) : resolve(b))));
  };
  const check = async (ranges: Array<[number, number]>, what: string): Promise<void> => {
    const got = await Promise.all(ranges.map(([off, len]) => readCb(off, len))); // all issued in one tick
    t.ok(got.every((b, i) => b.equals(data.subarray(ranges[i]![0], ranges[i]![0] + ranges[i]![1]))), `${what}: every buffer holds its range`);
  };

  // Eight adjacent reads (in order, as a sequential reader sends them), one elsewhere, then two more adjacent.
  await check(
    [...[0, 1, 2, 3, 4, 5, 6, 7].map((i): [number, number] => [i * 256 * KiB, 256 * KiB]), [6 * MiB, 4 * KiB], [3 * MiB, 4 * KiB], [3 * MiB + 4 * KiB, 60 * KiB]],
    'runs',
  );
  t.same(calls, ['readv 8x @0 2097152', `read @${6 * MiB}`, `readv 2x @${3 * MiB} 65536`], 'one preadv per run, a plain read for a lone one');

  // A run stops at 4 MiB: 20 reads of 256 KiB are runs of 16 and 4.
  calls.length = 0;
  await check(
    Array.from({ length: 20 }, (_, i): [number, number] => [i * 256 * KiB, 256 * KiB]),
    '20 x 256 KiB',
  );
  t.same(calls, ['readv 16x @0 4194304', `readv 4x @${4 * MiB} 1048576`], 'runs of at most 4 MiB');

  // Overlapping or out-of-order reads are not merged: each is read on its own.
  calls.length = 0;
  await check([[64 * KiB, 64 * KiB], [0, 64 * KiB], [96 * KiB, 64 * KiB]], 'out of order and overlapping');
  t.equal(calls.length, 3, 'three reads');
  t.ok(calls.every((c) => c.startsWith('read ')), 'none merged');

  // A failed preadv: every read of the run is redone on its own, and succeeds.
  calls.length = 0;
  failNext = 'error';
  await check([[0, 128 * KiB], [128 * KiB, 128 * KiB], [256 * KiB, 128 * KiB]], 'after a failed preadv');
  t.same(calls, ['readv 3x @0 393216', 'read @0', `read @${128 * KiB}`, `read @${256 * KiB}`], 'redone read by read');

  // A short preadv: the first read is complete, the second goes on from where the preadv stopped, the third is
  // read whole.
  calls.length = 0;
  failNext = 'short';
  await check([[0, 128 * KiB], [128 * KiB, 128 * KiB], [256 * KiB, 128 * KiB]], 'after a short preadv');
  t.same(calls, ['readv 3x @0 393216', `read @${192 * KiB}`, `read @${256 * KiB}`], 'only the missing bytes are read again');
});

t.test('preadNow: synchronous reads exactly when the image is on a memory filesystem', async (t) => {
  const disk = t.testdir();
  const onDisk = await open(t, disk, 1 << 20);
  const onDiskIsMemory = statfsSync(disk).type === 0x01021994;
  t.equal(onDisk.inMemory, onDiskIsMemory, `the fixture directory is ${onDiskIsMemory ? '' : 'not '}a tmpfs, and the file says so`);
  await onDisk.pwrite(Buffer.alloc(4096, 0x31), 0);
  if (!onDiskIsMemory) t.equal(onDisk.preadNow(Buffer.alloc(4096), 0), false, 'a file on a disk declines: a read may wait for the device');
  await onDisk.close();

  const dir = tmpfsDir(t, 'backing-file');
  if (!requireThat(t, dir !== null, '/dev/shm is not a tmpfs')) return;
  const size = 256 * 4096 + 1000; // with a short tail block
  const dev = await open(t, dir!, size);
  t.equal(dev.inMemory, true, 'a file under /dev/shm is in memory');
  t.equal(dev.preadNow(Buffer.alloc(0), 5), true, 'an empty read');
  // Data, holes that never held data, trimmed blocks and the short tail, then random ranges over all of them.
  const rnd = prng(4242);
  const model = Buffer.alloc(size);
  for (let i = 0; i < 60; i++) {
    const off = Math.floor(rnd() * (size - 1));
    const len = 1 + Math.floor(rnd() * Math.min(3 * 4096, size - off));
    const data = Buffer.alloc(len);
    for (let j = 0; j < len; j++) data[j] = Math.floor(rnd() * 255) + 1;
    await dev.pwrite(data, off);
    data.copy(model, off);
  }
  for (let i = 0; i < 15; i++) {
    const first = Math.floor(rnd() * 256);
    const n = 1 + Math.floor(rnd() * 4);
    await dev.trim(first * 4096, n * 4096);
    model.fill(0, first * 4096, Math.min(size, (first + n) * 4096));
  }
  const flags = (await dev.extents(0, size)).map((e) => e.flags);
  t.ok(flags.includes(DATA) && flags.includes(HOLE_ZERO), 'the image has both data and holes');
  let mismatches = 0;
  let declined = 0;
  for (let i = 0; i < 400; i++) {
    const off = Math.floor(rnd() * (size - 1));
    const len = 1 + Math.floor(rnd() * Math.min(64 * 1024, size - off));
    const b = Buffer.alloc(len, 0xee);
    if (!dev.preadNow(b, off)) declined++;
    else if (!b.equals(model.subarray(off, off + len))) mismatches++;
  }
  t.equal(declined, 0, 'every read was answered synchronously');
  t.equal(mismatches, 0, 'and every one matched the model (holes as zeros)');
  const tail = Buffer.alloc(1000, 0xee);
  t.ok(dev.preadNow(tail, 256 * 4096) && tail.equals(model.subarray(256 * 4096)), 'the short tail block');
});
