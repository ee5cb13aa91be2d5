// lib/storage/read-cache.ts: a byte-bounded LRU of 4 KiB blocks keyed by (export, block). Checked: the bound
// in bytes, least-recently-used eviction (a hit refreshes a block), the hit/miss counters, that insert and
// readInto copy (no aliasing of the caller's buffers), partial reads into an offset, invalidation of small
// ranges (per block) and wide ranges (the path that walks the keys) without touching other exports, and that a
// cache smaller than one page is disabled.

import t from 'tap';
import { ReadCache } from '../../../lib/storage/read-cache';
import { PAGE_SIZE } from '../../../lib/storage/pmem-region';

const PS = 4096;

/** A page whose every byte is v (never zero for v in 1..255). */
const page = (v: number): Buffer => Buffer.alloc(PS, v);

/** The block as the cache holds it, or null on a miss (counts as a hit/miss like any read). */
function get(c: ReadCache, exp: number, block: number): Buffer | null {
  const dst = Buffer.alloc(PS, 0xee);
  return c.readInto(exp, block, dst, 0) ? dst : null;
}

/** Which of blocks 0..n-1 of an export are cached (the counters are restored afterwards). */
function present(c: ReadCache, exp: number, n: number): number[] {
  const { hits, misses } = c;
  const out: number[] = [];
  for (let b = 0; b < n; b++) if (get(c, exp, b) !== null) out.push(b);
  c.hits = hits;
  c.misses = misses;
  return out;
}

t.test('the page size is 4 KiB', async (t) => {
  t.equal(PAGE_SIZE, PS);
});

t.test('bounded in bytes: a cache of 3 pages keeps at most 3 blocks', async (t) => {
  const c = new ReadCache(3 * PS);
  t.equal(c.maxBytes, 3 * PS);
  t.equal(c.bytes, 0, 'empty at first');
  for (let b = 0; b < 5; b++) {
    c.insert(0, b, page(b + 1));
    t.equal(c.bytes, Math.min(b + 1, 3) * PS, `after ${b + 1} inserts: ${Math.min(b + 1, 3)} pages`);
  }
  t.same(present(c, 0, 5), [2, 3, 4], 'the two oldest were evicted');
  // A maxBytes that is not a whole number of pages rounds down.
  const d = new ReadCache(2 * PS + PS / 2);
  for (let b = 0; b < 4; b++) d.insert(0, b, page(9));
  t.equal(d.bytes, 2 * PS, 'two and a half pages hold two');
  t.same(present(d, 0, 4), [2, 3]);
});

t.test('LRU: a hit refreshes a block, so the least recently used one goes first', async (t) => {
  const c = new ReadCache(3 * PS);
  c.insert(0, 0, page(1));
  c.insert(0, 1, page(2));
  c.insert(0, 2, page(3));
  t.ok(get(c, 0, 0), 'touch block 0');
  c.insert(0, 3, page(4));
  t.same(present(c, 0, 4), [0, 2, 3], 'block 1 (least recently used) was evicted, not block 0');
  t.ok(get(c, 0, 2), 'touch block 2');
  c.insert(0, 4, page(5));
  t.same(present(c, 0, 5), [2, 3, 4], 'then block 0 went');
  // Re-inserting a block replaces its data and refreshes it too.
  c.insert(0, 3, page(0x33));
  c.insert(0, 5, page(6));
  t.same(present(c, 0, 6), [3, 4, 5], 'block 2 went; the re-inserted block 3 stayed');
  t.ok(get(c, 0, 3)!.equals(page(0x33)), 're-insert replaced the data');
  t.equal(c.bytes, 3 * PS, 'a replacement does not count twice');
});

t.test('hits and misses are counted per readInto', async (t) => {
  const c = new ReadCache(4 * PS);
  t.equal(c.hits, 0);
  t.equal(c.misses, 0);
  t.equal(get(c, 0, 7), null, 'miss on an empty cache');
  c.insert(0, 7, page(7));
  t.ok(get(c, 0, 7));
  t.ok(get(c, 0, 7));
  t.equal(get(c, 0, 8), null);
  t.equal(get(c, 1, 7), null, 'the same block of another export is another key');
  t.equal(c.hits, 2);
  t.equal(c.misses, 3);
});

t.test('insert copies its source and readInto copies out: no aliasing', async (t) => {
  const c = new ReadCache(4 * PS);
  const src = page(0x11);
  c.insert(2, 5, src);
  src.fill(0x99); // the caller reuses its buffer (a region page being overwritten)
  const a = get(c, 2, 5)!;
  t.ok(a.equals(page(0x11)), 'the cached block kept the bytes it was inserted with');
  a.fill(0x55);
  t.ok(get(c, 2, 5)!.equals(page(0x11)), 'scribbling on what readInto returned does not change the cache');
  // A view into a larger buffer is copied as a page too.
  const big = Buffer.alloc(3 * PS);
  big.fill(0x42, PS, 2 * PS);
  c.insert(2, 6, big.subarray(PS, 2 * PS));
  big.fill(0);
  t.ok(get(c, 2, 6)!.equals(page(0x42)), 'a subarray source is copied');
});

