// nbdmirror-server as a user runs it: defaults, flags, environment, config file, bad usage (exit 2 with one
// line), data-dir locking, /healthz, and graceful stop on SIGTERM/SIGINT.

import t from 'tap';
import { existsSync, mkdirSync, statSync, writeFileSync } from 'node:fs';
import * as http from 'node:http';
import * as path from 'node:path';
import { run, type RunResult } from '../helpers/run';
import { SERVER_JS, freshDir, startServer } from '../helpers/spawn-server';
import { NbdClient } from '../../lib/client/nbd-client';

const server = (args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv } = {}): Promise<RunResult> =>
  run(process.execPath, [SERVER_JS, ...args], { timeoutMs: 20_000, ...opts });

function httpGet(port: number, p: string, method = 'GET'): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, path: p, method }, (res) => {
      let body = '';
      res.on('data', (d: Buffer) => (body += d.toString()));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

async function exportsOf(port: number): Promise<Array<{ name: string }>> {
  return NbdClient.list({ host: '127.0.0.1', port });
}

t.test('--help lists every flag with its default and exits 0', async (t) => {
  const r = await server(['--help']);
  t.equal(r.code, 0);
  for (const f of ['--listen', '--http', '--data-dir', '--export', '--read-only', '--config', '--log-level']) {
    t.match(r.stdout, f, `help mentions ${f}`);
  }
  t.match(r.stdout, '127.0.0.1:10809');
  t.match(r.stdout, 'disk0=1G');
});

t.test('bad usage: one clear line on stderr and exit 2', async (t) => {
  const dir = freshDir(t, 'bad');
  const cases: Array<[string[], RegExp]> = [
    [['--no-such-flag'], /unknown option/],
    [['--export', 'disk0=12Q'], /invalid size of export disk0 "12Q"/],
    [['--export', 'disk0'], /use NAME=SIZE/],
    [['--export', '../etc=1M'], /invalid export name/],
    [['--export', 'a=1M', '--export', 'a=2M'], /given twice/],
    [['--export', 'tiny=100'], /at least 512 bytes/],
    [['--listen', 'nonsense'], /invalid --listen address/],
    [['--listen', '127.0.0.1:70000'], /invalid --listen address/],
    [['--log-level', 'loud'], /log-level/],
    [['--config', path.join(dir, 'missing.json')], /cannot read config file/],
    [['extra-arg'], /too many arguments|unknown/],
    [['--pmem-dir', path.join(dir, 'pmem'), '--pmem-size', '100K'], /--pmem-size \d+ is too small/],
    [['--pmem-dir', path.join(dir, 'pmem'), '--pmem-size', '3G'], /--pmem-size \d+ is too large: at most \d+ bytes/],
  ];
  for (const [args, re] of cases) {
    const r = await server(['--data-dir', path.join(dir, 'data'), '--http', '127.0.0.1:0', ...args]);
    t.equal(r.code, 2, `${args.join(' ')} → exit 2`);
    t.match(r.stderr, re, `${args.join(' ')} → message`);
    t.equal(r.stderr.trim().split('\n').length, 1, `${args.join(' ')} → one line`);
  }
  const cfg = path.join(dir, 'bad.json');
  writeFileSync(cfg, '{"exports": ["a=1M"], "colour": "blue"}');
  const r = await server(['--config', cfg, '--data-dir', path.join(dir, 'data')]);
  t.equal(r.code, 2);
  t.match(r.stderr, /unknown key "colour"/);
  writeFileSync(cfg, '{ not json');
  t.equal((await server(['--config', cfg])).code, 2, 'invalid JSON → exit 2');
});

t.test('no flags: disk0 (1 GiB) from ./data on 127.0.0.1:10809, /healthz on 9810', async (t) => {
  const cwd = freshDir(t, 'defaults');
  const srv = await startServer(t, { args: [], dataDir: path.join(cwd, 'data'), cwd, bare: true });
  t.equal(srv.nbdPort, 10809);
  t.equal(srv.httpPort, 9810);
  const st = statSync(path.join(cwd, 'data', 'disk0.img'));
  t.equal(st.size, 1024 ** 3, 'backing file created at 1 GiB');
  t.ok(st.blocks * 512 < 16 * 1024 * 1024, 'and sparse');
  const c = await NbdClient.connect({ host: '127.0.0.1', port: 10809 }, { exportName: '' });
  t.equal(c.size, 1024 ** 3);
  await c.disconnect();
  const h = await httpGet(9810, '/healthz');
  t.equal(h.status, 200);
  t.same(JSON.parse(h.body), { status: 'ok' });
  t.equal((await httpGet(9810, '/nope')).status, 404);
  t.equal((await httpGet(9810, '/healthz', 'POST')).status, 405);
  const st2 = await srv.stop();
  t.equal(st2.code, 0, 'SIGTERM → exit 0');
});

t.test('flags > env > config file > defaults', async (t) => {
  const dir = freshDir(t, 'prec');
  const cfg = path.join(dir, 'cfg.json');
  writeFileSync(cfg, JSON.stringify({ export: ['fromfile=1M'], 'log-level': 'debug' }));
  // File only.
  let srv = await startServer(t, { args: ['--config', cfg], dataDir: path.join(dir, 'd1') });
  t.same((await exportsOf(srv.nbdPort)).map((e) => e.name), ['fromfile']);
  await srv.stop();
  // Env beats file; comma-separated exports.
  srv = await startServer(t, { args: ['--config', cfg], dataDir: path.join(dir, 'd2'), env: { NBDMIRROR_EXPORT: 'a=1M,b=2M' } });
  t.same((await exportsOf(srv.nbdPort)).map((e) => e.name), ['a', 'b']);
  await srv.stop();
  // Flag beats env.
  srv = await startServer(t, {
    args: ['--config', cfg, '--export', 'flag=1M'],
    dataDir: path.join(dir, 'd3'),
    env: { NBDMIRROR_EXPORT: 'a=1M' },
  });
  t.same((await exportsOf(srv.nbdPort)).map((e) => e.name), ['flag']);
  await srv.stop();
  // Read-only from the environment.
  srv = await startServer(t, { args: ['--export', 'ro=1M'], dataDir: path.join(dir, 'd4'), env: { NBDMIRROR_READ_ONLY: 'true' } });
  const c = await NbdClient.connect({ host: '127.0.0.1', port: srv.nbdPort }, { exportName: 'ro' });
  t.equal(c.readOnly, true);
  await c.disconnect();
  await srv.stop();
});

t.test('a second server on the same data dir fails with a clear message', async (t) => {
  const dir = freshDir(t, 'lock');
  const data = path.join(dir, 'data');
  const first = await startServer(t, { args: ['--export', 'disk0=1M'], dataDir: data });
  const r = await server(['--listen', '127.0.0.1:0', '--http', '127.0.0.1:0', '--data-dir', data, '--export', 'disk0=1M']);
  t.equal(r.code, 1);
  t.match(r.stderr, /data dir .* is locked by another process/);
  t.equal(r.stderr.trim().split('\n').length, 1);
  t.notOk(first.exited, 'the first server keeps running');
  await first.stop();
});

t.test('an existing backing file with another size is refused', async (t) => {
  const dir = freshDir(t, 'resize');
  const data = path.join(dir, 'data');
  const s = await startServer(t, { args: ['--export', 'disk0=1M'], dataDir: data });
  await s.stop();
  const r = await server(['--listen', '127.0.0.1:0', '--http', '127.0.0.1:0', '--data-dir', data, '--export', 'disk0=2M']);
  t.equal(r.code, 2);
  t.match(r.stderr, /holds 1048576 bytes but the export is configured as 2097152/);
});

for (const signal of ['SIGTERM', 'SIGINT'] as const) {
  t.test(`${signal}: in-flight writes finish, data is flushed, exit 0`, async (t) => {
    const dir = freshDir(t, signal);
    const data = path.join(dir, 'data');
    mkdirSync(data, { recursive: true });
    const srv = await startServer(t, { args: ['--export', 'disk0=64M'], dataDir: data });
    const c = await NbdClient.connect({ host: '127.0.0.1', port: srv.nbdPort }, { exportName: 'disk0' });
    const chunk = Buffer.alloc(1 << 20);
    const writes: Array<Promise<unknown>> = [];
    for (let i = 0; i < 32; i++) {
      chunk.fill(i + 1);
      writes.push(c.pwrite(Buffer.from(chunk), i << 20));
    }
    // Signal while the writes are in flight; every write is either done or refused with ESHUTDOWN.
    process.kill(srv.pid, signal);
    const results = await Promise.allSettled(writes);
    const exit = await srv.waitExit();
    t.equal(exit.code, 0, `${signal} → exit 0`);
    t.match(srv.logs(), /"msg":"stopped"/);
    await c.close();
    const again = await startServer(t, { args: ['--export', 'disk0=64M'], dataDir: data });
    const r = await NbdClient.connect({ host: '127.0.0.1', port: again.nbdPort }, { exportName: 'disk0' });
    let ok = 0;
    for (let i = 0; i < 32; i++) {
      if (results[i]!.status !== 'fulfilled') continue;
      ok++;
      const back = await r.pread(i << 20, 1 << 20);
      t.ok(back.equals(Buffer.alloc(1 << 20, i + 1)), `acknowledged write ${i} survived the stop`);
    }
    t.ok(ok > 0 || results.every((x) => x.status === 'rejected'), `${ok} of 32 writes acknowledged before the stop`);
    await r.disconnect();
    await again.stop();
  });
}

t.test('data dir is created when absent', async (t) => {
  const dir = freshDir(t, 'mk');
  const data = path.join(dir, 'a', 'b', 'c');
  const srv = await startServer(t, { args: ['--export', 'x=1M'], dataDir: data });
  t.ok(existsSync(path.join(data, 'x.img')));
  t.ok(existsSync(path.join(data, 'x.alloc')));
  await srv.stop();
});
