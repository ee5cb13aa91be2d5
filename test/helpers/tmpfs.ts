// A scratch directory on tmpfs, for tests of the paths a server takes only when its files live in memory
// (synchronous reads from the backing file). The fixture directories are on the test machine's disk.

import { mkdtempSync, rmSync, statfsSync } from 'node:fs';
import * as path from 'node:path';

const TMPFS_MAGIC = 0x01021994;

interface TeardownLike {
  teardown(fn: () => void | Promise<void>): void;
}

/** A fresh directory under /dev/shm, removed at teardown; null when /dev/shm is not a tmpfs. */
export function tmpfsDir(t: TeardownLike, prefix: string): string | null {
  try {
    if (statfsSync('/dev/shm').type !== TMPFS_MAGIC) return null;
  } catch {
    return null;
  }
  const dir = mkdtempSync(path.join('/dev/shm', `nbdmirror-test-${prefix}-`));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}
