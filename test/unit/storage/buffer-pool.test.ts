// lib/storage/buffer-pool.ts: READ payload buffers by power-of-two size class. Checked: exact lengths from
// the class's allocation, reuse after give (same memory), the bound on free bytes, that buffers the pool
// did not make (or views into the middle of one) are never taken in, and that free buffers give their pages
// back to the OS once the pool goes unused (residency read with mincore).

import t from 'tap';
import mmap from '@riaskov/mmap-io';
import { BufferPool, sizeClass } from '../../../lib/storage/buffer-pool';

/** Pages of ab resident in memory (mincore). */
function residentPages(ab: ArrayBufferLike): number {
  return mmap.incore(Buffer.from(ab))[1];
}

const KiB = 1024;
const MiB = 1024 * KiB;

t.test('size classes: powers of two from 16 KiB', async (t) => {
  t.equal(sizeClass(1), 16 * KiB);
  t.equal(sizeClass(16 * KiB), 16 * KiB);
  t.equal(sizeClass(16 * KiB + 1), 32 * KiB);
  t.equal(sizeClass(MiB), MiB);
  t.equal(sizeClass(MiB + 1), 2 * MiB);
  t.equal(sizeClass(32 * MiB), 32 * MiB);
});

t.test('take gives exactly the length asked; give makes the memory reusable', async (t) => {
  const p = new BufferPool(8 * MiB);
  const a = p.take(MiB - 512);
  t.equal(a.length, MiB - 512);
  t.equal(a.buffer.byteLength, MiB, 'a view of a whole size-class allocation');
  a.fill(0x5a);
  p.give(a);
  t.equal(p.heldBytes, MiB);
  const b = p.take(MiB);
  t.equal(b.buffer, a.buffer, 'the same memory comes back for the same class');
  t.equal(b.length, MiB);
  t.equal(p.heldBytes, 0);
  const c = p.take(100 * KiB);
  t.not(c.buffer, a.buffer, 'another class gets its own allocation');
  t.equal(p.taken, 3);
  t.equal(p.reused, 1);
});

t.test('free bytes stay within the bound', async (t) => {
  const p = new BufferPool(2 * MiB);
  const bufs = [p.take(MiB), p.take(MiB), p.take(MiB)];
  for (const b of bufs) p.give(b);
  t.equal(p.heldBytes, 2 * MiB, 'the third was dropped');
  t.equal(p.take(MiB).buffer, bufs[1]!.buffer, 'last in, first out');
  t.equal(p.take(MiB).buffer, bufs[0]!.buffer);
  t.not(p.take(MiB).buffer, bufs[2]!.buffer, 'the dropped one is not in the pool');
});

t.test('buffers the pool did not make are not taken in', async (t) => {
  const p = new BufferPool(8 * MiB);
  p.give(Buffer.alloc(64 * KiB + 1)); // not a size class
  p.give(Buffer.allocUnsafeSlow(64 * KiB).subarray(16, 16 + 100)); // a view into the middle
  const whole = Buffer.allocUnsafeSlow(64 * KiB);
  p.give(whole.subarray(0, 10 * KiB)); // its length's class (16 KiB) is not its allocation's (64 KiB)
  t.equal(p.heldBytes, 0);
});

t.test('a full pool makes room for a new size class by dropping free buffers of other classes', async (t) => {
  const p = new BufferPool(2 * MiB);
  // One workload (256 KiB requests) fills the pool...
  const small = Array.from({ length: 8 }, () => p.take(256 * KiB));
  for (const b of small) p.give(b);
  t.equal(p.heldBytes, 2 * MiB, 'full of 256 KiB buffers');
  // ...then the next one uses 1 MiB buffers: they must be kept, or every request allocates afresh.
  const big = [p.take(MiB), p.take(MiB)];
  t.equal(p.reused, 0);
  for (const b of big) p.give(b);
  t.equal(p.heldBytes, 2 * MiB, 'still within the bound');
  t.equal(p.take(MiB).buffer, big[1]!.buffer, 'the 1 MiB buffers were kept');
  t.equal(p.take(MiB).buffer, big[0]!.buffer);
  t.equal(p.heldBytes, 0, 'the 256 KiB buffers made room');
  // A buffer of its own class is not evicted to take another of the same class beyond the bound.
  const q = new BufferPool(MiB);
  const [x, y] = [q.take(MiB), q.take(MiB)];
  q.give(x);
  q.give(y);
  t.equal(q.take(MiB).buffer, x.buffer, 'the first one stays, the second is dropped');
  // Larger than the whole bound: never kept.
  q.give(q.take(2 * MiB));
  t.equal(q.heldBytes, 0);
});

t.test('free buffers give their pages back on release; buffers in use keep theirs', async (t) => {
  const p = new BufferPool(8 * MiB, 0);
  const free = p.take(MiB);
  const used = p.take(256 * KiB);
  free.fill(0xa5);
  used.fill(0x3c);
  t.equal(residentPages(free.buffer), MiB / 4096, 'a written buffer is resident');
  p.give(free);
  p.releaseIdle();
  t.equal(p.releases, 1);
  t.equal(residentPages(free.buffer), 0, 'the free buffer holds no pages');
  t.equal(p.heldBytes, MiB, 'and stays in the pool');
  t.ok(used.every((b) => b === 0x3c), 'the buffer in use kept its bytes');
  t.equal(residentPages(used.buffer), (256 * KiB) / 4096);
  p.releaseIdle();
  t.equal(p.releases, 1, 'nothing given back since: no second release');
  // Taken again, it works as before: zeros until written.
  const again = p.take(MiB);
  t.equal(again.buffer, free.buffer, 'the same allocation comes back');
  t.ok(again.every((b) => b === 0), 'its released pages read as zeros');
  again.fill(0x77);
  t.ok(again.every((b) => b === 0x77));
  t.equal(residentPages(again.buffer), MiB / 4096);
});

t.test('the pool releases its free buffers after it has gone idleMs without a take()', async (t) => {
  const idleMs = 40;
  const p = new BufferPool(8 * MiB, idleMs);
  const a = p.take(512 * KiB);
  a.fill(1);
  p.give(a);
  // Busy: a take() in every interval keeps the pages.
  for (let i = 0; i < 6; i++) {
    await new Promise((r) => setTimeout(r, idleMs / 2));
    const b = p.take(16 * KiB);
    b.fill(2);
    p.give(b);
  }
  t.equal(p.releases, 0, 'no release while the pool is in use');
  t.equal(residentPages(a.buffer), (512 * KiB) / 4096);
  // Idle: released within two intervals or so (timers are not exact; bounded wait).
  const deadline = Date.now() + 20 * idleMs;
  while (p.releases === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, idleMs / 2));
  t.equal(p.releases, 1, 'released once idle');
  t.equal(residentPages(a.buffer), 0);
  t.equal(p.heldBytes, 512 * KiB + 16 * KiB, 'both buffers still pooled');
});
