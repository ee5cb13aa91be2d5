// lib/storage/block-index.ts: a typed-array hash map of block → slot. Seeded random set/delete/get against a
// Map model, with clustered keys (long probe runs, wrap-around at the table's end, backward-shift deletion),
// keys past 2^32, growth, iteration and clear.

import t from 'tap';
import { BlockIndex } from '../../../lib/storage/block-index';
import { prng } from '../../helpers/bytes';

t.test('basic operations', async (t) => {
  const ix = new BlockIndex();
  t.equal(ix.size, 0);
  t.equal(ix.get(5), undefined);
  t.equal(ix.has(5), false);
  ix.set(5, 50).set(2 ** 40 + 5, 51).set(0, 0);
  t.equal(ix.get(5), 50);
  t.equal(ix.get(2 ** 40 + 5), 51, 'keys past 2^32 are distinct from their low half');
  t.equal(ix.get(0), 0, 'key 0 and value 0 work');
  ix.set(5, 52);
  t.equal(ix.size, 3, 'overwrite keeps the size');
  t.equal(ix.get(5), 52);
  t.equal(ix.delete(5), true);
  t.equal(ix.delete(5), false, 'deleting an absent key');
  t.equal(ix.size, 2);
  t.same([...ix].sort((a, b) => a[0] - b[0]), [[0, 0], [2 ** 40 + 5, 51]]);
  t.same([...ix.keys()].sort((a, b) => a - b), [0, 2 ** 40 + 5]);
  ix.clear();
  t.equal(ix.size, 0);
  t.equal(ix.get(0), undefined);
  t.throws(() => ix.set(-1, 1), RangeError, 'negative keys are refused');
});

t.test('random operations match a Map, across growth and deletions in long probe runs', async (t) => {
  for (const [seed, spread] of [[1, 64], [2, 5000], [3, 2 ** 45]] as const) {
    const rnd = prng(seed);
    const ix = new BlockIndex();
    const model = new Map<number, number>();
    let bad = 0;
    for (let op = 0; op < 40_000; op++) {
      const key = Math.floor(rnd() * spread);
      const r = rnd();
      if (r < 0.5) {
        ix.set(key, op);
        model.set(key, op);
      } else if (r < 0.85) {
        if (ix.delete(key) !== model.delete(key)) bad++;
      } else if (ix.get(key) !== model.get(key)) {
        bad++;
      }
      if (ix.size !== model.size) bad++;
    }
    // Every model key is found, and iteration yields exactly the model.
    for (const [k, v] of model) if (ix.get(k) !== v) bad++;
    const seen = new Map([...ix]);
    t.equal(bad, 0, `seed ${seed}, keys below ${spread}: every answer matched`);
    t.same([...seen].sort((a, b) => a[0] - b[0]), [...model].sort((a, b) => a[0] - b[0]), `seed ${seed}: iteration equals the model`);
  }
});
