// lib/replication/oos-map.ts on real files: mark/clear/ranges/markRanges agree with a boolean-per-block model
// under seeded random operations; persist + reopen gives the same bits; persist writes only the pages of the
// bit array that changed (pendingBytes, and a page tampered with on disk behind the map's back stays as it
// is); the partial last block; damaged files are refused; concurrent persists coalesce; a 64 GiB export.

import t from 'tap';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { OosMap, OOS_BLOCK_SIZE } from '../../../lib/replication/oos-map';
import { CorruptStateError, ShutdownError } from '../../../lib/errors';
import { prng } from '../../helpers/bytes';

const BS = OOS_BLOCK_SIZE;
const HEADER = 4096;
/** Blocks per 4 KiB page of the bit array. */
const BPP = 4096 * 8;
const GiB = 1024 ** 3;

/** Set model blocks touching the range; returns the change in the number of set blocks. */
function setBlocks(model: boolean[], offset: number, length: number, value: boolean): number {
  let delta = 0;
  if (length === 0) return 0;
  for (let b = Math.floor(offset / BS); b <= Math.floor((offset + length - 1) / BS); b++) {
    if (model[b] !== value) delta += value ? 1 : -1;
    model[b] = value;
  }
  return delta;
}

function modelRanges(model: boolean[]): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (let b = 0; b < model.length; b++) {
    if (!model[b]) continue;
    const start = b;
    while (b + 1 < model.length && model[b + 1]) b++;
    out.push([start, b - start + 1]);
  }
  return out;
}

t.test('create, then reopen', async (t) => {
  const dir = t.testdir();
  const size = 10 * BS;
  const a = await OosMap.open({ dir, name: 'd0', size });
  t.equal(a.created, true);
  t.equal(a.map.blocks, 10);
  t.equal(a.map.count, 0);
  t.equal(a.map.pendingBytes, 0, 'a new map has nothing to write');
  t.equal((await fsp.stat(path.join(dir, 'd0.oos'))).size, HEADER + 4, 'header + one word');
  t.same((await fsp.readdir(dir)).sort(), ['d0.oos'], 'no temporary file left');
  await a.map.close();
  await a.map.close(); // idempotent
  await t.rejects(a.map.persist(), ShutdownError, 'persist after close');
  const b = await OosMap.open({ dir, name: 'd0', size });
  t.equal(b.created, false);
  t.equal(b.map.count, 0);
  await b.map.close();
});

t.test('random operations against a model; persist and reopen', async (t) => {
  const dir = t.testdir();
  const rnd = prng(42);
  // 3 pages of bits and a partial last block.
  const size = (3 * BPP - 100) * BS - 1234;
  const { map } = await OosMap.open({ dir, name: 'x', size });
  const blocks = Math.ceil(size / BS);
  t.equal(map.blocks, blocks);
  const model = new Array<boolean>(blocks).fill(false);
  let count = 0;
  let bad = 0;
  for (let op = 0; op < 3000; op++) {
    const r = rnd();
    const offset = Math.floor(rnd() * size);
    const length = Math.min(size - offset, rnd() < 0.8 ? Math.floor(rnd() * 64 * 1024) : Math.floor(rnd() * 64 * 1024 * 1024));
    if (r < 0.5) {
      map.mark(offset, length);
      count += setBlocks(model, offset, length, true);
    } else if (r < 0.9) {
      map.clear(offset, length);
      count += setBlocks(model, offset, length, false);
    } else {
      const first = Math.floor(rnd() * blocks);
      const ranges: Array<[number, number]> = [[first, Math.floor(rnd() * Math.min(500, blocks - first))], [Math.floor(rnd() * blocks), 1]];
      map.markRanges(ranges);
      for (const [f, c] of ranges) count += setBlocks(model, f * BS, c * BS, true);
    }
    if (map.count !== count) bad++;
    const probe = Math.floor(rnd() * blocks);
    if (map.nextSet(probe) !== model.indexOf(true, probe)) bad++;
    if (op % 100 === 0) {
      if (JSON.stringify(map.ranges()) !== JSON.stringify(modelRanges(model))) bad++;
      if (op % 500 === 0) await map.persist();
    }
  }
  t.equal(bad, 0, '3000 random operations agree with the model');
  t.same(map.ranges(), modelRanges(model), 'ranges');
  t.equal(count, model.filter(Boolean).length, 'the model kept its own count right');
  const bytes = map.bytes;
  await map.persist();
  t.equal(map.pendingBytes, 0, 'nothing pending after persist');
  await map.close();

  const { map: again, created } = await OosMap.open({ dir, name: 'x', size });
  t.equal(created, false);
  t.equal(again.count, count, 'count rebuilt on open');
  t.equal(again.bytes, bytes);
  t.same(again.ranges(), modelRanges(model), 'same bits after reopen');
  let walk = 0;
  for (let b = again.nextSet(0); b >= 0 && walk <= blocks; b = again.nextSet(b + 1)) walk++;
  t.equal(walk, count, 'the summary level was rebuilt: walking set bits visits them all');
  // ranges() feeds markRanges() on another map (the wire round trip).
  const other = await OosMap.open({ dir, name: 'y', size });
  other.map.markRanges(again.ranges());
  t.same(other.map.ranges(), again.ranges());
  await other.map.close();
  await again.close();
});

