// Faults around the pmem region, driven from outside against dist/server.js:
// - a region far smaller than the data streamed through it (backpressure: slow, never an error or a hang);
// - a region whose pages all stay dirty until writers force them out (--writeback-high 100);
// - the region file removed after a crash (a new, empty region; flushed data intact);
// - the region file's header damaged (refused with exit 1 and a one-line message; the backing file is not
//   touched; moving the file away lets the server start), and one page of it damaged (counted as torn,
//   everything else recovered);
// - a clean stop (everything written back, the region file removed, nothing to recover);
// - the backing file's filesystem full (ENOSPC to the client, no crash, no lost acknowledged data, and
//   everything works again once space is freed). This one mounts a small tmpfs, so it needs root.

import t from 'tap';
import type { Test } from 'tap';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, openSync, closeSync, readSync, readFileSync, renameSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { NbdClient } from '../../lib/client/nbd-client';
import { PeerError } from '../../lib/errors';
import { requireThat, requireTool } from '../helpers/requires';
import { run, sha256, sha256File, describe as describeRun } from '../helpers/run';
import { SERVER_JS, freshDir, startServer, type ServerProcess } from '../helpers/spawn-server';
import { getStatus } from '../helpers/status';

const KiB = 1024;
const MiB = 1024 * 1024;
const PAGE = 4096;
const NBD_ENOSPC = 28;