t.test('readInto copies a byte range of the block to an offset of dst', async (t) => {
  const c = new ReadCache(4 * PS);
  const src = Buffer.alloc(PS);
  for (let i = 0; i < PS; i++) src[i] = (i * 7 + 3) & 0xff;
  c.insert(0, 1, src);
  const dst = Buffer.alloc(1000, 0xee);
  t.ok(c.readInto(0, 1, dst, 100, 4000, 4096), 'the last 96 bytes of the block');
  t.ok(dst.subarray(100, 196).equals(src.subarray(4000)), 'copied to dst[100..196)');
  t.ok(dst.subarray(0, 100).every((x) => x === 0xee) && dst.subarray(196).every((x) => x === 0xee), 'nothing else touched');
  const whole = Buffer.alloc(PS + 10, 0xee);
  t.ok(c.readInto(0, 1, whole, 10), 'the default range is the whole block');
  t.ok(whole.subarray(10).equals(src));
});

t.test('invalidate a small range: only those blocks of that export go', async (t) => {
  const c = new ReadCache(64 * PS);
  for (let b = 0; b < 10; b++) {
    c.insert(0, b, page(b + 1));
    c.insert(1, b, page(b + 100));
  }
  c.invalidate(0, 3, 5);
  t.same(present(c, 0, 10), [0, 1, 2, 6, 7, 8, 9], 'blocks 3..5 of export 0 dropped');
  t.same(present(c, 1, 10), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 'export 1 untouched');
  c.invalidate(0, 9, 9);
  t.same(present(c, 0, 10), [0, 1, 2, 6, 7, 8], 'a one-block range');
  c.invalidate(0, 100, 120);
  t.same(present(c, 0, 10), [0, 1, 2, 6, 7, 8], 'a range with nothing cached changes nothing');
  t.equal(c.bytes, 16 * PS, 'the byte count follows');
  // An empty cache takes the early exit.
  const e = new ReadCache(4 * PS);
  e.invalidate(0, 0, 1e12);
  t.equal(e.bytes, 0);
});

t.test('invalidate a wide range walks the keys: exact bounds, other exports untouched', async (t) => {
  const c = new ReadCache(64 * PS);
  // Blocks far apart so that every range below is wider than the cache holds (the key-walking path).
  const blocks = [0, 5, 1_000_000, 2 ** 32 + 7, 2 ** 40 - 1];
  for (const exp of [0, 1, 2, 8191]) for (const b of blocks) c.insert(exp, b, page((exp + b) % 250 + 1));
  t.equal(c.bytes, 20 * PS);
  const has = (exp: number, b: number): boolean => {
    const { hits, misses } = c;
    const r = get(c, exp, b) !== null;
    c.hits = hits;
    c.misses = misses;
    return r;
  };
  c.invalidate(1, 5, 2 ** 32 + 7);
  t.same(blocks.map((b) => has(1, b)), [true, false, false, false, true], 'export 1: bounds inclusive, 0 and the last block stay');
  for (const exp of [0, 2, 8191]) t.same(blocks.map((b) => has(exp, b)), [true, true, true, true, true], `export ${exp} untouched`);
  c.invalidate(0, 0, 2 ** 40 - 1);
  t.same(blocks.map((b) => has(0, b)), [false, false, false, false, false], 'the whole block space of export 0');
  t.same(blocks.map((b) => has(1, b)), [true, false, false, false, true], 'export 0 ends where export 1 begins');
  t.same(blocks.map((b) => has(8191, b)), [true, true, true, true, true], 'the largest exact export id keeps distinct keys');
  c.invalidate(8191, 6, 999_999);
  t.same(blocks.map((b) => has(8191, b)), [true, true, true, true, true], 'a wide range that holds no cached block');
  t.equal(c.bytes, 12 * PS);
});

t.test('wide and narrow invalidation agree (seeded random)', async (t) => {
  let seed = 12345;
  const rnd = (n: number): number => {
    seed = (seed * 1103515245 + 12345) % 2 ** 31;
    return seed % n;
  };
  let mismatches = 0;
  for (let round = 0; round < 200; round++) {
    const c = new ReadCache(16 * PS);
    const model = new Set<string>();
    for (let i = 0; i < 30; i++) {
      const exp = rnd(3);
      const b = rnd(64);
      c.insert(exp, b, page(1));
      model.add(`${exp}:${b}`);
    }
    // The cache may have evicted some: the model is what it holds now.
    for (const k of [...model]) {
      const [exp, b] = k.split(':').map(Number) as [number, number];
      if (get(c, exp, b) === null) model.delete(k);
    }
    const exp = rnd(3);
    const first = rnd(64);
    const last = first + rnd(64); // sometimes narrower, sometimes wider than the cache's entry count
    c.invalidate(exp, first, last);
    for (const k of [...model]) {
      const [e, b] = k.split(':').map(Number) as [number, number];
      if (e === exp && b >= first && b <= last) model.delete(k);
    }
    for (let e = 0; e < 3; e++) {
      for (let b = 0; b < 64; b++) {
        const want = model.has(`${e}:${b}`);
        if ((get(c, e, b) !== null) !== want) mismatches++;
      }
    }
  }
  t.equal(mismatches, 0, 'the cache matches the set model after every invalidation');
});

t.test('maxBytes below one page (0) disables the cache', async (t) => {
  for (const max of [0, PS - 1]) {
    const c = new ReadCache(max);
    t.equal(c.maxBytes, max);
    c.insert(0, 0, page(1));
    t.equal(c.bytes, 0, `maxBytes ${max}: nothing is kept`);
    t.equal(get(c, 0, 0), null, 'every read misses');
    t.equal(c.misses, 1);
    t.equal(c.hits, 0);
    c.invalidate(0, 0, 10); // a no-op, must not throw
    t.equal(c.bytes, 0);
  }
  const one = new ReadCache(PS);
  one.insert(0, 0, page(1));
  t.equal(one.bytes, PS, 'exactly one page is a working cache');
  t.ok(get(one, 0, 0));
});
