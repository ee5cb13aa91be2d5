// Black box: a real filesystem on the export. nbdfuse exposes the export as a file, a loop device turns it
// into a block device, and the kernel's ext4 drives the server (mkfs discards, journal writes, flushes).
// Files with known random content are written and synced; fsck must find the filesystem clean. Then
// everything is torn down, the server restarted, the export attached afresh (no cache can hide a lost
// write), and fsck + sha256 of every file must still hold. Mount, loop and FUSE state is always cleaned
// up in t.teardown, even when an assertion fails.

import t from 'tap';
import type { Test } from 'tap';
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmdirSync, writeFileSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { requireThat, requireTool } from '../helpers/requires';
import { AttachedExport, missingMountPrivileges } from '../helpers/nbdfuse';
import { describe, run, type RunResult, sha256, sha256File } from '../helpers/run';
import { type ServerProcess, startServer } from '../helpers/spawn-server';

const MiB = 1024 * 1024;
const SIZE = 256 * MiB;

function checkOk(tt: Test, r: RunResult, what: string, srv: ServerProcess): void {
  tt.equal(r.code, 0, what, r.code === 0 ? {} : { run: describe(r), server: srv.logTail() });
}

const tools = ['nbdfuse', 'fusermount3', 'losetup', 'mkfs.ext4', 'fsck.ext4', 'fstrim', 'mount', 'umount', 'sync'];
if (tools.every((tool) => requireTool(t, tool))) {
  const missing = missingMountPrivileges();
  if (requireThat(t, missing === null, `ext4-nbdfuse: ${missing ?? ''}`)) {
    t.test('ext4-nbdfuse: mkfs, files, fsck clean, restart, fsck + contents intact', async (tt) => {
      // Mount points live outside the tap fixture dir, so its recursive cleanup can never walk into a mount.
      const base = mkdtempSync(path.join(os.tmpdir(), 'nbdmirror-ext4-'));
      tt.teardown(() => {
        try {
          rmdirSync(base);
        } catch {
          // left behind only if something is still mounted: detach() reported it
        }
      });
      const args = ['--export', `disk0=${SIZE}`];
      let srv = await startServer(tt, { args });

      // Round 1: make a filesystem, write files, fsck.
      let disk = await AttachedExport.attach(tt, base, srv.uri('disk0'), 'a', SIZE);
      const dev = disk.loop!;
      checkOk(tt, await run('mkfs.ext4', ['-F', '-q', '-E', 'lazy_itable_init=0,lazy_journal_init=0', dev], { timeoutMs: 60_000 }), 'mkfs.ext4', srv);
      checkOk(tt, await run('mount', ['-t', 'ext4', dev, disk.mountDir], { timeoutMs: 30_000 }), 'mount', srv);

      const files = new Map<string, string>();
      const sizes = [17, 4096, 65537, MiB, 3 * MiB + 123, 8 * MiB];
      sizes.forEach((n, i) => {
        const data = randomBytes(n);
        const name = `file-${i}.bin`;
        writeFileSync(path.join(disk.mountDir, name), data);
        files.set(name, sha256(data));
      });
      mkdirSync(path.join(disk.mountDir, 'many'));
      for (let i = 0; i < 40; i++) {
        const data = randomBytes(1000 + i * 97);
        const name = path.join('many', `small-${i}`);
        writeFileSync(path.join(disk.mountDir, name), data);
        files.set(name, sha256(data));
      }
      checkOk(tt, await run('sync', [], { timeoutMs: 60_000 }), 'sync', srv);
      for (const [name, sum] of files) {
        if (sum !== (await sha256File(path.join(disk.mountDir, name)))) tt.fail(`${name} reads back wrong before umount`);
      }
      checkOk(tt, await run('umount', [disk.mountDir], { timeoutMs: 30_000 }), 'umount', srv);
      const fsck1 = await run('fsck.ext4', ['-fn', dev], { timeoutMs: 60_000 });
      checkOk(tt, fsck1, 'fsck.ext4 -fn: clean', srv);
      tt.same(await disk.detach(), [], 'detached cleanly (umount, losetup -d, fusermount3 -u, nbdfuse exited)');

      // Round 2: restart the server and attach afresh, so every byte comes from the server again.
      tt.same(await srv.stop(), { code: 0, signal: null }, 'server SIGTERM → exit 0');
      srv = await startServer(tt, { dataDir: srv.dataDir, args });
      disk = await AttachedExport.attach(tt, base, srv.uri('disk0'), 'b', SIZE);
      const dev2 = disk.loop!;
      checkOk(tt, await run('fsck.ext4', ['-fn', dev2], { timeoutMs: 60_000 }), 'fsck.ext4 -fn after restart: clean', srv);
      checkOk(tt, await run('mount', ['-t', 'ext4', dev2, disk.mountDir], { timeoutMs: 30_000 }), 'remount', srv);
      let intact = 0;
      for (const [name, sum] of files) {
        const got = await sha256File(path.join(disk.mountDir, name)).catch((err: Error) => `error: ${err.message}`);
        if (got === sum) intact++;
        else tt.fail(`${name}: sha256 after restart`, { expected: sum, got });
      }
      tt.equal(intact, files.size, `all ${files.size} files intact after restart`);

      // Change the filesystem once more (deletes → discards, new data) and fsck again.
      checkOk(tt, await run('rm', ['-rf', path.join(disk.mountDir, 'many')], { timeoutMs: 30_000 }), 'delete a directory', srv);
      writeFileSync(path.join(disk.mountDir, 'late.bin'), randomBytes(2 * MiB));
      checkOk(tt, await run('fstrim', [disk.mountDir], { timeoutMs: 60_000 }), 'fstrim (discards through loop → FUSE → NBD TRIM)', srv);
      checkOk(tt, await run('umount', [disk.mountDir], { timeoutMs: 30_000 }), 'umount', srv);
      checkOk(tt, await run('fsck.ext4', ['-fn', dev2], { timeoutMs: 60_000 }), 'fsck.ext4 -fn after delete + trim: clean', srv);
      tt.same(await disk.detach(), [], 'detached cleanly');
    });
  }
}
