// lib/replication/activity-log.ts on real files: begin() is null for hot extents and a promise for cold ones;
// hot extents survive a reopen without end()/cool() and are gone after cool(); LRU eviction waits for the
// beforeEvict hook, skips extents with writes in flight and is cancelled by a begin() during the hook; with
// every slot busy a writer waits for an end(); begin()s batch into few transactions; a torn newest copy falls
// back to the older one; damaged files are refused; and under random operations the record on disk always
// lists every extent with a write in flight (read back with a decoder written here, not the module's).

import t from 'tap';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { crc32 } from '@node-rs/crc32';
import { ActivityLog, AL_EXTENT_SIZE, type ActivityLogOptions } from '../../../lib/replication/activity-log';
import { CorruptStateError, ShutdownError } from '../../../lib/errors';
import { prng } from '../../helpers/bytes';

const E = AL_EXTENT_SIZE;
const HEADER = 4096;

const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

/** Settled state of a promise after the pending I/O and microtasks had a chance to run. */
async function isSettled(p: Promise<unknown>, rounds = 20): Promise<boolean> {
  let settled = false;
  p.then(
    () => (settled = true),
    () => (settled = true),
  );
  for (let i = 0; i < rounds && !settled; i++) await new Promise((r) => setTimeout(r, 1));
  return settled;
}

/** A hook whose calls are recorded and each held until released. */
function heldHook(): { hook: (e: number) => Promise<void>; calls: number[]; release: (err?: Error) => void; pending: () => number } {
  const calls: number[] = [];
  const waiting: Array<{ resolve: () => void; reject: (e: Error) => void }> = [];
  return {
    calls,
    hook: (e) => {
      calls.push(e);
      return new Promise<void>((resolve, reject) => waiting.push({ resolve, reject }));
    },
    release: (err) => {
      const w = waiting.shift();
      if (w === undefined) throw new Error('no hook call to release');
      if (err) w.reject(err);
      else w.resolve();
    },
    pending: () => waiting.length,
  };
}

/** Decode the newest valid record copy of NAME.al, independently of the module. */
async function readRecord(file: string): Promise<{ seq: number; extents: number[] } | null> {
  const buf = await fsp.readFile(file);
  const slots = buf.readUInt32BE(16);
  const r = Math.ceil((24 + 4 * slots) / 4096) * 4096;
  let best: { seq: number; extents: number[] } | null = null;
  for (let i = 0; i < 2; i++) {
    const c = buf.subarray(HEADER + i * r, HEADER + (i + 1) * r);
    if (c.toString('latin1', 0, 4) !== 'ALR1') continue;
    const n = c.readUInt32LE(16);
    if (n > slots) continue;
    if (crc32(c.subarray(8, 24 + 4 * n)) !== c.readUInt32LE(4)) continue;
    const seq = Number(c.readBigUInt64LE(8));
    const extents: number[] = [];
    for (let k = 0; k < n; k++) extents.push(c.readUInt32LE(24 + 4 * k));
    if (best === null || seq > best.seq) best = { seq, extents };
  }
  return best;
}

async function openLog(opts: ActivityLogOptions): Promise<{ log: ActivityLog; recovered: number[] }> {
  return ActivityLog.open(opts);
}

