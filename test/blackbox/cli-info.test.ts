// Black box: the built CLI, `node dist/client.js info …`, against a real nbdkit. Checks the JSON and text
// output and the exit-code contract (0 ok, 1 failed with one line on stderr, 2 bad usage).
// Builds nothing: run `npx tsc -p .` first (`npm test` does).

import { existsSync } from 'node:fs';
import * as path from 'node:path';
import t from 'tap';
import { requireTool } from '../helpers/requires';
import { exitCode, oneLine } from '../helpers/cli-output';
import { run, type RunResult } from '../helpers/run';
import { freePort, startNbdkit } from '../helpers/nbdkit';

const CLIENT_JS = path.resolve(__dirname, '..', '..', 'dist', 'client.js');
const MiB = 1024 * 1024;

function cli(...args: string[]): Promise<RunResult> {
  return run(process.execPath, [CLIENT_JS, ...args], { timeoutMs: 20_000 });
}

if (!existsSync(CLIENT_JS)) {
  t.fail(`${CLIENT_JS} is missing: build first with npx tsc -p .`);
} else if (requireTool(t, 'nbdkit')) {
  t.test('info --json against nbdkit memory', async (tt) => {
    const srv = await startNbdkit(tt, ['memory', '64M']);
    const r = await cli('info', srv.uri(), '--json');
    exitCode(tt, r, 0, 'info --json');
    const j = JSON.parse(r.stdout) as Record<string, unknown>;
    tt.match(j, {
      uri: srv.uri(),
      exportName: '',
      description: null,
      size: 64 * MiB,
      flags: { readOnly: false, canFlush: true, canFua: true, canTrim: true, canZero: true, canFastZero: true, canDf: true, canCache: true, canMultiConn: true, raw: Number },
      blockSizes: null,
      metaContexts: ['base:allocation'],
    });
    tt.notOk('exports' in j, 'no export list unless --list');
    tt.equal(r.stderr, '');
  });

  t.test('info (text) over a Unix socket, with --list and block sizes', async (tt) => {
    const srv = await startNbdkit(
      tt,
      ['memory', '8M', 'exportname=disk0', 'exportname=disk1', 'exportname-list=explicit', 'exportdesc=fixed:test disk', 'exportname-strict=true', 'blocksize-minimum=512', 'blocksize-preferred=4096', 'blocksize-maximum=1M'],
      { transport: 'unix', filters: ['exportname', 'blocksize-policy'] },
    );
    const r = await cli('info', srv.uri('disk1'), '--list');
    exitCode(tt, r, 0, 'info --list');
    tt.match(r.stdout, /^export: +"disk1"$/m);
    tt.match(r.stdout, /^description: +test disk$/m);
    tt.match(r.stdout, /^size: +8388608 bytes \(8 MiB\)$/m);
    tt.match(r.stdout, /^read-only: +no$/m);
    tt.match(r.stdout, /^flags: +flush fua trim zero fast-zero df cache multi-conn \(0x[0-9a-f]{4}\)$/m);
    tt.match(r.stdout, /^block sizes: +minimum 512, preferred 4096, maximum 1048576$/m);
    tt.match(r.stdout, /^meta contexts: +base:allocation$/m);
    tt.match(r.stdout, /^exports: +2\n {2}"disk0" {2}test disk\n {2}"disk1" {2}test disk$/m);

    const j = await cli('info', srv.uri('disk0'), '--list', '--json');
    exitCode(tt, j, 0, 'info --list --json');
    tt.same((JSON.parse(j.stdout) as { exports: unknown }).exports, [
      { name: 'disk0', description: 'test disk' },
      { name: 'disk1', description: 'test disk' },
    ]);

    const unknown = await cli('info', srv.uri('nope'));
    exitCode(tt, unknown, 1, 'unknown export');
    oneLine(tt, unknown, /^nbdmirror: server has no export "nope" \(NBD_REP_ERR_UNKNOWN/);
  });
}

t.test('usage errors exit 2', async (tt) => {
  for (const [args, re] of [
    [['info', 'http://127.0.0.1/'], /^nbdmirror: invalid NBD URI "http:\/\/127\.0\.0\.1\/"/],
    [['info', 'nbd://127.0.0.1:99999/'], /port 99999 out of range|bad port/],
    [['info', 'nbd+unix:///x'], /socket=PATH/],
  ] as const) {
    const r = await cli(...args);
    exitCode(tt, r, 2, args.join(' '));
    oneLine(tt, r, re);
  }
  for (const args of [['info', 'nbd://127.0.0.1/', '--bogus'], ['info'], ['frobnicate'], ['info', 'nbd://h/', '--timeout', 'soon'], []]) {
    const r = await cli(...args);
    exitCode(tt, r, 2, `nbdmirror ${args.join(' ')}`);
    tt.not(r.stderr, '', 'says why on stderr');
  }
});

t.test('--help exits 0 and lists the info command', async (tt) => {
  const top = await cli('--help');
  exitCode(tt, top, 0, '--help');
  tt.match(top.stdout, /info \[options\] <uri>/);
  tt.match(top.stdout, /Exit codes: 0 ok, 1 failed, 2 bad usage/);
  const sub = await cli('info', '--help');
  exitCode(tt, sub, 0, 'info --help');
  tt.match(sub.stdout, /--json/);
  tt.match(sub.stdout, /--list/);
});

t.test('connection refused exits 1 with one line on stderr', async (tt) => {
  const port = await freePort(); // free a moment ago, so nothing is listening there
  const r = await cli('info', `nbd://127.0.0.1:${port}/`, '--json');
  exitCode(tt, r, 1, 'connection refused');
  oneLine(tt, r, new RegExp(`^nbdmirror: cannot connect to 127\\.0\\.0\\.1:${port}: .*ECONNREFUSED`));
});
