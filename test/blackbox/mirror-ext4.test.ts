// Black box: failover of a real filesystem. Two nbdmirror processes on loopback mirror disk0; the kernel's ext4
// runs on the primary's export (nbdfuse + loop). Files are written and synced (each sync reaches the server as
// NBD FLUSH, which completes only when both nodes have the data), more files are being written unsynced, and
// the primary is SIGKILLed with the filesystem still mounted. The secondary is promoted, the export attached
// there afresh and mounted (the kernel replays ext4's journal, as after any crash), every file synced before the
// kill must read back intact, and after umount `fsck.ext4 -fn` must find the filesystem clean.

import t from 'tap';
import type { Test } from 'tap';
import { randomBytes } from 'node:crypto';
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmdirSync, writeFileSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { AttachedExport, isMounted, missingMountPrivileges } from '../helpers/nbdfuse';
import { requireThat, requireTool } from '../helpers/requires';
import { describe, run, type RunResult, sha256, sha256File } from '../helpers/run';
import { makePair, type Node, waitInSync, waitRep } from '../helpers/two-nodes';

const MiB = 1024 * 1024;
const SIZE = 128 * MiB;

function checkOk(tt: Test, r: RunResult, what: string, node: Node): void {
  tt.equal(r.code, 0, what, r.code === 0 ? {} : { run: describe(r), server: node.proc?.logTail() ?? '(not running)' });
}

/**
 * Keep writing unsynced files into dir (a bounded shell loop, so a page cache that stops accepting writes
 * cannot make it run forever) until stopped; stop() kills its process group and waits (at most 10 s) until no
 * member is left.
 */
function backgroundWriter(dir: string): { stop(): Promise<void> } {
  const script = 'i=0; while [ "$i" -lt 400 ]; do head -c 200000 /dev/urandom > "$0/unsynced-$i" || exit 0; i=$((i+1)); done';
  // Its own process group, so stop() ends the shell and the `head` it is running together.
  const child = spawn('sh', ['-c', script, dir], { stdio: 'ignore', detached: true });
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  return {
    async stop() {
      const pgid = child.pid;
      if (pgid === undefined) return;
      const groupAlive = (): boolean => {
        try {
          process.kill(-pgid, 0);
          return true;
        } catch {
          return false;
        }
      };
      if (groupAlive()) process.kill(-pgid, 'SIGKILL');
      // The shell exits first; its `head` may still be leaving the kernel with a file open on the mount.
      const deadline = Date.now() + 10_000;
      while (groupAlive() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
      await Promise.race([exited, new Promise((r) => setTimeout(r, 1_000).unref())]);
    },
  };
}

const tools = ['nbdfuse', 'fusermount3', 'losetup', 'mkfs.ext4', 'fsck.ext4', 'mount', 'umount', 'sync'];
if (tools.every((tool) => requireTool(t, tool))) {
  const missing = missingMountPrivileges();
  if (requireThat(t, missing === null, `mirror-ext4: ${missing ?? ''}`)) {
    t.test('ext4 on the primary, primary SIGKILLed mid-write, secondary promoted: fsck clean, synced files intact', async (tt) => {
      const base = mkdtempSync(path.join(os.tmpdir(), 'nbdmirror-mirror-ext4-'));
      tt.teardown(() => {
        try {
          rmdirSync(base);
        } catch {
          // left behind only if something is still mounted: detach() reported it
        }
      });
      const { a, b } = await makePair(tt, { exports: [`disk0=${SIZE}`], args: ['--peer-timeout', '1s'] });
      await b.start(['--role', 'secondary']);
      await a.start(['--role', 'primary']);
      await waitInSync(a, b);

      // On the primary: a filesystem, files, sync.
      const onA = await AttachedExport.attach(tt, base, a.uri(), 'a', SIZE);
      checkOk(tt, await run('mkfs.ext4', ['-F', '-q', '-E', 'lazy_itable_init=0,lazy_journal_init=0', onA.loop!], { timeoutMs: 60_000 }), 'mkfs.ext4 on the primary', a);
      checkOk(tt, await run('mount', ['-t', 'ext4', onA.loop!, onA.mountDir], { timeoutMs: 30_000 }), 'mount on the primary', a);
      const files = new Map<string, string>();
      [17, 4096, 65537, MiB, 3 * MiB + 123, 8 * MiB].forEach((n, i) => {
        const data = randomBytes(n);
        writeFileSync(path.join(onA.mountDir, `file-${i}.bin`), data);
        files.set(`file-${i}.bin`, sha256(data));
      });
      mkdirSync(path.join(onA.mountDir, 'many'));
      for (let i = 0; i < 40; i++) {
        const data = randomBytes(1000 + i * 97);
        writeFileSync(path.join(onA.mountDir, 'many', `small-${i}`), data);
        files.set(path.join('many', `small-${i}`), sha256(data));
      }
      checkOk(tt, await run('sync', ['-f', onA.mountDir], { timeoutMs: 60_000 }), 'sync (FLUSH through loop → FUSE → NBD, mirrored)', a);
      const ra = await a.rep();
      tt.equal(ra.link?.state, 'connected', 'the files were written while the link was up (mirrored, not degraded)');
      tt.equal(ra.outOfSync.blocks, 0, 'nothing out of sync before the kill');

      // More files, never synced, still being written when the primary dies with the filesystem mounted.
      mkdirSync(path.join(onA.mountDir, 'late'));
      const writer = backgroundWriter(path.join(onA.mountDir, 'late'));
      await new Promise((r) => setTimeout(r, 700));
      await a.kill();
      await writer.stop();
      // The dead primary's mount: umount gets I/O errors from the dead export, but everything must come down.
      const problems = await onA.detach();
      tt.notOk(isMounted(onA.mountDir) || isMounted(onA.fuseDir), "the dead primary's mount and FUSE file are gone", { problems });

      // Failover: the secondary is promoted once the primary's session has lapsed.
      await waitRep(b, (r) => r.session === null);
      const promoted = await b.post('/v1/exports/disk0/promote');
      tt.equal(promoted.status, 200, `promote the secondary: ${JSON.stringify(promoted.body)}`);
      tt.equal(promoted.body.role, 'primary');

      const onB = await AttachedExport.attach(tt, base, b.uri(), 'b', SIZE);
      // Mounting replays the journal, as on any host that takes over a crashed filesystem.
      checkOk(tt, await run('mount', ['-t', 'ext4', onB.loop!, onB.mountDir], { timeoutMs: 30_000 }), 'mount on the promoted secondary (journal replay)', b);
      let intact = 0;
      for (const [name, sum] of files) {
        const got = await sha256File(path.join(onB.mountDir, name)).catch((err: Error) => `error: ${err.message}`);
        if (got === sum) intact++;
        else tt.fail(`${name}: sha256 on the promoted secondary`, { expected: sum, got });
      }
      tt.equal(intact, files.size, `all ${files.size} files synced before the kill are intact on the secondary`);
      checkOk(tt, await run('umount', [onB.mountDir], { timeoutMs: 30_000 }), 'umount on the secondary', b);
      checkOk(tt, await run('fsck.ext4', ['-fn', onB.loop!], { timeoutMs: 60_000 }), 'fsck.ext4 -fn on the secondary: clean', b);
      tt.same(await onB.detach(), [], 'detached cleanly from the secondary');
    });
  }
}
