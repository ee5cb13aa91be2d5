// Assertions on a CLI run shared by the CLI tests: the exit code (with the whole run on failure), and the
// "one line on stderr, nothing on stdout" rule every failure of the CLI follows.

import type { Test } from 'tap';
import { describe, type RunResult } from './run';

export function exitCode(tt: Test, r: RunResult, code: number, what: string): void {
  tt.equal(r.code, code, `${what}: exit ${code}`, r.code === code ? {} : { run: describe(r) });
}

/** Failures print exactly one non-empty line on stderr, nothing on stdout. */
export function oneLine(tt: Test, r: RunResult, re: RegExp): void {
  const lines = r.stderr.split('\n').filter((l) => l !== '');
  tt.equal(lines.length, 1, 'one line on stderr', { stderr: r.stderr });
  tt.match(lines[0], re);
  tt.equal(r.stdout, '', 'nothing on stdout');
}
