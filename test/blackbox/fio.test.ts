// Black box: fio's nbd engine (libnbd, 32 requests in flight) against dist/server.js. Two concurrent random
// read/write jobs — fixed 4 KiB blocks, and mixed 512 B..64 KiB blocks — write crc32c-tagged blocks and
// verify every one. Then a seeded write pattern is verified again by a separate fio run after a restart,
// and, as a check that the verifier is live, fails verification once a block is corrupted on disk.

import t from 'tap';
import type { Test } from 'tap';
import { closeSync, openSync, writeSync } from 'node:fs';
import * as path from 'node:path';
import { requireTool } from '../helpers/requires';
import { describe, run, type RunResult } from '../helpers/run';
import { type ServerProcess, startServer } from '../helpers/spawn-server';

const MiB = 1024 * 1024;

interface FioJob {
  jobname: string;
  error: number;
  read: { io_bytes: number; total_ios: number };
  write: { io_bytes: number; total_ios: number };
}

/** fio prints "fio: connected to NBD server" before the JSON document. */
function parseFio(r: RunResult): FioJob[] | null {
  const start = r.stdout.search(/^\{/m);
  if (start < 0) return null;
  try {
    return (JSON.parse(r.stdout.slice(start)) as { jobs: FioJob[] }).jobs;
  } catch {
    return null;
  }
}

async function fio(args: string[]): Promise<RunResult> {
  // runtime bounds each job even if the server slows to a crawl; time_based=0 stops when size is done.
  // verify_state_save=0: fio would otherwise drop *-verify.state files into the current directory.
  return run('fio', ['--output-format=json', '--ioengine=nbd', '--runtime=60', '--time_based=0', '--verify_state_save=0', ...args], {
    timeoutMs: 90_000,
  });
}

function checkClean(tt: Test, r: RunResult, names: string[], srv: ServerProcess): FioJob[] {
  const diag = { run: describe(r), server: srv.logTail() };
  tt.equal(r.code, 0, 'fio exits 0', r.code === 0 ? {} : diag);
  tt.notMatch(r.stderr, /verify:|bad magic|crc32c/i, 'no verify errors on stderr', { stderr: r.stderr });
  const jobs = parseFio(r) ?? [];
  tt.same(jobs.map((j) => j.jobname), names, 'JSON output has every job', jobs.length ? {} : diag);
  for (const j of jobs) tt.equal(j.error, 0, `job ${j.jobname}: error 0`);
  return jobs;
}

if (requireTool(t, 'fio')) {
  t.test('fio-randrw-verify: 4k and 512..64k jobs concurrently, iodepth 32, crc32c verified', async (tt) => {
    const srv = await startServer(tt, { args: ['--export', 'disk0=256M'] });
    const r = await fio([
      `--uri=${srv.uri('disk0')}`,
      '--rw=randrw',
      '--iodepth=32',
      '--size=64m',
      '--verify=crc32c',
      '--do_verify=1',
      '--name=bs4k', '--bs=4k', '--offset=0',
      '--name=bsrange', '--bsrange=512-64k', '--offset=64m',
    ]);
    const jobs = checkClean(tt, r, ['bs4k', 'bsrange'], srv);
    for (const j of jobs) {
      tt.ok(j.write.total_ios > 0 && j.write.io_bytes > 16 * MiB, `job ${j.jobname} wrote`, { write: j.write });
      // Reads include the verify pass over every written block.
      tt.ok(j.read.io_bytes >= j.write.io_bytes, `job ${j.jobname} read back at least what it wrote`, { read: j.read, write: j.write });
    }
  });

  t.test('fio-interleaved-sectors: four connections share every 4 KiB block, over trimmed stale data', async (tt) => {
    const srv = await startServer(tt, { args: ['--export', 'disk0=64M'] });
    const uri = `--uri=${srv.uri('disk0')}`;
    const region = ['--offset=16m', '--size=8m'];
    // Stale data, then deallocate it: the blocks below must be padded with zeros, never resurrected.
    checkClean(tt, await fio([uri, ...region, '--name=fill', '--rw=write', '--bs=1m']), ['fill'], srv);
    checkClean(tt, await fio([uri, ...region, '--name=trim', '--rw=trim', '--bs=1m']), ['trim'], srv);
    // Job i writes sector i of every 2 KiB (512 B, then skip 1536 B): four connections write disjoint
    // sectors of the same allocation blocks at the same time, each verifying its own sectors afterwards.
    const jobs: string[] = [];
    for (let i = 0; i < 4; i++) jobs.push(`--name=sector${i}`, `--offset=${16 * MiB + i * 512}`);
    const r = await fio([uri, '--size=8m', '--rw=write:1536', '--bs=512', '--iodepth=32', '--verify=crc32c', '--do_verify=1', ...jobs]);
    const done = checkClean(tt, r, ['sector0', 'sector1', 'sector2', 'sector3'], srv);
    // 512 B every 2 KiB across (at least) the 8 MiB trimmed region: at least 4096 sectors per job.
    for (const j of done) tt.ok(j.write.total_ios >= 4096 && j.read.total_ios === j.write.total_ios, `job ${j.jobname}: every sector written and verified`, { read: j.read, write: j.write });
  });

  t.test('fio-verify-restart: a seeded pattern verifies after restart; a corrupted block is caught', async (tt) => {
    const args = ['--export', 'disk0=64M'];
    let srv = await startServer(tt, { args });
    const job = (uri: string): string[] => [
      `--uri=${uri}`,
      '--name=pattern',
      '--rw=randwrite',
      '--bsrange=512-64k',
      '--iodepth=32',
      '--size=32m',
      '--offset=0',
      '--verify=crc32c',
      '--randrepeat=1',
      '--randseed=20240601',
    ];
    checkClean(tt, await fio([...job(srv.uri('disk0')), '--do_verify=0']), ['pattern'], srv);
    tt.same(await srv.stop(), { code: 0, signal: null }, 'SIGTERM → exit 0');

    srv = await startServer(tt, { dataDir: srv.dataDir, args });
    checkClean(tt, await fio([...job(srv.uri('disk0')), '--verify_only=1']), ['pattern'], srv);
    tt.same(await srv.stop(), { code: 0, signal: null }, 'SIGTERM → exit 0');

    // Corrupt 4 KiB in the middle of the pattern, behind the server's back (it is stopped).
    const fd = openSync(path.join(srv.dataDir, 'disk0.img'), 'r+');
    writeSync(fd, Buffer.alloc(4096, 0x5a), 0, 4096, 8 * MiB);
    closeSync(fd);
    srv = await startServer(tt, { dataDir: srv.dataDir, args });
    const bad = await fio([...job(srv.uri('disk0')), '--verify_only=1']);
    const jobs = parseFio(bad);
    tt.not(bad.code, 0, 'fio fails verification after corruption', { run: describe(bad) });
    tt.ok(jobs?.[0]?.error !== 0 || /verify:/.test(bad.stderr), 'and reports a verify error', { run: describe(bad) });
  });
}
