// A FIFO of (slot, stamp) entries with lazy deletion, in a ring of typed arrays: the order in which region
// slots became clean or dirty. An entry counts while isLive(slot, stamp) holds; stale ones are skipped at the
// head and squeezed out in place when the ring fills. The store's queues had been JS arrays that grew, were
// sliced and rebuilt as they turned over: at 4 KiB random writes that was several MB/s of short-lived
// arrays of 64k+ elements, which go straight to V8's old generation (large objects) and grew the heap by
// tens of MiB between major collections.

const MIN_CAPACITY = 1024;

export class SlotFifo {
  private slots = new Int32Array(MIN_CAPACITY);
  private stamps = new Float64Array(MIN_CAPACITY);
  private mask = MIN_CAPACITY - 1;
  /** Ring position of the oldest entry. */
  private head = 0;
  /** Entries in the ring, live or stale. */
  private n = 0;

  constructor(private readonly isLive: (slot: number, stamp: number) => boolean) {}

  /** Entries held, stale ones included (for tests and bounds). */
  get length(): number {
    return this.n;
  }

  get capacity(): number {
    return this.slots.length;
  }

  push(slot: number, stamp: number): void {
    if (this.n === this.slots.length) this.makeRoom();
    const i = (this.head + this.n) & this.mask;
    this.slots[i] = slot;
    this.stamps[i] = stamp;
    this.n++;
  }

  /** The oldest live slot, or -1; stale entries before it are dropped. */
  first(): number {
    while (this.n !== 0) {
      const slot = this.slots[this.head]!;
      if (this.isLive(slot, this.stamps[this.head]!)) return slot;
      this.drop();
    }
    return -1;
  }

  /** The oldest live slot, removed; -1 when none. */
  shift(): number {
    const slot = this.first();
    if (slot >= 0) this.drop();
    return slot;
  }

  /** Up to limit slots from the head, live or not (the caller checks). */
  peek(limit: number): number[] {
    const out: number[] = [];
    for (let k = 0; k < this.n && k < limit; k++) out.push(this.slots[(this.head + k) & this.mask]!);
    return out;
  }

  private drop(): void {
    this.head = (this.head + 1) & this.mask;
    this.n--;
  }

  /** Full: squeeze out the stale entries in place; double the ring if that frees less than half of it. */
  private makeRoom(): void {
    const cap = this.slots.length;
    let w = 0;
    for (let k = 0; k < cap; k++) {
      const i = (this.head + k) & this.mask;
      const slot = this.slots[i]!;
      const stamp = this.stamps[i]!;
      if (!this.isLive(slot, stamp)) continue;
      // w <= k: the write position never passes the read position, in ring order from the head.
      const j = (this.head + w) & this.mask;
      this.slots[j] = slot;
      this.stamps[j] = stamp;
      w++;
    }
    this.n = w;
    if (w * 2 <= cap) return;
    const slots = new Int32Array(cap * 2);
    const stamps = new Float64Array(cap * 2);
    for (let k = 0; k < w; k++) {
      const i = (this.head + k) & this.mask;
      slots[k] = this.slots[i]!;
      stamps[k] = this.stamps[i]!;
    }
    this.slots = slots;
    this.stamps = stamps;
    this.mask = cap * 2 - 1;
    this.head = 0;
  }
}
