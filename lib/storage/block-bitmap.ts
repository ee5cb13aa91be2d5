// A bitmap over an export's blocks with fast "next set bit" scans: 32-bit words plus a summary level with
// one bit per non-zero word, so a sparse map is scanned 1024 blocks per summary word. Used for the dirty
// blocks the writeback worker sweeps in offset order, and for the out-of-sync bitmap of replication (range
// operations; `recount` after `words` were loaded from a file). Pure (no I/O); `count` is exact.

export class BlockBitmap {
  readonly words: Uint32Array;
  /** Bit w set ⇔ words[w] !== 0. */
  private readonly summary: Uint32Array;
  private n = 0;

  constructor(readonly size: number) {
    if (!Number.isInteger(size) || size < 0) throw new RangeError(`bitmap size ${size}`);
    this.words = new Uint32Array(Math.ceil(size / 32));
    this.summary = new Uint32Array(Math.ceil(this.words.length / 32));
  }

  /** Number of set bits. */
  get count(): number {
    return this.n;
  }

  get(i: number): boolean {
    return (this.words[i >>> 5]! & (1 << (i & 31))) !== 0;
  }

  /** Set bit i; true if it was clear. */
  set(i: number): boolean {
    const w = i >>> 5;
    const old = this.words[w]!;
    const next = (old | (1 << (i & 31))) >>> 0;
    if (next === old) return false;
    this.words[w] = next;
    if (old === 0) this.summary[w >>> 5]! |= 1 << (w & 31);
    this.n++;
    return true;
  }

  /** Clear bit i; true if it was set. */
  clear(i: number): boolean {
    const w = i >>> 5;
    const old = this.words[w]!;
    const next = (old & ~(1 << (i & 31))) >>> 0;
    if (next === old) return false;
    this.words[w] = next;
    if (next === 0) this.summary[w >>> 5]! &= ~(1 << (w & 31));
    this.n--;
    return true;
  }

  /** The first set bit at or after from, or -1. */
  nextSet(from: number): number {
    if (from >= this.size) return -1;
    if (from < 0) from = 0;
    let w = from >>> 5;
    const bits = this.words[w]! & (~0 << (from & 31));
    if (bits !== 0) return (w << 5) + ctz(bits);
    // Find the next non-zero word through the summary.
    w++;
    let s = w >>> 5;
    if (s >= this.summary.length) return -1;
    let sb = (w & 31) === 0 ? this.summary[s]! : this.summary[s]! & (~0 << (w & 31));
    while (sb === 0) {
      if (++s >= this.summary.length) return -1;
      sb = this.summary[s]!;
    }
    w = (s << 5) + ctz(sb);
    return (w << 5) + ctz(this.words[w]!);
  }

  /** The first clear bit at or after from (size when every bit from there on is set). */
  nextClear(from: number): number {
    if (from < 0) from = 0;
    if (from >= this.size) return this.size;
    let w = from >>> 5;
    let bits = ~this.words[w]! & (~0 << (from & 31));
    while (bits === 0) {
      if (++w >= this.words.length) return this.size;
      bits = ~this.words[w]!;
    }
    return Math.min(this.size, (w << 5) + ctz(bits));
  }

  /** Clear every bit. */
  clearAll(): void {
    this.words.fill(0);
    this.summary.fill(0);
    this.n = 0;
  }

  /** Set bits [from, to); returns how many were clear. A word at a time. */
  setRange(from: number, to: number): number {
    const changed = this.updateRange(from, to, true);
    this.n += changed;
    return changed;
  }

  /** Clear bits [from, to); returns how many were set. A word at a time. */
  clearRange(from: number, to: number): number {
    const changed = this.updateRange(from, to, false);
    this.n -= changed;
    return changed;
  }

  /** Set or clear bits [from, to), keeping the summary level right; returns how many bits changed. */
  private updateRange(from: number, to: number, set: boolean): number {
    this.checkRange(from, to);
    if (from === to) return 0;
    const firstW = from >>> 5;
    const lastW = (to - 1) >>> 5;
    let changed = 0;
    for (let w = firstW; w <= lastW; w++) {
      let mask = -1;
      if (w === firstW) mask &= -1 << (from & 31);
      if (w === lastW) mask &= -1 >>> (31 - ((to - 1) & 31));
      const old = this.words[w]!;
      const next = (set ? old | mask : old & ~mask) >>> 0;
      if (next === old) continue;
      changed += popcount(next ^ old);
      this.words[w] = next;
      if (set && old === 0) this.summary[w >>> 5]! |= 1 << (w & 31);
      else if (!set && next === 0) this.summary[w >>> 5]! &= ~(1 << (w & 31));
    }
    return changed;
  }

  /**
   * Rebuild the summary level and the count from `words`, after they were filled from outside (read from a
   * file). Bits past `size` in the last word are cleared.
   */
  recount(): void {
    const tail = this.size & 31;
    const last = this.words.length - 1;
    if (tail !== 0 && last >= 0) this.words[last] = this.words[last]! & (-1 >>> (32 - tail));
    this.summary.fill(0);
    let n = 0;
    for (let w = 0; w < this.words.length; w++) {
      const x = this.words[w]!;
      if (x === 0) continue;
      this.summary[w >>> 5]! |= 1 << (w & 31);
      n += popcount(x);
    }
    this.n = n;
  }

  private checkRange(from: number, to: number): void {
    if (!(Number.isInteger(from) && Number.isInteger(to) && from >= 0 && from <= to && to <= this.size)) {
      throw new RangeError(`bit range [${from}, ${to}) outside [0, ${this.size})`);
    }
  }
}

/** Number of set bits of a 32-bit value. */
function popcount(x: number): number {
  x = x - ((x >>> 1) & 0x55555555);
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
  return Math.imul((x + (x >>> 4)) & 0x0f0f0f0f, 0x01010101) >>> 24;
}

/** Count of trailing zero bits of a non-zero 32-bit value. */
function ctz(x: number): number {
  return 31 - Math.clz32(x & -x);
}
