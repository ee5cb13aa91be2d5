// Black box: QEMU's NBD client (qemu-io, qemu-img) against dist/server.js. The same script of writes —
// aligned and unaligned, FUA, vectored, concurrent aio, zero with and without unmap, fast zero, discard,
// flush, the unaligned tail of the export — goes to the export and to a local raw file. Every expected
// pattern is read back (-P) from both, and `qemu-img compare` must find them identical; a write to the
// export alone must make compare report the exact mismatching offset.

import t from 'tap';
import type { Test } from 'tap';
import { closeSync, ftruncateSync, openSync } from 'node:fs';
import * as path from 'node:path';
import { requireTool } from '../helpers/requires';
import { describe, run, type RunResult } from '../helpers/run';
import { type ServerProcess, freshDir, startServer } from '../helpers/spawn-server';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 64 * MiB;

/** Writes applied identically to the export and to the local file (one qemu-io session each). */
const WRITES = [
  `write -P 0x11 0 64k`,
  `write -P 0x22 4095 3`, // crosses a 4 KiB boundary inside allocated data
  `write -P 0x33 1000001 70001`, // unaligned offset and length into unallocated space
  `write -f -P 0x44 8M 1M`, // FUA
  `write -z ${8 * MiB + 4096} 8192`, // zeros that must stay allocated (NO_HOLE)
  `write -P 0x66 9M 1M`,
  `discard ${9 * MiB + 256 * KiB} 256k`, // aligned discard inside data
  `write -P 0x55 16M 2M`,
  `write -z -u 16M 1M`, // aligned zero with unmap
  `write -z -u ${17 * MiB + 100} 5000`, // unaligned zero with unmap: partial blocks at both ends
  `write -P 0x5a 24M 1M`,
  `write -z -u -n 24M 512k`, // fast zero (may unmap): the server advertises it and can do it fast
  `writev -P 0x77 40M 512 1000 3000`,
  `aio_write -P 0x78 41M 64k`,
  `aio_write -P 0x79 42M 64k`,
  `aio_write -f -P 0x7a 43M 64k`,
  `aio_flush`,
  `write -P 0x7b ${SIZE - 4095} 4095`, // the export's last bytes
  `flush`,
];

/** What the writes above must have left behind (checked on both the export and the local file). */
const READS = [
  `read -P 0x11 0 4095`,
  `read -P 0x22 4095 3`,
  `read -P 0x11 4098 ${64 * KiB - 4098}`,
  `read -P 0 ${64 * KiB} ${1000001 - 64 * KiB}`,
  `read -P 0x33 1000001 70001`,
  `read -P 0 1070002 10000`, // the zero padding of a freshly allocated block
  `read -P 0x44 8M 4096`,
  `read -P 0 ${8 * MiB + 4096} 8192`,
  `read -P 0x44 ${8 * MiB + 12288} ${MiB - 12288}`,
  `read -P 0x66 9M 256k`,
  `read -P 0 ${9 * MiB + 256 * KiB} 256k`,
  `read -P 0x66 ${9 * MiB + 512 * KiB} 512k`,
  `read -P 0 16M 1M`,
  `read -P 0x55 17M 100`,
  `read -P 0 ${17 * MiB + 100} 5000`,
  `read -P 0x55 ${17 * MiB + 5100} ${MiB - 5100}`,
  `read -P 0 24M 512k`,
  `read -P 0x5a ${24 * MiB + 512 * KiB} 512k`,
  `readv -P 0x77 40M 4512`,
  `read -P 0 ${40 * MiB + 4512} 4096`,
  `read -P 0x78 41M 64k`,
  `read -P 0x79 42M 64k`,
  `read -P 0x7a 43M 64k`,
  `read -P 0 ${SIZE - 8192} 4097`,
  `read -P 0x7b ${SIZE - 4095} 4095`,
];

