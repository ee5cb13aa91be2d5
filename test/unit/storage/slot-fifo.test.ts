// lib/storage/slot-fifo.ts against a model (a plain array of entries filtered by the same liveness rule):
// order, lazy deletion, squeezing stale entries out in place when the ring is full, growth, and a bounded
// ring when entries keep turning stale.

import t from 'tap';
import { SlotFifo } from '../../../lib/storage/slot-fifo';
import { prng } from '../../helpers/bytes';

/** The liveness the store uses: an entry counts while its stamp is the slot's current one. */
function setup(slots: number): { fifo: SlotFifo; current: Float64Array } {
  const current = new Float64Array(slots);
  return { fifo: new SlotFifo((slot, stamp) => current[slot] === stamp), current };
}

t.test('first-in first-out; stale entries are skipped; shift removes', async (t) => {
  const { fifo, current } = setup(8);
  t.equal(fifo.first(), -1, 'empty');
  t.equal(fifo.shift(), -1);
  let stamp = 1;
  for (const s of [3, 5, 1]) fifo.push(s, (current[s] = stamp++));
  t.same(fifo.peek(10), [3, 5, 1]);
  t.equal(fifo.first(), 3);
  current[3] = 0; // 3 went stale
  t.equal(fifo.first(), 5, 'a stale head is skipped');
  t.equal(fifo.length, 2, 'and dropped');
  fifo.push(3, (current[3] = stamp++)); // 3 again, now at the tail
  t.equal(fifo.shift(), 5);
  t.equal(fifo.shift(), 1);
  t.equal(fifo.shift(), 3, 'taken at its new place');
  t.equal(fifo.shift(), -1);
  t.same(fifo.peek(4), []);
});

t.test('a full ring squeezes stale entries out in place and keeps the order; it grows only when mostly live', async (t) => {
  const { fifo, current } = setup(4096);
  let stamp = 1;
  for (let s = 0; s < 1024; s++) fifo.push(s, (current[s] = stamp++));
  t.equal(fifo.capacity, 1024, 'full at the initial size');
  for (let s = 0; s < 1024; s += 2) current[s] = 0; // every even slot stale, throughout the ring
  fifo.push(2000, (current[2000] = stamp++));
  t.equal(fifo.capacity, 1024, 'half stale: squeezed, not grown');
  t.equal(fifo.length, 513);
  const want = [];
  for (let s = 1; s < 1024; s += 2) want.push(s);
  want.push(2000);
  t.same(fifo.peek(1000), want, 'live entries in their order, the new one last');
  for (let s = 0; s < 600; s++) fifo.push(3000 + (s % 1000), (current[3000 + (s % 1000)] = stamp++));
  t.equal(fifo.capacity, 2048, 'grown once mostly live');
  t.equal(fifo.first(), 1, 'the order survived the growth');
});

t.test('random operations against a model; the ring stays bounded by the live entries', async (t) => {
  const slots = 300;
  const { fifo, current } = setup(slots);
  const r = prng(42);
  const rnd = (): number => Math.floor(r() * 1e9);
  let model: Array<[number, number]> = [];
  let stamp = 1;
  let maxCap = 0;
  for (let step = 0; step < 200_000; step++) {
    const op = rnd() % 10;
    if (op < 5) {
      const s = rnd() % slots;
      current[s] = stamp;
      fifo.push(s, stamp);
      model.push([s, stamp]);
      stamp++;
    } else if (op < 7) {
      current[rnd() % slots] = 0;
    } else if (op < 9) {
      model = model.filter(([s, st]) => current[s] === st);
      const want = model.length === 0 ? -1 : model[0]![0];
      const got = fifo.shift();
      if (got !== want) {
        t.fail(`step ${step}: shift ${got}, model ${want}`);
        return;
      }
      if (want >= 0) model.shift();
    } else {
      model = model.filter(([s, st]) => current[s] === st);
      if (fifo.first() !== (model.length === 0 ? -1 : model[0]![0])) {
        t.fail(`step ${step}: first differs`);
        return;
      }
    }
    maxCap = Math.max(maxCap, fifo.capacity);
  }
  model = model.filter(([s, st]) => current[s] === st);
  const rest: number[] = [];
  for (let s = fifo.shift(); s >= 0; s = fifo.shift()) rest.push(s);
  t.same(rest, model.map(([s]) => s), 'drained in the model order');
  // At most one live entry per slot: the ring never needs more than a few times that.
  t.ok(maxCap <= 4 * Math.max(1024, slots), `ring capacity stayed at ${maxCap}`);
});
