// Crash torture for the storage engine (pmem region + writeback + recovery). A verifying writer keeps 32
// requests in flight against dist/server.js — writes of 512 B … 1 MiB at random offsets (sector- and
// page-aligned, unaligned, straddling page boundaries; long page-aligned ones may bypass the region; half of
// them inside a small hot window so blocks are
// rewritten while dirty, clean, evicted or being written back), some with FUA, FLUSHes now and then, a few
// WRITE_ZEROES and TRIMs, and reads that check what is already known. At a random moment (50–600 ms into a
// round) the test SIGKILLs the server, restarts it on the same data dir (same pmem region file, sometimes
// with another region size, cache size or writeback age) and reads the whole export back. The model of the
// disk holds one known value per byte, plus — for the requests in flight at the kill, which never overlap
// each other — one alternative value (the request's new data, or zero): such a byte may hold either. Every
// acknowledged write must read back exactly, bytes never written keep their content, and a torn in-flight
// request may only mix old and new bytes. A SIGKILL is a process crash, not a power loss: the region
// (MAP_SHARED) survives it in both durability modes, so the acknowledged state must survive in both.
//
// After the last round the server is stopped cleanly (SIGTERM): that must write everything back and remove
// the region file, so the next start recovers nothing and still reads the model back.
//
// A TRIM may leave each byte old or zero; the writer learns which by reading the range back before anything
// else may touch it. After a round that found lost data, the model adopts what the server holds, so later
// rounds keep testing (and the report counts the rounds that failed).
//
// Reproduce with CRASH_TORTURE_SEED=<seed printed in the test output>. The seed fixes the random choices and
// each round's configuration; completion order and the instant of the kill are real time.

import t from 'tap';
import type { Test } from 'tap';
import { existsSync, readdirSync } from 'node:fs';
import * as path from 'node:path';
import { PeerError } from '../../lib/errors';
import { NbdClient } from '../../lib/client/nbd-client';
import { prng } from '../helpers/bytes';
import { freshDir, startServer, type ServerProcess } from '../helpers/spawn-server';
import { getStatus } from '../helpers/status';

const MiB = 1024 * 1024;
const KiB = 1024;
const PAGE = 4096;
const EXPORT_SIZE = 64 * MiB;
const IN_FLIGHT = 32;
const MAX_IO = 1 * MiB;
/** Bound on any single request in the verification phases (a hang fails instead of stalling the file). */
const OP_TIMEOUT_MS = 20_000;

const SEED = process.env['CRASH_TORTURE_SEED'] !== undefined ? Number(process.env['CRASH_TORTURE_SEED']) >>> 0 : (Date.now() ^ (process.pid << 8)) >>> 0;

// -------------------------------------------------------------------------------------------------------------
// Deterministic randomness

/** Pseudo-random content of one write, reproducible from its seed (to name the write a stray byte came from). */
function dataFor(seed: number, len: number): Buffer {
  const words = new Uint32Array(Math.ceil(len / 4));
  let s = (seed ^ 0x9e3779b9) >>> 0 || 1;
  for (let i = 0; i < words.length; i++) {
    // xorshift32
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    words[i] = s;
  }
  return Buffer.from(words.buffer, 0, len);
}

// -------------------------------------------------------------------------------------------------------------
// The model

type Kind = 'write' | 'zero' | 'trim';

interface Op {
  id: number;
  round: number;
  kind: Kind;
  off: number;
  len: number;
  fua: boolean;
  /** Content seed of a write. */
  dataSeed: number;
  /** 'sent' until acknowledged; a TRIM is 'resolving' while the read that learns its outcome runs. */
  state: 'sent' | 'acked' | 'resolving' | 'failed';
}

class Model {
  /** The value every byte is known to hold (outside the uncertain ranges). */
  readonly known = Buffer.alloc(EXPORT_SIZE);
  /** Requests whose range is busy: a new request never overlaps one of them. */
  readonly busy = new Map<number, Op>();
  /** Every request ever sent (for diagnostics). */
  readonly history: Op[] = [];

