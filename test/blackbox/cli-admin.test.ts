// Black box: the built operator CLI (`node dist/client.js status | promote | demote | resync`) against real
// nbdmirror servers (dist/server.js) on 127.0.0.1: text and --json output, role changes, the exit-code
// contract (0 ok, 1 failed with one line on stderr, 2 bad usage), `status --watch` off a TTY ending on
// SIGINT, and one two-node resync followed with `nbdmirror resync`.
// Builds nothing: run `npm run build` first (`npm test` does).

import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import t from 'tap';
import { NbdClient } from '../../lib/client/nbd-client';
import { exitCode, oneLine } from '../helpers/cli-output';
import { run, type RunResult } from '../helpers/run';
import { SERVER_JS, startServer, type ServerProcess } from '../helpers/spawn-server';
import { hashExport, makePair } from '../helpers/two-nodes';

const CLIENT_JS = path.resolve(__dirname, '..', '..', 'dist', 'client.js');
const MiB = 1024 * 1024;

function cli(args: readonly string[], opts: { env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): Promise<RunResult> {
  const env = { ...process.env, ...opts.env };
  if (opts.env?.NBDMIRROR_HTTP === undefined) delete env.NBDMIRROR_HTTP;
  return run(process.execPath, [CLIENT_JS, ...args], { timeoutMs: opts.timeoutMs ?? 20_000, env });
}

function http(srv: ServerProcess): string {
  return `http://127.0.0.1:${srv.httpPort}`;
}

/** A loopback port nobody listens on (bound, then released). */
async function deadPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

interface Json {
  replication: { nodeId: string; peer: string | null; exports: Array<{ name: string; role: string; disk: string; epoch: number }> };
}

if (!existsSync(CLIENT_JS) || !existsSync(SERVER_JS)) {
  t.fail(`${CLIENT_JS} or ${SERVER_JS} is missing: build first with npm run build`);
} else {
  t.test('status, demote, promote on a single primary', async (tt) => {
    const srv = await startServer(tt, { args: ['--export', 'disk0=16M', '--export', 'disk1=8M', '--node-id', 'node-x'] });

    const text = await cli(['status', '--http', http(srv)]);
    exitCode(tt, text, 0, 'status');
    tt.match(text.stdout, /^node: +node-x$/m);
    tt.match(text.stdout, /^export disk0\n {2}role: +primary \(epoch \d+\)\n {2}disk: +UpToDate$/m);
    tt.match(text.stdout, /^export disk1$/m);
    tt.match(text.stdout, /^ {2}out of sync: +0 bytes$/m);
    tt.notMatch(text.stdout, /SPLIT BRAIN/);
    tt.equal(text.stderr, '');

    const json = await cli(['status', '--json', '--http', `127.0.0.1:${srv.httpPort}`]);
    exitCode(tt, json, 0, 'status --json');
    const j = JSON.parse(json.stdout) as Json;
    tt.equal(j.replication.nodeId, 'node-x');
    tt.match(j.replication.exports, [
      { name: 'disk0', role: 'primary', disk: 'UpToDate' },
      { name: 'disk1', role: 'primary', disk: 'UpToDate' },
    ]);
    const epoch0 = j.replication.exports[0]!.epoch;

    const demote = await cli(['demote', 'disk0', '--http', http(srv)]);
    exitCode(tt, demote, 0, 'demote disk0');
    tt.match(demote.stdout, /^disk0: secondary$/m);
    const after = await cli(['status'], { env: { NBDMIRROR_HTTP: http(srv) } });
    exitCode(tt, after, 0, 'status (NBDMIRROR_HTTP)');
    tt.match(after.stdout, /^export disk0\n {2}role: +secondary \(epoch \d+\)\n {2}disk: +UpToDate$/m, 'disk0 is secondary');
    tt.match(after.stdout, /^ {2}primary: +none attached$/m);
    tt.match(after.stdout, /^export disk1\n {2}role: +primary/m, 'disk1 is untouched');

    const promote = await cli(['promote', 'disk0', '--json', '--http', http(srv)]);
    exitCode(tt, promote, 0, 'promote disk0 --json');
    const p = JSON.parse(promote.stdout) as { name: string; role: string; epoch: number };
    tt.match(p, { name: 'disk0', role: 'primary' });
    tt.ok(p.epoch > epoch0, 'promotion starts a new epoch');
    const back = await cli(['status', '--json', '--http', http(srv)]);
    tt.equal((JSON.parse(back.stdout) as Json).replication.exports[0]!.role, 'primary', 'disk0 is primary again');

    const again = await cli(['promote', 'disk0', '--http', http(srv)]);
    exitCode(tt, again, 0, 'promote of a primary is a no-op');
    tt.match(again.stdout, new RegExp(`^disk0: primary \\(epoch ${p.epoch}\\)$`, 'm'));
  });

  t.test('failures exit 1 with one line', async (tt) => {
    const srv = await startServer(tt, { args: ['--export', 'disk0=8M'] });
    const unknown = await cli(['promote', 'nope', '--http', http(srv)]);
    exitCode(tt, unknown, 1, 'promote of an unknown export');
    oneLine(tt, unknown, new RegExp(`^nbdmirror: the server at ${http(srv)} has no export "nope" \\(exports: disk0\\)$`));

    const demote = await cli(['demote', 'nope', '--http', http(srv)]);
    exitCode(tt, demote, 1, 'demote of an unknown export');

    const resync = await cli(['resync', 'disk0', '--http', http(srv)]);
    exitCode(tt, resync, 1, 'resync on a node without --peer');
    oneLine(tt, resync, /^nbdmirror: export disk0 is primary on a node without --peer: there is no peer to resync with$/);

    const port = await deadPort();
    const dead = await cli(['status', '--http', `127.0.0.1:${port}`]);
    exitCode(tt, dead, 1, 'status against a port nobody listens on');
    oneLine(
      tt,
      dead,
      new RegExp(`^nbdmirror: cannot reach the nbdmirror server at http://127\\.0\\.0\\.1:${port} \\(connect ECONNREFUSED 127\\.0\\.0\\.1:${port}\\): is it running`),
    );
    const deadWatch = await cli(['status', '--watch', '--http', `127.0.0.1:${port}`]);
    exitCode(tt, deadWatch, 1, 'status --watch whose first request fails');
    const deadPromote = await cli(['promote', 'disk0', '--http', `127.0.0.1:${port}`]);
    exitCode(tt, deadPromote, 1, 'promote against a port nobody listens on');
    oneLine(tt, deadPromote, /^nbdmirror: cannot reach the nbdmirror server/);
  });

  t.test('bad usage exits 2', async (tt) => {
    const cases: Array<[string[], RegExp]> = [
      [['promote'], /missing required argument 'export'/],
      [['demote'], /missing required argument 'export'/],
      [['resync'], /missing required argument 'export'/],
      [['status', '--interval', '5'], /--interval <ms>.*expected at least 100 milliseconds/],
      [['status', '--interval', 'soon'], /--interval <ms>.*whole number/],
      [['resync', 'disk0', '--timeout', '-1'], /--timeout <ms>.*whole number/],
      [['status', '--http', 'ftp://x'], /^nbdmirror: --http: expected an http:\/\/ URL, got "ftp:\/\/x"$/m],
      [['status', '--frobnicate'], /unknown option '--frobnicate'/],
      [['promote', 'disk0', 'disk1'], /too many arguments/],
      [['statu'], /unknown command 'statu'/],
    ];
    for (const [args, re] of cases) {
      const r = await cli(args);
      exitCode(tt, r, 2, args.join(' '));
      tt.match(r.stderr, re, `${args.join(' ')}: message`);
      tt.equal(r.stdout, '', `${args.join(' ')}: nothing on stdout`);
    }
    const help = await cli(['status', '--help']);
    exitCode(tt, help, 0, 'status --help');
    tt.match(help.stdout, /--watch/);
    tt.match(help.stdout, /env: NBDMIRROR_HTTP/);
  });

  t.test('a secondary: status and resync timeout', async (tt) => {
    const srv = await startServer(tt, { args: ['--export', 'disk0=8M', '--role', 'secondary'] });
    const st = await cli(['status', '--http', http(srv)]);
    exitCode(tt, st, 0, 'status');
    tt.match(st.stdout, /^ {2}role: +secondary \(epoch \d+\)$/m);
    tt.match(st.stdout, /^ {2}primary: +none attached$/m);
    // No primary will ever connect: the wait ends at --timeout with the last state.
    const r = await cli(['resync', 'disk0', '--timeout', '1500', '--interval', '200', '--http', http(srv)]);
    exitCode(tt, r, 1, 'resync with nobody to sync from');
    tt.match(r.stderr, /^disk0: secondary, UpToDate: waiting for the primary to connect/m, 'a progress line');
    tt.match(r.stderr, /^nbdmirror: disk0: not in sync after 1\.5s \(--timeout 1500\); last seen: secondary, UpToDate: waiting for the primary/m);
    tt.equal(r.stdout, '');
  });

  t.test('status --watch off a TTY: one line per change, ends on SIGINT', async (tt) => {
    const srv = await startServer(tt, { args: ['--export', 'disk0=8M'] });
    const child = spawn(process.execPath, [CLIENT_JS, 'status', '--watch', '--interval', '200', '--http', http(srv)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
    const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
    tt.teardown(() => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    });
    const waitFor = async (re: RegExp, ms = 10_000): Promise<boolean> => {
      const deadline = Date.now() + ms;
      while (!re.test(out)) {
        if (Date.now() > deadline) return false;
        await new Promise((r) => setTimeout(r, 50));
      }
      return true;
    };
    tt.ok(await waitFor(/^export disk0\n {2}role: +primary/m), 'the full status first', { out, err });
    const demote = await cli(['demote', 'disk0', '--http', http(srv)]);
    exitCode(tt, demote, 0, 'demote while watching');
    tt.ok(await waitFor(/^\d\d:\d\d:\d\d disk0: secondary UpToDate epoch \d+, no primary attached, out of sync 0 bytes$/m), 'a change line', { out });
    await new Promise((r) => setTimeout(r, 700)); // a few more polls: nothing changed, nothing printed
    tt.equal(out.split('\n').filter((l) => /^\d\d:\d\d:\d\d /.test(l)).length, 1, 'exactly one change line');
    child.kill('SIGINT');
    let timer: NodeJS.Timeout | undefined;
    const code = await Promise.race([exited, new Promise<'timeout'>((r) => (timer = setTimeout(() => r('timeout'), 10_000)))]);
    clearTimeout(timer);
    tt.equal(code, 0, 'exit 0 on SIGINT', { err });
    tt.equal(err, '');
  });

  // Two nodes: the secondary is started after the primary wrote alone, and `nbdmirror resync` follows the
  // resync to the end on both. The replication layer is young: generous bounds, nothing about speed.
  t.test('resync follows a two-node resync to the end', async (tt) => {
    const { a, b } = await makePair(tt, { exports: ['disk0=32M'], args: ['--resync-rate', '16M'] });
    await a.start(['--role', 'primary']);
    const c = await NbdClient.connect({ host: '127.0.0.1', port: a.nbdPort }, { exportName: 'disk0' });
    const data = Buffer.alloc(MiB);
    for (let i = 0; i < data.length; i++) data[i] = (i * 131 + 7) & 0xff;
    for (let off = 0; off < 16 * MiB; off += 2 * MiB) await c.pwrite(data, off);
    await c.flush();
    await c.disconnect();

    const degraded = await cli(['status', '--http', `127.0.0.1:${a.httpPort}`]);
    exitCode(tt, degraded, 0, 'status of the degraded primary');
    tt.match(degraded.stdout, /^ {2}link: +connecting to nbd:\/\/127\.0\.0\.1:\d+.*\(degraded: writes are not mirrored\)$/m);
    tt.match(degraded.stdout, /^ {2}out of sync: +\d/m);

    await b.start(['--role', 'secondary']);
    const ra = await cli(['resync', 'disk0', '--timeout', '60000', '--interval', '200', '--http', `127.0.0.1:${a.httpPort}`], { timeoutMs: 90_000 });
    exitCode(tt, ra, 0, 'resync on the primary');
    tt.match(ra.stdout, /^disk0: in sync \(primary, UpToDate, epoch \d+, peer nbd:\/\/127\.0\.0\.1:\d+/m);
    const rb = await cli(['resync', 'disk0', '--json', '--timeout', '30000', '--interval', '200', '--http', `127.0.0.1:${b.httpPort}`], { timeoutMs: 60_000 });
    exitCode(tt, rb, 0, 'resync on the secondary');
    tt.match(JSON.parse(rb.stdout), { name: 'disk0', role: 'secondary', disk: 'UpToDate', session: { nodeId: 'node-a' } });
    tt.equal(await hashExport(a.uri()), await hashExport(b.uri()), 'both copies are byte-identical');

    const sa = await cli(['status', '--http', `127.0.0.1:${a.httpPort}`]);
    tt.match(sa.stdout, /^ {2}link: +connected to nbd:\/\/127\.0\.0\.1:\d+/m);
    tt.match(sa.stdout, /^ {2}last resync: /m);
  });
}
