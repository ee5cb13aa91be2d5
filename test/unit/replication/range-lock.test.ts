// lib/replication/range-lock.ts: free ranges are taken synchronously; overlapping ranges run one after another
// in arrival order; disjoint ranges never wait; random overlapping acquisitions never deadlock and never let
// two holders share a block.

import t from 'tap';
import { RangeLock } from '../../../lib/replication/range-lock';
import { prng } from '../../helpers/bytes';

t.test('free and overlapping ranges', async (t) => {
  const l = new RangeLock();
  t.equal(l.acquire(0, 8192), null, 'free range taken at once');
  t.equal(l.acquire(8192, 4096), null, 'disjoint range taken at once');
  const order: string[] = [];
  const p1 = l.acquire(4096, 8192)!; // overlaps both
  t.ok(p1 instanceof Promise);
  void p1.then(() => order.push('p1'));
  const p2 = l.acquire(4096, 1)!; // queued behind p1 on block 1
  void p2.then(() => order.push('p2'));
  l.release(0, 8192);
  await new Promise((r) => setImmediate(r));
  t.same(order, [], 'p1 still needs block 2');
  l.release(8192, 4096);
  await p1;
  t.same(order, ['p1']);
  l.release(4096, 8192);
  await p2;
  t.same(order, ['p1', 'p2'], 'arrival order kept');
  l.release(4096, 1);
  t.equal(l.heldBlocks, 0);
  t.throws(() => l.release(0, 1), /not held/);
});

t.test('tryAcquire takes a free range whole, or nothing', async (t) => {
  const l = new RangeLock();
  t.equal(l.tryAcquire(4096, 8192), true, 'blocks 1-2 free: taken');
  t.equal(l.heldBlocks, 2);
  t.equal(l.tryAcquire(0, 3 * 4096), false, 'blocks 0-2: block 1 is held');
  t.equal(l.heldBlocks, 2, 'block 0 was not taken by the refused call');
  t.equal(l.tryAcquire(0, 4096), true, 'block 0 is still free');
  const waiter = l.acquire(8192, 1)!;
  t.ok(waiter instanceof Promise, 'a waiter queues behind tryAcquire holders');
  l.release(4096, 8192);
  await waiter;
  t.equal(l.tryAcquire(8192, 1), false, 'block 2 passed to the waiter');
  l.release(8192, 1);
  l.release(0, 4096);
  t.equal(l.heldBlocks, 0);
});

t.test('random overlapping holders never share a block and all finish', async (t) => {
  const l = new RangeLock();
  const rnd = prng(7);
  const owner = new Map<number, number>();
  let done = 0;
  const N = 300;
  const jobs: Promise<void>[] = [];
  for (let i = 0; i < N; i++) {
    const first = Math.floor(rnd() * 64);
    const n = 1 + Math.floor(rnd() * 6);
    jobs.push(
      (async () => {
        await l.acquire(first * 4096, n * 4096);
        for (let b = first; b < first + n; b++) {
          if (owner.has(b)) throw new Error(`block ${b} held twice`);
          owner.set(b, i);
        }
        await new Promise((r) => setImmediate(r));
        for (let b = first; b < first + n; b++) owner.delete(b);
        l.release(first * 4096, n * 4096);
        done++;
      })(),
    );
  }
  await Promise.all(jobs);
  t.equal(done, N);
  t.equal(l.heldBlocks, 0);
});

t.test('blocks far apart and beyond 2^32 (offsets up to 2^52): held, contended and freed like any other', async (t) => {
  const l = new RangeLock();
  const rnd = prng(11);
  // A few hot spots far apart: block numbers that share their low 32 bits collide in any hash of the low half.
  const spots = [0, 2 ** 32, 2 ** 40, 2 ** 40 + 2 ** 32, 2 ** 52 / 4096 - 64];
  const owner = new Set<number>();
  const jobs: Promise<void>[] = [];
  const N = 400;
  let done = 0;
  for (let i = 0; i < N; i++) {
    const first = spots[i % spots.length]! + Math.floor(rnd() * 48);
    const n = 1 + Math.floor(rnd() * 4);
    jobs.push(
      (async () => {
        const w = l.acquire(first * 4096, n * 4096);
        if (w) await w;
        for (let b = first; b < first + n; b++) {
          if (owner.has(b)) throw new Error(`block ${b} held twice`);
          owner.add(b);
        }
        if (rnd() < 0.5) await new Promise((r) => setImmediate(r));
        for (let b = first; b < first + n; b++) owner.delete(b);
        l.release(first * 4096, n * 4096);
        done++;
      })(),
    );
  }
  await Promise.all(jobs);
  t.equal(done, N);
  t.equal(l.heldBlocks, 0, 'nothing left held');
  t.equal(l.tryAcquire(2 ** 40 * 4096, 4096), true, 'and every block is free again');
  t.throws(() => l.release(2 ** 32 * 4096, 4096), /not held/, 'a block with the same low 32 bits as a held one is not held');
});