t.test('partial last block, bytes, edges', async (t) => {
  const dir = t.testdir();
  const size = 5 * BS + 100;
  const { map } = await OosMap.open({ dir, name: 'p', size });
  t.equal(map.blocks, 6);
  map.mark(size - 1, 1);
  t.same(map.ranges(), [[5, 1]]);
  t.equal(map.bytes, 100, 'the partial block counts by its length');
  map.mark(0, 1);
  t.equal(map.bytes, BS + 100);
  map.mark(BS - 1, 2);
  t.same(map.ranges(), [[0, 2], [5, 1]], 'a range touching two blocks marks both');
  map.clear(BS, 1);
  t.same(map.ranges(), [[0, 1], [5, 1]], 'clear takes partly covered blocks too');
  map.mark(3 * BS, 0);
  t.equal(map.count, 2, 'a zero-length mark touches nothing');
  map.markAll();
  t.equal(map.count, 6);
  t.equal(map.bytes, size);
  t.same(map.ranges(), [[0, 6]]);
  t.equal(map.nextSet(6), -1);
  map.clearAll();
  t.equal(map.count, 0);
  t.same(map.ranges(), []);
  t.throws(() => map.mark(size - 10, 11), RangeError, 'past the end');
  t.throws(() => map.mark(-1, 1), RangeError);
  t.throws(() => map.clear(0, size + 1), RangeError);
  t.throws(() => map.markRanges([[0, 1], [5, 2]]), RangeError, 'run past the last block');
  t.equal(map.count, 0, 'a rejected markRanges sets nothing');
  t.throws(() => map.markRanges([[-1, 1]]), RangeError);
  t.throws(() => map.markRanges([[1.5, 1]]), RangeError);
  map.markRanges([[5, 1], [2, 0]]);
  t.same(map.ranges(), [[5, 1]]);
  await map.close();
  const again = await OosMap.open({ dir, name: 'p', size });
  t.same(again.map.ranges(), [[5, 1]], 'the last block survives a reopen');
  await again.map.close();

  const empty = await OosMap.open({ dir, name: 'zero', size: 0 });
  t.equal(empty.map.blocks, 0);
  t.same(empty.map.ranges(), []);
  empty.map.markAll();
  t.equal(empty.map.count, 0);
  await empty.map.close();
  t.equal((await OosMap.open({ dir, name: 'zero', size: 0 })).created, false);
});

