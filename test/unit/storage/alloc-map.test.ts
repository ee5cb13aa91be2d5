// lib/storage/alloc-map.ts: setRange reports exactly the bitmap bytes that changed; the whole-byte fast path and
// the bit path agree with a naive boolean-array model under seeded random operations; extents() alternates
// data and holes, clips to the range and to the export size, and stops at maxExtents.

import t from 'tap';
import { AllocMap } from '../../../lib/storage/alloc-map';
import type { Extent } from '../../../lib/protocol/reply';
import { prng } from '../../helpers/bytes';

const DATA = 0;
const HOLE_ZERO = 3; // NBD_STATE_HOLE | NBD_STATE_ZERO, written out
const BS = 4096;

/** The naive model: one boolean per block, and the bitmap bytes it implies (bit b%8 of byte b/8, LSB first). */
class Model {
  readonly bits: boolean[];
  constructor(readonly blocks: number) {
    this.bits = new Array<boolean>(blocks).fill(false);
  }
  set(first: number, last: number, value: boolean): void {
    for (let b = first; b <= last; b++) this.bits[b] = value;
  }
  bytes(): Uint8Array {
    const out = new Uint8Array(Math.ceil(this.blocks / 8));
    this.bits.forEach((v, b) => {
      if (v) out[b >> 3]! |= 1 << (b % 8);
    });
    return out;
  }
  /** Expected extents, one block at a time. */
  extents(size: number, blockSize: number, offset: number, length: number, max = Infinity): Extent[] {
    const out: Extent[] = [];
    const end = Math.min(offset + length, size);
    for (let pos = offset; pos < end && out.length <= max; ) {
      const b = Math.floor(pos / blockSize);
      const stop = Math.min((b + 1) * blockSize, end);
      const flags = this.bits[b] ? DATA : HOLE_ZERO;
      const last = out[out.length - 1];
      if (last !== undefined && last.flags === flags) last.length += stop - pos;
      else out.push({ length: stop - pos, flags });
      pos = stop;
    }
    return out.slice(0, max);
  }
}

/** The byte range a change from before to after really touched, or null. */
function changedBytes(before: Uint8Array, after: Uint8Array): { start: number; end: number } | null {
  let start = -1;
  let end = -1;
  for (let i = 0; i < before.length; i++) {
    if (before[i] !== after[i]) {
      if (start < 0) start = i;
      end = i + 1;
    }
  }
  return start < 0 ? null : { start, end };
}

t.test('construction', async (t) => {
  const m = new AllocMap(10 * BS + 1, BS);
  t.equal(m.blocks, 11, 'a partial tail block counts');
  t.equal(m.bits.length, 2);
  t.equal(new AllocMap(8 * BS, BS).bits.length, 1);
  t.equal(new AllocMap(0, BS).blocks, 0);
  t.throws(() => new AllocMap(100 * BS, BS, new Uint8Array(3)), RangeError, 'bitmap of the wrong length');
  const given = new Uint8Array([0b101]);
  const g = new AllocMap(3 * BS, BS, given);
  t.equal(g.bits, given, 'uses the given bitmap');
  t.same([g.get(0), g.get(1), g.get(2)], [true, false, true]);
});

t.test('setRange returns exactly the changed bytes', async (t) => {
  const m = new AllocMap(100 * BS, BS); // 100 blocks, 13 bytes
  t.same(m.setRange(3, 5, true), { start: 0, end: 1 });
  t.equal(m.setRange(3, 5, true), null, 'no change, no range');
  t.equal(m.setRange(4, 4, true), null);
  t.same(m.setRange(0, 63, true), { start: 0, end: 8 }, 'byte 0 partly, bytes 1-7 wholly');
  t.equal(m.setRange(8, 55, true), null, 'whole bytes already set: fast path reports nothing');
  t.same(m.setRange(8, 15, false), { start: 1, end: 2 }, 'one whole byte');
  t.same(m.setRange(7, 16, false), { start: 0, end: 3 }, 'bit 7 of byte 0 and bit 0 of byte 2 around a clear byte');
  t.same(m.setRange(99, 99, true), { start: 12, end: 13 }, 'the last block');
  t.same(m.setRange(64, 99, false), { start: 12, end: 13 }, 'clearing a mostly clear range changes one byte');
  t.same(m.setRange(20, 20, false), { start: 2, end: 3 }, 'a single bit');
  t.equal(m.setRange(5, 4, true), null, 'an empty range (last < first)');
  t.equal(m.get(99), false);
});

t.test('allSet', async (t) => {
  const m = new AllocMap(40 * BS, BS);
  m.setRange(8, 23, true);
  t.equal(m.allSet(8, 23), true);
  t.equal(m.allSet(9, 9), true);
  t.equal(m.allSet(7, 8), false);
  t.equal(m.allSet(23, 24), false);
  t.equal(m.allSet(0, 39), false);
});