  overlapsBusy(off: number, len: number): boolean {
    for (const o of this.busy.values()) if (off < o.off + o.len && o.off < off + len) return true;
    return false;
  }

  /** What byte range [off, off+len) of op would hold if it was applied (zero for TRIM / WRITE_ZEROES). */
  alternative(op: Op): Buffer {
    return op.kind === 'write' ? dataFor(op.dataSeed, op.len) : Buffer.alloc(op.len);
  }
}

interface Mismatch {
  offset: number;
  length: number;
  expected: string;
  actual: string;
  note: string;
}

function hex(b: Buffer, max = 16): string {
  return b.subarray(0, max).toString('hex');
}

/** Which earlier requests covered offset, newest first, and whether the byte read there matches their data. */
function explain(model: Model, offset: number, actual: Buffer): string {
  const covering = model.history.filter((o) => o.off <= offset && offset < o.off + o.len).slice(-6).reverse();
  if (covering.length === 0) return 'never written (expected the initial zeros)';
  return covering
    .map((o) => {
      const n = Math.min(actual.length, o.off + o.len - offset);
      const alt = model.alternative(o).subarray(offset - o.off, offset - o.off + n);
      const same = alt.equals(actual.subarray(0, n));
      return `#${o.id} round ${o.round} ${o.kind}${o.fua ? '+fua' : ''} [${o.off}, +${o.len}) ${o.state}${same ? ' <= the bytes read match this request' : ''}`;
    })
    .join('; ');
}

/**
 * Compare data read from [base, base+data.length) with the model. Uncertain ranges (requests busy at a kill)
 * accept the old or the new byte, and learn what was read. Returns the mismatches (at most a few).
 */
function checkRange(model: Model, base: number, data: Buffer, uncertain: Op[], mismatches: Mismatch[]): void {
  const end = base + data.length;
  const inRange = uncertain.filter((o) => o.off < end && base < o.off + o.len).sort((a, b) => a.off - b.off);
  let pos = base;
  const strict = (from: number, to: number): void => {
    if (to <= from) return;
    const got = data.subarray(from - base, to - base);
    const want = model.known.subarray(from, to);
    if (got.equals(want)) return;
    let i = 0;
    while (got[i] === want[i]) i++;
    let j = i;
    let bad = 0;
    for (let k = i; k < got.length; k++) {
      if (got[k] !== want[k]) {
        bad++;
        j = k;
      }
    }
    if (mismatches.length < 8) {
      mismatches.push({
        offset: from + i,
        length: j - i + 1,
        expected: hex(want.subarray(i)),
        actual: hex(got.subarray(i)),
        note: `${bad} bytes differ in [${from + i}, ${from + j + 1}); at the first: ${explain(model, from + i, got.subarray(i, i + 16))}`,
      });
    }
  };
  for (const o of inRange) {
    const s = Math.max(o.off, base);
    const e = Math.min(o.off + o.len, end);
    strict(pos, s);
    const alt = model.alternative(o);
    let bad = -1;
    let badCount = 0;
    for (let x = s; x < e; x++) {
      const b = data[x - base]!;
      if (b !== model.known[x] && b !== alt[x - o.off]) {
        if (bad < 0) bad = x;
        badCount++;
      }
    }
    if (bad >= 0 && mismatches.length < 8) {
      mismatches.push({
        offset: bad,
        length: badCount,
        expected: `${hex(model.known.subarray(bad))} or ${hex(alt.subarray(bad - o.off))}`,
        actual: hex(data.subarray(bad - base)),
        note: `${badCount} bytes of interrupted request #${o.id} (${o.kind} [${o.off}, +${o.len}) ${o.state}) hold neither the old nor the new value; ${explain(model, bad, data.subarray(bad - base, bad - base + 16))}`,
      });
    }
    // What was read is the truth from now on.
    data.copy(model.known, s, s - base, e - base);
    pos = e;
  }
  strict(pos, end);
  // After a reported mismatch the model follows what the server now holds, so later rounds test on.
  data.copy(model.known, base);
}