t.test('persist writes only the pages that changed', async (t) => {
  const dir = t.testdir();
  const file = path.join(dir, 'w.oos');
  // 4 pages of bits, the last one a partial page of 8 bytes (64 blocks).
  const blocks = 3 * BPP + 64;
  const size = blocks * BS;
  const { map } = await OosMap.open({ dir, name: 'w', size });
  t.equal((await fsp.stat(file)).size, HEADER + 3 * 4096 + 8);
  map.mark(0, BS);
  t.equal(map.pendingBytes, 4096);
  map.mark(10 * BS, 3 * BS);
  t.equal(map.pendingBytes, 4096, 'same page');
  map.mark(3 * BPP * BS, BS);
  t.equal(map.pendingBytes, 4096 + 8, 'the partial last page counts by its length');
  await map.persist();
  t.equal(map.pendingBytes, 0);
  map.mark(0, BS);
  t.equal(map.pendingBytes, 0, 'setting a set bit changes nothing');
  map.clear(5 * BS, BS);
  t.equal(map.pendingBytes, 0, 'clearing a clear bit changes nothing');

  // Tamper with pages 1 and 2 on disk: a persist that only touches page 0 must leave them alone.
  const fh = await fsp.open(file, 'r+');
  await fh.write(Buffer.alloc(4096, 0xaa), 0, 4096, HEADER + 4096);
  await fh.write(Buffer.alloc(4096, 0xbb), 0, 4096, HEADER + 2 * 4096);
  await fh.close();
  map.mark(100 * BS, BS);
  map.clear(0, BS);
  t.equal(map.pendingBytes, 4096);
  await map.persist();
  const disk = await fsp.readFile(file);
  t.equal(disk.length, HEADER + 3 * 4096 + 8, 'file length unchanged');
  const w0 = new Uint32Array(disk.buffer.slice(disk.byteOffset + HEADER, disk.byteOffset + HEADER + 4096));
  t.equal(w0[0], 0b1110000000000, 'page 0: block 0 cleared, blocks 10-12 set');
  t.equal(w0[3], 1 << 4, 'page 0: block 100 set');
  t.ok(disk.subarray(HEADER + 4096, HEADER + 2 * 4096).every((b) => b === 0xaa), 'page 1 not rewritten');
  t.ok(disk.subarray(HEADER + 2 * 4096, HEADER + 3 * 4096).every((b) => b === 0xbb), 'page 2 not rewritten');
  t.same([...disk.subarray(HEADER + 3 * 4096)], [1, 0, 0, 0, 0, 0, 0, 0], 'last page as persisted before');

  // markAll/clearAll dirty only pages whose words change.
  map.clearAll();
  t.equal(map.pendingBytes, 4096 + 8, 'clearAll: pages 0 and 3 had bits');
  await map.persist();
  map.markRanges([[BPP + 1, 2]]);
  t.equal(map.pendingBytes, 4096);
  await map.close();
  t.equal(map.pendingBytes, 0, 'close persists');
});

t.test('concurrent persist calls coalesce and all resolve', async (t) => {
  const dir = t.testdir();
  const size = 4 * BPP * BS;
  const { map } = await OosMap.open({ dir, name: 'c', size });
  map.mark(0, BS);
  const p1 = map.persist();
  map.mark(BPP * BS, BS); // after p1 started: p1 may miss it, p2 must not
  const p2 = map.persist();
  map.mark(2 * BPP * BS, BS);
  const p3 = map.persist();
  t.equal(p2, p3, 'calls made while a persist runs share the next one');
  t.not(p1, p2);
  const done: number[] = [];
  await Promise.all([p1.then(() => done.push(1)), p2.then(() => done.push(2)), p3.then(() => done.push(3))]);
  t.same(done, [1, 2, 3]);
  t.equal(map.pendingBytes, 0);
  const p4 = map.persist();
  t.not(p4, p2, 'a call after they ended starts a new persist');
  await p4;
  // Many callers at once, with marks in between.
  const all: Array<Promise<void>> = [];
  for (let i = 0; i < 50; i++) {
    map.mark(i * 7 * BS, BS);
    all.push(map.persist());
  }
  t.ok(new Set(all).size <= 2, `50 calls made ${new Set(all).size} persists`);
  await Promise.all(all);
  const expect = map.ranges();
  await map.close();
  const again = await OosMap.open({ dir, name: 'c', size });
  t.same(again.map.ranges(), expect, 'every mark made before a resolved persist is on disk');
  await again.map.close();
});

