// deploy/nbdmirror.sample.json and deploy/systemd/nbdmirror.service.
// - The sample config loads through lib/config.ts's loadConfig, as the server loads it, and says what it means to.
// - The unit: its ExecStart runs the server with --config at the path the sample is installed to, and names only
//   real flags and NBDMIRROR_* variables; it keeps the region in /dev/shm across restarts (RemoveIPC=no) and does
//   not restart on bad usage (exit 2). `systemd-analyze verify` accepts it.
// - The unit's ExecStart, with the install paths mapped to this repo and the addresses to loopback, starts a
//   server that serves the sample's export.

import t from 'tap';
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { NbdClient } from '../../lib/client/nbd-client';
import { loadConfig, serverCommand } from '../../lib/config';
import { requireTool } from '../helpers/requires';
import { describe, run } from '../helpers/run';
import { freshDir, startServer } from '../helpers/spawn-server';
import { getStatus } from '../helpers/status';
import { freePorts } from '../helpers/two-nodes';

const ROOT = path.resolve(__dirname, '..', '..');
const SAMPLE = path.join(ROOT, 'deploy', 'nbdmirror.sample.json');
const UNIT = path.join(ROOT, 'deploy', 'systemd', 'nbdmirror.service');
const GiB = 2 ** 30;

const OPTIONS = serverCommand().options;
const FLAGS = new Set(OPTIONS.map((o) => o.long).filter((x): x is string => x !== undefined));
const ENV_VARS = new Set(OPTIONS.map((o) => o.envVar).filter((x): x is string => x !== undefined));

/** A systemd unit file: section → key → values (keys may repeat). Continuation lines are joined. */
function parseUnit(text: string): Map<string, Map<string, string[]>> {
  const sections = new Map<string, Map<string, string[]>>();
  let cur: Map<string, string[]> | null = null;
  const lines = text.replace(/\\\n/g, ' ').split('\n');
  for (const raw of lines) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#') || line.startsWith(';')) continue;
    const sec = /^\[(.+)\]$/.exec(line);
    if (sec) {
      cur = new Map();
      sections.set(sec[1]!, cur);
      continue;
    }
    const eq = line.indexOf('=');
    if (cur === null || eq < 0) throw new Error(`unit: bad line "${line}"`);
    const k = line.slice(0, eq).trim();
    cur.set(k, [...(cur.get(k) ?? []), line.slice(eq + 1).trim()]);
  }
  return sections;
}

const unitText = readFileSync(UNIT, 'utf8');
const unit = parseUnit(unitText);
const service = unit.get('Service')!;
const one = (key: string): string | undefined => service.get(key)?.at(-1);
const execStart = (one('ExecStart') ?? '').split(/\s+/).filter((w) => w !== '');

/** --flag VALUE / --flag=VALUE in an argv. */
function flagValue(argv: readonly string[], flag: string): string | undefined {
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === flag) return argv[i + 1];
    if (argv[i]!.startsWith(`${flag}=`)) return argv[i]!.slice(flag.length + 1);
  }
  return undefined;
}