t.test('begin is null for hot extents, a promise for cold ones; ranges across extents', async (t) => {
  const dir = t.testdir();
  const { log, recovered } = await openLog({ dir, name: 'a', size: 10 * E });
  t.same(recovered, []);
  t.equal(log.extents, 10);
  t.same((await fsp.readdir(dir)).sort(), ['a.al'], 'no temporary file left');
  const p = log.begin(0, 4096);
  t.type(p, Promise, 'cold extent: a promise');
  t.equal(log.inFlight, 1);
  await p;
  t.same(log.hot(), [0]);
  t.equal(log.transactions, 1);
  t.same((await readRecord(path.join(dir, 'a.al')))?.extents, [0], 'durable before begin resolved');
  t.equal(log.begin(E - 4096, 4096), null, 'hot extent: null');
  t.equal(log.inFlight, 2);
  log.end(E - 4096, 4096);
  log.end(0, 4096);
  t.equal(log.inFlight, 0);

  const span = log.begin(E - 512, 1024);
  t.type(span, Promise, 'a range across the boundary needs extent 1 too');
  await span;
  t.same(log.hot(), [0, 1], 'both extents hot');
  t.equal(log.begin(E, E), null, 'the whole of a hot extent');
  log.end(E, E);
  log.end(E - 512, 1024);
  await log.begin(9 * E, E); // the last extent, to the end of the export
  t.equal(log.begin(2 * E, 0), null, 'zero length touches no extent');
  log.end(2 * E, 0);
  t.throws(() => log.begin(9 * E, E + 1), RangeError, 'past the end');
  t.throws(() => log.begin(-1, 1), RangeError);
  t.throws(() => log.end(5 * E, 1), Error, 'end without begin on that extent');
  await t.rejects(log.close().then(() => log.begin(0, 1) as Promise<void>), ShutdownError, 'begin after close');
});

t.test('allHot tells whether a begin would return null, and changes nothing', async (t) => {
  const { log } = await openLog({ dir: t.testdir(), name: 'h', size: 4 * E });
  t.equal(log.allHot(0, 4096), false, 'cold extent');
  t.equal(log.inFlight, 0, 'allHot begins nothing');
  await log.begin(0, 4096);
  t.equal(log.allHot(0, 4096), true);
  t.equal(log.allHot(E - 4096, 8192), false, 'extent 1 of the range is cold');
  t.equal(log.allHot(0, 0), false, 'an empty range is not for the fast path');
  t.equal(log.allHot(4 * E - 1, 2), false, 'past the end');
  t.equal(log.begin(100, 200), null, 'begin agrees: hot');
  log.end(100, 200);
  log.end(0, 4096);
  await log.close();
  t.equal(log.allHot(0, 4096), false, 'a closed log is never hot');
});

t.test('begins for a range wider than the log are refused', async (t) => {
  const dir = t.testdir();
  const { log } = await openLog({ dir, name: 'w', size: 8 * E, slots: 2 });
  t.throws(() => log.begin(0, 3 * E), RangeError);
  t.equal(log.inFlight, 0);
  await log.begin(0, 2 * E);
  log.end(0, 2 * E);
  await log.close();
});

t.test('hot extents are recovered after a stop without end/cool; cool empties the log', async (t) => {
  const dir = t.testdir();
  const size = 100 * E + 5;
  const a = await openLog({ dir, name: 'r', size });
  await Promise.all([a.log.begin(3 * E, 10), a.log.begin(40 * E + 7, E), a.log.begin(100 * E, 5)]);
  a.log.end(3 * E, 10); // ended, but still hot (no cool): after a crash it may differ too
  await a.log.close(); // writes in flight: no cool
  const b = await openLog({ dir, name: 'r', size });
  t.same(b.recovered, [3, 40, 41, 100]);
  t.same(b.log.hot(), [3, 40, 41, 100], 'recovered extents stay hot');
  t.equal(b.log.begin(41 * E, 4096), null, 'a recovered extent is hot: no transaction');
  b.log.end(41 * E, 4096);
  await b.log.cool();
  t.same(b.log.hot(), []);
  await b.log.close();
  const c = await openLog({ dir, name: 'r', size });
  t.same(c.recovered, [], 'empty after cool and reopen');
  await c.log.begin(0, 1);
  await t.resolves(c.log.cool(), 'cool keeps extents with writes in flight');
  t.same(c.log.hot(), [0]);
  c.log.end(0, 1);
  await c.log.close(); // nothing in flight: cools
  t.same((await openLog({ dir, name: 'r', size })).recovered, [], 'a clean close leaves nothing hot');
});