t.test('damaged or foreign files are refused', async (t) => {
  const dir = t.testdir();
  const size = 100 * BS;
  const file = path.join(dir, 'bad.oos');
  const { map } = await OosMap.open({ dir, name: 'bad', size });
  map.mark(0, BS);
  await map.close();
  const good = await fsp.readFile(file);

  const expectCorrupt = async (what: string, bytes: Buffer, openSize = size): Promise<void> => {
    await fsp.writeFile(file, bytes);
    const err = await OosMap.open({ dir, name: 'bad', size: openSize }).then(
      () => null,
      (e: unknown) => e,
    );
    t.ok(err instanceof CorruptStateError, `${what}: CorruptStateError`);
    t.match((err as Error).message, file, `${what}: the message names the file`);
  };
  await expectCorrupt('size mismatch', good, size + BS);
  const magic = Buffer.from(good);
  magic.write('XXXX', 0);
  await expectCorrupt('bad magic', magic);
  const version = Buffer.from(good);
  version.writeUInt32BE(2, 8);
  await expectCorrupt('other version', version);
  const headerBit = Buffer.from(good);
  headerBit[17]! ^= 1;
  await expectCorrupt('header bit flip', headerBit);
  await expectCorrupt('short file (header only part)', good.subarray(0, 100));
  await expectCorrupt('short file (bits cut)', good.subarray(0, good.length - 1));
  await expectCorrupt('long file', Buffer.concat([good, Buffer.alloc(4)]));
  await expectCorrupt('empty file', Buffer.alloc(0));
  const padding = Buffer.from(good);
  padding[HEADER + 12] = 0x80; // block 103 of a 100-block map
  await expectCorrupt('bits past the last block', padding);

  await fsp.writeFile(file, good);
  const ok = await OosMap.open({ dir, name: 'bad', size });
  t.same(ok.map.ranges(), [[0, 1]], 'the intact file still opens');
  await ok.map.close();
});

t.test('a 64 GiB export: 16 Mi blocks, a 2 MiB bit array', async (t) => {
  const dir = t.testdir();
  const size = 64 * GiB;
  const t0 = Date.now();
  const { map } = await OosMap.open({ dir, name: 'big', size });
  t.equal(map.blocks, 16 * 1024 * 1024);
  t.equal((await fsp.stat(path.join(dir, 'big.oos'))).size, HEADER + 2 * 1024 * 1024);
  map.markAll();
  t.equal(map.pendingBytes, 2 * 1024 * 1024);
  await map.persist();
  map.clear(0, GiB);
  map.mark(10, 1);
  map.clear(63 * GiB, GiB);
  t.equal(map.pendingBytes, 2 * 8 * 4096, 'two runs of 8 pages (1 GiB = 256 Ki blocks = 32 KiB of bits each)');
  await map.persist();
  const count = map.count;
  t.equal(count, 62 * 256 * 1024 + 1);
  await map.close();
  const again = await OosMap.open({ dir, name: 'big', size });
  t.equal(again.map.count, count);
  t.same(again.map.ranges(), [[0, 1], [256 * 1024, 62 * 256 * 1024]]);
  t.equal(again.map.bytes, 62 * GiB + BS);
  await again.map.close();
  const ms = Date.now() - t0;
  t.ok(ms < 5000, `open, persist and reopen took ${ms} ms`);
});