t.test('the sample config loads as the server loads it', async (t) => {
  const keys = Object.keys(JSON.parse(readFileSync(SAMPLE, 'utf8')) as Record<string, unknown>);
  for (const k of keys) t.ok(FLAGS.has(`--${k}`), `key "${k}" is a server flag`);
  t.notOk(keys.includes('admin-token'), 'no secret in the sample: the token comes from the environment file');

  // Its HTTP address is not on loopback, so the server wants a token (from the unit's EnvironmentFile).
  t.throws(() => loadConfig(['--config', SAMPLE], {}), /admin-token/, 'refused without an admin token');
  const r = loadConfig(['--config', SAMPLE], { NBDMIRROR_ADMIN_TOKEN: 'a-token-for-the-test' });
  if (r.kind !== 'config') throw new Error('expected a config');
  const c = r.config;
  t.equal(c.configFile, SAMPLE);
  t.same(c.listen, { host: '0.0.0.0', port: 10809 });
  t.same(c.http, { host: '0.0.0.0', port: 9810 });
  t.equal(c.dataDir, '/var/lib/nbdmirror');
  t.same(c.exports, [{ name: 'disk0', size: 10 * GiB }]);
  t.equal(c.nodeId, 'node-a');
  t.equal(c.role, null, 'no role: a new export with a peer starts secondary; promote one node once');
  t.same(c.peer, { nbd: { host: '10.0.0.2', port: 10809 }, http: 'http://10.0.0.2:9810' });
  t.equal(c.pmemDir, '/dev/shm');
  t.equal(c.durability, 'disk');

  // Flags and variables win over the file, as the README says.
  const o = loadConfig(['--config', SAMPLE, '--listen', '127.0.0.1:1'], { NBDMIRROR_ADMIN_TOKEN: 'a-token-for-the-test', NBDMIRROR_NODE_ID: 'x' });
  if (o.kind !== 'config') throw new Error('expected a config');
  t.same(o.config.listen, { host: '127.0.0.1', port: 1 }, 'a flag overrides the file');
  t.equal(o.config.nodeId, 'x', 'a variable overrides the file');
});

