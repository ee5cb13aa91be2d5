// scripts/demo.sh (npm run demo), end to end: it starts the compose topology as two processes on loopback and
// prints their URIs; data written through node-a survives node-a's SIGKILL and reads back from node-b once
// node-b is promoted with the command the demo prints; Ctrl-C (SIGINT) then stops the script with exit 0 and
// leaves no process behind. Also: the nodes run with the flags compose.yaml gives them.

import t from 'tap';
import type { Test } from 'tap';
import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { parse as parseYaml } from 'yaml';
import { NbdClient } from '../../lib/client/nbd-client';
import { describe, run } from '../helpers/run';
import { freshDir, SERVER_JS } from '../helpers/spawn-server';
import { getStatus } from '../helpers/status';
import { freePorts } from '../helpers/two-nodes';

const ROOT = path.resolve(__dirname, '..', '..');
const SCRIPT = path.join(ROOT, 'scripts', 'demo.sh');
const CLIENT_JS = path.join(ROOT, 'dist', 'client.js');
const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

function canListen(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.once('error', () => resolve(false));
    s.listen(port, '127.0.0.1', () => s.close(() => resolve(true)));
  });
}

/** A port p with p and p + 1 free (the demo puts node-b on node-a's port + 1), avoiding `avoid`. */
async function portPair(avoid: readonly number[] = []): Promise<number> {
  for (let i = 0; i < 100; i++) {
    const [p] = await freePorts(1);
    if (p! >= 65534 || avoid.some((a) => Math.abs(a - p!) <= 1)) continue;
    if ((await canListen(p!)) && (await canListen(p! + 1))) return p!;
  }
  throw new Error('no two consecutive free ports');
}

/** Resolves null after ms, without keeping the test process alive. */
function timeout(ms: number): Promise<null> {
  return new Promise((res) => setTimeout(() => res(null), ms).unref());
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  try {
    return readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]![0] !== 'Z';
  } catch {
    return false;
  }
}

function cmdline(pid: number): string[] {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').filter((s) => s !== '');
  } catch {
    return [];
  }
}

/** Processes whose command line mentions dir (the demo's nodes all do). */
function processesUsing(dir: string): number[] {
  return readdirSync('/proc')
    .filter((d) => /^\d+$/.test(d))
    .map(Number)
    .filter((pid) => pid !== process.pid && cmdline(pid).some((a) => a.includes(dir)));
}

async function waitFor(what: string, fn: () => Promise<boolean> | boolean, ms = 30_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    try {
      if (await fn()) return;
    } catch {
      // not yet
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`${what}: not reached in ${ms} ms`);
}

interface Demo {
  child: ChildProcess;
  output(): string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** Start scripts/demo.sh; t.teardown stops it (and, by PID, any node of this demo still running). */
function startDemo(t: Test, env: Record<string, string>, dir: string): Demo {
  const child = spawn('bash', [SCRIPT], { cwd: ROOT, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout!.setEncoding('utf8').on('data', (s: string) => (out += s));
  child.stderr!.setEncoding('utf8').on('data', (s: string) => (out += s));
  let done = false;
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.once('exit', (code, signal) => {
      done = true;
      resolve({ code, signal });
    }),
  );
  t.teardown(async () => {
    if (!done && child.pid !== undefined) {
      process.kill(child.pid, 'SIGTERM');
      await Promise.race([exited, timeout(30_000)]);
      if (!done) process.kill(child.pid, 'SIGKILL');
    }
    // Whatever of this demo is left (only processes whose command line names its own directory).
    for (const pid of processesUsing(dir)) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone
      }
    }
    if (t.passing && !t.passing()) {
      process.stderr.write(`--- demo output:\n${out}\n`);
      for (const f of ['node-a.log', 'node-b.log']) {
        const p = path.join(dir, f);
        if (existsSync(p)) process.stderr.write(`--- ${f} (end):\n${readFileSync(p, 'utf8').split('\n').slice(-30).join('\n')}\n`);
      }
    }
  });
  return { child, output: () => out, exited };
}

