// Reusable buffers for long payloads (READ payloads too long to be copied into the reply slab, the pmem layer's
// scratch for long reads, resync chunks). A fresh Buffer per long request is external memory that V8 only
// reclaims with full mark-compact collections: at 1 MiB reads the server spent about a fifth of its CPU in major
// GC (perf, mostly concurrent marking threads competing for the 2 cores). A buffer goes back to the pool only
// once nothing uses it (for a READ payload, once the socket has written it); one that may still be in use (a
// failed read whose other parts are still being filled by the thread pool, a connection that died) is simply
// left to the garbage collector.
//
// Each pooled allocation is an anonymous mapping of its own, so that free buffers can give their pages back
// while they sit unused (releaseIdle): a pool filled by one workload (nbdcopy's 256 KiB reads) otherwise held
// its memory through the next (4 KiB random I/O, which takes nothing from it), and memory from malloc, once
// freed, mostly stays in the process anyway.

import mmap from '@riaskov/mmap-io';

/** Smallest size class: shorter reads are copied into the reply slab anyway. */
const MIN_CLASS = 16 * 1024;
/** Free buffers give their pages back after the pool has gone this long without a take(). */
export const IDLE_RELEASE_MS = 1000;
const PROT_READ_WRITE = 3;
/** Linux's MAP_ANONYMOUS (mmap-io exports no constant for it). */
const MAP_ANONYMOUS = 0x20;

export class BufferPool {
  /** Free ArrayBuffers per size class (a power of two). */
  private readonly free = new Map<number, ArrayBuffer[]>();
  /** Bytes held in free lists. */
  private held = 0;
  taken = 0;
  reused = 0;
  /** Times the free buffers gave their pages back (releaseIdle). */
  releases = 0;
  /** A free buffer may hold pages: a buffer was given back since the last release. */
  private unreleased = false;
  private idleTimer: NodeJS.Timeout | null = null;
  private takenAtCheck = 0;

  /**
   * @param maxBytes bytes of free buffers kept at most; buffers given back beyond that are dropped
   * @param idleMs free buffers give their pages back after this long without a take() (0: never)
   */
  constructor(
    readonly maxBytes: number,
    private readonly idleMs = IDLE_RELEASE_MS,
  ) {}

  /** A buffer of exactly `length` bytes (uninitialised), a view of a pooled allocation of its size class. */
  take(length: number): Buffer {
    this.taken++;
    const size = sizeClass(length);
    const ab = this.free.get(size)?.pop();
    if (ab === undefined) return Buffer.from(allocate(size), 0, length);
    this.held -= size;
    this.reused++;
    return Buffer.from(ab, 0, length);
  }

  /** Give back a buffer from take() that nothing references any more. */
  give(buf: Buffer): void {
    const ab = buf.buffer as ArrayBuffer;
    const size = ab.byteLength;
    if (buf.byteOffset !== 0 || size !== sizeClass(buf.length) || size > this.maxBytes) return;
    if (this.held + size > this.maxBytes) this.evictFor(size);
    if (this.held + size > this.maxBytes) return;
    let list = this.free.get(size);
    if (list === undefined) this.free.set(size, (list = []));
    list.push(ab);
    this.held += size;
    this.unreleased = true;
    if (this.idleTimer === null && this.idleMs > 0) this.watchIdle();
  }

  /** Check every idleMs whether the pool went unused meanwhile; stop once the free buffers are released. */
  private watchIdle(): void {
    this.takenAtCheck = this.taken;
    this.idleTimer = setTimeout(() => {
      this.idleTimer = null;
      if (this.taken === this.takenAtCheck) this.releaseIdle();
      if (this.unreleased) this.watchIdle();
    }, this.idleMs);
    this.idleTimer.unref();
  }

  /**
   * Give the free buffers' pages back to the OS (madvise MADV_DONTNEED); they stay in the pool, and a page
   * comes back, zeroed, when a later user of its buffer touches it.
   */
  releaseIdle(): void {
    if (!this.unreleased) return;
    this.unreleased = false;
    this.releases++;
    for (const list of this.free.values()) {
      for (const ab of list) {
        try {
          mmap.advise(Buffer.from(ab), mmap.MADV_DONTNEED);
        } catch {
          // Not a mapping of its own (allocate fell back to malloc): its memory stays.
        }
      }
    }
  }

  /**
   * Make room for a buffer of `size` by dropping free buffers of other size classes. Without this, a pool
   * filled by one workload (nbdcopy's 256 KiB requests) refused every buffer of the next (1 MiB), and each of
   * those requests then paid a fresh allocation: 256 page faults and as many zeroed pages per MiB.
   */
  private evictFor(size: number): void {
    for (const [cls, list] of this.free) {
      if (cls === size) continue;
      while (list.length > 0 && this.held + size > this.maxBytes) {
        list.pop();
        this.held -= cls;
      }
      if (this.held + size <= this.maxBytes) return;
    }
  }

  get heldBytes(): number {
    return this.held;
  }
}

export function sizeClass(length: number): number {
  return length <= MIN_CLASS ? MIN_CLASS : 2 ** Math.ceil(Math.log2(length));
}

/** A fresh allocation for the pool: an anonymous private mapping (page-aligned, returned by munmap once collected). */
function allocate(size: number): ArrayBuffer {
  try {
    return mmap.map(size, PROT_READ_WRITE, mmap.MAP_PRIVATE | MAP_ANONYMOUS, -1, 0).buffer as ArrayBuffer;
  } catch {
    return Buffer.allocUnsafeSlow(size).buffer as ArrayBuffer;
  }
}