// -------------------------------------------------------------------------------------------------------------
// Helpers

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    p.finally(() => clearTimeout(timer)),
    new Promise<T>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what} did not complete within ${ms} ms (deadlock?)`)), ms);
    }),
  ]);
}

interface RegionStats {
  capacityPages: number;
  freePages: number;
  dirtyPages: number;
  cleanPages: number;
  backpressureWaits: number;
}

interface Status {
  region: RegionStats;
  recovery: { pages: number; bytes: number; torn: number; superseded: number };
  node: { regionFile: string };
}

function connect(srv: ServerProcess, maxInFlight = 64): Promise<NbdClient> {
  return NbdClient.connect({ host: '127.0.0.1', port: srv.nbdPort }, { exportName: 'disk0', maxInFlight });
}

/** Read [off, off+len) in chunks of at most 32 MiB. */
async function readRange(c: NbdClient, off: number, len: number): Promise<Buffer> {
  const parts: Buffer[] = [];
  for (let pos = 0; pos < len; pos += 32 * MiB) parts.push(await c.pread(off + pos, Math.min(32 * MiB, len - pos)));
  return Buffer.concat(parts);
}

/** The first offset where a and b differ, described, or null when equal. */
function firstDiff(a: Buffer, b: Buffer, base = 0): string | null {
  if (a.equals(b)) return null;
  let i = 0;
  while (i < a.length && a[i] === b[i]) i++;
  let n = 0;
  for (let k = i; k < Math.min(a.length, b.length); k++) if (a[k] !== b[k]) n++;
  return `${n} byte(s) differ, the first at offset ${base + i}: got ${a.subarray(i, i + 16).toString('hex')}…, expected ${b.subarray(i, i + 16).toString('hex')}…`;
}

/** The region file of a server started by startServer (DATA_DIR/pmem/nbdmirror-UUID.pmem). */
function regionFileOf(dataDir: string): string {
  const uuid = (JSON.parse(readFileSync(path.join(dataDir, 'node.json'), 'utf8')) as { uuid: string }).uuid;
  return path.join(dataDir, 'pmem', `nbdmirror-${uuid}.pmem`);
}

function logRecords(srv: ServerProcess): Array<Record<string, any>> {
  const out: Array<Record<string, any>> = [];
  for (const line of srv.logs().split('\n')) {
    if (!line.startsWith('{')) continue;
    try {
      out.push(JSON.parse(line) as Record<string, any>);
    } catch {
      // not a log record
    }
  }
  return out;
}

/** Parse the region file's page table (layout version 1): the slots that hold a page. */
function regionEntries(file: string): { pageCount: number; pagesOffset: number; entries: Array<{ slot: number; seq: number; exportId: number; block: number }> } {
  const fd = openSync(file, 'r');
  try {
    const header = Buffer.alloc(64);
    readSync(fd, header, 0, 64, 0);
    const pageCount = header.readUInt32BE(16);
    const tableBytes = Math.ceil((pageCount * 32) / PAGE) * PAGE;
    const table = Buffer.alloc(pageCount * 32);
    readSync(fd, table, 0, table.length, 16 * KiB);
    const entries = [];
    for (let slot = 0; slot < pageCount; slot++) {
      const e = slot * 32;
      const seq = table.readUInt32BE(e) * 2 ** 32 + table.readUInt32BE(e + 4);
      if (seq === 0) continue;
      entries.push({ slot, seq, exportId: table.readUInt32BE(e + 8), block: table.readUInt32BE(e + 12) * 2 ** 32 + table.readUInt32BE(e + 16) });
    }
    return { pageCount, pagesOffset: 16 * KiB + tableBytes, entries };
  } finally {
    closeSync(fd);
  }
}

/** Status sampled every 50 ms while a workload runs: the largest dirty count, and any impossible figure. */
function sampleStatus(srv: ServerProcess): { stop: () => Promise<{ maxDirty: number; samples: number; violations: string[]; last: Status | null }> } {
  let maxDirty = 0;
  let samples = 0;
  let last: Status | null = null;
  const violations: string[] = [];
  let stopped = false;
  const loop = (async () => {
    while (!stopped) {
      try {
        const s = await getStatus<Status>(srv.httpPort);
        samples++;
        last = s;
        const r = s.region;
        maxDirty = Math.max(maxDirty, r.dirtyPages);
        if (r.dirtyPages > r.capacityPages || r.dirtyPages < 0 || r.freePages < 0 || r.dirtyPages + r.cleanPages + r.freePages > r.capacityPages) {
          violations.push(JSON.stringify(r));
        }
      } catch (err) {
        violations.push(`GET /v1/status failed: ${(err as Error).message}`);
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  })();
  return {
    stop: async () => {
      stopped = true;
      await loop;
      return { maxDirty, samples, violations, last };
    },
  };
}

// -------------------------------------------------------------------------------------------------------------
// Sustained writes through a tiny region

/**
 * Stream `bigCount` 32 MiB writes into [0, bigCount×32 MiB) (up to 3 in flight, on one connection) and
 * `smallBytes` of 4 KiB writes into the space after them (64 in flight, on a second connection), every range
 * written once; then FLUSH and read everything back.
 */
async function sustained(t: Test, srv: ServerProcess, bigCount: number, smallBytes: number, limitMs: number): Promise<void> {
  const big = await connect(srv, 4);
  const small = await connect(srv, 64);
  const smallBase = bigCount * 32 * MiB;
  const smallData = randomBytes(smallBytes);
  const bigHashes: string[] = [];
  const errors: string[] = [];
  const sampler = sampleStatus(srv);
  const started = Date.now();
  let nextBig = 0;
  let nextSmall = 0;
  const bigWorker = async (): Promise<void> => {
    while (nextBig < bigCount) {
      const i = nextBig++;
      const buf = randomBytes(32 * MiB);
      bigHashes[i] = sha256(buf);
      try {
        await big.pwrite(buf, i * 32 * MiB);
      } catch (err) {
        errors.push(`32 MiB WRITE #${i}: ${(err as Error).message}`);
        return;
      }
    }
  };
  const smallWorker = async (): Promise<void> => {
    while (nextSmall < smallBytes / PAGE) {
      const i = nextSmall++;
      try {
        await small.pwrite(smallData.subarray(i * PAGE, (i + 1) * PAGE), smallBase + i * PAGE);
      } catch (err) {
        errors.push(`4 KiB WRITE #${i}: ${(err as Error).message}`);
        return;
      }
    }
  };
  let finished = true;
  try {
    await withTimeout(Promise.all([bigWorker(), bigWorker(), bigWorker(), ...Array.from({ length: 64 }, smallWorker)]), limitMs, `${(bigCount * 32 + smallBytes / MiB).toFixed(0)} MiB of writes`);
  } catch (err) {
    finished = false;
    errors.push((err as Error).message);
  }
  const ms = Date.now() - started;
  const sampled = await sampler.stop();
  const total = bigCount * 32 * MiB + smallBytes;
  t.ok(finished, `${total / MiB} MiB of writes completed within ${limitMs / 1000} s (took ${ms} ms, ${((total / MiB) / (ms / 1000)).toFixed(0)} MiB/s)`);
  t.same(errors, [], 'no write failed (backpressure, not ENOSPC/EIO)');
  t.notOk(srv.exited, 'the server is still running');
  if (!finished) return;
  await withTimeout(big.flush(), 30_000, 'FLUSH');
  const status = await getStatus<Status>(srv.httpPort);
  t.same(sampled.violations, [], `status figures stayed consistent (${sampled.samples} samples, at most ${sampled.maxDirty} dirty pages)`);
  t.ok(sampled.maxDirty <= status.region.capacityPages, `dirtyPages (max ${sampled.maxDirty}) ≤ capacity (${status.region.capacityPages})`);
  t.ok(status.region.backpressureWaits > 0, `writers waited for free pages (backpressureWaits ${status.region.backpressureWaits})`);
  for (let i = 0; i < bigCount; i++) {
    const got = await withTimeout(big.pread(i * 32 * MiB, 32 * MiB), 30_000, 'READ');
    t.equal(sha256(got), bigHashes[i], `32 MiB write #${i} reads back`);
  }
  const got = await withTimeout(readRange(small, smallBase, smallBytes), 30_000, 'READ');
  t.equal(firstDiff(got, smallData, smallBase), null, `${smallBytes / MiB} MiB of 4 KiB writes read back`);
  await big.disconnect();
  await small.disconnect();
}