function okRun(tt: Test, r: RunResult, what: string, srv?: ServerProcess): void {
  const failed = /Pattern verification failed|failed:|error/i.test(r.stdout + r.stderr);
  tt.ok(r.code === 0 && !failed, what, r.code === 0 && !failed ? {} : { run: describe(r), server: srv?.logTail() ?? '' });
}

async function qemuIo(target: string, cmds: string[]): Promise<RunResult> {
  const args = ['-f', 'raw'];
  for (const c of cmds) args.push('-c', c);
  args.push(target);
  return run('qemu-io', args, { timeoutMs: 60_000 });
}

async function compare(local: string, uri: string): Promise<RunResult> {
  return run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', local, uri], { timeoutMs: 60_000 });
}

if (requireTool(t, 'qemu-io') && requireTool(t, 'qemu-img')) {
  t.test('qemu-io-script: the same writes on the export and a local file read back and compare equal', async (tt) => {
    const srv = await startServer(tt, { args: ['--export', `disk0=${SIZE}`] });
    const uri = srv.uri('disk0');
    const local = path.join(freshDir(tt, 'local'), 'local.img');
    const fd = openSync(local, 'w');
    ftruncateSync(fd, SIZE);
    closeSync(fd);

    okRun(tt, await qemuIo(uri, WRITES), 'writes on the export', srv);
    okRun(tt, await qemuIo(local, WRITES), 'writes on the local file');
    // Each expectation separately, so a failure names the range.
    const onExport = await qemuIo(uri, READS);
    const onLocal = await qemuIo(local, READS);
    okRun(tt, onLocal, 'the expected patterns hold on a plain raw file (the script itself is right)');
    okRun(tt, onExport, 'every expected pattern reads back from the export', srv);
    tt.equal((onExport.stdout.match(/^read \d+\/\d+ bytes/gm) ?? []).length, READS.length, 'every read completed in full');

    let cmp = await compare(local, uri);
    tt.equal(cmp.code, 0, 'qemu-img compare: identical', cmp.code === 0 ? {} : { run: describe(cmp) });
    tt.match(cmp.stdout, /Images are identical/);

    // FAST_ZERO without permission to unmap: the spec lets the server refuse with ENOTSUP (then nothing
    // changes) or do it (then the range reads as zeros). Either way the data must match the answer.
    const prep = [`write -P 0x5b 30M 64k`];
    okRun(tt, await qemuIo(uri, prep), 'prepare fast-zero range (export)', srv);
    okRun(tt, await qemuIo(local, prep), 'prepare fast-zero range (local)');
    const fz = await qemuIo(uri, [`write -z -n 30M 4096`]);
    const refused = /Operation not supported/.test(fz.stdout + fz.stderr);
    const done = fz.code === 0 && /wrote 4096\/4096/.test(fz.stdout);
    tt.ok(refused !== done, `fast zero with NO_HOLE: ${done ? 'done' : 'refused with ENOTSUP'}`, { run: describe(fz) });
    if (done) okRun(tt, await qemuIo(local, [`write -z 30M 4096`]), 'mirror the zeroing on the local file');
    okRun(tt, await qemuIo(uri, [done ? `read -P 0 30M 4096` : `read -P 0x5b 30M 4096`, `read -P 0x5b ${30 * MiB + 4096} ${60 * KiB}`]), 'data matches the fast-zero answer', srv);

    // An unaligned discard: its range is unspecified afterwards, but nothing outside it may change.
    const base = 50 * MiB;
    okRun(tt, await qemuIo(uri, [`write -P 0x42 50M 64k`]), 'prepare discard range', srv);
    okRun(tt, await qemuIo(local, [`write -P 0x42 50M 64k`]), 'prepare discard range (local)');
    okRun(tt, await qemuIo(uri, [`discard ${base + 300} 10000`, `read -P 0x42 50M 300`, `read -P 0x42 ${base + 10300} ${64 * KiB - 10300}`]),
      'unaligned discard leaves the neighbouring bytes alone', srv);
    okRun(tt, await qemuIo(uri, [`write -P 0x43 ${base + 300} 10000`]), 'rewrite the discarded range', srv);
    okRun(tt, await qemuIo(local, [`write -P 0x43 ${base + 300} 10000`]), 'rewrite the discarded range (local)');

    cmp = await compare(local, uri);
    tt.equal(cmp.code, 0, 'still identical', cmp.code === 0 ? {} : { run: describe(cmp) });

    // One byte on the export alone: compare must notice, at that offset.
    okRun(tt, await qemuIo(uri, [`write -P 0x99 ${5 * MiB + 7} 1`]), 'one differing byte on the export', srv);
    cmp = await compare(local, uri);
    tt.equal(cmp.code, 1, 'qemu-img compare: different (exit 1)', { run: describe(cmp) });
    tt.match(cmp.stdout, new RegExp(`Content mismatch at offset ${5 * MiB}\\b`), 'at the sector holding that byte');
    okRun(tt, await qemuIo(local, [`write -P 0x99 ${5 * MiB + 7} 1`]), 'same byte on the local file');
    cmp = await compare(local, uri);
    tt.equal(cmp.code, 0, 'identical again', cmp.code === 0 ? {} : { run: describe(cmp) });

    // After a graceful restart the export still compares equal.
    tt.same(await srv.stop(), { code: 0, signal: null }, 'SIGTERM → exit 0');
    const again = await startServer(tt, { dataDir: srv.dataDir, args: ['--export', `disk0=${SIZE}`] });
    cmp = await compare(local, again.uri('disk0'));
    tt.equal(cmp.code, 0, 'identical after restart', cmp.code === 0 ? {} : { run: describe(cmp), server: again.logTail() });
  });
}