// -------------------------------------------------------------------------------------------------------------
// Plumbing

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    p.finally(() => clearTimeout(timer)),
    new Promise<T>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what} did not complete within ${ms} ms (server hang?)`)), ms);
    }),
  ]);
}

/** Read the whole export (4 MiB requests, 4 at a time) and check it against the model. */
async function verifyAll(client: NbdClient, model: Model, uncertain: Op[]): Promise<Mismatch[]> {
  const mismatches: Mismatch[] = [];
  const CHUNK = 4 * MiB;
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < EXPORT_SIZE) {
      const off = next;
      next += CHUNK;
      const len = Math.min(CHUNK, EXPORT_SIZE - off);
      const data = await withTimeout(client.pread(off, len), OP_TIMEOUT_MS, `READ [${off}, +${len})`);
      checkRange(model, off, data, uncertain, mismatches);
    }
  };
  await Promise.all([worker(), worker(), worker(), worker()]);
  return mismatches;
}

interface RoundConfig {
  durability: 'disk' | 'pmem';
  pmemSize: string;
  maxAge: string;
  cacheSize: string;
}

function argsFor(c: RoundConfig): string[] {
  return [
    '--export', `disk0=${EXPORT_SIZE}`,
    '--durability', c.durability,
    '--pmem-size', c.pmemSize,
    '--writeback-max-age', c.maxAge,
    '--cache-size', c.cacheSize,
    '--log-level', 'info',
  ];
}

function describeConfig(c: RoundConfig): string {
  return `--durability ${c.durability} --pmem-size ${c.pmemSize} --writeback-max-age ${c.maxAge} --cache-size ${c.cacheSize}`;
}

interface RoundStats {
  acked: number;
  sent: number;
  flushes: number;
  reads: number;
  bytesAcked: number;
  serverErrors: string[];
  readMismatches: Mismatch[];
}

/**
 * Run the verifying writer against client until `stop()` says so. Requests that complete update the model;
 * requests that fail because the connection died stay busy (uncertain). An error REPLY from the server is
 * recorded: nothing here is invalid, so the server has no reason to refuse anything.
 */
function startWriter(client: NbdClient, model: Model, round: number, rand: () => number, nextId: () => number): { stop: () => void; done: Promise<RoundStats> } {
  let stopped = false;
  const stats: RoundStats = { acked: 0, sent: 0, flushes: 0, reads: 0, bytesAcked: 0, serverErrors: [], readMismatches: [] };
  // A hot window where requests collide on the same pages across requests and rounds.
  const hot = Math.floor(rand() * ((EXPORT_SIZE - 4 * MiB) / MiB)) * MiB;
  const pickRange = (maxLen: number): { off: number; len: number } => {
    const r = rand();
    let len: number;
    let align: number;
    if (r < 0.25) {
      len = 512 * (1 + Math.floor(rand() * 16));
      align = 512;
    } else if (r < 0.5) {
      len = PAGE * (1 + Math.floor(rand() * (maxLen / PAGE)));
      align = PAGE;
    } else if (r < 0.8) {
      len = 1 + Math.floor(rand() * maxLen);
      align = 1;
    } else {
      // Straddles a page boundary, unaligned at both ends.
      len = 2 + Math.floor(rand() * 3 * PAGE);
      align = 0;
    }
    len = Math.max(512, Math.min(len, maxLen));
    const inHot = rand() < 0.5;
    const lo = inHot ? hot : 0;
    const span = (inHot ? 4 * MiB : EXPORT_SIZE) - len;
    let off: number;
    if (align === 0) {
      const boundary = lo + PAGE * (1 + Math.floor(rand() * (span / PAGE - 1)));
      off = boundary - 1 - Math.floor(rand() * Math.min(len - 1, PAGE));
    } else {
      off = lo + Math.floor((rand() * span) / align) * align;
    }
    off = Math.max(0, Math.min(off, EXPORT_SIZE - len));
    return { off, len };
  };
  const serverError = (what: string, err: unknown): void => {
    if (err instanceof PeerError && !stopped) stats.serverErrors.push(`${what}: ${err.message} (errno ${err.errno})`);
  };

  const one = async (): Promise<void> => {
    const r = rand();
    if (r < 0.03) {
      stats.sent++;
      try {
        await client.flush();
        stats.flushes++;
      } catch (err) {
        serverError('FLUSH', err);
      }
      return;
    }
    if (r < 0.13) {
      // Verify a range that nothing in flight touches.
      const { off, len } = pickRange(MAX_IO);
      if (model.overlapsBusy(off, len)) return;
      const expected = Buffer.from(model.known.subarray(off, off + len));
      // Hold the range so no write starts on it while the read runs.
      const hold: Op = { id: nextId(), round, kind: 'write', off, len, fua: false, dataSeed: 0, state: 'acked' };
      model.busy.set(hold.id, hold);
      try {
        const got = await client.pread(off, len);
        stats.reads++;
        if (!got.equals(expected)) {
          let i = 0;
          while (got[i] === expected[i]) i++;
          stats.readMismatches.push({
            offset: off + i,
            length: len - i,
            expected: hex(expected.subarray(i)),
            actual: hex(got.subarray(i)),
            note: `READ [${off}, +${len}) while the server ran; ${explain(model, off + i, got.subarray(i, i + 16))}`,
          });
        }
        model.busy.delete(hold.id);
      } catch (err) {
        serverError(`READ [${off}, +${len})`, err);
        model.busy.delete(hold.id); // a read changes nothing, so it never makes a range uncertain
      }
      return;
    }
    const kind: Kind = r < 0.16 ? 'zero' : r < 0.18 ? 'trim' : 'write';
    const { off, len } = pickRange(kind === 'write' ? MAX_IO : 1 * MiB);
    if (model.overlapsBusy(off, len)) return;
    const op: Op = { id: nextId(), round, kind, off, len, fua: rand() < 0.1, dataSeed: (rand() * 0x1_0000_0000) >>> 0, state: 'sent' };
    model.busy.set(op.id, op);
    model.history.push(op);
    stats.sent++;
    try {
      if (kind === 'write') {
        await client.pwrite(dataFor(op.dataSeed, len), off, { fua: op.fua });
        model.known.set(dataFor(op.dataSeed, len), off);
      } else if (kind === 'zero') {
        await client.zero(off, len, { fua: op.fua, noHole: rand() < 0.3 });
        model.known.fill(0, off, off + len);
      } else {
        await client.trim(off, len, { fua: op.fua });
        // TRIM leaves each byte old or zero: learn which with a read while the range is still held.
        op.state = 'resolving';
        const got = await client.pread(off, len);
        const alt = model.known.subarray(off, off + len);
        for (let i = 0; i < len; i++) {
          if (got[i] !== 0 && got[i] !== alt[i]) {
            stats.readMismatches.push({
              offset: off + i,
              length: len - i,
              expected: `${hex(alt.subarray(i))} or zeros`,
              actual: hex(got.subarray(i)),
              note: `bytes of acknowledged TRIM #${op.id} [${off}, +${len}) read as neither the old data nor zeros`,
            });
            break;
          }
        }
        got.copy(model.known, off);
      }
      op.state = 'acked';
      stats.acked++;
      stats.bytesAcked += len;
      model.busy.delete(op.id);
    } catch (err) {
      // Left busy: the request may or may not have taken effect (wholly or in part).
      serverError(`${kind.toUpperCase()} [${off}, +${len})`, err);
      if (err instanceof PeerError && !stopped) op.state = 'failed';
    }
  };

  const worker = async (): Promise<void> => {
    while (!stopped) await one();
  };
  const done = Promise.all(Array.from({ length: IN_FLIGHT }, worker)).then(() => stats);
  return {
    stop: () => {
      stopped = true;
    },
    done,
  };
}

