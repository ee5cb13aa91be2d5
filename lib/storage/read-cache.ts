// Read cache: clean 4 KiB blocks keyed by (export, block), bounded in bytes (lru-cache). It only ever holds
// data equal to the backing file: writers invalidate a block before its new data can be read from anywhere
// but the region, and fills that raced with a write are dropped (see generation()).

import { LRUCache } from 'lru-cache';
import { PAGE_SIZE } from './pmem-region';

/** Blocks per export id in the key space: 2^40 blocks × 4 KiB = 4 EiB, ids below 2^13 stay exact. */
const KEY_STRIDE = 2 ** 40;

export class ReadCache {
  private readonly lru: LRUCache<number, Buffer> | null;
  hits = 0;
  misses = 0;

  constructor(readonly maxBytes: number) {
    this.lru = maxBytes >= PAGE_SIZE ? new LRUCache<number, Buffer>({ maxSize: maxBytes, sizeCalculation: () => PAGE_SIZE }) : null;
  }

  get bytes(): number {
    return this.lru?.calculatedSize ?? 0;
  }

  /** Copy a cached block into dst at dstOffset; false on a miss. */
  readInto(exportId: number, block: number, dst: Buffer, dstOffset: number, from = 0, to = PAGE_SIZE): boolean {
    const b = this.lru?.get(exportId * KEY_STRIDE + block);
    if (b === undefined) {
      this.misses++;
      return false;
    }
    this.hits++;
    b.copy(dst, dstOffset, from, to);
    return true;
  }

  /** Insert a copy of a clean block (src must be exactly one page). */
  insert(exportId: number, block: number, src: Buffer): void {
    if (this.lru === null) return;
    this.lru.set(exportId * KEY_STRIDE + block, Buffer.from(src));
  }

  invalidate(exportId: number, first: number, last: number): void {
    if (this.lru === null || this.lru.size === 0) return;
    if (last - first > this.lru.size) {
      // Wide ranges (a 4 GiB trim): walk the cache instead of the range.
      const lo = exportId * KEY_STRIDE + first;
      const hi = exportId * KEY_STRIDE + last;
      for (const k of [...this.lru.keys()]) if (k >= lo && k <= hi) this.lru.delete(k);
      return;
    }
    for (let b = first; b <= last; b++) this.lru.delete(exportId * KEY_STRIDE + b);
  }
}