t.test('LRU eviction waits for beforeEvict and skips extents with writes in flight', async (t) => {
  const dir = t.testdir();
  const h = heldHook();
  const { log } = await openLog({ dir, name: 'e', size: 16 * E, slots: 3, beforeEvict: h.hook });
  for (const e of [5, 6, 7]) {
    await log.begin(e * E, 1);
  }
  log.end(6 * E, 1); // 6 idle first: least recently used
  log.end(5 * E, 1); // then 5; 7 stays busy
  const tx = log.transactions;
  const p = log.begin(9 * E, 1)!;
  t.type(p, Promise);
  await tick();
  t.same(h.calls, [6], 'the least recently used idle extent');
  t.notOk(await isSettled(p), 'the new writer waits for the hook');
  t.equal(log.transactions, tx, 'nothing written before the hook returns');
  t.same(log.hot(), [5, 6, 7], 'the extent stays hot during the hook');
  h.release();
  await p;
  t.same(log.hot(), [5, 7, 9]);
  t.equal(log.transactions, tx + 1, 'one transaction drops 6 and adds 9');
  t.same((await readRecord(path.join(dir, 'e.al')))?.extents, [5, 7, 9]);
  // A begin on the extent being evicted cancels the eviction; the next idle one goes instead.
  log.end(9 * E, 1); // idle order: 5, 9
  const q = log.begin(10 * E, 1)!;
  await tick();
  t.same(h.calls, [6, 5]);
  t.equal(log.begin(5 * E, 1), null, 'still hot while its hook runs');
  h.release();
  await tick();
  t.same(h.calls, [6, 5, 9], 'the cancelled eviction is replaced by the next idle extent');
  t.notOk(await isSettled(q));
  h.release();
  await q;
  t.same(log.hot(), [5, 7, 10]);
  t.equal(h.pending(), 0);
  log.end(5 * E, 1);
  log.end(7 * E, 1);
  log.end(10 * E, 1);
  await log.close();
});

t.test('eviction without a hook, and a failing hook', async (t) => {
  const dir = t.testdir();
  const { log } = await openLog({ dir, name: 'n', size: 16 * E, slots: 2 });
  await log.begin(0, 1);
  log.end(0, 1);
  await log.begin(E, 1);
  log.end(E, 1);
  await log.begin(2 * E, 1);
  t.same(log.hot(), [1, 2], 'evicted at once');
  log.end(2 * E, 1);
  await log.close();

  const failing = await openLog({
    dir,
    name: 'f',
    size: 16 * E,
    slots: 1,
    beforeEvict: async () => {
      throw new Error('oos persist failed');
    },
  });
  await failing.log.begin(0, 1);
  failing.log.end(0, 1);
  await t.rejects(failing.log.begin(E, 1)!, { message: 'oos persist failed' }, 'the waiting writer gets the hook error');
  t.equal(failing.log.inFlight, 0, 'the failed begin is undone');
  t.same(failing.log.hot(), [0], 'the extent stays hot');
  t.equal(failing.log.begin(0, 1), null);
  failing.log.end(0, 1);
  await failing.log.close();
});

t.test('with every slot busy a writer waits for an end()', async (t) => {
  const dir = t.testdir();
  const calls: number[] = [];
  const { log } = await openLog({
    dir,
    name: 'b',
    size: 16 * E,
    slots: 2,
    beforeEvict: async (e) => {
      calls.push(e);
    },
  });
  await log.begin(0, 1);
  await log.begin(E, 1);
  const p = log.begin(2 * E, 1)!;
  t.notOk(await isSettled(p), 'waits');
  t.same(calls, [], 'nothing evicted while every extent has a write in flight');
  log.end(E, 1);
  await p;
  t.same(calls, [1]);
  t.same(log.hot(), [0, 2]);
  // Writers queue in order: two more wait, each gets the slot an end() frees.
  const q1 = log.begin(3 * E, 1)!;
  const q2 = log.begin(4 * E, 1)!;
  t.notOk(await isSettled(q1));
  log.end(0, 1);
  await q1;
  t.notOk(await isSettled(q2));
  log.end(2 * E, 1);
  await q2;
  t.same(log.hot(), [3, 4]);
  t.equal(log.inFlight, 2);
  // close fails writers still waiting.
  const q3 = t.rejects(log.begin(5 * E, 1)!, ShutdownError);
  await log.close();
  await q3;
  t.equal(log.inFlight, 2);
});

