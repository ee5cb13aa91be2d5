// lib/storage/block-bitmap.ts: set/clear/get/count and the nextSet/nextClear scans agree with a boolean-array
// model under seeded random operations, across word and summary-word boundaries and at the map's end.

import t from 'tap';
import { BlockBitmap } from '../../../lib/storage/block-bitmap';
import { prng } from '../../helpers/bytes';

function modelNext(bits: boolean[], from: number, want: boolean): number {
  for (let i = Math.max(0, from); i < bits.length; i++) if (bits[i] === want) return i;
  return want ? -1 : bits.length;
}

t.test('empty and full maps, edges', async (t) => {
  const m = new BlockBitmap(100);
  t.equal(m.count, 0);
  t.equal(m.nextSet(0), -1, 'nothing set');
  t.equal(m.nextClear(0), 0);
  t.equal(m.nextSet(100), -1, 'from past the end');
  t.equal(m.nextClear(100), 100, 'nextClear past the end is size');
  for (let i = 0; i < 100; i++) m.set(i);
  t.equal(m.count, 100);
  t.equal(m.nextClear(0), 100, 'all set: nextClear is size, not a padding bit');
  t.equal(m.nextSet(99), 99);
  t.equal(m.set(5), false, 'setting a set bit reports no change');
  t.equal(m.clear(5), true);
  t.equal(m.clear(5), false, 'clearing a clear bit reports no change');
  t.equal(m.nextClear(0), 5);
  t.equal(m.count, 99);
  m.clearAll();
  t.equal(m.count, 0);
  t.equal(m.nextSet(0), -1);
  t.equal(new BlockBitmap(0).nextSet(0), -1, 'zero-size map');
  t.throws(() => new BlockBitmap(-1), RangeError);
});

t.test('bits far apart are found through the summary level', async (t) => {
  const m = new BlockBitmap(5_000_000);
  m.set(31);
  m.set(32);
  m.set(1023);
  m.set(1024);
  m.set(4_999_999);
  t.same([m.nextSet(0), m.nextSet(32), m.nextSet(33), m.nextSet(1024), m.nextSet(1025), m.nextSet(4_999_999)], [31, 32, 1023, 1024, 4_999_999, 4_999_999]);
  m.clear(4_999_999);
  t.equal(m.nextSet(1025), -1, 'a cleared word drops out of the summary');
});

t.test('random operations match a boolean-array model', async (t) => {
  const rnd = prng(7);
  for (const size of [1, 31, 32, 33, 1024, 1025, 40_000]) {
    const m = new BlockBitmap(size);
    const bits = new Array<boolean>(size).fill(false);
    let count = 0;
    let bad = 0;
    for (let op = 0; op < 4000; op++) {
      // Clustered positions so words fill up and empty again.
      const i = rnd() < 0.5 ? Math.floor(rnd() * size) : Math.min(size - 1, Math.floor(rnd() * 70));
      if (rnd() < 0.55) {
        const changed = m.set(i);
        if (changed !== !bits[i]) bad++;
        if (!bits[i]) count++;
        bits[i] = true;
      } else {
        const changed = m.clear(i);
        if (changed !== bits[i]) bad++;
        if (bits[i]) count--;
        bits[i] = false;
      }
      const from = Math.floor(rnd() * (size + 2)) - 1;
      if (m.nextSet(from) !== modelNext(bits, from, true)) bad++;
      if (m.nextClear(from) !== modelNext(bits, from, false)) bad++;
      if (m.get(i) !== bits[i]) bad++;
      if (m.count !== count) bad++;
    }
    // Walking every set bit visits exactly the model's set bits.
    const seen: number[] = [];
    for (let i = m.nextSet(0); i >= 0; i = m.nextSet(i + 1)) seen.push(i);
    t.same(seen, bits.flatMap((b, i) => (b ? [i] : [])), `size ${size}: walk of set bits`);
    t.equal(bad, 0, `size ${size}: 4000 random operations agree with the model`);
  }
});

t.test('setRange/clearRange match the model and report the bits they changed', async (t) => {
  const rnd = prng(11);
  for (const size of [1, 31, 32, 33, 64, 1025, 40_000]) {
    const m = new BlockBitmap(size);
    const bits = new Array<boolean>(size).fill(false);
    let bad = 0;
    for (let op = 0; op < 1500; op++) {
      const a = Math.floor(rnd() * (size + 1));
      const len = rnd() < 0.5 ? Math.floor(rnd() * 70) : Math.floor(rnd() * (size + 1));
      const b = Math.min(size, a + len);
      const value = rnd() < 0.5;
      let expect = 0;
      for (let i = a; i < b; i++) {
        if (bits[i] !== value) expect++;
        bits[i] = value;
      }
      const changed = value ? m.setRange(a, b) : m.clearRange(a, b);
      if (changed !== expect) bad++;
      if (m.count !== bits.filter(Boolean).length) bad++;
      const from = Math.floor(rnd() * (size + 1));
      if (m.nextSet(from) !== modelNext(bits, from, true)) bad++;
      if (m.nextClear(from) !== modelNext(bits, from, false)) bad++;
    }
    const seen: number[] = [];
    for (let i = m.nextSet(0); i >= 0; i = m.nextSet(i + 1)) seen.push(i);
    t.same(seen, bits.flatMap((v, i) => (v ? [i] : [])), `size ${size}: walk of set bits (summary kept up to date)`);
    t.equal(bad, 0, `size ${size}: 1500 random range operations agree with the model`);
  }
});

t.test('range edges and bad ranges', async (t) => {
  const m = new BlockBitmap(100);
  t.equal(m.setRange(0, 100), 100, 'whole map');
  t.equal(m.nextClear(0), 100);
  t.equal(m.setRange(10, 20), 0, 'already set');
  t.equal(m.clearRange(31, 33), 2, 'across a word boundary');
  t.same([m.get(30), m.get(31), m.get(32), m.get(33)], [true, false, false, true]);
  t.equal(m.clearRange(5, 5), 0, 'empty range');
  t.equal(m.clearRange(0, 100), 98);
  t.equal(m.count, 0);
  t.equal(m.nextSet(0), -1, 'summary cleared');
  t.throws(() => m.setRange(-1, 3), RangeError);
  t.throws(() => m.setRange(5, 101), RangeError);
  t.throws(() => m.clearRange(6, 5), RangeError);
  t.throws(() => m.setRange(0.5, 3), RangeError);
});

t.test('recount rebuilds count and summary from words written from outside', async (t) => {
  const m = new BlockBitmap(70_000); // 2188 words: three summary words
  m.words[0] = 0x80000001;
  m.words[1500] = 0xffffffff;
  m.words[2187] = 0xffffffff; // bits past 70_000 are padding
  m.recount();
  t.equal(m.count, 2 + 32 + (70_000 - 2187 * 32), 'padding bits are not counted');
  t.equal(m.words[2187], (1 << (70_000 - 2187 * 32)) - 1, 'padding bits cleared');
  t.equal(m.nextSet(1), 31);
  t.equal(m.nextSet(32), 1500 * 32, 'found through the rebuilt summary');
  t.equal(m.nextSet(1501 * 32), 2187 * 32);
  m.words.fill(0);
  m.recount();
  t.equal(m.count, 0);
  t.equal(m.nextSet(0), -1, 'stale summary bits dropped');
  const full = new BlockBitmap(64);
  full.words.fill(0xffffffff);
  full.recount();
  t.equal(full.count, 64, 'no padding when size is a multiple of 32');
});
