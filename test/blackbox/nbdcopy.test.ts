// Black box: libnbd's nbdcopy (multi-connection, many requests in flight, zero detection) moves 256 MiB of
// random data into dist/server.js and back out bit for bit; a second image with a zero run overwrites the
// first (the zero run must read back as zeros); the data survives a graceful stop + restart and a SIGKILL
// + restart (acknowledged writes live in the OS page cache, which outlives the process).

import t from 'tap';
import type { Test } from 'tap';
import { randomFillSync } from 'node:crypto';
import { closeSync, openSync, ftruncateSync, rmSync, writeSync } from 'node:fs';
import * as path from 'node:path';
import { requireTool } from '../helpers/requires';
import { describe, run, sha256File } from '../helpers/run';
import { type ServerProcess, freshDir, startServer } from '../helpers/spawn-server';

const MiB = 1024 * 1024;
const SIZE = 256 * MiB;
const PIECE = 8 * MiB;

/**
 * Write a SIZE-byte file of random data in 8 MiB pieces; pieces overlapping `hole` are left unwritten
 * (a sparse run of zeros, which nbdcopy turns into zero requests).
 */
function randomImage(file: string, hole?: { start: number; end: number }): void {
  const fd = openSync(file, 'w');
  try {
    ftruncateSync(fd, SIZE);
    const buf = Buffer.allocUnsafe(PIECE);
    for (let off = 0; off < SIZE; off += PIECE) {
      if (hole && off >= hole.start && off + PIECE <= hole.end) continue;
      randomFillSync(buf);
      writeSync(fd, buf, 0, PIECE, off);
    }
  } finally {
    closeSync(fd);
  }
}

async function nbdcopy(tt: Test, args: string[], srv: ServerProcess, what: string): Promise<void> {
  const r = await run('nbdcopy', args, { timeoutMs: 60_000 });
  tt.equal(r.code, 0, what, r.code === 0 ? {} : { run: describe(r), server: srv.logTail() });
}

/** Copy the whole export out to a new file and return its sha256 (the file is removed afterwards). */
async function exportSha(tt: Test, srv: ServerProcess, dir: string, label: string): Promise<string> {
  const out = path.join(dir, `${label}.out`);
  await nbdcopy(tt, [srv.uri('disk0'), out], srv, `nbdcopy export → ${label}.out`);
  const sha = await sha256File(out);
  rmSync(out, { force: true });
  return sha;
}

if (requireTool(t, 'nbdcopy')) {
  t.test('nbdcopy-roundtrip: 256 MiB in and out, overwrite with a zero run, graceful restart', async (tt) => {
    const dir = freshDir(tt, 'img');
    const imgB = path.join(dir, 'b.img');
    const imgA = path.join(dir, 'a.img');
    randomImage(imgB);
    randomImage(imgA, { start: 64 * MiB, end: 96 * MiB });
    const shaB = await sha256File(imgB);
    const shaA = await sha256File(imgA);
    tt.not(shaA, shaB, 'two different images');

    const data = freshDir(tt, 'data');
    const srv = await startServer(tt, { dataDir: data, args: ['--export', 'disk0=256M'] });
    await nbdcopy(tt, [imgB, srv.uri('disk0')], srv, 'nbdcopy b.img → export');
    tt.equal(await exportSha(tt, srv, dir, 'b'), shaB, 'export reads back b.img exactly');

    await nbdcopy(tt, [imgA, srv.uri('disk0')], srv, 'nbdcopy a.img (with a 32 MiB zero run) → export');
    tt.equal(await exportSha(tt, srv, dir, 'a'), shaA, 'export reads back a.img exactly (zero run overwrote data)');

    const exit = await srv.stop();
    tt.same(exit, { code: 0, signal: null }, 'SIGTERM → exit 0', { logs: srv.logTail() });

    const again = await startServer(tt, { dataDir: data, args: ['--export', 'disk0=256M'] });
    tt.equal(await exportSha(tt, again, dir, 'a-restart'), shaA, 'after a graceful restart the export still holds a.img');
  });

  t.test('nbdcopy-sigkill: acknowledged writes survive SIGKILL + restart', async (tt) => {
    const dir = freshDir(tt, 'img');
    const img = path.join(dir, 'c.img');
    randomImage(img, { start: 128 * MiB, end: 136 * MiB });
    const sha = await sha256File(img);

    const data = freshDir(tt, 'data');
    const srv = await startServer(tt, { dataDir: data, args: ['--export', 'disk0=256M'] });
    // Largest requests the server allows (block_size_maximum), no --flush: durability comes from the OS.
    await nbdcopy(tt, ['--request-size=33554432', img, srv.uri('disk0')], srv, 'nbdcopy with 32 MiB requests → export');
    await srv.kill();
    tt.ok(srv.exited, 'server killed');

    const again = await startServer(tt, { dataDir: data, args: ['--export', 'disk0=256M'] });
    tt.equal(await exportSha(tt, again, dir, 'c-after-kill'), sha, 'after SIGKILL + restart the export holds c.img');
  });
}
