// Micro-benchmark of the storage engine's hot pieces, each against the alternative it replaced or one tried:
// - region page lookup: BlockIndex (typed-array hash) vs a JS Map, in the write path's pattern (look up,
//   replace a resident block by a new one);
// - writeback selection: a sweep of the dirty-block bitmap vs iterating the index for dirty pages and sorting
//   them (the first version);
// - the page checksum: @node-rs/crc32 vs zlib's crc32;
// - copying a 4 KiB payload into a page: TypedArray#set vs Buffer#copy;
// - the range lock of mirrored writes, 32 ranges held (QD32): held blocks in a BlockIndex vs a JS Map (the
//   first version), whose tables V8 allocates in the old generation once the Map lives there;
// - the out-of-sync bitmap of replication: marking the blocks of writes the peer missed (setRange, a word at a
//   time, vs a bit at a time), and the resync's scan for runs of them (nextSet/nextClear over the summary
//   level vs a sweep of every word);
// - the read cache under 4 KiB random reads (a lookup, and on a miss a fill that evicts): blocks in one slab
//   of slots vs a Buffer per cached block (the first version).
//
// Run: npm run bench:micro   (runs the codec and storage micro-benchmarks; BENCH_MS=50 for longer samples)

import { crc32 as crc32Fast } from '@node-rs/crc32';
import { crc32 as crc32Zlib } from 'node:zlib';
import { BlockBitmap } from '../../lib/storage/block-bitmap';
import { BlockIndex } from '../../lib/storage/block-index';
import { ReadCache } from '../../lib/storage/read-cache';
import { RangeLock } from '../../lib/replication/range-lock';
import { LRUCache } from 'lru-cache';
import { check, compare, report } from './harness';

const PAGE = 4096;
/** 1 GiB export, 256 MiB region: the benchmark suite's geometry. */
const BLOCKS = 262_144;
const SLOTS = 65_536;

let sink = 0;

function lcg(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1103515245) + 12345) >>> 0;
    return s >>> 6;
  };
}

// ---------------------------------------------------------------------------------------------------------------
// Page lookup: the index holds SLOTS resident blocks; each op looks a random block up and, on a miss, evicts
// the oldest resident block (delete) and installs the new one (set), as a write to a full region does.

interface IndexLike {
  get(k: number): number | undefined;
  set(k: number, v: number): unknown;
  delete(k: number): boolean;
}

function lookupWorkload(ix: IndexLike): () => void {
  const rnd = lcg(7);
  const ring = new Float64Array(SLOTS);
  for (let i = 0; i < SLOTS; i++) {
    ring[i] = i * 4;
    ix.set(i * 4, i);
  }
  let head = 0;
  return () => {
    const b = rnd() % BLOCKS;
    const slot = ix.get(b);
    if (slot !== undefined) {
      sink += slot;
      return;
    }
    const old = ring[head]!;
    const s = ix.get(old)!;
    ix.delete(old);
    ix.set(b, s);
    ring[head] = b;
    head = (head + 1) % SLOTS;
  };
}

// ---------------------------------------------------------------------------------------------------------------
// Writeback selection: half of the region's pages are dirty; pick the next 256 dirty blocks in offset order.

function selectionFixtures(): { bitmap: BlockBitmap; index: Map<number, number>; dirtySlot: Uint8Array } {
  const rnd = lcg(11);
  const bitmap = new BlockBitmap(BLOCKS);
  const index = new Map<number, number>();
  const dirtySlot = new Uint8Array(SLOTS);
  let slot = 0;
  while (index.size < SLOTS) {
    const b = rnd() % BLOCKS;
    if (index.has(b)) continue;
    index.set(b, slot);
    if (slot % 2 === 0) {
      dirtySlot[slot] = 1;
      bitmap.set(b);
    }
    slot++;
  }
  return { bitmap, index, dirtySlot };
}

