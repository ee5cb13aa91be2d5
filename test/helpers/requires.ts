// Tests that need an external tool call requireTool() first (nbdkit's `requires` in tests/functions.sh).
// A missing tool is a skip with the reason on a developer machine, but a FAILURE under CI=true: a green CI run
// must never hide a test that did not run.

import { accessSync, constants, statSync } from 'node:fs';
import * as path from 'node:path';
import type { Test } from 'tap';

/** The parts of a tap Test (or the root `t`) this helper uses. */
export type RequireTap = Pick<Test, 'fail' | 'skip'>;

/** True when CI=true (or CI=1) is set in the environment. */
export function isCI(): boolean {
  const v = process.env['CI'];
  return v !== undefined && /^(true|1|yes)$/i.test(v);
}

const found = new Map<string, string | null>();

/** Absolute path of an executable on PATH (or the path itself if it contains a slash), else null. */
export function whichTool(command: string): string | null {
  const cached = found.get(command);
  if (cached !== undefined) return cached;
  const candidates = command.includes('/')
    ? [command]
    : (process.env['PATH'] ?? '').split(path.delimiter).filter((d) => d !== '').map((d) => path.join(d, command));
  let hit: string | null = null;
  for (const c of candidates) {
    try {
      accessSync(c, constants.X_OK);
      if (statSync(c).isFile()) {
        hit = c;
        break;
      }
    } catch {
      // not here
    }
  }
  found.set(command, hit);
  return hit;
}

/**
 * True when `command` is on PATH. Otherwise records why on t — t.fail under CI=true, t.skip elsewhere — and
 * returns false, so callers wrap the tests that need the tool in `if (requireTool(t, 'nbdkit')) { … }`.
 */
export function requireTool(t: RequireTap, command: string): boolean {
  return requireThat(t, whichTool(command) !== null, `${command} not found on PATH`);
}

/**
 * Any other precondition (root, /dev/fuse, Python bindings): true when ok; otherwise t.fail under CI=true and
 * t.skip with the reason elsewhere, so a missing prerequisite can never make a green CI run.
 */
export function requireThat(t: RequireTap, ok: boolean, reason: string): boolean {
  if (ok) return true;
  if (isCI()) t.fail(`${reason} (required when CI=true)`); else void t.skip(`${reason}: skipping (not CI)`, () => undefined);
  return false;
}
