// Allocation bitmap of an export: one bit per block, 1 = allocated (read the backing file), 0 = deallocated
// (reads as zeros, reported as a hole). Pure: the backing-file layer persists the bytes this returns.
// Node has no fallocate(PUNCH_HOLE), so TRIM and WRITE_ZEROES deallocate here instead of in the file.

import { NBD_STATE_HOLE, NBD_STATE_ZERO } from '../protocol/constants';
import type { Extent } from '../protocol/reply';

/** Bytes of the bitmap that changed: persist buf[start, end). */
export interface DirtyRange {
  start: number;
  end: number;
}

export class AllocMap {
  readonly blocks: number;

  constructor(
    readonly size: number,
    readonly blockSize: number,
    readonly bits: Uint8Array = new Uint8Array(Math.ceil(Math.ceil(size / blockSize) / 8)),
  ) {
    this.blocks = Math.ceil(size / blockSize);
    if (bits.length !== Math.ceil(this.blocks / 8)) throw new RangeError('bitmap length does not match size');
  }

  get(block: number): boolean {
    return (this.bits[block >>> 3]! & (1 << (block & 7))) !== 0;
  }

  /** Set blocks [first, last] to value; returns the bitmap bytes that changed, or null if none did. */
  setRange(first: number, last: number, value: boolean): DirtyRange | null {
    let start = -1;
    let end = -1;
    for (let b = first; b <= last; ) {
      const byte = b >>> 3;
      // Whole bytes at a time in the middle of the range.
      if ((b & 7) === 0 && b + 7 <= last) {
        const want = value ? 0xff : 0;
        if (this.bits[byte] !== want) {
          this.bits[byte] = want;
          if (start < 0) start = byte;
          end = byte + 1;
        }
        b += 8;
        continue;
      }
      const mask = 1 << (b & 7);
      const old = this.bits[byte]!;
      const next = value ? old | mask : old & ~mask;
      if (next !== old) {
        this.bits[byte] = next;
        if (start < 0) start = byte;
        end = byte + 1;
      }
      b++;
    }
    return start < 0 ? null : { start, end };
  }

  /** True if every block in [first, last] is allocated. */
  allSet(first: number, last: number): boolean {
    for (let b = first; b <= last; b++) if (!this.get(b)) return false;
    return true;
  }

  /**
   * Extents for [offset, offset+length): alternating runs of data (flags 0) and holes (HOLE|ZERO), clipped to
   * the range, at most maxExtents of them (the last one ends the reply early, as the spec allows).
   */
  extents(offset: number, length: number, maxExtents = 65536): Extent[] {
    const out: Extent[] = [];
    const end = Math.min(offset + length, this.size);
    let pos = offset;
    while (pos < end && out.length < maxExtents) {
      const block = Math.floor(pos / this.blockSize);
      const allocated = this.get(block);
      let b = block + 1;
      while (b < this.blocks && b * this.blockSize < end && this.get(b) === allocated) b++;
      const runEnd = Math.min(b * this.blockSize, end);
      out.push({ length: runEnd - pos, flags: allocated ? 0 : NBD_STATE_HOLE | NBD_STATE_ZERO });
      pos = runEnd;
    }
    return out;
  }
}