t.test('begins share transactions', async (t) => {
  const dir = t.testdir();
  const { log } = await openLog({ dir, name: 't', size: 1024 * E });
  const ps: Array<Promise<void> | null> = [];
  for (let e = 0; e < 100; e++) ps.push(log.begin(e * E, 4096));
  t.ok(ps.every((p) => p !== null));
  await Promise.all(ps);
  t.equal(log.transactions, 1, '100 cold extents in one tick: one transaction');
  t.equal(log.hot().length, 100);
  // Begins made while a transaction is written share the next one.
  const first = log.begin(200 * E, 1)!;
  await Promise.resolve(); // the transaction for 200 starts
  await Promise.resolve();
  const more: Array<Promise<void> | null> = [];
  for (let e = 300; e < 350; e++) {
    more.push(log.begin(e * E, 1));
    await Promise.resolve();
  }
  await Promise.all([first, ...more]);
  t.ok(log.transactions <= 3, `51 extents begun while a transaction was written took ${log.transactions - 1} transactions`);
  t.same((await readRecord(path.join(dir, 't.al')))?.extents.length, 151);
  for (let e = 0; e < 100; e++) log.end(e * E, 4096);
  log.end(200 * E, 1);
  for (let e = 300; e < 350; e++) log.end(e * E, 1);
  await log.close();
});

t.test('a torn newest copy falls back to the older one', async (t) => {
  const dir = t.testdir();
  const file = path.join(dir, 'c.al');
  const size = 32 * E;
  const a = await openLog({ dir, name: 'c', size });
  await a.log.begin(1 * E, 1); // sequence 1, copy 1: [1]
  await a.log.begin(2 * E, 1); // sequence 2, copy 0: [1, 2]
  await a.log.close();
  const buf = await fsp.readFile(file);
  const rec = Math.ceil((24 + 4 * 1024) / 4096) * 4096;
  t.equal(buf.length, HEADER + 2 * rec);
  t.same((await readRecord(file))?.extents, [1, 2]);
  // Tear copy 0 (the newest): its second extent number.
  buf[HEADER + 28]! ^= 0xff;
  await fsp.writeFile(file, buf);
  const b = await openLog({ dir, name: 'c', size });
  t.same(b.recovered, [1], 'the older copy');
  // The next transaction goes to the torn copy, never over the good one.
  await b.log.begin(5 * E, 1);
  await b.log.close();
  const c = await openLog({ dir, name: 'c', size });
  t.same(c.recovered, [1, 5]);
  await c.log.close();

  // Both copies damaged: refused.
  const both = await fsp.readFile(file);
  both[HEADER + 20]! ^= 1;
  both[HEADER + rec + 20]! ^= 1;
  await fsp.writeFile(file, both);
  await t.rejects(openLog({ dir, name: 'c', size }), CorruptStateError);
});

t.test('damaged or foreign files are refused', async (t) => {
  const dir = t.testdir();
  const file = path.join(dir, 'd.al');
  const size = 8 * E;
  const { log } = await openLog({ dir, name: 'd', size });
  await log.close();
  const good = await fsp.readFile(file);
  const expectCorrupt = async (what: string, bytes: Buffer, openSize = size): Promise<void> => {
    await fsp.writeFile(file, bytes);
    const err = await openLog({ dir, name: 'd', size: openSize }).then(
      () => null,
      (e: unknown) => e,
    );
    t.ok(err instanceof CorruptStateError, `${what}: CorruptStateError`);
    t.match((err as Error).message, file, `${what}: names the file`);
  };
  await expectCorrupt('export size mismatch', good, size + E);
  const magic = Buffer.from(good);
  magic.write('NBDMAL99', 0);
  await expectCorrupt('bad magic', magic);
  const flip = Buffer.from(good);
  flip[30]! ^= 1;
  await expectCorrupt('header bit flip', flip);
  await expectCorrupt('short file', good.subarray(0, 1000));
  await expectCorrupt('record cut', good.subarray(0, good.length - 1));
  await expectCorrupt('empty file', Buffer.alloc(0));
  await fsp.writeFile(file, good);
  const ok = await openLog({ dir, name: 'd', size });
  t.same(ok.recovered, []);
  await ok.log.close();
});

