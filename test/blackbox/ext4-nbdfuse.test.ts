// Black box: a real filesystem on the export. nbdfuse exposes the export as a file, a loop device turns it
// into a block device, and the kernel's ext4 drives the server (mkfs discards, journal writes, flushes).
// Files with known random content are written and synced; fsck must find the filesystem clean. Then
// everything is torn down, the server restarted, the export attached afresh (no cache can hide a lost
// write), and fsck + sha256 of every file must still hold. Mount, loop and FUSE state is always cleaned
// up in t.teardown, even when an assertion fails.

import t from 'tap';
import type { Test } from 'tap';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmdirSync, statSync, writeFileSync } from 'node:fs';
import { spawn } from 'node:child_process';
import * as os from 'node:os';
import * as path from 'node:path';
import { requireThat, requireTool } from '../helpers/requires';
import { describe, run, type RunResult, sha256, sha256File } from '../helpers/run';
import { type ServerProcess, startServer } from '../helpers/spawn-server';

const MiB = 1024 * 1024;
const SIZE = 256 * MiB;

function isMounted(dir: string): boolean {
  const real = path.resolve(dir);
  return readFileSync('/proc/mounts', 'utf8')
    .split('\n')
    .some((line) => line.split(' ')[1] === real);
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Wait for p, at most ms (the timer never keeps the process alive). */
function within(p: Promise<unknown>, ms: number): Promise<unknown> {
  return Promise.race([p, new Promise((r) => setTimeout(r, ms).unref())]);
}

/** The export attached as /dev/loopN through nbdfuse; detach() undoes every step that was done. */
class AttachedExport {
  loop: string | null = null;
  private fuseExited = false;
  private fuseLog = '';

  private constructor(
    readonly fuseDir: string,
    readonly mountDir: string,
    private readonly fusePid: number,
    private readonly exitedP: Promise<void>,
  ) {}

  /** Start nbdfuse on uri, wait for its file, attach a loop device. Registers detach() as a teardown. */
  static async attach(tt: Test, base: string, uri: string, label: string): Promise<AttachedExport> {
    const fuseDir = path.join(base, `fuse-${label}`);
    const mountDir = path.join(base, `mnt-${label}`);
    mkdirSync(fuseDir);
    mkdirSync(mountDir);
    const child = spawn('nbdfuse', [path.join(fuseDir, 'disk'), uri], { stdio: ['ignore', 'pipe', 'pipe'] });
    if (child.pid === undefined) throw new Error('cannot spawn nbdfuse');
    let resolveExit!: () => void;
    const exitedP = new Promise<void>((r) => (resolveExit = r));
    const a = new AttachedExport(fuseDir, mountDir, child.pid, exitedP);
    child.stdout!.on('data', (d: Buffer) => (a.fuseLog += d.toString()));
    child.stderr!.on('data', (d: Buffer) => (a.fuseLog += d.toString()));
    child.on('exit', () => {
      a.fuseExited = true;
      resolveExit();
    });
    // Registered before anything else can fail (LIFO: runs before the server started earlier is killed).
    tt.teardown(() => a.detach());

    const file = path.join(fuseDir, 'disk');
    const deadline = Date.now() + 15_000;
    while (!(existsSync(file) && statSync(file).size === SIZE)) {
      if (a.fuseExited) throw new Error(`nbdfuse exited early:\n${a.fuseLog}`);
      if (Date.now() > deadline) throw new Error(`nbdfuse did not expose ${file} within 15 s:\n${a.fuseLog}`);
      await sleep(50);
    }
    const r = await run('losetup', ['-f', '--show', file], { timeoutMs: 20_000 });
    if (r.code !== 0) throw new Error(`losetup failed\n${describe(r)}`);
    a.loop = r.stdout.trim();
    return a;
  }

  /** Undo whatever is in place: umount, losetup -d, fusermount3 -u, then make sure nbdfuse is gone. */
  async detach(): Promise<string[]> {
    const problems: string[] = [];
    const step = async (cmd: string, args: string[]): Promise<void> => {
      const r = await run(cmd, args, { timeoutMs: 30_000 });
      if (r.code !== 0) problems.push(describe(r));
    };
    if (isMounted(this.mountDir)) await step('umount', [this.mountDir]);
    if (this.loop !== null) {
      await step('losetup', ['-d', this.loop]);
      this.loop = null;
    }
    if (isMounted(this.fuseDir)) await step('fusermount3', ['-u', this.fuseDir]);
    if (!this.fuseExited) {
      await within(this.exitedP, 10_000);
      if (!this.fuseExited) {
        try {
          process.kill(this.fusePid, 'SIGKILL');
        } catch {
          // gone
        }
        await within(this.exitedP, 5_000);
        // A killed FUSE daemon leaves a dead mount behind; a lazy unmount clears it.
        if (isMounted(this.fuseDir)) await step('fusermount3', ['-u', '-z', this.fuseDir]);
      }
    }
    for (const d of [this.mountDir, this.fuseDir]) {
      if (!isMounted(d) && existsSync(d)) {
        try {
          rmdirSync(d);
        } catch (err) {
          problems.push(`rmdir ${d}: ${(err as Error).message}`);
        }
      }
    }
    return problems;
  }
}

function checkOk(tt: Test, r: RunResult, what: string, srv: ServerProcess): void {
  tt.equal(r.code, 0, what, r.code === 0 ? {} : { run: describe(r), server: srv.logTail() });
}

/** Root, /dev/fuse and loop devices: without them this test cannot run at all. */
function missingPrivileges(): string | null {
  if (process.getuid?.() !== 0) return 'needs root (mount, losetup)';
  if (!existsSync('/dev/fuse')) return 'needs /dev/fuse';
  if (!existsSync('/dev/loop-control')) return 'needs loop devices (/dev/loop-control)';
  return null;
}

const tools = ['nbdfuse', 'fusermount3', 'losetup', 'mkfs.ext4', 'fsck.ext4', 'fstrim', 'mount', 'umount', 'sync'];
if (tools.every((tool) => requireTool(t, tool))) {
  const missing = missingPrivileges();
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
      let disk = await AttachedExport.attach(tt, base, srv.uri('disk0'), 'a');
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
      disk = await AttachedExport.attach(tt, base, srv.uri('disk0'), 'b');
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