t.test('the systemd unit', async (t) => {
  t.ok(unit.has('Unit') && unit.has('Service') && unit.has('Install'), '[Unit], [Service], [Install]');
  t.equal(one('Type') ?? 'simple', 'simple', 'Type=simple: the server stays in the foreground');
  t.equal(execStart[0], '/usr/bin/node', 'ExecStart runs node by absolute path');
  t.match(execStart[1], /^\/.*\/dist\/server\.js$/, 'ExecStart runs the built server');
  const configPath = flagValue(execStart, '--config');
  t.equal(configPath, '/etc/nbdmirror/nbdmirror.json', '--config /etc/nbdmirror/nbdmirror.json');
  t.match(unitText, new RegExp(`deploy/nbdmirror\\.sample\\.json ${configPath!.replace(/\./g, '\\.')}`), 'the install notes copy the sample there');
  for (const a of execStart.slice(2).filter((a) => a.startsWith('--'))) t.ok(FLAGS.has(a.split('=')[0]!), `ExecStart: ${a} is a server flag`);
  for (const e of service.get('Environment') ?? []) {
    for (const kv of e.split(/\s+/)) {
      const k = kv.replace(/^"/, '').split('=')[0]!;
      if (k.startsWith('NBDMIRROR_')) t.ok(ENV_VARS.has(k), `Environment: ${k} is a server variable`);
    }
  }
  t.ok(service.get('EnvironmentFile')?.some((f) => f.replace(/^-/, '').startsWith('/etc/nbdmirror/')), 'an EnvironmentFile for NBDMIRROR_ADMIN_TOKEN');

  const user = one('User');
  t.ok(user !== undefined && user !== 'root' && user !== '0', `runs as a system user (${user})`);
  t.notOk(/^(yes|true|1|on)$/i.test(one('DynamicUser') ?? 'no'), 'no DynamicUser (it implies RemoveIPC=yes)');
  t.equal(one('RemoveIPC'), 'no', 'RemoveIPC=no: the region in /dev/shm survives a crash for recovery');
  t.notOk(/^(yes|true|1|on)$/i.test(one('PrivateIPC') ?? 'no'), 'no PrivateIPC');
  t.equal(one('KillSignal') ?? 'SIGTERM', 'SIGTERM', 'stopped with SIGTERM (a clean stop)');
  t.ok(Number((one('TimeoutStopSec') ?? '90').replace(/s$/, '')) >= 30, 'time for the clean stop');
  t.equal(one('RestartPreventExitStatus'), '2', 'no restart loop on bad usage (exit 2)');
  t.notOk(/^(yes|true|1|on)$/i.test(one('MemoryDenyWriteExecute') ?? 'no'), "no MemoryDenyWriteExecute (V8's JIT)");

  // The config file's data dir is the unit's StateDirectory, and the service user may write it.
  const sample = JSON.parse(readFileSync(SAMPLE, 'utf8')) as Record<string, string>;
  t.equal(sample['data-dir'], `/var/lib/${one('StateDirectory')}`, 'the sample data-dir is /var/lib/$StateDirectory');
  t.equal(unit.get('Install')?.get('WantedBy')?.[0], 'multi-user.target');

  if (requireTool(t, 'systemd-analyze')) {
    // Verified as written, except the paths that exist only once installed: node where this node is, the server
    // in this repo (systemd checks that the executable exists).
    const dir = freshDir(t, 'unit');
    const file = path.join(dir, 'nbdmirror.service');
    writeFileSync(file, unitText.replace(/^ExecStart=\/usr\/bin\/node /m, `ExecStart=${process.execPath} `));
    const r = await run('systemd-analyze', ['verify', file], { timeoutMs: 60_000 });
    const about = (r.stdout + r.stderr)
      .split('\n')
      .filter((l) => l.includes('nbdmirror.service'));
    t.equal(r.code, 0, `systemd-analyze verify\n${describe(r)}`);
    t.same(about, [], 'no warnings about the unit');
  }
});

t.test("the unit's ExecStart, on loopback, serves the sample config's export", async (t) => {
  const dir = freshDir(t, 'node');
  const etc = path.join(dir, 'etc');
  mkdirSync(etc);
  const config = path.join(etc, 'nbdmirror.json');
  copyFileSync(SAMPLE, config);
  const [peerNbd, peerHttp] = await freePorts(2);
  // ExecStart with its paths mapped: node → this node, /opt/nbdmirror/dist/server.js → the built server (what
  // startServer runs),
  // --config → the copied sample. The addresses, dirs and region size move to loopback and the test dir, and
  // the peer to a loopback port nobody listens on (a new export with a peer is secondary: it only waits).
  const argv = execStart.slice(2).map((a) => (a === '/etc/nbdmirror/nbdmirror.json' ? config : a));
  t.equal(path.basename(path.dirname(execStart[1]!)), 'dist');
  const env: Record<string, string> = { NBDMIRROR_ADMIN_TOKEN: 'a-token-for-the-test' };
  for (const e of service.get('Environment') ?? []) for (const kv of e.split(/\s+/)) env[kv.split('=')[0]!] = kv.slice(kv.indexOf('=') + 1);
  const srv = await startServer(t, {
    bare: true,
    dataDir: path.join(dir, 'data'),
    env,
    args: [
      ...argv,
      '--listen', '127.0.0.1:0',
      '--http', '127.0.0.1:0',
      '--data-dir', path.join(dir, 'data'),
      '--pmem-dir', path.join(dir, 'shm'),
      '--pmem-size', '16M',
      '--peer', `nbd://127.0.0.1:${peerNbd}`,
      '--peer-http', `http://127.0.0.1:${peerHttp}`,
    ],
  });
  const health = await fetch(`http://127.0.0.1:${srv.httpPort}/healthz`);
  t.equal(health.status, 200, 'GET /healthz');
  const c = await NbdClient.connect({ host: '127.0.0.1', port: srv.nbdPort }, { exportName: 'disk0', metaContexts: [] });
  t.equal(c.size, 10 * GiB, 'disk0 is the 10G of the sample');
  t.equal(c.readOnly, true, 'a secondary until promoted');
  await c.disconnect();
  const s = await getStatus(srv.httpPort);
  const rep = (s.replication?.exports as { name: string; role: string }[]).find((e) => e.name === 'disk0');
  t.equal(rep?.role, 'secondary');
  t.same(await srv.stop(), { code: 0, signal: null }, 'stops cleanly on SIGTERM (what systemctl stop sends)');
});