t.test('a 1 MiB region under 256 MiB of sustained writes: backpressure, no error, no deadlock', { timeout: 100_000 }, async (t) => {
  // --write-bypass 0: every write goes through the region (long ones would otherwise go past it).
  const srv = await startServer(t, { args: ['--export', `disk0=${256 * MiB}`, '--pmem-size', '1M', '--write-bypass', '0'] });
  await sustained(t, srv, 6, 64 * MiB, 75_000);
  t.equal((await srv.stop()).code, 0, 'stops cleanly');
});

t.test('every page dirty until writers force them out (--writeback-high 100 --writeback-low 99, pmem durability)', { timeout: 80_000 }, async (t) => {
  const srv = await startServer(t, {
    args: ['--export', `disk0=${96 * MiB}`, '--pmem-size', '1M', '--writeback-high', '100', '--writeback-low', '99', '--writeback-max-age', '60s', '--durability', 'pmem', '--write-bypass', '0'],
  });
  // A first burst that fits: the pages stay dirty (nothing reaches the watermark or the age limit).
  const c = await connect(srv);
  const first = randomBytes(512 * KiB);
  await c.pwrite(first, 90 * MiB);
  await new Promise((r) => setTimeout(r, 300));
  const before = await getStatus<Status>(srv.httpPort);
  t.equal(before.region.dirtyPages, 128, `512 KiB of writes stay dirty below the watermark (${JSON.stringify(before.region)})`);
  await c.disconnect();
  await sustained(t, srv, 2, 16 * MiB, 55_000);
  const c2 = await connect(srv);
  t.equal(firstDiff(await c2.pread(90 * MiB, 512 * KiB), first, 90 * MiB), null, 'the first burst reads back');
  await c2.disconnect();
  t.equal((await srv.stop()).code, 0, 'stops cleanly');
});

// -------------------------------------------------------------------------------------------------------------
// The region file after a crash

/** Write `flushed` at 0 and FLUSH, then `unflushed` at 32 MiB without FLUSH; then SIGKILL. */
async function writeThenKill(srv: ServerProcess, flushed: Buffer, unflushed: Buffer): Promise<void> {
  const c = await connect(srv);
  await c.pwrite(flushed, 0);
  await c.flush();
  await c.pwrite(unflushed, 32 * MiB);
  await srv.kill();
  await c.close().catch(() => undefined);
}