if (requireTool(t, 'qemu-io') && requireTool(t, 'qemu-img')) {
  t.test('qemu-io-high-offsets: writes across and beyond the 4 GiB boundary (64-bit offsets)', async (tt) => {
    const big = 6 * 1024 * MiB;
    const G4 = 4 * 1024 * MiB;
    const srv = await startServer(tt, { args: ['--export', `disk0=${big}`] });
    const uri = srv.uri('disk0');
    const local = path.join(freshDir(tt, 'local'), 'big.img');
    const fd = openSync(local, 'w');
    ftruncateSync(fd, big);
    closeSync(fd);
    const writes = [
      `write -P 0x61 ${G4 - 512} 1024`, // straddles 2^32
      `write -P 0x62 ${G4 + MiB * 1024 + 123} 70000`,
      `write -z -u ${G4} 4096`,
      `write -P 0x63 ${big - 4096} 4096`,
      `write -P 0x64 ${G4 + 1024 * MiB + 4096} 8192`,
    ];
    okRun(tt, await qemuIo(uri, writes), 'writes above 4 GiB on the export', srv);
    okRun(tt, await qemuIo(local, writes), 'the same on the local file');
    const reads = [
      `read -P 0x61 ${G4 - 512} 512`,
      `read -P 0 ${G4} 4096`,
      `read -P 0x62 ${G4 + 1024 * MiB + 123} ${4096 - 123}`,
      `read -P 0x64 ${G4 + 1024 * MiB + 4096} 8192`,
      `read -P 0x62 ${G4 + 1024 * MiB + 12288} ${70000 - 12288 + 123}`,
      `read -P 0x63 ${big - 4096} 4096`,
      `read -P 0 0 1M`,
    ];
    okRun(tt, await qemuIo(local, reads), 'expected patterns on the local file');
    okRun(tt, await qemuIo(uri, reads), 'expected patterns on the export', srv);
    const cmp = await compare(local, uri);
    tt.equal(cmp.code, 0, 'qemu-img compare: identical', cmp.code === 0 ? {} : { run: describe(cmp), server: srv.logTail() });
  });
}
