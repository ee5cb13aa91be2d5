// Read cache: clean 4 KiB blocks keyed by (export, block), bounded in bytes (lru-cache). It only ever holds
// data equal to the backing file: writers invalidate a block before its new data can be read from anywhere
// but the region, and fills that raced with a write are dropped (see PmemLayer's generation check).
//
// The blocks live in one slab allocated up front, one 4 KiB slot each; the LRU maps a key to its slot and
// gives the slot back when it evicts or deletes the key. So a fill is a copy, not an allocation: a Buffer per
// cached block made every miss feed the garbage collector (a profile of 1 MiB reads spent a fifth of the time
// in Buffer creation and another fifth in GC). The slab's pages count in RSS only once a slot is used.

import { LRUCache } from 'lru-cache';
import { PAGE_SIZE } from './pmem-region';

/** Blocks per export id in the key space: 2^40 blocks × 4 KiB = 4 EiB, ids below 2^13 stay exact. */
const KEY_STRIDE = 2 ** 40;

export class ReadCache {
  private readonly lru: LRUCache<number, number> | null;
  private readonly slab: Buffer;
  /** Slots not holding a block. */
  private readonly free: number[] = [];
  hits = 0;
  misses = 0;

  constructor(readonly maxBytes: number) {
    const slots = Math.floor(maxBytes / PAGE_SIZE);
    this.slab = Buffer.allocUnsafeSlow(slots * PAGE_SIZE);
    for (let s = slots - 1; s >= 0; s--) this.free.push(s);
    this.lru =
      slots > 0
        ? new LRUCache<number, number>({
            max: slots,
            dispose: (slot) => {
              this.free.push(slot);
            },
          })
        : null;
  }

  get bytes(): number {
    return (this.lru?.size ?? 0) * PAGE_SIZE;
  }

  /** Copy bytes [from, to) of a cached block into dst at dstOffset; false on a miss. */
  readInto(exportId: number, block: number, dst: Buffer, dstOffset: number, from = 0, to = PAGE_SIZE): boolean {
    const slot = this.lru?.get(exportId * KEY_STRIDE + block);
    if (slot === undefined) {
      this.misses++;
      return false;
    }
    this.hits++;
    const at = slot * PAGE_SIZE;
    this.slab.copy(dst, dstOffset, at + from, at + to);
    return true;
  }

  /** Insert a copy of a clean block, src[at, at+PAGE_SIZE), evicting the least recently used block. */
  insert(exportId: number, block: number, src: Buffer, at = 0): void {
    const lru = this.lru;
    if (lru === null) return;
    const key = exportId * KEY_STRIDE + block;
    let slot = lru.peek(key);
    if (slot === undefined) {
      if (this.free.length === 0) lru.pop(); // its dispose returns the slot
      slot = this.free.pop()!;
      lru.set(key, slot);
    } else {
      lru.get(key); // refresh: a re-insert counts as a use
    }
    src.copy(this.slab, slot * PAGE_SIZE, at, at + PAGE_SIZE);
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