function main(): void {
  compare('page lookup with eviction (65536 resident of 262144 blocks)', ['current: BlockIndex (typed-array hash)', lookupWorkload(new BlockIndex())], [
    ['alt: Map<number, number>', lookupWorkload(new Map<number, number>())],
  ]);

  const f = selectionFixtures();
  let cursor = 0;
  const sweep = (): number[] => {
    const out: number[] = [];
    let b = f.bitmap.nextSet(cursor);
    while (out.length < 256) {
      if (b < 0) b = f.bitmap.nextSet(0);
      out.push(b);
      b = f.bitmap.nextSet(b + 1);
    }
    cursor = b < 0 ? 0 : b;
    return out;
  };
  const scanAndSort = (): number[] => {
    const picked: number[] = [];
    for (const [block, slot] of f.index) {
      if (f.dirtySlot[slot] !== 1) continue;
      picked.push(block);
      if (picked.length >= 4096) break;
    }
    picked.sort((a, b) => a - b);
    return picked.slice(0, 256);
  };
  check(sweep().every((b) => f.bitmap.get(b)) && scanAndSort().every((b) => f.bitmap.get(b)), 'both pick dirty blocks');
  cursor = 0;
  compare(
    'writeback: next 256 dirty blocks in offset order (32768 dirty of 65536 resident)',
    ['current: sweep of the dirty-block bitmap', () => void (sink += sweep()[0]!)],
    [['alt: iterate the index for 4096 dirty pages, sort (first version)', () => void (sink += scanAndSort()[0]!)]],
    256,
  );

  const page = Buffer.alloc(PAGE);
  for (let i = 0; i < PAGE; i++) page[i] = (i * 31) & 0xff;
  check(crc32Fast(page, crc32Fast(page.subarray(0, 20))) === crc32Zlib(page, crc32Zlib(page.subarray(0, 20))), 'the same CRC-32');
  compare('checksum of a 4 KiB page', ['current: @node-rs/crc32', () => void (sink += crc32Fast(page))], [['alt: zlib.crc32', () => void (sink += crc32Zlib(page))]]);

  const region = Buffer.alloc(PAGE * 1024);
  const pages = Array.from({ length: 1024 }, (_, i) => region.subarray(i * PAGE, (i + 1) * PAGE));
  let n = 0;
  compare('copy a 4 KiB payload into a region page', ['current: TypedArray#set', () => pages[n++ & 1023]!.set(page)], [['alt: Buffer#copy', () => void page.copy(pages[n++ & 1023]!, 0, 0, PAGE)]]);

  // The read cache in the suite's geometry (64 MiB = 16384 blocks of a 1 GiB export): each op reads a random
  // block; a miss inserts it (evicting the least recently used one), as a random read that missed does.
  const CACHE = 64 << 20;
  const slab = new ReadCache(CACHE);
  const perBlock = new LRUCache<number, Buffer>({ maxSize: CACHE, sizeCalculation: () => PAGE });
  const dst = Buffer.alloc(PAGE);
  const slabRnd = lcg(7);
  const perBlockRnd = lcg(7);
  const viaSlab = (): void => {
    const b = slabRnd() % BLOCKS;
    if (!slab.readInto(0, b, dst, 0)) slab.insert(0, b, page);
  };
  const viaBuffers = (): void => {
    const b = perBlockRnd() % BLOCKS;
    const hit = perBlock.get(b);
    if (hit !== undefined) hit.copy(dst);
    else perBlock.set(b, Buffer.from(page));
  };
  for (let i = 0; i < 40_000; i++) {
    viaSlab();
    viaBuffers();
  }
  check(slab.bytes === perBlock.calculatedSize, 'both caches full to the same size');
  compare('read cache: 4 KiB random reads, fill on a miss (1 in 16 hits)', ['current: slots in one slab', viaSlab], [['alt: a Buffer per block (first version)', viaBuffers]]);

  // The range lock as mirrored 4 KiB random writes at QD32 use it: 32 ranges held, each op releases the oldest
  // and takes a new random one. The first version kept held blocks in a Map (set on take, delete on release).
  const HELD = 32;
  const lock = new RangeLock();
  const mapHeld = new Map<number, null>();
  const ringLock = new Float64Array(HELD);
  const ringMap = new Float64Array(HELD);
  const lockRnd = lcg(11);
  const mapRnd = lcg(11);
  let atLock = 0;
  let atMap = 0;
  for (let i = 0; i < HELD; i++) {
    for (;;) {
      const b = lockRnd() % BLOCKS;
      if (!lock.tryAcquire(b * PAGE, PAGE)) continue;
      ringLock[i] = b;
      break;
    }
    for (;;) {
      const b = mapRnd() % BLOCKS;
      if (mapHeld.has(b)) continue;
      mapHeld.set(b, null);
      ringMap[i] = b;
      break;
    }
  }
  const viaLock = (): void => {
    lock.release(ringLock[atLock]! * PAGE, PAGE);
    let b = lockRnd() % BLOCKS;
    while (!lock.tryAcquire(b * PAGE, PAGE)) b = lockRnd() % BLOCKS;
    ringLock[atLock] = b;
    atLock = (atLock + 1) % HELD;
  };
  const viaMap = (): void => {
    mapHeld.delete(ringMap[atMap]!);
    let b = mapRnd() % BLOCKS;
    while (mapHeld.has(b)) b = mapRnd() % BLOCKS;
    mapHeld.set(b, null);
    ringMap[atMap] = b;
    atMap = (atMap + 1) % HELD;
  };
  for (let i = 0; i < 10_000; i++) {
    viaLock();
    viaMap();
  }
  check(lock.heldBlocks === HELD && mapHeld.size === HELD, 'both hold 32 blocks');
  compare('range lock: release the oldest of 32 held 4 KiB ranges, take a random one', ['current: RangeLock (BlockIndex)', viaLock], [['alt: held blocks in a Map (first version)', viaMap]]);

  oosCases();

  report('storage micro-benchmark', `(writeback rows: ns per picked page; sink ${sink % 997})`);
}