/** Every byte of got is the old value (zero here) or the new one. */
function oldOrNew(got: Buffer, neu: Buffer): boolean {
  for (let i = 0; i < got.length; i++) if (got[i] !== 0 && got[i] !== neu[i]) return false;
  return true;
}

t.test('region file removed after a crash: a new region, flushed data intact', async (t) => {
  const args = ['--export', `disk0=${64 * MiB}`, '--pmem-size', '4M', '--writeback-max-age', '60s', '--write-bypass', '0'];
  const srv = await startServer(t, { args });
  const dataDir = srv.dataDir;
  const flushed = randomBytes(6 * MiB + 1234);
  const unflushed = randomBytes(1 * MiB);
  await writeThenKill(srv, flushed, unflushed);
  const file = regionFileOf(dataDir);
  t.ok(existsSync(file), 'the crash left the region file behind');
  rmSync(file);

  const srv2 = await startServer(t, { dataDir, args });
  const ready = logRecords(srv2).find((r) => r.msg === 'pmem region ready');
  t.equal(ready?.created, true, 'the log says the region was created');
  const status = await getStatus(srv2.httpPort);
  t.equal(status.recovery.pages, 0, 'nothing recovered');
  t.notMatch(srv2.logs(), /recovered the pmem region/, 'no recovery logged');
  const c = await connect(srv2);
  t.equal(firstDiff(await c.pread(0, flushed.length), flushed), null, 'the flushed data reads back');
  t.ok(oldOrNew(await c.pread(32 * MiB, unflushed.length), unflushed), 'unflushed data (lost with the region) reads as old or new bytes, nothing else');
  await c.disconnect();
  t.equal((await srv2.stop()).code, 0);
});

t.test('region file with a damaged header: exit 1 naming the file, backing untouched; moved away, the server starts', async (t) => {
  const args = ['--export', `disk0=${64 * MiB}`, '--pmem-size', '4M', '--writeback-max-age', '60s', '--write-bypass', '0'];
  const srv = await startServer(t, { args });
  const dataDir = srv.dataDir;
  const flushed = randomBytes(4 * MiB);
  const unflushed = randomBytes(1 * MiB);
  await writeThenKill(srv, flushed, unflushed);
  const file = regionFileOf(dataDir);
  const img = path.join(dataDir, 'disk0.img');
  const alloc = path.join(dataDir, 'disk0.alloc');
  const before = { img: await sha256File(img), alloc: await sha256File(alloc) };
  // Overwrite the magic.
  const fd = openSync(file, 'r+');
  writeSync(fd, Buffer.from('GARBAGE!'), 0, 8, 0);
  closeSync(fd);
  const damaged = await sha256File(file);

  const r = await run(
    process.execPath,
    [SERVER_JS, '--listen', '127.0.0.1:0', '--http', '127.0.0.1:0', '--data-dir', dataDir, '--pmem-dir', path.join(dataDir, 'pmem'), ...args],
    { timeoutMs: 20_000 },
  );
  t.equal(r.code, 1, `exit code 1\n${describeRun(r)}`);
  const lines = r.stderr.split('\n').filter((l) => l.trim() !== '');
  t.equal(lines.length, 1, `one line on stderr: ${JSON.stringify(r.stderr)}`);
  t.ok(lines[0]?.includes(file), 'the message names the region file');
  t.match(lines[0] ?? '', /move .* away/, 'the message says to move the file away');
  t.equal(await sha256File(img), before.img, 'the backing file is untouched');
  t.equal(await sha256File(alloc), before.alloc, 'the allocation map is untouched');
  t.equal(await sha256File(file), damaged, 'the damaged region file is left as it was (for the operator)');

  renameSync(file, `${file}.damaged`);
  const srv2 = await startServer(t, { dataDir, args });
  t.equal(logRecords(srv2).find((r) => r.msg === 'pmem region ready')?.created, true, 'starts with a new region');
  const c = await connect(srv2);
  t.equal(firstDiff(await c.pread(0, flushed.length), flushed), null, 'the flushed data reads back');
  t.ok(oldOrNew(await c.pread(32 * MiB, unflushed.length), unflushed), 'unflushed data reads as old or new bytes, nothing else');
  await c.disconnect();
  t.equal((await srv2.stop()).code, 0);
});

