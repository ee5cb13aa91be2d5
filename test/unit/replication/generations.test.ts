// lib/replication/generations.ts: the verdicts of comparing two nodes' generation ids in the situations the
// replication code meets (fresh pair, degraded primary, failover, crash, split brain, unrelated disks, a
// discarded side), and the transitions that produce those ids.

import t from 'tap';
import {
  compareGenerations,
  discardLocalChanges,
  GEN_CREATED,
  type Generations,
  initialGenerations,
  isGenerations,
  newGenId,
  sourceSynced,
  startDiverging,
  targetSynced,
} from '../../../lib/replication/generations';

const diverge = (g: Generations): Generations => startDiverging(g) ?? g;

t.test('fresh pair and a pair in sync', async (t) => {
  const a = initialGenerations();
  const b = initialGenerations();
  t.equal(compareGenerations(a, b), 'in-sync', 'two never-written copies are equal');
  t.ok(isGenerations(a));
  t.notOk(isGenerations({ current: 'xyz', bitmap: '', history: [] }));
  t.not(newGenId(), GEN_CREATED);
});

t.test('primary degraded: bitmap resync, then both agree again', async (t) => {
  let p = initialGenerations();
  let s = initialGenerations();
  p = diverge(p);
  t.equal(p.bitmap, GEN_CREATED);
  t.equal(startDiverging(p), null, 'diverging twice changes nothing');
  t.equal(compareGenerations(p, s), 'bitmap', 'the bitmap covers everything since the copies were equal');
  s = targetSynced(s, p.current);
  p = sourceSynced(p);
  t.equal(p.bitmap, '');
  t.same(p.history, [GEN_CREATED]);
  t.equal(compareGenerations(p, s), 'in-sync');
  // Degraded again, longer: still a bitmap.
  const p2 = diverge(p);
  t.equal(compareGenerations(p2, s), 'bitmap');
  // The secondary of a source that lost its bitmap id (history only) needs a full copy.
  const p3 = sourceSynced(diverge(sourceSynced(p2)));
  t.equal(compareGenerations(p3, s), 'full', "the target's id is only in the source's history");
});

t.test('failover: the promoted node is source, the old primary target', async (t) => {
  const shared = diverge(initialGenerations());
  let a = sourceSynced(shared);
  const b0 = targetSynced(initialGenerations(), a.current);
  t.equal(compareGenerations(a, b0), 'in-sync');
  const b = diverge(b0); // promoted, writes while a is down
  t.equal(compareGenerations(b, a), 'bitmap', 'new primary → old primary: bitmap');
  t.equal(compareGenerations(a, b), 'peer-newer', 'the old primary must not be the source');
  a = diverge(a); // the old primary wrote as well
  t.equal(compareGenerations(b, a), 'split-brain');
  t.equal(compareGenerations(a, b), 'split-brain', 'split brain either way round');
});

t.test('split brain resolved by discarding one side', async (t) => {
  const base = sourceSynced(diverge(initialGenerations()));
  const a = diverge(base);
  const b = diverge(base);
  t.equal(compareGenerations(a, b), 'split-brain');
  const a2 = discardLocalChanges(a);
  t.equal(a2.current, base.current, 'back to the id its changes were made on');
  t.equal(compareGenerations(b, a2), 'bitmap', 'the kept side resyncs the discarded one by bitmap');
  const fresh = discardLocalChanges(base);
  t.equal(fresh.current, GEN_CREATED, 'without a bitmap id: never-synced, a full copy');
  t.equal(compareGenerations(b, fresh), 'full');
});

t.test('unrelated disks and never-written sources', async (t) => {
  const a = sourceSynced(diverge(sourceSynced(diverge(initialGenerations()))));
  const b = sourceSynced(diverge(sourceSynced(diverge(initialGenerations()))));
  t.equal(compareGenerations(a, b), 'unrelated');
  t.equal(compareGenerations(initialGenerations(), a), 'peer-newer', 'an empty source never overwrites data');
  t.equal(compareGenerations(a, initialGenerations()), 'full', 'an empty target gets a full copy');
});
