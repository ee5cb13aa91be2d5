// lib/storage/memory-device.ts: the in-memory BlockDevice keeps the BlockDevice contract the file layer keeps
// (holes read as zeros, advisory whole-block TRIM, zero with and without deallocation, the short tail block),
// checked directly and against a plain Buffer model under seeded random operations.

import t from 'tap';
import { MemoryDevice, MEMORY_BLOCK_SIZE } from '../../../lib/storage/memory-device';
import { OutOfRangeError, ReadOnlyError, ShutdownError, toNbdErrno } from '../../../lib/errors';
import type { Extent } from '../../../lib/storage/block-device';
import { prng } from '../../helpers/bytes';

// base:allocation flags written out (doc/proto.md), not imported.
const HOLE_ZERO = 3;
const DATA = 0;
const KiB = 1024;

async function read(dev: MemoryDevice, offset: number, length: number): Promise<Buffer> {
  const b = Buffer.alloc(length, 0xee); // pre-filled so "left untouched" cannot pass as zeros
  await dev.pread(b, offset);
  return b;
}

function isZero(b: Buffer): boolean {
  for (const x of b) if (x !== 0) return false;
  return true;
}

/** Extents are non-empty, alternate data and holes, and sum to exactly the range. */
function extentShapeOk(ext: Extent[], length: number): boolean {
  return ext.reduce((s, e) => s + e.length, 0) === length &&
    ext.every((e) => e.length > 0 && (e.flags === DATA || e.flags === HOLE_ZERO)) &&
    ext.every((e, i) => i === 0 || e.flags !== ext[i - 1]!.flags);
}

t.test('a new device is one hole that reads as zeros', async (t) => {
  const dev = new MemoryDevice({ size: 1024 * KiB });
  t.equal(dev.size, 1024 * KiB);
  t.equal(dev.blockSize, MEMORY_BLOCK_SIZE);
  t.equal(MEMORY_BLOCK_SIZE, 4096);
  t.same(dev.caps, {
    readOnly: false, flush: true, fua: true, trim: true, zero: true, fastZero: true, cache: true, multiConn: true, extents: true,
  });
  t.ok(isZero(await read(dev, 0, dev.size)), 'reads zeros');
  t.same(await dev.extents(0, dev.size), [{ length: dev.size, flags: HOLE_ZERO }]);
  t.equal(dev.allocatedBytes, 0, 'nothing allocated');
});

t.test('constructor rejects bad sizes and block sizes', async (t) => {
  t.throws(() => new MemoryDevice({ size: -1 }), RangeError);
  t.throws(() => new MemoryDevice({ size: 1.5 }), RangeError);
  t.throws(() => new MemoryDevice({ size: 2 ** 53 }), RangeError);
  t.throws(() => new MemoryDevice({ size: 4096, blockSize: 1000 }), RangeError);
  t.throws(() => new MemoryDevice({ size: 4096, blockSize: 256 }), RangeError);
  t.equal(new MemoryDevice({ size: 0 }).size, 0, 'an empty device is allowed');
  t.equal(new MemoryDevice({ size: 4096, blockSize: 512 }).blockSize, 512);
});

t.test('unaligned writes read back and allocate exactly the touched blocks', async (t) => {
  const dev = new MemoryDevice({ size: 64 * KiB });
  const data = Buffer.alloc(10000);
  for (let i = 0; i < data.length; i++) data[i] = (i * 7 + 3) & 0xff;
  await dev.pwrite(data, 1234);
  t.same(await read(dev, 1234, 10000), data, 'data reads back');
  t.ok(isZero(await read(dev, 0, 1234)), 'zeros before');
  t.ok(isZero(await read(dev, 11234, 64 * KiB - 11234)), 'zeros after');
  // 1234..11234 touches blocks 0, 1 and 2.
  t.same(await dev.extents(0, 64 * KiB), [{ length: 3 * 4096, flags: DATA }, { length: 64 * KiB - 3 * 4096, flags: HOLE_ZERO }]);
  t.equal(dev.allocatedBytes, 3 * 4096);
  const mid = await read(dev, 4000, 200);
  t.same(mid, data.subarray(4000 - 1234, 4200 - 1234), 'a read across a block boundary');
  // The caller's buffer is copied at once: changing it later does not change the device.
  data.fill(0x55);
  t.equal((await read(dev, 1234, 1))[0], 3, 'the device kept its own copy');
});

