// A bitmap over an export's blocks with fast "next set bit" scans: 32-bit words plus a summary level with
// one bit per non-zero word, so a sparse map is scanned 1024 blocks per summary word. Used for the dirty
// blocks the writeback worker sweeps in offset order. Pure (no I/O); `count` is exact.

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
}

/** Count of trailing zero bits of a non-zero 32-bit value. */
function ctz(x: number): number {
  return 31 - Math.clz32(x & -x);
}