t.test('npm run demo: write through node-a, SIGKILL it, promote node-b, read back; Ctrl-C exits 0', async (t) => {
  if (!existsSync(SERVER_JS)) throw new Error(`${SERVER_JS} is missing: build first`);
  const dir = freshDir(t, 'demo');
  const nbd = await portPair();
  const http = await portPair([nbd]);
  const demo = startDemo(
    t,
    {
      DEMO_DIR: dir,
      DEMO_NBD_PORT: String(nbd),
      DEMO_HTTP_PORT: String(http),
      DEMO_EXPORT: `disk0=${SIZE}`,
      DEMO_PMEM_SIZE: '16M',
      DEMO_PMEM_DIR: path.join(dir, 'shm'),
      DEMO_BUILD: '0',
    },
    dir,
  );
  await Promise.race([
    waitFor('the demo prints its URIs', () => demo.output().includes('Ctrl-C stops both nodes.'), 90_000),
    demo.exited.then((s) => {
      throw new Error(`the demo exited early (${JSON.stringify(s)}):\n${demo.output()}`);
    }),
  ]);
  const out = demo.output();
  const line = (node: string) => {
    const m = new RegExp(`^\\s*${node}\\s+(\\S+)\\s+(nbd://\\S+)\\s+(http://\\S+)\\s+pid (\\d+)`, 'm').exec(out);
    if (!m) throw new Error(`no ${node} line in:\n${out}`);
    return { role: m[1]!, uri: m[2]!, http: m[3]!, pid: Number(m[4]) };
  };
  const a = line('node-a');
  const b = line('node-b');
  t.same([a.role, b.role], ['primary', 'secondary'], 'node-a primary, node-b secondary');
  t.equal(a.uri, `nbd://127.0.0.1:${nbd}/disk0`);
  t.equal(b.uri, `nbd://127.0.0.1:${nbd + 1}/disk0`);
  t.equal(a.http, `http://127.0.0.1:${http}`);
  t.equal(b.http, `http://127.0.0.1:${http + 1}`);
  t.equal(Number(readFileSync(path.join(dir, 'node-a.pid'), 'utf8')), a.pid, 'node-a.pid in DEMO_DIR');
  t.equal(Number(readFileSync(path.join(dir, 'node-b.pid'), 'utf8')), b.pid, 'node-b.pid in DEMO_DIR');
  for (const cmd of ['nbdinfo', 'nbdcopy', 'status --watch', `promote disk0 --http ${b.http}`, '/metrics']) t.match(out, cmd, `the demo suggests ${cmd}`);
  const metrics = await fetch(`${a.http}/metrics`);
  t.equal(metrics.status, 200, 'the printed metrics URL answers');
  await metrics.arrayBuffer();

  // The nodes run with compose.yaml's flags (addresses on loopback; exports and region as the test set them).
  const compose = parseYaml(readFileSync(path.join(ROOT, 'compose.yaml'), 'utf8')) as Record<string, any>;
  for (const [name, pid, peerNbd, peerHttp] of [
    ['node-a', a.pid, nbd + 1, http + 1],
    ['node-b', b.pid, nbd, http],
  ] as const) {
    const argv = cmdline(pid);
    const flag = (f: string): string | undefined => {
      const i = argv.indexOf(f);
      return i < 0 ? undefined : argv[i + 1];
    };
    const env = compose.services[name].environment as Record<string, string>;
    // The admin token and the log level are not flags in the demo: the token passes through the environment
    // when set (loopback needs none), and the level is the default.
    for (const key of Object.keys(env).filter((k) => k.startsWith('NBDMIRROR_') && !['NBDMIRROR_ADMIN_TOKEN', 'NBDMIRROR_LOG_LEVEL'].includes(k))) {
      const f = `--${key.slice('NBDMIRROR_'.length).toLowerCase().replace(/_/g, '-')}`;
      t.ok(flag(f) !== undefined, `${name}: ${f} (compose ${key})`);
    }
    t.equal(flag('--role') === undefined, env.NBDMIRROR_ROLE === undefined, `${name}: --role exactly when compose sets a role`);
    t.equal(flag('--node-id'), env.NBDMIRROR_NODE_ID, `${name}: node id as in compose`);
    t.equal(flag('--peer'), `nbd://127.0.0.1:${peerNbd}`, `${name}: the peer's NBD address`);
    t.equal(flag('--peer-http'), `http://127.0.0.1:${peerHttp}`, `${name}: the peer's HTTP address`);
  }
  t.equal(cmdline(a.pid)[cmdline(a.pid).indexOf('--role') + 1], 'primary');

  // Write through node-a.
  const portOf = (uri: string) => Number(new URL(uri).port);
  const data = randomBytes(4 * MiB);
  const tail = randomBytes(4096);
  const ca = await NbdClient.connect({ host: '127.0.0.1', port: portOf(a.uri) }, { exportName: 'disk0', metaContexts: [] });
  t.equal(ca.size, SIZE);
  await ca.pwrite(data, MiB);
  await ca.pwrite(tail, SIZE - 4096);
  await ca.flush();
  await ca.disconnect();

  // Lose node-a.
  process.kill(a.pid, 'SIGKILL');
  await waitFor('node-a gone', () => !alive(a.pid));
  await waitFor('the demo reports that node-a exited', () => /node-a \(pid \d+\) has exited/.test(demo.output()), 10_000);
  t.ok(alive(demo.child.pid!), 'the demo keeps running with node-b');

  // Promote node-b with the command the demo prints, once node-b no longer counts node-a as attached.
  const bHttpPort = portOf(b.http);
  await waitFor(
    'node-b lets the dead primary go',
    async () => ((await getStatus(bHttpPort)).replication.exports as { name: string; session: unknown }[]).find((e) => e.name === 'disk0')?.session === null,
    60_000,
  );
  const r = await run(process.execPath, [CLIENT_JS, 'promote', 'disk0', '--http', b.http], { timeoutMs: 30_000 });
  t.equal(r.code, 0, `nbdmirror promote disk0 on node-b\n${describe(r)}`);

  // Read back from node-b.
  const cb = await NbdClient.connect({ host: '127.0.0.1', port: portOf(b.uri) }, { exportName: 'disk0', metaContexts: [] });
  t.equal(cb.readOnly, false, 'node-b is the writable primary now');
  t.ok((await cb.pread(MiB, data.length)).equals(data), 'node-b has the data written through node-a');
  t.ok((await cb.pread(SIZE - 4096, 4096)).equals(tail), 'up to the last block');
  t.ok((await cb.pread(0, MiB)).equals(Buffer.alloc(MiB)), 'and zeros where nothing was written');
  await cb.disconnect();

  // Ctrl-C.
  process.kill(demo.child.pid!, 'SIGINT');
  const exit = await Promise.race([demo.exited, timeout(60_000)]);
  t.same(exit, { code: 0, signal: null }, 'the demo exits 0 on SIGINT');
  t.notOk(alive(b.pid), 'node-b has stopped');
  t.match(readFileSync(path.join(dir, 'node-b.log'), 'utf8'), /"msg":"stopped"/, 'node-b stopped cleanly');
  t.notOk(existsSync(path.join(dir, 'node-b.pid')), 'pid files removed');
  t.same(processesUsing(dir), [], 'no process of the demo is left');
});

t.test('demo: a node that cannot start is reported, and the script exits 1 leaving nothing behind', async (t) => {
  const dir = freshDir(t, 'demo-busy');
  const nbd = await portPair();
  const http = await portPair([nbd]);
  // Occupy node-b's NBD port.
  const blocker = net.createServer();
  await new Promise<void>((res) => blocker.listen(nbd + 1, '127.0.0.1', () => res()));
  t.teardown(() => new Promise((res) => blocker.close(res)));
  const demo = startDemo(
    t,
    {
      DEMO_DIR: dir,
      DEMO_NBD_PORT: String(nbd),
      DEMO_HTTP_PORT: String(http),
      DEMO_EXPORT: 'disk0=16M',
      DEMO_PMEM_SIZE: '16M',
      DEMO_PMEM_DIR: path.join(dir, 'shm'),
      DEMO_BUILD: '0',
    },
    dir,
  );
  const exit = await Promise.race([demo.exited, timeout(90_000)]);
  t.same(exit, { code: 1, signal: null }, `exit 1\n${demo.output()}`);
  t.match(demo.output(), /node-b did not become ready/, 'names the node');
  t.same(processesUsing(dir), [], 'node-a was stopped too');
});
