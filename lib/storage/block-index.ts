// block → slot of an export's resident pages: a Map<number, number> in typed arrays (open addressing, linear
// probing, backward-shift deletion). The write path looks a block up several times per request; a JS Map
// spent most of that time hashing and in its ordered tables (a profile showed 13% of server CPU in Map
// lookups and deletes). Size is bounded by the region's page count, so memory is too (12 bytes × 2 × pages).

const EMPTY = -1;
const MIN_CAPACITY = 16;

export class BlockIndex {
  private kt: Float64Array;
  private vt: Int32Array;
  private mask: number;
  private shift: number;
  private n = 0;

  constructor(capacity = MIN_CAPACITY) {
    let cap = MIN_CAPACITY;
    while (cap < capacity) cap *= 2;
    this.kt = new Float64Array(cap).fill(EMPTY);
    this.vt = new Int32Array(cap);
    this.mask = cap - 1;
    this.shift = 32 - Math.log2(cap);
  }

  get size(): number {
    return this.n;
  }

  /** Home position of a key (a block number, an integer in [0, 2^53)): Fibonacci hashing of both halves. */
  private home(key: number): number {
    const lo = key >>> 0;
    const hi = (key / 0x1_0000_0000) >>> 0;
    return Math.imul(lo ^ Math.imul(hi, 0x85ebca6b), 0x9e3779b1) >>> this.shift;
  }

  private find(key: number): number {
    const kt = this.kt;
    for (let i = this.home(key); ; i = (i + 1) & this.mask) {
      const k = kt[i]!;
      if (k === key) return i;
      if (k === EMPTY) return -1;
    }
  }

  get(key: number): number | undefined {
    const i = this.find(key);
    return i < 0 ? undefined : this.vt[i];
  }

  has(key: number): boolean {
    return this.find(key) >= 0;
  }

  set(key: number, value: number): this {
    if (!(key >= 0)) throw new RangeError(`block ${key}`);
    const kt = this.kt;
    let i = this.home(key);
    for (;;) {
      const k = kt[i]!;
      if (k === key) {
        this.vt[i] = value;
        return this;
      }
      if (k === EMPTY) break;
      i = (i + 1) & this.mask;
    }
    kt[i] = key;
    this.vt[i] = value;
    if (++this.n * 2 > kt.length) this.resize(kt.length * 2);
    return this;
  }

  delete(key: number): boolean {
    let i = this.find(key);
    if (i < 0) return false;
    const kt = this.kt;
    const mask = this.mask;
    // Backward shift: move later entries of the probe run into the hole unless they sit at or after their
    // home position relative to it, so lookups never stop early at a hole.
    for (let j = (i + 1) & mask; kt[j] !== EMPTY; j = (j + 1) & mask) {
      const h = this.home(kt[j]!);
      const stays = i <= j ? i < h && h <= j : i < h || h <= j;
      if (stays) continue;
      kt[i] = kt[j]!;
      this.vt[i] = this.vt[j]!;
      i = j;
    }
    kt[i] = EMPTY;
    this.n--;
    return true;
  }

  clear(): void {
    this.kt.fill(EMPTY);
    this.n = 0;
  }

  /** Entries in table order. Do not change the index while iterating (copy first: `[...index]`). */
  *entries(): IterableIterator<[number, number]> {
    const kt = this.kt;
    for (let i = 0; i < kt.length; i++) if (kt[i] !== EMPTY) yield [kt[i]!, this.vt[i]!];
  }

  *keys(): IterableIterator<number> {
    const kt = this.kt;
    for (let i = 0; i < kt.length; i++) if (kt[i] !== EMPTY) yield kt[i]!;
  }

  [Symbol.iterator](): IterableIterator<[number, number]> {
    return this.entries();
  }

  private resize(cap: number): void {
    const oldKeys = this.kt;
    const oldVals = this.vt;
    this.kt = new Float64Array(cap).fill(EMPTY);
    this.vt = new Int32Array(cap);
    this.mask = cap - 1;
    this.shift = 32 - Math.log2(cap);
    for (let i = 0; i < oldKeys.length; i++) {
      const k = oldKeys[i]!;
      if (k === EMPTY) continue;
      let j = this.home(k);
      while (this.kt[j] !== EMPTY) j = (j + 1) & this.mask;
      this.kt[j] = k;
      this.vt[j] = oldVals[i]!;
    }
  }
}