t.test('trim drops whole blocks only; partial blocks keep their data', async (t) => {
  const dev = new MemoryDevice({ size: 16 * 4096 });
  await dev.pwrite(Buffer.alloc(8 * 4096, 0xaa), 0);
  await dev.trim(2000, 14000 - 2000); // whole blocks 1 and 2 (4096..12288)
  t.same(await dev.extents(0, 8 * 4096), [
    { length: 4096, flags: DATA },
    { length: 8192, flags: HOLE_ZERO },
    { length: 5 * 4096, flags: DATA },
  ]);
  t.ok((await read(dev, 2000, 4096 - 2000)).every((x) => x === 0xaa), 'head of the partial first block kept');
  t.ok(isZero(await read(dev, 4096, 8192)), 'trimmed blocks read zeros');
  t.ok((await read(dev, 12288, 14000 - 12288)).every((x) => x === 0xaa), 'partial last block kept');
  await dev.trim(5 * 4096 + 1, 100);
  t.ok((await read(dev, 5 * 4096, 4096)).every((x) => x === 0xaa), 'a trim inside one block does nothing');
  t.equal(dev.allocatedBytes, 6 * 4096);
});

t.test('zero: mayTrim makes holes, NO_HOLE writes allocated zeros, edges are zeroed either way', async (t) => {
  const dev = new MemoryDevice({ size: 16 * 4096 });
  await dev.pwrite(Buffer.alloc(16 * 4096, 0xaa), 0);
  await dev.zero(100, 3 * 4096, { mayTrim: true }); // whole blocks 1, 2; edges in blocks 0 and 3
  t.ok(isZero(await read(dev, 100, 3 * 4096)), 'the whole range reads zeros');
  t.equal((await read(dev, 99, 1))[0], 0xaa, 'byte before untouched');
  t.equal((await read(dev, 100 + 3 * 4096, 1))[0], 0xaa, 'byte after untouched');
  t.same((await dev.extents(0, 4 * 4096)).map((e) => e.flags), [DATA, HOLE_ZERO, DATA], 'whole blocks became a hole');

  await dev.zero(8 * 4096, 2 * 4096, { fastZero: true });
  t.ok(isZero(await read(dev, 8 * 4096, 2 * 4096)), 'NO_HOLE zero reads zeros');
  t.same(await dev.extents(8 * 4096, 2 * 4096), [{ length: 8192, flags: DATA }], 'and stays allocated; fastZero is fine in memory');

  await dev.zero(12 * 4096, 4096, { mayTrim: true, fastZero: true, fua: true });
  t.same(await dev.extents(12 * 4096, 4096), [{ length: 4096, flags: HOLE_ZERO }]);

  // NO_HOLE zero over a hole allocates it.
  await dev.zero(12 * 4096 + 10, 20);
  t.same(await dev.extents(12 * 4096, 4096), [{ length: 4096, flags: DATA }]);
  t.ok(isZero(await read(dev, 12 * 4096, 4096)));
});

t.test('a size that is not a multiple of the block size: the short tail block', async (t) => {
  const size = 1024 * KiB + 512;
  const dev = new MemoryDevice({ size });
  await dev.pwrite(Buffer.alloc(1024, 0x11), size - 1024);
  // size - 1024 is 512 bytes before the tail block: the last whole block and the tail are both data.
  t.same(await dev.extents(size - 4096 - 1024, 4096 + 1024), [
    { length: 512, flags: HOLE_ZERO },
    { length: 4096 + 512, flags: DATA },
  ]);
  t.same(await dev.extents(size - 512, 512), [{ length: 512, flags: DATA }], 'tail extent clipped to the size');
  await dev.trim(size - 512, 512);
  t.same(await dev.extents(size - 512, 512), [{ length: 512, flags: HOLE_ZERO }], 'the tail block counts as whole');
  t.ok(isZero(await read(dev, size - 512, 512)));
  t.ok((await read(dev, size - 1024, 512)).every((x) => x === 0x11), 'the block before keeps its data');
  await dev.zero(size - 4096, 4096, { mayTrim: true });
  t.same(await dev.extents(size - 4096 - 512, 4096 + 512), [
    { length: 4096, flags: DATA },
    { length: 512, flags: HOLE_ZERO },
  ], 'zeroing part of the last whole block leaves it allocated');
  t.ok(isZero(await read(dev, size - 4096, 4096)));
  await dev.zero(size - 4096 - 512, 4096 + 512, { mayTrim: true });
  t.same(await dev.extents(size - 4096 - 512, 4096 + 512), [{ length: 4096 + 512, flags: HOLE_ZERO }]);
});

t.test('extents clip to the range and start exactly at the offset', async (t) => {
  const dev = new MemoryDevice({ size: 8 * 4096 });
  await dev.pwrite(Buffer.alloc(4096, 1), 4096);
  t.same(await dev.extents(4096 + 100, 200), [{ length: 200, flags: DATA }]);
  t.same(await dev.extents(4000, 200), [{ length: 96, flags: HOLE_ZERO }, { length: 104, flags: DATA }]);
  t.same(await dev.extents(8 * 4096, 0), [], 'empty range at the end');
});

