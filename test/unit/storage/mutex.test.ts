// lib/storage/mutex.ts: callers run one at a time, in the order they called run(), each gets its own result or
// rejection, and a rejection (or a synchronous throw) does not stop the callers queued behind it.

import t from 'tap';
import { Mutex } from '../../../lib/storage/mutex';

/** A promise whose settlement the test controls. */
function deferred<T = void>(): { promise: Promise<T>; resolve: (v: T) => void; reject: (e: unknown) => void } {
  let resolve!: (v: T) => void;
  let reject!: (e: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

/** Let queued microtasks and one macrotask turn run. */
const settle = (): Promise<void> => new Promise((r) => setImmediate(r));

t.test('FIFO order, one at a time, whatever order the holders finish in', async (t) => {
  const m = new Mutex();
  const gates = Array.from({ length: 6 }, () => deferred());
  const started: number[] = [];
  const finished: number[] = [];
  let active = 0;
  let maxActive = 0;
  const runs = gates.map((g, i) =>
    m.run(async () => {
      started.push(i);
      active++;
      maxActive = Math.max(maxActive, active);
      await g.promise;
      active--;
      finished.push(i);
      return i * 10;
    }),
  );
  await settle();
  t.same(started, [0], 'only the first holder runs');
  // Release the gates in reverse: later holders must still wait for the earlier ones.
  for (let i = gates.length - 1; i >= 1; i--) gates[i]!.resolve();
  await settle();
  t.same(started, [0], 'releasing later gates does not let anyone jump the queue');
  gates[0]!.resolve();
  t.same(await Promise.all(runs), [0, 10, 20, 30, 40, 50], 'each caller gets its own result');
  t.same(started, [0, 1, 2, 3, 4, 5], 'started in arrival order');
  t.same(finished, [0, 1, 2, 3, 4, 5]);
  t.equal(maxActive, 1, 'never two holders at once');
});

t.test('a rejection reaches its caller only; the queue continues', async (t) => {
  const m = new Mutex();
  const order: string[] = [];
  const a = m.run(async () => {
    order.push('a');
    return 'a';
  });
  const b = m.run(async () => {
    order.push('b');
    throw new Error('b failed');
  });
  const c = m.run((): Promise<string> => {
    order.push('c');
    throw new Error('c threw synchronously');
  });
  const d = m.run(async () => {
    order.push('d');
    return 'd';
  });
  t.equal(await a, 'a');
  await t.rejects(b, { message: 'b failed' });
  await t.rejects(c, { message: 'c threw synchronously' });
  t.equal(await d, 'd', 'a holder after two failures still runs');
  t.same(order, ['a', 'b', 'c', 'd']);
  t.equal(await m.run(async () => 'later'), 'later', 'the mutex is usable afterwards');
});

t.test('work queued from inside a holder runs after it', async (t) => {
  const m = new Mutex();
  const order: string[] = [];
  let inner: Promise<void> | undefined;
  await m.run(async () => {
    order.push('outer start');
    // Not awaited: awaiting a nested run() on the same mutex would deadlock, by design.
    inner = m.run(async () => {
      order.push('inner');
    });
    await settle();
    order.push('outer end');
  });
  await inner;
  t.same(order, ['outer start', 'outer end', 'inner']);
});

t.test('many callers, bounded: order and exclusion hold for 200 runs', async (t) => {
  const m = new Mutex();
  const seen: number[] = [];
  let active = 0;
  let overlap = false;
  await Promise.all(
    Array.from({ length: 200 }, (_, i) =>
      m.run(async () => {
        if (++active > 1) overlap = true;
        if (i % 3 === 0) await settle();
        seen.push(i);
        active--;
      }),
    ),
  );
  t.equal(overlap, false, 'no overlap');
  t.same(seen, Array.from({ length: 200 }, (_, i) => i), 'arrival order');
});