t.test('random setRange against the model (seeded, 3000 ops)', async (t) => {
  const blocks = 1003; // not a multiple of 8
  const m = new AllocMap(blocks * BS - 100, BS);
  t.equal(m.blocks, blocks);
  const model = new Model(blocks);
  const rnd = prng(0xa110c);
  const int = (n: number): number => Math.floor(rnd() * n);
  let wrongRange = 0;
  let wrongBits = 0;
  let fast = 0;
  for (let i = 0; i < 3000; i++) {
    // Alternate short unaligned ranges (bit path) and long byte-aligned ones (fast path with ragged edges).
    let first: number;
    let last: number;
    if (i % 2 === 0) {
      first = int(blocks);
      last = Math.min(blocks - 1, first + int(12));
    } else {
      first = int(blocks / 8) * 8 + (rnd() < 0.5 ? 0 : int(8));
      last = Math.min(blocks - 1, first + int(200));
      if (last - first >= 8) fast++;
    }
    const value = rnd() < 0.5;
    const before = m.bits.slice();
    const got = m.setRange(first, last, value);
    model.set(first, last, value);
    const want = changedBytes(before, m.bits);
    if (JSON.stringify(got) !== JSON.stringify(want)) wrongRange++;
    if (!Buffer.from(m.bits).equals(Buffer.from(model.bytes()))) wrongBits++;
  }
  t.equal(wrongRange, 0, 'returned range is exactly the changed bytes every time');
  t.equal(wrongBits, 0, 'bitmap equals the model every time');
  t.ok(fast > 1000, `${fast} ranges long enough for the fast path`);
  let getOk = true;
  for (let b = 0; b < blocks; b++) if (m.get(b) !== model.bits[b]) getOk = false;
  t.ok(getOk, 'get() agrees with the model for every block');
  t.equal(m.bits[m.bits.length - 1]! >> (blocks % 8), 0, 'bits past the last block stay clear');
});

t.test('extents: alternation, clipping, maxExtents', async (t) => {
  const size = 20 * BS + 1000; // 21 blocks, the last one short
  const m = new AllocMap(size, BS);
  m.setRange(2, 4, true);
  m.setRange(10, 10, true);
  m.setRange(20, 20, true);
  t.same(m.extents(0, size), [
    { length: 2 * BS, flags: HOLE_ZERO },
    { length: 3 * BS, flags: DATA },
    { length: 5 * BS, flags: HOLE_ZERO },
    { length: BS, flags: DATA },
    { length: 9 * BS, flags: HOLE_ZERO },
    { length: 1000, flags: DATA },
  ]);
  t.same(m.extents(BS + 10, BS), [{ length: BS - 10, flags: HOLE_ZERO }, { length: 10, flags: DATA }], 'clipped at both ends');
  t.same(m.extents(2 * BS + 1, 5), [{ length: 5, flags: DATA }], 'inside one block');
  t.same(m.extents(size - 10, 1 << 30), [{ length: 10, flags: DATA }], 'clipped to the export size');
  t.same(m.extents(19 * BS, 4 * BS), [{ length: BS, flags: HOLE_ZERO }, { length: 1000, flags: DATA }], 'tail block');
  t.same(m.extents(size, 100), [], 'at the end: nothing');
  t.same(m.extents(0, 0), [], 'empty range: nothing');
  t.same(m.extents(0, size, 2), [{ length: 2 * BS, flags: HOLE_ZERO }, { length: 3 * BS, flags: DATA }], 'maxExtents 2');
  t.same(m.extents(0, size, 1), [{ length: 2 * BS, flags: HOLE_ZERO }], 'maxExtents 1');
  const allData = new AllocMap(size, BS);
  allData.setRange(0, allData.blocks - 1, true);
  t.same(allData.extents(0, size), [{ length: size, flags: DATA }], 'one run for a fully allocated map');
  t.same(new AllocMap(size, BS).extents(0, size), [{ length: size, flags: HOLE_ZERO }], 'one run for an empty map');
});

t.test('extents: checkerboard and maxExtents at the default limit', async (t) => {
  const blocks = 70000;
  const m = new AllocMap(blocks * 512, 512);
  for (let b = 0; b < blocks; b += 2) m.setRange(b, b, true);
  const ext = m.extents(0, blocks * 512);
  t.equal(ext.length, 65536, 'stops at the default maxExtents (65536)');
  t.ok(ext.every((e, i) => e.length === 512 && e.flags === (i % 2 === 0 ? DATA : HOLE_ZERO)), 'one block each, alternating');
  t.equal(m.extents(0, blocks * 512, 7).length, 7);
});

t.test('random extents against the model (seeded, 1500 queries, sizes not a multiple of 4096)', async (t) => {
  const rnd = prng(0xe87e);
  const int = (n: number): number => Math.floor(rnd() * n);
  let wrong = 0;
  let queries = 0;
  for (const [size, bs] of [[257 * BS - 1, BS], [100 * BS + 1, BS], [3000 * 512 + 7, 512], [BS * 64, BS]] as const) {
    const m = new AllocMap(size, bs);
    const model = new Model(m.blocks);
    for (let i = 0; i < 375; i++) {
      const first = int(m.blocks);
      const last = Math.min(m.blocks - 1, first + int(i % 3 === 0 ? 40 : 5));
      const value = rnd() < 0.5;
      m.setRange(first, last, value);
      model.set(first, last, value);
      const offset = int(size + bs);
      const length = int(rnd() < 0.2 ? size : 20 * bs);
      const max = rnd() < 0.2 ? 1 + int(4) : undefined;
      const got = max === undefined ? m.extents(offset, length) : m.extents(offset, length, max);
      const want = model.extents(size, bs, offset, length, max);
      queries++;
      if (JSON.stringify(got) !== JSON.stringify(want)) {
        wrong++;
        if (wrong <= 3) t.same(got, want, `size ${size}, bs ${bs}, extents(${offset}, ${length}, ${max})`);
      }
    }
  }
  t.equal(wrong, 0, `all ${queries} extent queries match the model`);
});