// ---------------------------------------------------------------------------------------------------------------
// The out-of-sync bitmap (OosMap's bits): while the peer is away every write marks its blocks; when it returns
// the resync walks the runs of marked blocks. Writes of 1-64 blocks (4-256 KiB) at random block offsets.

/** Set [from, to) one bit at a time: what setRange replaced. */
function setBitByBit(m: BlockBitmap, from: number, to: number): number {
  let changed = 0;
  for (let b = from; b < to; b++) if (m.set(b)) changed++;
  return changed;
}

/** Runs [start, end) of set bits by a sweep of every word (no summary level): the alternative to nextSet. */
function runsBySweep(m: BlockBitmap): number[] {
  const out: number[] = [];
  const words = m.words;
  let start = -1;
  for (let w = 0; w < words.length; w++) {
    const x = words[w]!;
    if (x === 0) {
      if (start >= 0) {
        out.push(start, w << 5);
        start = -1;
      }
      continue;
    }
    if (x === 0xffffffff && start >= 0) continue;
    for (let i = 0; i < 32; i++) {
      const on = (x & (1 << i)) !== 0;
      if (on && start < 0) start = (w << 5) + i;
      else if (!on && start >= 0) {
        out.push(start, (w << 5) + i);
        start = -1;
      }
    }
  }
  if (start >= 0) out.push(start, Math.min(m.size, words.length << 5));
  return out;
}

/** The same runs by the scans OosMap and the resync use. */
function runsByNextSet(m: BlockBitmap): number[] {
  const out: number[] = [];
  for (let b = m.nextSet(0); b >= 0; ) {
    const end = m.nextClear(b);
    out.push(b, end);
    b = end < m.size ? m.nextSet(end) : -1;
  }
  return out;
}

function oosCases(): void {
  const writes = (seed: number): (() => [number, number]) => {
    const rnd = lcg(seed);
    return () => {
      const len = 1 + (rnd() & 63);
      const first = rnd() % (BLOCKS - len);
      return [first, first + len];
    };
  };
  // Both variants mark the same writes, and start over when a quarter of the export is marked (a resync).
  const byRange = new BlockBitmap(BLOCKS);
  const byBit = new BlockBitmap(BLOCKS);
  const nextA = writes(21);
  const nextB = writes(21);
  const viaRange = (): void => {
    const [from, to] = nextA();
    sink += byRange.setRange(from, to);
    if (byRange.count > BLOCKS / 4) byRange.clearAll();
  };
  const viaBits = (): void => {
    const [from, to] = nextB();
    sink += setBitByBit(byBit, from, to);
    if (byBit.count > BLOCKS / 4) byBit.clearAll();
  };
  for (let i = 0; i < 5000; i++) {
    viaRange();
    viaBits();
  }
  check(byRange.count === byBit.count && byRange.words.every((w, i) => w === byBit.words[i]), 'the same bits set');
  compare('out-of-sync bitmap: mark a write of 1-64 blocks (262144 blocks)', ['current: setRange, a word at a time', viaRange], [
    ['alt: set() a bit at a time', viaBits],
  ]);

  // The resync's scan, every run listed: after a short outage (200 writes marked, about 2.5% of the blocks)
  // and a longer one (2000 writes, about a fifth).
  for (const marked of [200, 2000]) {
    const m = new BlockBitmap(BLOCKS);
    const next = writes(33);
    for (let i = 0; i < marked; i++) {
      const [from, to] = next();
      m.setRange(from, to);
    }
    const a = runsByNextSet(m);
    const b = runsBySweep(m);
    check(a.length === b.length && a.every((x, i) => x === b[i]), 'the same runs');
    compare(`resync scan: every run of marked blocks (${m.count} of 262144 marked, ${a.length / 2} runs)`, ['current: nextSet/nextClear (summary level)', () => void (sink += runsByNextSet(m).length)], [
      ['alt: sweep every word', () => void (sink += runsBySweep(m).length)],
    ]);
  }
}

main();