function regionFiles(dataDir: string): string[] {
  const dir = path.join(dataDir, 'pmem');
  return existsSync(dir) ? readdirSync(dir).filter((f) => f.endsWith('.pmem')) : [];
}

// -------------------------------------------------------------------------------------------------------------
// The rounds

async function torture(t: Test, mode: 'disk' | 'pmem', rounds: number, seed: number): Promise<void> {
  const rand = prng(seed);
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)]!;
  const configFor = (): RoundConfig => ({
    durability: mode,
    pmemSize: pick(['4M', '4M', '4M', '2M', '8M']),
    maxAge: pick(['200ms', '200ms', '5s']),
    cacheSize: pick(['64M', '64M', '0', '1M']),
  });
  const dataDir = freshDir(t, `torture-${mode}`);
  const model = new Model();
  let id = 0;
  const nextId = (): number => ++id;
  let cfg = configFor();
  let srv: ServerProcess = await startServer(t, { dataDir, args: argsFor(cfg) });
  const failures: string[] = [];
  let totalAcked = 0;
  let totalBytes = 0;
  let recoveredRounds = 0;
  let recoveredPages = 0;
  let tornPages = 0;
  const killDelays: number[] = [];
  let bypassBytes = 0;

  const failedRounds: number[] = [];
  for (let round = 1; round <= rounds; round++) {
    const failuresBefore = failures.length;
    const roundCfg = cfg;
    const client = await NbdClient.connect({ host: '127.0.0.1', port: srv.nbdPort }, { exportName: 'disk0', maxInFlight: 64 });
    const delay = 50 + Math.floor(rand() * 550);
    killDelays.push(delay);
    const w = startWriter(client, model, round, prng((seed ^ Math.imul(round, 0x85ebca6b)) >>> 0), nextId);
    await new Promise((r) => setTimeout(r, delay));
    // Just before the kill: how many bytes so far went straight to the backing file (the region bypass).
    const before = await getStatus(srv.httpPort).catch(() => null);
    bypassBytes += (before?.['writeback'] as { bypassBytes?: number } | undefined)?.bypassBytes ?? 0;
    w.stop();
    await srv.kill();
    const stats = await withTimeout(w.done, OP_TIMEOUT_MS, `round ${round}: the writer after the kill`);
    await client.close().catch(() => undefined);
    totalAcked += stats.acked;
    totalBytes += stats.bytesAcked;
    const where = `round ${round} (seed ${seed}, ${describeConfig(roundCfg)}, killed after ${delay} ms)`;
    for (const e of stats.serverErrors) failures.push(`${where}: the server answered with an error: ${e}`);
    for (const m of stats.readMismatches) failures.push(`${where}: a read while running returned wrong data at ${m.offset}: expected ${m.expected}…, got ${m.actual}… (${m.note})`);

    // Restart on the same data dir: recovery happens before the server listens.
    cfg = configFor();
    const restartArgs = argsFor(cfg);
    srv = await startServer(t, { dataDir, args: restartArgs });
    const status = await getStatus(srv.httpPort);
    const rec = status['recovery'] as { pages: number; torn: number; bytes: number } | undefined;
    if (rec === undefined || typeof rec.pages !== 'number' || typeof rec.torn !== 'number') {
      failures.push(`${where}: GET /v1/status has no recovery figures: ${JSON.stringify(status)}`);
    } else {
      if (rec.pages > 0) recoveredRounds++;
      recoveredPages += rec.pages;
      tornPages += rec.torn;
      const logged = /recovered the pmem region after an unclean stop/.test(srv.logs());
      if ((rec.pages > 0 || rec.torn > 0) !== logged) {
        failures.push(`${where}: recovery figures ${JSON.stringify(rec)} but the recovery log line is ${logged ? 'present' : 'missing'}`);
      }
    }
    const verifier = await NbdClient.connect({ host: '127.0.0.1', port: srv.nbdPort }, { exportName: 'disk0', maxInFlight: 16 });
    const uncertain = [...model.busy.values()];
    const mismatches = await verifyAll(verifier, model, uncertain);
    model.busy.clear();
    await verifier.disconnect();
    for (const m of mismatches) {
      failures.push(
        `${where}, restarted with ${describeConfig(cfg)}: after recovery ${m.length} byte(s) at ${m.offset} are wrong: expected ${m.expected}…, got ${m.actual}… — ${m.note}`,
      );
    }
    t.comment(
      `${mode} round ${round}: killed after ${delay} ms, ${stats.acked}/${stats.sent} requests acknowledged (${(stats.bytesAcked / MiB).toFixed(1)} MiB, ` +
        `${stats.flushes} flushes, ${stats.reads} reads), ${uncertain.length} in flight at the kill; recovered ${rec?.pages ?? '?'} pages (${rec?.torn ?? '?'} torn)` +
        (failures.length > failuresBefore ? ` — ${failures.length - failuresBefore} FAILURE(S)` : ''),
    );
    if (failures.length > failuresBefore) failedRounds.push(round);
  }

  {
    // A clean stop writes everything back and removes the region; the next start has nothing to recover.
    const exit = await srv.stop();
    t.equal(exit.code, 0, 'SIGTERM stops the server with exit 0');
    t.same(regionFiles(dataDir), [], 'a clean stop removes the region file');
    srv = await startServer(t, { dataDir, args: argsFor(configFor()) });
    const status = await getStatus(srv.httpPort);
    t.equal(status['recovery']?.pages, 0, 'nothing to recover after a clean stop');
    const client = await NbdClient.connect({ host: '127.0.0.1', port: srv.nbdPort }, { exportName: 'disk0', maxInFlight: 16 });
    const mismatches = await verifyAll(client, model, []);
    await client.disconnect();
    for (const m of mismatches) failures.push(`after the final clean stop and restart (seed ${seed}): ${m.length} byte(s) at ${m.offset} are wrong: expected ${m.expected}…, got ${m.actual}… — ${m.note}`);
    t.equal((await srv.stop()).code, 0, 'final stop exits 0');
  }

  t.comment(
    `${mode}: seed ${seed}, ${killDelays.length} rounds, ${totalAcked} requests acknowledged (${(totalBytes / MiB).toFixed(0)} MiB), ` +
      `recovery in ${recoveredRounds} rounds (${recoveredPages} pages, ${tornPages} torn); rounds with failures: ${failedRounds.length === 0 ? 'none' : failedRounds.join(', ')}`,
  );
  t.ok(bypassBytes > 0, `long writes went straight to the backing file in the rounds (${(bypassBytes / MiB).toFixed(1)} MiB), and survived the kills too`);
  t.ok(
    failures.length === 0,
    `every acknowledged write survived ${killDelays.length} SIGKILLs and a clean stop (--durability ${mode}, seed ${seed}; ` +
      `${failures.length} failure(s), in rounds: ${failedRounds.join(', ') || 'none'})`,
    { failures: failures.slice(0, 12), notShown: Math.max(0, failures.length - 12) },
  );
  t.ok(totalAcked > rounds * 20, `the writer made progress (${totalAcked} requests acknowledged in ${killDelays.length} rounds)`);
  t.ok(recoveredRounds >= Math.ceil(killDelays.length / 2), `recovery had pages to write back in most rounds (${recoveredRounds} of ${killDelays.length})`);
}

t.comment(`crash torture seed ${SEED} (set CRASH_TORTURE_SEED to repeat a run's workload)`);

t.test('SIGKILL at random moments, --durability disk: acknowledged writes survive', { timeout: 110_000 }, async (t) => {
  await torture(t, 'disk', 20, SEED);
});

t.test('SIGKILL at random moments, --durability pmem: acknowledged writes survive', { timeout: 70_000 }, async (t) => {
  await torture(t, 'pmem', 10, (SEED ^ 0x5bd1e995) >>> 0);
});