t.test('a damaged page in the region is counted as torn; every other page recovers', async (t) => {
  const args = ['--export', `disk0=${64 * MiB}`, '--pmem-size', '4M', '--writeback-max-age', '60s', '--write-bypass', '0'];
  const srv = await startServer(t, { args });
  const dataDir = srv.dataDir;
  const BLOCKS = 64;
  const p0 = randomBytes(BLOCKS * PAGE);
  const p1 = randomBytes(BLOCKS * PAGE);
  const c = await connect(srv);
  await c.pwrite(p0, 0);
  await c.flush(); // p0 is in the backing file
  await c.pwrite(p1, 0); // p1 only in the region (below the watermark, younger than the age limit)
  await srv.kill();
  await c.close().catch(() => undefined);

  const file = regionFileOf(dataDir);
  const { pagesOffset, entries } = regionEntries(file);
  const victim = entries.find((e) => e.block === 10);
  t.equal(entries.length, BLOCKS, `the region holds one page per written block (${entries.length})`);
  if (victim === undefined) {
    t.fail('no region page for block 10');
    return;
  }
  const fd = openSync(file, 'r+');
  const at = pagesOffset + victim.slot * PAGE + 1000;
  const bytes = Buffer.alloc(16);
  readSync(fd, bytes, 0, 16, at);
  for (let i = 0; i < 16; i++) bytes[i] = bytes[i]! ^ 0xff;
  writeSync(fd, bytes, 0, 16, at);
  closeSync(fd);

  const srv2 = await startServer(t, { dataDir, args });
  const status = await getStatus(srv2.httpPort);
  t.equal(status.recovery.torn, 1, `recovery counts one torn page (${JSON.stringify(status.recovery)})`);
  t.equal(status.recovery.pages, BLOCKS - 1, 'and recovers the other pages');
  const logged = logRecords(srv2).find((r) => r.msg === 'recovered the pmem region after an unclean stop');
  t.equal(logged?.torn, 1, 'the recovery log line reports the torn page');
  const c2 = await connect(srv2);
  const got = await c2.pread(0, BLOCKS * PAGE);
  const expected = Buffer.from(p1);
  p0.copy(expected, 10 * PAGE, 10 * PAGE, 11 * PAGE); // the torn page falls back to the flushed version
  t.equal(firstDiff(got, expected), null, 'every block reads its last version, the torn one its flushed version');
  await c2.disconnect();
  t.equal((await srv2.stop()).code, 0);
});

t.test('a clean stop writes everything back and removes the region file', async (t) => {
  const args = ['--export', `disk0=${64 * MiB}`, '--pmem-size', '4M', '--writeback-max-age', '60s', '--write-bypass', '0'];
  const srv = await startServer(t, { args });
  const dataDir = srv.dataDir;
  const data = randomBytes(1 * MiB + 777);
  const c = await connect(srv);
  await c.pwrite(data, 5 * MiB + 3);
  const status = await getStatus<Status>(srv.httpPort);
  t.ok(status.region.dirtyPages > 0, `pages are dirty before the stop (${status.region.dirtyPages})`);
  await c.disconnect();
  const file = regionFileOf(dataDir);
  t.ok(existsSync(file), 'the region file exists while running');
  t.equal((await srv.stop()).code, 0, 'SIGTERM: exit 0');
  t.notOk(existsSync(file), 'the region file is removed');
  // The data is in the backing file itself.
  const fd = openSync(path.join(dataDir, 'disk0.img'), 'r');
  const raw = Buffer.alloc(data.length);
  readSync(fd, raw, 0, raw.length, 5 * MiB + 3);
  closeSync(fd);
  t.equal(firstDiff(raw, data), null, 'the backing file holds the data');

  const srv2 = await startServer(t, { dataDir, args });
  t.equal((await getStatus(srv2.httpPort)).recovery.pages, 0, 'the next start recovers 0 pages');
  t.notMatch(srv2.logs(), /recovered the pmem region/, 'no recovery logged');
  const c2 = await connect(srv2);
  t.equal(firstDiff(await c2.pread(5 * MiB + 3, data.length), data), null, 'the data reads back');
  await c2.disconnect();
  t.equal((await srv2.stop()).code, 0);
});