t.test('a changed slot count carries the hot extents over', async (t) => {
  const dir = t.testdir();
  const size = 64 * E;
  const a = await openLog({ dir, name: 's', size, slots: 8 });
  await Promise.all([a.log.begin(0, 1), a.log.begin(10 * E, 1), a.log.begin(20 * E, 1)]);
  await a.log.close();
  await t.rejects(openLog({ dir, name: 's', size, slots: 2 }), CorruptStateError, 'more hot extents than the new slots');
  const b = await openLog({ dir, name: 's', size, slots: 2048 });
  t.same(b.recovered, [0, 10, 20]);
  await b.log.close(); // nothing in flight in this instance: cools
  t.equal((await fsp.stat(path.join(dir, 's.al'))).size, HEADER + 2 * Math.ceil((24 + 4 * 2048) / 4096) * 4096);
  const c = await openLog({ dir, name: 's', size, slots: 2048 });
  t.same(c.recovered, []);
  await c.log.close();
});

t.test('random operations: the record on disk covers every write in flight', async (t) => {
  const dir = t.testdir();
  const file = path.join(dir, 'x.al');
  const rnd = prng(99);
  const hookRnd = prng(7); // its own stream: hooks run at times that depend on I/O
  const extents = 24;
  const active = new Map<number, { offset: number; length: number }>(); // begun and resolved, not ended
  let nextId = 0;
  const busyAtHook: number[] = [];
  const inActive = (e: number): boolean => {
    for (const w of active.values()) {
      if (Math.floor(w.offset / E) <= e && e <= Math.floor((w.offset + w.length - 1) / E)) return true;
    }
    return false;
  };
  const { log } = await openLog({
    dir,
    name: 'x',
    size: extents * E,
    slots: 5,
    beforeEvict: async (e) => {
      if (inActive(e)) busyAtHook.push(e);
      if (hookRnd() < 0.5) await tick();
    },
  });
  const pending = new Set<Promise<void>>();
  let violations = 0;
  for (let op = 0; op < 400; op++) {
    if (rnd() < 0.55 && active.size + pending.size < 4) {
      const offset = Math.floor(rnd() * (extents - 1) * E);
      const length = rnd() < 0.3 ? E : 1 + Math.floor(rnd() * 8192);
      const id = nextId++;
      const p = log.begin(offset, length);
      if (p === null) active.set(id, { offset, length });
      else {
        const q = p.then(() => {
          active.set(id, { offset, length });
          pending.delete(q);
        });
        pending.add(q);
      }
    } else if (active.size > 0) {
      const ids = [...active.keys()];
      const id = ids[Math.floor(rnd() * ids.length)]!;
      const w = active.get(id)!;
      active.delete(id);
      log.end(w.offset, w.length);
    }
    await tick();
    // Under I/O load a transaction can outlast many ticks: wait for one when nothing else can move, so the
    // run makes progress (and many transactions) however slow fdatasync is.
    if (pending.size > 0 && active.size === 0) await Promise.race([...pending]);
    if (op % 10 === 0) {
      const rec = await readRecord(file);
      const onDisk = new Set(rec?.extents ?? []);
      for (let e = 0; e < extents; e++) if (inActive(e) && !onDisk.has(e)) violations++;
      if (log.hot().some((e) => !onDisk.has(e))) violations++;
    }
  }
  for (let i = 0; i < 100 && pending.size > 0; i++) {
    for (const w of active.values()) log.end(w.offset, w.length);
    active.clear();
    await Promise.race([...pending]);
    await tick();
  }
  t.equal(pending.size, 0, 'every begin resolved');
  for (const w of active.values()) log.end(w.offset, w.length);
  t.equal(violations, 0, 'the record always lists the extents of writes in flight and every hot extent');
  t.same(busyAtHook, [], 'no extent with a write in flight was offered for eviction');
  t.equal(log.inFlight, 0);
  t.ok(log.transactions > 5, `${log.transactions} transactions`);
  await log.close();
  t.same((await readRecord(file))?.extents, [], 'clean close');
});
