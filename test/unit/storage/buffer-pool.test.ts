// lib/storage/buffer-pool.ts: READ payload buffers by power-of-two size class. Checked: exact lengths from
// the class's allocation, reuse after give (same memory), the bound on free bytes, and that buffers the pool
// did not make (or views into the middle of one) are never taken in.

import t from 'tap';
import { BufferPool, sizeClass } from '../../../lib/storage/buffer-pool';

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