// -------------------------------------------------------------------------------------------------------------
// The backing file's filesystem fills up

t.test('backing filesystem full: ENOSPC to the client, no crash, no lost data; works again after freeing space', { timeout: 90_000 }, async (t) => {
  const isRoot = typeof process.getuid === 'function' && process.getuid() === 0;
  if (!requireThat(t, isRoot, 'mounting a tmpfs needs root')) return;
  if (!requireTool(t, 'mount') || !requireTool(t, 'umount')) return;
  // The mount point is outside tap's fixture dir: tap removes that before later teardowns run, and a
  // mounted directory cannot be removed.
  const mnt = mkdtempSync(path.join(tmpdir(), 'nbdmirror-full-'));
  const servers: ServerProcess[] = [];
  let mounted = false;
  t.teardown(async () => {
    for (const s of servers) if (!s.exited) await s.kill();
    if (mounted) {
      let ok = false;
      for (let i = 0; i < 10 && !ok; i++) {
        ok = (await run('umount', [mnt], { timeoutMs: 10_000 })).code === 0;
        if (!ok) await new Promise((r) => setTimeout(r, 200));
      }
      if (!ok) await run('umount', ['-l', mnt], { timeoutMs: 10_000 });
    }
    rmSync(mnt, { recursive: true, force: true });
  });
  const m = await run('mount', ['-t', 'tmpfs', '-o', 'size=24m', 'tmpfs', mnt], { timeoutMs: 10_000 });
  if (!requireThat(t, m.code === 0, `cannot mount a tmpfs: ${m.stderr.trim()}`)) return;
  mounted = true;

  // The data dir fills the tmpfs; the region lives on the ordinary disk.
  const dataDir = path.join(mnt, 'data');
  mkdirSync(dataDir);
  const filler = path.join(mnt, 'filler');
  writeFileSync(filler, randomBytes(8 * MiB));
  const EXPORT = 20 * MiB; // larger than the free space (about 16 MiB), smaller than the filesystem
  const args = ['--export', `disk0=${EXPORT}`, '--pmem-dir', path.join(freshDir(t, 'pmem-on-disk')), '--pmem-size', '2M', '--writeback-max-age', '200ms'];
  const srv = await startServer(t, { dataDir, args });
  servers.push(srv);
  t.ok(logRecords(srv).some((r) => r.msg === 'export is larger than the free space in the data dir'), 'the server warns that the export may not fit');

  const c = await connect(srv, 16);
  const known = Buffer.alloc(EXPORT);
  const uncertain: Array<{ off: number; data: Buffer }> = [];
  const errnos: number[] = [];
  const otherErrors: string[] = [];
  let flushedUpTo = 0; // every write below this offset was acknowledged before a successful FLUSH began
  let ackedUpTo = 0;
  let sawNoSpace = false;
  const noSpaceFrom = { write: 0, flush: 0 };
  const CHUNK = 256 * KiB;
  const done: boolean[] = [];
  // First 4 MiB written and flushed while there is room: the data that must survive whatever follows.
  const FIRST = 4 * MiB;
  const first = randomBytes(FIRST);
  await c.pwrite(first, 0);
  await c.flush();
  first.copy(known, 0);
  for (let off = 0; off < FIRST; off += CHUNK) done[off / CHUNK] = true;
  flushedUpTo = ackedUpTo = FIRST;
  let next = FIRST;
  let flushes = 0;
  const writer = async (): Promise<void> => {
    while (!sawNoSpace && next + CHUNK <= EXPORT) {
      const off = next;
      next += CHUNK;
      const data = randomBytes(CHUNK);
      try {
        await c.pwrite(data, off);
        data.copy(known, off);
        done[off / CHUNK] = true;
        while (done[ackedUpTo / CHUNK]) ackedUpTo += CHUNK;
      } catch (err) {
        uncertain.push({ off, data });
        if (err instanceof PeerError) {
          errnos.push(err.errno);
          if (err.errno === NBD_ENOSPC) {
            sawNoSpace = true;
            noSpaceFrom.write++;
          } else otherErrors.push(`WRITE at ${off}: ${err.message}`);
        } else {
          otherErrors.push(`WRITE at ${off}: ${(err as Error).message}`);
          sawNoSpace = true; // stop: the connection is gone
        }
      }
    }
  };
  const flusher = async (): Promise<void> => {
    while (!sawNoSpace && next + CHUNK <= EXPORT) {
      await new Promise((r) => setTimeout(r, 30));
      const covered = ackedUpTo;
      try {
        await c.flush();
        flushes++;
        flushedUpTo = Math.max(flushedUpTo, covered);
      } catch (err) {
        if (err instanceof PeerError) {
          errnos.push(err.errno);
          if (err.errno === NBD_ENOSPC) {
            sawNoSpace = true;
            noSpaceFrom.flush++;
          } else otherErrors.push(`FLUSH: ${err.message}`);
        } else {
          otherErrors.push(`FLUSH: ${(err as Error).message}`);
          sawNoSpace = true;
        }
      }
    }
  };
  await withTimeout(Promise.all([writer(), writer(), writer(), writer(), flusher()]), 45_000, 'filling the filesystem');
  t.ok(errnos.includes(NBD_ENOSPC), `the client got ENOSPC (errnos seen: ${JSON.stringify([...new Set(errnos)])}, ENOSPC from ${noSpaceFrom.write} write(s) and ${noSpaceFrom.flush} flush(es); ${(ackedUpTo / MiB).toFixed(2)} MiB acknowledged, ${(flushedUpTo / MiB).toFixed(2)} MiB flushed by ${flushes + 1} successful FLUSHes)`);
  t.same(otherErrors, [], 'no other error (no EIO, no dropped connection)');
  t.notOk(srv.exited, 'the server did not crash');
  const full = await getStatus<Status>(srv.httpPort);
  t.comment(`region while the disk is full: ${JSON.stringify(full.region)}`);

  // Flushed data reads back while the disk is still full.
  const got = await withTimeout(c.pread(0, flushedUpTo || 1), 20_000, 'READ while full');
  t.equal(firstDiff(got.subarray(0, flushedUpTo), known.subarray(0, flushedUpTo)), null, `the ${(flushedUpTo / MiB).toFixed(2)} MiB flushed before the error read back`);

  // Free space: FLUSH succeeds, and everything acknowledged is there.
  rmSync(filler);
  let flushErr: unknown = null;
  try {
    await withTimeout(c.flush(), 30_000, 'FLUSH after freeing space');
  } catch (err) {
    flushErr = err;
  }
  t.equal(flushErr, null, `FLUSH succeeds once space is free${flushErr ? `: ${(flushErr as Error).message}` : ''}`);
  // Writes work again: rewrite the ranges that failed, and a little more.
  for (const u of uncertain) {
    try {
      await withTimeout(c.pwrite(u.data, u.off), 30_000, 'WRITE after freeing space');
      u.data.copy(known, u.off);
    } catch (err) {
      t.fail(`WRITE at ${u.off} after freeing space: ${(err as Error).message}`);
    }
  }
  uncertain.length = 0;
  let writeErr: unknown = null;
  try {
    await withTimeout(c.flush(), 30_000, 'FLUSH');
  } catch (err) {
    writeErr = err;
  }
  t.equal(writeErr, null, 'the rewritten ranges flush');
  const all = await withTimeout(c.pread(0, EXPORT), 20_000, 'READ');
  // Ranges never written (above the last attempt) are still zeros in the model.
  t.equal(firstDiff(all, known), null, 'every acknowledged write reads back');
  await c.disconnect();

  // And it is all in the backing file: a clean stop and a fresh start read the same.
  t.equal((await srv.stop()).code, 0, 'SIGTERM: exit 0');
  const srv2 = await startServer(t, { dataDir, args });
  servers.push(srv2);
  const c2 = await connect(srv2);
  t.equal(firstDiff(await c2.pread(0, EXPORT), known), null, 'after a restart every acknowledged write reads back');
  await c2.disconnect();
  t.equal((await srv2.stop()).code, 0);
});
