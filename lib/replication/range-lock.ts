// Block-range locks that keep overlapping writes in one order on both nodes: a mirrored write holds the
// blocks it touches until both copies have it, so a later overlapping write (or a resync chunk) starts only
// after it. Blocks are taken in ascending order, so two waiting ranges can never deadlock. Taking a free
// range is synchronous and allocates nothing but the map entries (the hot path).

interface Waiter {
  first: number;
  last: number;
  /** Next block of the range still to take. */
  next: number;
  resolve: () => void;
}

export class RangeLock {
  /** block → waiters queued on it (an empty array while held with nobody waiting). */
  private readonly held = new Map<number, Waiter[]>();

  get heldBlocks(): number {
    return this.held.size;
  }

  /** Take every block of [offset, offset+length): null when taken at once, else a promise. */
  acquire(offset: number, length: number): Promise<void> | null {
    const first = Math.floor(offset / 4096);
    const last = Math.floor((offset + Math.max(length, 1) - 1) / 4096);
    for (let b = first; b <= last; b++) {
      const q = this.held.get(b);
      if (q !== undefined) {
        return new Promise<void>((resolve) => {
          const w: Waiter = { first, last, next: b, resolve };
          if (q === EMPTY) this.held.set(b, [w]);
          else q.push(w);
        });
      }
      this.held.set(b, EMPTY);
    }
    return null;
  }

  /** Take every block of [offset, offset+length) if none is held (true), else take nothing (false). */
  tryAcquire(offset: number, length: number): boolean {
    const first = Math.floor(offset / 4096);
    const last = Math.floor((offset + Math.max(length, 1) - 1) / 4096);
    for (let b = first; b <= last; b++) if (this.held.has(b)) return false;
    for (let b = first; b <= last; b++) this.held.set(b, EMPTY);
    return true;
  }

  release(offset: number, length: number): void {
    const first = Math.floor(offset / 4096);
    const last = Math.floor((offset + Math.max(length, 1) - 1) / 4096);
    for (let b = first; b <= last; b++) {
      const q = this.held.get(b);
      if (q === undefined) throw new Error(`RangeLock: block ${b} released but not held`);
      if (q.length === 0) {
        this.held.delete(b);
        continue;
      }
      // Hand the block to the first waiter, which then goes on taking the rest of its range.
      const w = q.shift()!;
      this.held.set(b, q.length === 0 ? EMPTY : q);
      w.next = b + 1;
      this.continue(w);
    }
  }

  private continue(w: Waiter): void {
    for (let b = w.next; b <= w.last; b++) {
      const q = this.held.get(b);
      if (q !== undefined) {
        w.next = b;
        if (q === EMPTY) this.held.set(b, [w]);
        else q.push(w);
        return;
      }
      this.held.set(b, EMPTY);
    }
    w.resolve();
  }
}

/** Shared marker for "held, nobody waiting" (never mutated: a waiter replaces it with its own array). */
const EMPTY: Waiter[] = Object.freeze([]) as unknown as Waiter[];