t.test('entry assertions: range, read-only, closed', async (t) => {
  const dev = new MemoryDevice({ size: 4096 });
  await t.rejects(dev.pread(Buffer.alloc(2), 4095), OutOfRangeError);
  await t.rejects(dev.pwrite(Buffer.alloc(1), 4096), OutOfRangeError);
  await t.rejects(dev.trim(-1, 1), OutOfRangeError);
  await t.rejects(dev.zero(0, 4097), OutOfRangeError);
  await t.rejects(dev.cache(4096, 1), OutOfRangeError);
  await t.rejects(dev.extents(0.5, 1), OutOfRangeError);
  t.resolves(dev.pread(Buffer.alloc(0), 4096), 'an empty read at the end is inside');

  const ro = new MemoryDevice({ size: 4096, readOnly: true });
  t.equal(ro.caps.readOnly, true);
  await t.rejects(ro.pwrite(Buffer.alloc(1), 0), ReadOnlyError);
  await t.rejects(ro.trim(0, 4096), ReadOnlyError);
  await t.rejects(ro.zero(0, 4096, { mayTrim: true }), ReadOnlyError);
  t.ok(isZero(await read(ro, 0, 4096)), 'reads still work');
  await ro.flush();
  await ro.cache(0, 4096);
  t.equal(toNbdErrno(await ro.pwrite(Buffer.alloc(1), 0).catch((e: unknown) => e)), 1, 'EPERM on the wire');

  await dev.pwrite(Buffer.alloc(4096, 9), 0);
  await dev.close();
  t.equal(dev.allocatedBytes, 0, 'close frees the blocks');
  await t.rejects(dev.pread(Buffer.alloc(1), 0), ShutdownError);
  await t.rejects(dev.flush(), ShutdownError);
  await dev.close(); // idempotent
  t.pass('a second close is harmless');
});

t.test('huge sparse device: trim and zero of the whole device stay cheap', async (t) => {
  const size = 2 ** 36 + 512; // 64 GiB + 512
  const dev = new MemoryDevice({ size });
  await dev.pwrite(Buffer.alloc(100, 7), 2 ** 35);
  await dev.pwrite(Buffer.alloc(100, 7), size - 100);
  t.equal(dev.allocatedBytes, 2 * 4096);
  await dev.trim(0, size);
  t.equal(dev.allocatedBytes, 0, 'every block dropped');
  t.same(await dev.extents(0, 2 ** 32), [{ length: 2 ** 32, flags: HOLE_ZERO }]);
  await dev.pwrite(Buffer.alloc(100, 7), 2 ** 35);
  await dev.zero(0, size, { mayTrim: true });
  t.equal(dev.allocatedBytes, 0);
  t.ok(isZero(await read(dev, 2 ** 35, 100)));
});

t.test('randomised operations match a Buffer model (seeded, 1500 ops)', async (t) => {
  const size = 96 * KiB + 1536;
  const dev = new MemoryDevice({ size, blockSize: 4096 });
  const model = Buffer.alloc(size);
  const rnd = prng(0x6d656d);
  const int = (n: number): number => Math.floor(rnd() * n);
  let mismatches = 0;
  let holeWithData = 0;
  let badShape = 0;
  let reads = 0;
  for (let i = 0; i < 1500; i++) {
    const offset = int(size);
    const length = Math.min(size - offset, rnd() < 0.3 ? int(16 * KiB) : int(700));
    const op = int(5);
    if (op === 0) {
      const b = Buffer.alloc(length);
      for (let j = 0; j < length; j++) b[j] = int(255) + 1;
      await dev.pwrite(b, offset);
      b.copy(model, offset);
    } else if (op === 1) {
      await dev.trim(offset, length);
      // The model's own idea of TRIM: the whole blocks inside the range (the short tail block counts) read zeros.
      const first = Math.ceil(offset / 4096);
      const end = offset + length >= size ? Math.ceil(size / 4096) : Math.floor((offset + length) / 4096);
      if (end > first) model.fill(0, first * 4096, Math.min(end * 4096, size));
    } else if (op === 2) {
      await dev.zero(offset, length, { mayTrim: rnd() < 0.5 });
      model.fill(0, offset, offset + length);
    } else {
      reads++;
      const got = await read(dev, offset, length);
      if (!got.equals(model.subarray(offset, offset + length))) mismatches++;
      const ext = await dev.extents(offset, length);
      let p = offset;
      for (const e of ext) {
        if (e.flags === HOLE_ZERO && !isZero(model.subarray(p, p + e.length))) holeWithData++;
        p += e.length;
      }
      if (!extentShapeOk(ext, length)) badShape++;
    }
  }
  t.equal(mismatches, 0, 'every read matched the model');
  t.equal(holeWithData, 0, 'every reported hole is zero in the model');
  t.equal(badShape, 0, 'every extent list is well formed');
  t.ok(reads > 500, `${reads} reads checked`);
  t.ok((await read(dev, 0, size)).equals(model), 'final image matches');
});
