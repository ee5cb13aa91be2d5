// A real block device on top of an NBD export, for ext4 tests: nbdfuse exposes the export as a file and a loop
// device turns that file into /dev/loopN. detach() undoes every step that was done (umount, losetup -d,
// fusermount3 -u, nbdfuse gone), also after the NBD server died underneath; attach() registers it as a
// teardown so a failing test never leaves a mount, loop device or FUSE daemon behind.

import type { Test } from 'tap';
import { existsSync, mkdirSync, readFileSync, rmdirSync, statSync } from 'node:fs';
import { spawn } from 'node:child_process';
import * as path from 'node:path';
import { describe, run } from './run';

export function isMounted(dir: string): boolean {
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
export class AttachedExport {
  loop: string | null = null;
  private fuseExited = false;
  private fuseLog = '';

  private constructor(
    readonly fuseDir: string,
    readonly mountDir: string,
    private readonly fusePid: number,
    private readonly exitedP: Promise<void>,
  ) {}

  /** Start nbdfuse on uri, wait for its file (of the export's size), attach a loop device. Registers detach() as a teardown. */
  static async attach(tt: Test, base: string, uri: string, label: string, size: number): Promise<AttachedExport> {
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
    while (!(existsSync(file) && statSync(file).size === size)) {
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

/** Root, /dev/fuse and loop devices: without them no ext4-over-NBD test can run; null when all are there. */
export function missingMountPrivileges(): string | null {
  if (process.getuid?.() !== 0) return 'needs root (mount, losetup)';
  if (!existsSync('/dev/fuse')) return 'needs /dev/fuse';
  if (!existsSync('/dev/loop-control')) return 'needs loop devices (/dev/loop-control)';
  return null;
}
