// compose.yaml, the Dockerfile, .dockerignore, and the Prometheus and Grafana files they use. No Docker engine
// is needed: the files are parsed and checked against the server itself. The compose topology is then run as
// plain processes with the compose environment, only addresses and dirs moved to loopback and a test dir, and
// put through the README's walkthrough.
//
// - compose: the four services; node-a and node-b build from the Dockerfile, publish their NBD and HTTP ports
//   on the host's loopback, keep their data in a volume each, and have room in /dev/shm for the region. Every
//   NBDMIRROR_* variable (compose and Dockerfile ENV) is a real server flag, and the peers point at each other.
// - Dockerfile: multi-stage, a non-root USER, a HEALTHCHECK on /healthz, the data VOLUME, EXPOSE = the ports
//   compose maps; .dockerignore keeps what the COPYs need and drops the rest.
// - the healthcheck script, run against a real server.
// - Prometheus scrapes both nodes' /metrics at their HTTP port; Grafana's provisioning finds the datasource
//   and the dashboard; every metric the dashboard's PromQL names is one the server exports (METRICS below,
//   plus prom-client's defaults).
// - the walkthrough: write through node-a, stop it, promote node-b (with the compose admin token; none is
//   refused), read back, bring node-a back as secondary and see it resynced. Both nodes' /metrics have every
//   metric the dashboard uses, and a real Prometheus run with deploy/prometheus/prometheus.yml (targets moved to
//   loopback) accepts every dashboard query and shows data in the panels that must always have some.

import t from 'tap';
import type { Test } from 'tap';
import { randomBytes } from 'node:crypto';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import * as path from 'node:path';
import { collectDefaultMetrics, Registry } from 'prom-client';
import { parse as parseYaml, stringify as toYaml } from 'yaml';
import { NbdClient } from '../../lib/client/nbd-client';
import { parseAddress, parseExport, serverCommand } from '../../lib/config';
import { parseSize } from '../../lib/size';
import { requireTool } from '../helpers/requires';
import { describe, run } from '../helpers/run';
import { freshDir, startServer, type ServerProcess } from '../helpers/spawn-server';
import { getStatus } from '../helpers/status';
import { freePorts } from '../helpers/two-nodes';
import { startPrometheus } from '../helpers/prometheus';

const ROOT = path.resolve(__dirname, '..', '..');
const MiB = 1024 * 1024;

// ---------------------------------------------------------------------------------------------------------
// What the server offers

const OPTIONS = serverCommand().options;
const FLAGS = new Set(OPTIONS.map((o) => o.long).filter((x): x is string => x !== undefined));
const ENV_VARS = new Set(OPTIONS.map((o) => o.envVar).filter((x): x is string => x !== undefined));

/** Passes for a real NBDMIRROR_* variable. */
function checkEnvVar(t: Test, name: string, where: string): void {
  t.ok(ENV_VARS.has(name), `${where}: ${name} is a server variable`);
}

/**
 * The metrics the server exports (the contract with lib/metrics), by name without labels. The dashboard may use
 * only these and prom-client's default process_* / nodejs_* metrics.
 */
const METRICS: Record<string, 'counter' | 'gauge' | 'histogram'> = {
  nbdmirror_requests_total: 'counter',
  nbdmirror_request_bytes_total: 'counter',
  nbdmirror_request_errors_total: 'counter',
  nbdmirror_request_duration_seconds: 'histogram',
  nbdmirror_requests_in_flight: 'gauge',
  nbdmirror_connections_open: 'gauge',
  nbdmirror_connections_accepted_total: 'counter',
  nbdmirror_busy_poll_seconds_total: 'counter',
  nbdmirror_busy_poll_window_seconds: 'gauge',
  nbdmirror_reply_pool_writes_total: 'counter',
  nbdmirror_reply_pool_partial_writes_total: 'counter',
  nbdmirror_region_capacity_pages: 'gauge',
  nbdmirror_region_used_pages: 'gauge',
  nbdmirror_region_dirty_pages: 'gauge',
  nbdmirror_region_page_size_bytes: 'gauge',
  nbdmirror_writeback_bytes_total: 'counter',
  nbdmirror_write_bypass_bytes_total: 'counter',
  nbdmirror_writeback_lag_seconds: 'gauge',
  nbdmirror_region_backpressure_waits_total: 'counter',
  nbdmirror_cache_hits_total: 'counter',
  nbdmirror_cache_misses_total: 'counter',
  nbdmirror_cache_bytes: 'gauge',
  nbdmirror_cache_capacity_bytes: 'gauge',
  nbdmirror_replication_role: 'gauge',
  nbdmirror_replication_link_state: 'gauge',
  nbdmirror_replication_disk_state: 'gauge',
  nbdmirror_replication_epoch: 'gauge',
  nbdmirror_replication_out_of_sync_bytes: 'gauge',
  nbdmirror_replication_split_brain: 'gauge',
  nbdmirror_peer_write_duration_seconds: 'histogram',
  nbdmirror_resync_done_bytes: 'gauge',
  nbdmirror_resync_total_bytes: 'gauge',
  nbdmirror_resync_rate_bytes_per_second: 'gauge',
  nbdmirror_resync_eta_seconds: 'gauge',
  nbdmirror_resync_sent_bytes_total: 'counter',
  nbdmirror_build_info: 'gauge',
};

function defaultMetricNames(): Map<string, string> {
  const reg = new Registry();
  collectDefaultMetrics({ register: reg });
  return new Map(reg.getMetricsAsArray().map((m) => [m.name, String(m.type)]));
}

// ---------------------------------------------------------------------------------------------------------
// The files

type Dict = Record<string, any>;

const compose = parseYaml(readFileSync(path.join(ROOT, 'compose.yaml'), 'utf8')) as Dict;
const NODES = ['node-a', 'node-b'] as const;
type NodeName = (typeof NODES)[number];

/** ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message} and $$, as compose interpolates them. */
function interpolate(value: string, vars: Record<string, string>): string {
  return value.replace(/\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-|:?\?)([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)/g, (m, name?: string, op?: string, arg?: string, bare?: string) => {
    if (m === '$$') return '$';
    const key = name ?? bare!;
    const v = vars[key];
    if (op === ':-') return v === undefined || v === '' ? (arg ?? '') : v;
    if (op === '-') return v === undefined ? (arg ?? '') : v;
    if (op !== undefined && op.endsWith('?') && (v === undefined || (op === ':?' && v === ''))) throw new Error(`compose needs ${key}: ${arg}`);
    if (v === undefined) throw new Error(`compose uses \${${key}} without a default`);
    return v;
  });
}

/** A service's environment (map or list form), interpolated. */
function serviceEnv(svc: Dict, vars: Record<string, string> = {}): Record<string, string> {
  const env = svc.environment ?? {};
  const entries: [string, string][] = Array.isArray(env)
    ? env.map((s: string) => {
        const eq = s.indexOf('=');
        return [s.slice(0, eq), s.slice(eq + 1)];
      })
    : Object.entries(env).map(([k, v]) => [k, String(v)]);
  return Object.fromEntries(entries.map(([k, v]) => [k, interpolate(v, vars)]));
}

interface Instr {
  cmd: string;
  args: string;
}
interface Stage {
  from: string;
  name: string | null;
  instrs: Instr[];
}

/** Dockerfile → stages of instructions (continuations joined, comments dropped). */
function parseDockerfile(text: string): Stage[] {
  const logical: string[] = [];
  let cur = '';
  for (const line of text.split('\n')) {
    if (/^\s*#/.test(line)) continue;
    if (/\\\s*$/.test(line)) {
      cur += line.replace(/\\\s*$/, ' ');
      continue;
    }
    cur += line;
    if (cur.trim() !== '') logical.push(cur.trim());
    cur = '';
  }
  const stages: Stage[] = [];
  /** ARGs declared before the first FROM, which FROM lines may use. */
  const globalArgs: Record<string, string> = {};
  for (const l of logical) {
    const m = /^(\S+)\s*(.*)$/s.exec(l)!;
    const cmd = m[1]!.toUpperCase();
    const args = m[2]!.replace(/\s+/g, ' ').trim();
    if (cmd === 'ARG' && stages.length === 0) {
      const [k, v] = args.split('=');
      globalArgs[k!] = v ?? '';
    } else if (cmd === 'FROM') {
      const f = /^(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?$/i.exec(args)!;
      const from = f[1]!.replace(/\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?/g, (_, k: string) => globalArgs[k] ?? '');
      stages.push({ from, name: f[2] ?? null, instrs: [] });
    } else if (stages.length > 0) {
      stages.at(-1)!.instrs.push({ cmd, args });
    }
  }
  return stages;
}

const dockerfile = parseDockerfile(readFileSync(path.join(ROOT, 'Dockerfile'), 'utf8'));
const runtime = dockerfile.at(-1)!;
const instrs = (cmd: string): Instr[] => runtime.instrs.filter((i) => i.cmd === cmd);

/** ENV K=V K2="V 2" (and the old ENV K V form) of the runtime stage. */
function dockerEnv(): Record<string, string> {
  const out: Record<string, string> = {};
  for (const { args } of instrs('ENV')) {
    if (!/^\S+=/.test(args)) {
      const [k, ...v] = args.split(' ');
      out[k!] = v.join(' ');
      continue;
    }
    for (const m of args.matchAll(/([A-Za-z_][A-Za-z0-9_]*)=("(?:[^"\\]|\\.)*"|\S*)/g)) out[m[1]!] = m[2]!.replace(/^"(.*)"$/, '$1');
  }
  return out;
}
const DOCKER_ENV = dockerEnv();

/** What a node container runs with: the image's ENV, overridden by the service's environment. */
function nodeEnv(name: NodeName, vars: Record<string, string> = {}): Record<string, string> {
  return { ...DOCKER_ENV, ...serviceEnv(compose.services[name], vars) };
}

/** "127.0.0.1:10810:10809" / "10809:10809" / long syntax → { hostIp, host, container }. */
function portMappings(svc: Dict): { hostIp: string; host: number; container: number }[] {
  return (svc.ports ?? []).map((p: string | Dict) => {
    if (typeof p === 'object') return { hostIp: String(p.host_ip ?? ''), host: Number(p.published), container: Number(p.target) };
    const parts = String(p).replace(/\/tcp$/, '').split(':');
    const container = Number(parts.pop());
    const host = Number(parts.pop() ?? container);
    return { hostIp: parts.join(':'), host, container };
  });
}

/** "node-a-data:/data[:ro]" / long syntax → { source, target }. */
function mounts(svc: Dict): { source: string; target: string; type: 'volume' | 'bind' }[] {
  return (svc.volumes ?? []).map((v: string | Dict) => {
    if (typeof v === 'object') return { source: String(v.source), target: String(v.target), type: v.type === 'bind' ? 'bind' : 'volume' };
    const [source, target] = String(v).split(':');
    return { source: source!, target: target!, type: /^[./~]/.test(source!) ? 'bind' : 'volume' };
  });
}

/** Docker byte sizes: 320m, 1g, 512mb, 67108864. */
function dockerBytes(v: string | number): number {
  if (typeof v === 'number') return v;
  const m = /^(\d+(?:\.\d+)?)\s*([bkmg]?)b?$/i.exec(v.trim());
  if (!m) throw new Error(`bad docker size "${v}"`);
  return Number(m[1]) * 1024 ** 'bkmg'.indexOf((m[2] || 'b').toLowerCase());
}

// ---------------------------------------------------------------------------------------------------------

t.test('compose.yaml: services, build, ports, volumes, region room, flags', async (t) => {
  const services = compose.services as Dict;
  for (const s of ['node-a', 'node-b', 'prometheus', 'grafana']) t.ok(services[s], `service ${s}`);

  const envA = nodeEnv('node-a');
  const envB = nodeEnv('node-b');
  t.equal(envA.NBDMIRROR_ROLE, 'primary', 'node-a starts primary (NODE_A_ROLE unset)');
  t.equal(nodeEnv('node-a', { NODE_A_ROLE: 'secondary' }).NBDMIRROR_ROLE, 'secondary', 'NODE_A_ROLE=secondary brings node-a back as secondary');
  t.ok(envB.NBDMIRROR_ROLE === undefined || envB.NBDMIRROR_ROLE === 'secondary', 'node-b is secondary (a new export with a peer)');

  const published = new Set<number>();
  for (const name of NODES) {
    const svc = services[name] as Dict;
    const env = nodeEnv(name);
    const build = typeof svc.build === 'string' ? { context: svc.build } : (svc.build as Dict);
    t.ok(build, `${name} is built`);
    t.equal(path.resolve(ROOT, build.context), ROOT, `${name}: build context is the repo`);
    t.equal(build.dockerfile ?? 'Dockerfile', 'Dockerfile', `${name}: built from the Dockerfile`);

    // Every variable and command flag is the server's.
    for (const k of Object.keys(serviceEnv(svc)).filter((k) => k.startsWith('NBDMIRROR_'))) checkEnvVar(t, k, `${name} environment`);
    t.notOk(svc.entrypoint, `${name}: the image's entrypoint (the server) is kept`);
    const command: string[] = svc.command === undefined ? [] : Array.isArray(svc.command) ? svc.command : String(svc.command).split(/\s+/);
    for (const a of command.filter((a) => a.startsWith('--'))) t.ok(FLAGS.has(a.split('=')[0]!), `${name} command: ${a} is a server flag`);

    t.equal(env.NBDMIRROR_NODE_ID, name, `${name}: node id`);
    t.ok(env.NBDMIRROR_EXPORT && env.NBDMIRROR_EXPORT.split(',').every((e) => parseExport(e)), `${name}: exports parse`);
    t.equal(env.NBDMIRROR_EXPORT, envA.NBDMIRROR_EXPORT, `${name}: the same exports on both nodes`);
    t.ok(env.NBDMIRROR_ADMIN_TOKEN, `${name}: an admin token (HTTP listens on 0.0.0.0 in the container)`);
    t.equal(env.NBDMIRROR_ADMIN_TOKEN, envA.NBDMIRROR_ADMIN_TOKEN, `${name}: the same admin token on both nodes`);
    t.equal(serviceEnv(svc, { NBDMIRROR_ADMIN_TOKEN: 'mine' }).NBDMIRROR_ADMIN_TOKEN, 'mine', `${name}: the token comes from NBDMIRROR_ADMIN_TOKEN (shell or .env)`);

    // Ports: the NBD and HTTP container ports, published on the host's loopback only.
    const listen = parseAddress(env.NBDMIRROR_LISTEN!, 'listen');
    const http = parseAddress(env.NBDMIRROR_HTTP!, 'http');
    t.equal(listen.host, '0.0.0.0', `${name}: NBD listens on all container interfaces`);
    t.equal(http.host, '0.0.0.0', `${name}: HTTP listens on all container interfaces`);
    const ports = portMappings(svc);
    t.same(ports.map((p) => p.container).sort(), [listen.port, http.port].sort(), `${name}: publishes exactly its NBD and HTTP ports`);
    for (const p of ports) {
      t.equal(p.hostIp, '127.0.0.1', `${name}: port ${p.container} published on the host's loopback only`);
      t.notOk(published.has(p.host), `${name}: host port ${p.host} not used twice`);
      published.add(p.host);
    }

    // The peer: the other service, at its container ports.
    const other = name === 'node-a' ? 'node-b' : 'node-a';
    const otherEnv = nodeEnv(other);
    const peer = new URL(env.NBDMIRROR_PEER!);
    t.equal(peer.protocol, 'nbd:');
    t.equal(peer.hostname, other, `${name}: the peer is ${other}`);
    t.equal(Number(peer.port), parseAddress(otherEnv.NBDMIRROR_LISTEN!, 'listen').port, `${name}: the peer's NBD port`);
    const peerHttp = new URL(env.NBDMIRROR_PEER_HTTP!);
    t.equal(peerHttp.hostname, other);
    t.equal(Number(peerHttp.port), parseAddress(otherEnv.NBDMIRROR_HTTP!, 'http').port, `${name}: the peer's HTTP port`);

    // Data in a named volume of its own, at the data dir.
    const data = mounts(svc).find((m) => m.target === env.NBDMIRROR_DATA_DIR);
    t.ok(data, `${name}: a volume at the data dir ${env.NBDMIRROR_DATA_DIR}`);
    t.equal(data?.type, 'volume', `${name}: the data dir is a named volume`);
    t.ok(data && data.source in (compose.volumes ?? {}), `${name}: volume ${data?.source} is declared`);
    t.match(data?.source, new RegExp(`^${name}`), `${name}: its own volume`);

    // The region: on tmpfs, with room for --pmem-size.
    const pmem = parseSize(env.NBDMIRROR_PMEM_SIZE ?? '256M');
    if (env.NBDMIRROR_PMEM_DIR === '/dev/shm') {
      t.ok(svc.shm_size !== undefined && dockerBytes(svc.shm_size) > pmem, `${name}: shm_size ${svc.shm_size} > pmem size ${env.NBDMIRROR_PMEM_SIZE}`);
    } else {
      const tmpfs: string[] = [].concat(svc.tmpfs ?? []);
      const mnt = tmpfs.find((x) => x.split(':')[0] === env.NBDMIRROR_PMEM_DIR);
      t.ok(mnt, `${name}: a tmpfs at the region dir ${env.NBDMIRROR_PMEM_DIR}`);
      const size = /size=([^,]+)/.exec(mnt ?? '')?.[1];
      t.ok(size !== undefined && dockerBytes(size) > pmem, `${name}: the tmpfs is larger than the region`);
    }
    t.ok(svc.stop_grace_period, `${name}: a stop grace period for the clean stop`);
  }
  t.same(
    portMappings(services['node-a']).map((p) => p.host),
    [10809, 9810],
    'node-a on the host: NBD 10809, HTTP 9810 (what npm run demo uses)',
  );
  t.same(portMappings(services['node-b']).map((p) => p.host), [10810, 9811], 'node-b on the host: NBD 10810, HTTP 9811');

  // Variables compose reads: every ${VAR} has a default, so `docker compose up` works without a .env.
  const text = readFileSync(path.join(ROOT, 'compose.yaml'), 'utf8').split('\n').filter((l) => !/^\s*#/.test(l)).join('\n');
  for (const m of text.matchAll(/\$\{([A-Za-z_][A-Za-z0-9_]*)([^}]*)\}/g)) t.match(m[2], /^:?-/, `\${${m[1]}} has a default`);
});

t.test('Dockerfile: multi-stage, non-root, healthcheck, volume, ports, variables; .dockerignore', async (t) => {
  t.ok(dockerfile.length >= 2, `multi-stage (${dockerfile.length} stages)`);
  const build = dockerfile[0]!;
  t.match(build.instrs.filter((i) => i.cmd === 'RUN').map((i) => i.args).join('\n'), /npm run build/, 'the first stage builds');
  t.notMatch(instrs('RUN').map((i) => i.args).join('\n'), /apt-get install|g\+\+|npm ci\b/, 'the runtime stage installs no compilers and no dev dependencies');
  t.ok(
    instrs('COPY').some((i) => /--from=\S+/.test(i.args) && /\/dist\b/.test(i.args)),
    'the runtime stage copies dist from the build stage',
  );
  t.match(runtime.from, /slim|alpine|distroless/, `a small runtime base (${runtime.from})`);

  const user = instrs('USER').at(-1)?.args;
  t.ok(user, 'USER is set');
  t.notOk(/^(root|0)(:|$)/.test(user ?? 'root'), `USER ${user} is not root`);

  const hc = instrs('HEALTHCHECK').at(-1)?.args ?? '';
  t.match(hc, /\/healthz/, 'HEALTHCHECK hits /healthz');
  t.match(hc, /\bCMD\b/, 'HEALTHCHECK runs a command');

  const volumes = instrs('VOLUME').flatMap((i) => (i.args.startsWith('[') ? (JSON.parse(i.args) as string[]) : i.args.split(' ')));
  t.ok(volumes.includes(DOCKER_ENV.NBDMIRROR_DATA_DIR!), `VOLUME ${DOCKER_ENV.NBDMIRROR_DATA_DIR} (the data dir)`);

  const expose = instrs('EXPOSE').flatMap((i) => i.args.split(' ')).map((p) => Number(p.replace(/\/tcp$/, '')));
  for (const name of NODES) {
    t.same(
      [...new Set(portMappings(compose.services[name]).map((p) => p.container))].sort(),
      [...new Set(expose)].sort(),
      `EXPOSE ${expose.join(' ')} = the container ports compose publishes for ${name}`,
    );
  }
  t.same(
    expose.sort(),
    [parseAddress(DOCKER_ENV.NBDMIRROR_LISTEN!, 'listen').port, parseAddress(DOCKER_ENV.NBDMIRROR_HTTP!, 'http').port].sort(),
    'EXPOSE = the ports of NBDMIRROR_LISTEN and NBDMIRROR_HTTP',
  );
  for (const k of Object.keys(DOCKER_ENV).filter((k) => k.startsWith('NBDMIRROR_'))) checkEnvVar(t, k, 'Dockerfile ENV');
  t.equal(DOCKER_ENV.NBDMIRROR_PMEM_DIR, '/dev/shm', 'the region on tmpfs (/dev/shm)');
  const entry = JSON.parse(instrs('ENTRYPOINT').at(-1)?.args ?? '[]') as string[];
  t.match(entry.join(' '), /dist\/server\.js$/, 'the entrypoint is the server');

  // .dockerignore: the COPY sources are in the context, the rest is not.
  const patterns = readFileSync(path.join(ROOT, '.dockerignore'), 'utf8')
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '' && !l.startsWith('#'));
  const glob = (p: string): RegExp =>
    new RegExp(
      `^${p
        .replace(/^\/|\/$/g, '')
        .replace(/[.+^${}()|[\]\\]/g, '\\$&')
        .replace(/\*\*/g, '\u0000')
        .replace(/\*/g, '[^/]*')
        .replace(/\?/g, '[^/]')
        .replace(/\u0000/g, '.*')}$`,
    );
  const ignored = (file: string): boolean => {
    const parts = file.split('/');
    let excluded = false;
    for (const raw of patterns) {
      const neg = raw.startsWith('!');
      const re = glob(neg ? raw.slice(1) : raw);
      for (let i = 1; i <= parts.length; i++) {
        if (re.test(parts.slice(0, i).join('/'))) {
          excluded = !neg;
          break;
        }
      }
    }
    return excluded;
  };
  const filesUnder = (rel: string): string[] => {
    const abs = path.join(ROOT, rel);
    if (!statSync(abs).isDirectory()) return [rel];
    return readdirSync(abs).flatMap((e) => filesUnder(path.join(rel, e)));
  };
  for (const stage of dockerfile) {
    for (const { args } of stage.instrs.filter((i) => i.cmd === 'COPY' || i.cmd === 'ADD')) {
      if (/--from=/.test(args)) continue;
      const words = args.split(' ').filter((w) => !w.startsWith('--'));
      for (const src of words.slice(0, -1)) {
        t.ok(existsSync(path.join(ROOT, src)), `COPY source ${src} exists`);
        const missing = existsSync(path.join(ROOT, src)) ? filesUnder(src).filter(ignored) : [];
        t.same(missing, [], `COPY source ${src} is in the build context`);
      }
    }
  }
  for (const p of ['node_modules', 'dist', '.git', 'test', 'data', '.env', 'bench-runs', 'README.md']) t.ok(ignored(p), `${p} is not sent to the builder`);
});

t.test('the image healthcheck script answers for a real server', async (t) => {
  const hc = instrs('HEALTHCHECK').at(-1)!.args;
  const cmd = JSON.parse(hc.slice(hc.indexOf('CMD') + 3).trim()) as string[];
  t.equal(cmd[0], 'node');
  // The script the image runs: the runtime stage's COPY whose destination (from its WORKDIR) is cmd[1].
  let workdir = '/';
  let source: string | null = null;
  for (const i of runtime.instrs) {
    if (i.cmd === 'WORKDIR') workdir = path.posix.resolve(workdir, i.args);
    if (i.cmd !== 'COPY' || /--from=/.test(i.args)) continue;
    const words = i.args.split(' ').filter((w) => !w.startsWith('--'));
    if (words.length === 2 && path.posix.resolve(workdir, words[1]!) === cmd[1]) source = words[0]!;
  }
  t.ok(source, `the runtime stage copies ${cmd[1]} in`);
  const script = path.join(ROOT, source!);
  const args = [script, ...cmd.slice(2)];

  const srv = await startServer(t);
  const hcRun = (env: NodeJS.ProcessEnv, extra: string[] = []) => run(process.execPath, [...args, ...extra], { env: { ...process.env, ...env }, timeoutMs: 20_000 });
  let r = await hcRun({ NBDMIRROR_HTTP: `127.0.0.1:${srv.httpPort}` });
  t.equal(r.code, 0, `healthy server: exit 0\n${describe(r)}`);
  r = await hcRun({ NBDMIRROR_HTTP: `0.0.0.0:${srv.httpPort}` });
  t.equal(r.code, 0, `NBDMIRROR_HTTP on 0.0.0.0 (as in the image) is checked on loopback\n${describe(r)}`);
  r = await run(process.execPath, [script, '/no-such-endpoint'], { env: { ...process.env, NBDMIRROR_HTTP: `127.0.0.1:${srv.httpPort}` } });
  t.equal(r.code, 1, 'a 404 is unhealthy');
  const [closed] = await freePorts(1);
  r = await hcRun({ NBDMIRROR_HTTP: `127.0.0.1:${closed}` });
  t.equal(r.code, 1, `nothing listening: exit 1\n${describe(r)}`);
  t.same(await srv.stop(), { code: 0, signal: null });
});

t.test('Prometheus scrapes both nodes; Grafana provisions the datasource and the dashboard', async (t) => {
  const services = compose.services as Dict;
  const prom = services.prometheus as Dict;
  const promArgs: string[] = [].concat(prom.command ?? []);
  const configPath = /--config\.file=(\S+)/.exec(promArgs.join(' '))?.[1] ?? '/etc/prometheus/prometheus.yml';
  const promMount = mounts(prom).find((m) => m.target === configPath);
  t.ok(promMount, `prometheus mounts its config at ${configPath}`);
  const promConfig = parseYaml(readFileSync(path.join(ROOT, promMount!.source), 'utf8')) as Dict;

  const targets = new Map<string, Dict>();
  for (const job of promConfig.scrape_configs as Dict[]) {
    for (const sc of job.static_configs ?? []) for (const target of sc.targets) targets.set(target, { job, labels: sc.labels ?? {} });
  }
  for (const name of NODES) {
    const port = parseAddress(nodeEnv(name).NBDMIRROR_HTTP!, 'http').port;
    const hit = targets.get(`${name}:${port}`);
    t.ok(hit, `Prometheus scrapes ${name}:${port}`);
    t.equal(hit?.job.metrics_path ?? '/metrics', '/metrics', `${name}: at /metrics`);
    t.equal(hit?.job.scheme ?? 'http', 'http');
    t.equal(hit?.labels.node, name, `${name}: labelled node="${name}" (the dashboard's node variable)`);
  }
  const promPort = portMappings(prom).map((p) => p.container)[0];
  if (requireTool(t, 'promtool')) {
    const r = await run('promtool', ['check', 'config', path.join(ROOT, promMount!.source)], { timeoutMs: 30_000 });
    t.equal(r.code, 0, `promtool check config\n${describe(r)}`);
  }

  // Grafana: datasource → the prometheus service; dashboard provider → the mounted dashboards dir.
  const graf = services.grafana as Dict;
  const gm = mounts(graf);
  const prov = gm.find((m) => m.target === '/etc/grafana/provisioning');
  t.ok(prov, 'grafana mounts the provisioning dir');
  const provDir = path.join(ROOT, prov!.source);
  const yamlsIn = (dir: string): Dict[] =>
    readdirSync(dir)
      .filter((f) => /\.ya?ml$/.test(f))
      .map((f) => parseYaml(readFileSync(path.join(dir, f), 'utf8')) as Dict);
  const datasources = yamlsIn(path.join(provDir, 'datasources')).flatMap((d) => d.datasources as Dict[]);
  const ds = datasources.find((d) => d.type === 'prometheus');
  t.ok(ds, 'a Prometheus datasource is provisioned');
  t.equal(ds?.url, `http://prometheus:${promPort}`, 'it points at the prometheus service');
  const providers = yamlsIn(path.join(provDir, 'dashboards')).flatMap((d) => d.providers as Dict[]);
  t.equal(providers.length, 1, 'one dashboard provider');
  const dashDirMount = gm.find((m) => m.target === providers[0]?.options?.path);
  t.ok(dashDirMount, `the provider's path ${providers[0]?.options?.path} is mounted from the repo`);
  const dashFile = path.join(ROOT, dashDirMount!.source, 'nbdmirror.json');
  t.ok(existsSync(dashFile), 'deploy/grafana/dashboards/nbdmirror.json is in it');
  const home = serviceEnv(graf).GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH;
  if (home !== undefined) t.equal(home, path.posix.join(dashDirMount!.target, 'nbdmirror.json'), 'the home dashboard is the nbdmirror one');

  const dash = JSON.parse(readFileSync(dashFile, 'utf8')) as Dict;
  t.ok(dash.uid && dash.title, 'the dashboard has a uid and a title');
  const panels = (dash.panels as Dict[]).flatMap((p) => [p, ...((p.panels as Dict[] | undefined) ?? [])]);
  const ids = panels.map((p) => p.id);
  t.equal(new Set(ids).size, ids.length, 'panel ids are unique');
  const exprs: string[] = [];
  for (const p of panels.filter((p) => p.type !== 'row')) {
    t.equal(p.datasource?.uid, ds?.uid, `panel "${p.title}" uses the provisioned datasource`);
    const ts = (p.targets as Dict[] | undefined) ?? [];
    t.ok(ts.length > 0 && ts.every((x) => typeof x.expr === 'string' && x.expr !== ''), `panel "${p.title}" has queries`);
    for (const x of ts) exprs.push(x.expr);
  }
  for (const v of dash.templating?.list ?? []) exprs.push(typeof v.query === 'string' ? v.query : String(v.query?.query ?? ''));

  const defaults = defaultMetricNames();
  const known = (name: string): boolean => {
    if (name in METRICS || defaults.has(name)) return true;
    const base = name.replace(/_(bucket|sum|count)$/, '');
    return base !== name && (METRICS[base] === 'histogram' || defaults.get(base) === 'histogram');
  };
  const used = new Set<string>();
  for (const e of exprs) {
    // Metric names: identifiers outside label matchers ({…}) that are not PromQL functions or keywords.
    const outside = e.replace(/\{[^}]*\}/g, '{}').replace(/"[^"]*"/g, '""');
    for (const m of outside.matchAll(/\b(nbdmirror_[a-z0-9_]+|process_[a-z0-9_]+|nodejs_[a-z0-9_]+)\b/g)) used.add(m[1]!);
  }
  for (const name of used) t.ok(known(name), `dashboard metric ${name} is exported by the server`);
  const base = new Set([...used].map((n) => n.replace(/_(bucket|sum|count)$/, '')));
  for (const [what, names] of Object.entries({
    throughput: ['nbdmirror_request_bytes_total'],
    latency: ['nbdmirror_request_duration_seconds'],
    region: ['nbdmirror_region_used_pages', 'nbdmirror_region_dirty_pages'],
    replication: ['nbdmirror_replication_role', 'nbdmirror_replication_link_state', 'nbdmirror_replication_out_of_sync_bytes'],
    resync: ['nbdmirror_resync_done_bytes', 'nbdmirror_resync_total_bytes'],
  })) {
    for (const n of names) t.ok(base.has(n), `a ${what} panel (${n})`);
  }
});

// ---------------------------------------------------------------------------------------------------------
// The walkthrough, with processes

/** The dashboard's PromQL: { title, expr } of every panel target, and the label_values() of its variables. */
function dashboardQueries(): { panels: { title: string; expr: string }[]; variables: string[] } {
  const dash = JSON.parse(readFileSync(path.join(ROOT, 'deploy/grafana/dashboards/nbdmirror.json'), 'utf8')) as Dict;
  const all = (dash.panels as Dict[]).flatMap((p) => [p, ...((p.panels as Dict[] | undefined) ?? [])]);
  return {
    panels: all.flatMap((p) => ((p.targets as Dict[] | undefined) ?? []).map((x) => ({ title: String(p.title), expr: String(x.expr) }))),
    variables: ((dash.templating?.list as Dict[] | undefined) ?? []).map((v) => String(typeof v.query === 'string' ? v.query : v.query?.query)),
  };
}

/** Grafana's variables as the dashboard's "All" (allValue .+) and a rate interval. */
function expandGrafana(expr: string): string {
  return expr.replace(/\$node\b/g, '.+').replace(/\$export\b/g, '.+').replace(/\$__rate_interval\b/g, '1m');
}

/** Panels that must show data on a linked pair (the others may be empty: no errors, no resync running…). */
const ALWAYS_DATA = ['Throughput', 'Requests per second', 'Region', 'Region dirty / used', 'Role', 'Link', 'Disk', 'Epoch', 'Split brain', 'Out of sync', 'CPU', 'Memory'];

/**
 * A real Prometheus with deploy/prometheus/prometheus.yml, its targets moved to the loopback nodes: it scrapes
 * both, every dashboard query is valid PromQL to it, and the panels in ALWAYS_DATA have data.
 */
async function prometheusAndDashboard(t: Test, nodes: Record<NodeName, Local>): Promise<void> {
  const base = parseYaml(readFileSync(path.join(ROOT, 'deploy/prometheus/prometheus.yml'), 'utf8')) as Dict;
  const prom = await startPrometheus(t, (promPort) => {
    const config: Dict = { ...base, global: { ...base.global, scrape_interval: '1s', evaluation_interval: '1s' } };
    for (const job of config.scrape_configs as Dict[]) {
      for (const sc of job.static_configs ?? []) {
        sc.targets = (sc.targets as string[]).map((target) => {
          const [host, port] = target.split(':');
          if (host === 'localhost') return `127.0.0.1:${promPort}`;
          const node = nodes[host as NodeName];
          if (node === undefined || Number(port) !== parseAddress(nodeEnv(node.name).NBDMIRROR_HTTP!, 'http').port) throw new Error(`unexpected target ${target}`);
          return `127.0.0.1:${node.http}`;
        });
      }
    }
    return toYaml(config);
  });
  const query = (q: string) => prom.query(q);
  const results = async (q: string): Promise<number> => (await query(q)).data?.result.length ?? 0;
  await waitFor('Prometheus scrapes both nodes', async () => (await results('up{job="nbdmirror"} == 1')) === 2, 60_000).catch((err: Error) => {
    throw new Error(`${err.message}\n${prom.log()}`);
  });
  // Two scrapes at least, so that rate() has something.
  await new Promise((r) => setTimeout(r, 2500));

  const { panels, variables } = dashboardQueries();
  for (const { title, expr } of panels) {
    const q = expandGrafana(expr);
    const r = await query(q);
    t.equal(r.status, 'success', `panel "${title}": valid PromQL: ${q}${r.error ? ` (${r.error})` : ''}`);
  }
  for (const title of ALWAYS_DATA) {
    const exprs = panels.filter((p) => p.title === title).map((p) => expandGrafana(p.expr));
    t.ok(exprs.length > 0, `panel "${title}" exists`);
    let n = 0;
    await waitFor(`panel "${title}" has data`, async () => {
      n = (await Promise.all(exprs.map(results))).reduce((x, y) => x + y, 0);
      return n > 0;
    }, 20_000).catch(() => undefined);
    t.ok(n > 0, `panel "${title}" shows data (${n} series)`);
  }
  // label_values(METRIC{…}, LABEL) of the variables: the nodes and the exports.
  for (const v of variables) {
    const m = /^label_values\((.+),\s*([a-z_]+)\)$/.exec(v);
    t.ok(m, `variable query ${v}`);
    const r = await query(`count by (${m![2]}) (${expandGrafana(m![1]!)})`);
    t.equal(r.status, 'success');
    t.ok((r.data?.result.length ?? 0) > 0, `${v} has values`);
  }
}

interface Local {
  name: NodeName;
  nbd: number;
  http: number;
  dataDir: string;
  pmemDir: string;
  proc: ServerProcess | null;
}

/**
 * A node's compose environment moved to this machine: container names → 127.0.0.1, container ports → free
 * ports, the data volume and /dev/shm → test dirs, and a 16 MiB region (many tests share the machine; the
 * compose size is checked above).
 */
function localEnv(t: Test, node: Local, all: Record<NodeName, Local>, vars: Record<string, string>): Record<string, string> {
  const env = nodeEnv(node.name, vars);
  const containerPort = (n: NodeName, key: 'NBDMIRROR_LISTEN' | 'NBDMIRROR_HTTP'): number => parseAddress(nodeEnv(n)[key]!, key).port;
  const move = (uri: string, key: 'NBDMIRROR_LISTEN' | 'NBDMIRROR_HTTP'): string => {
    const u = new URL(uri);
    const n = u.hostname as NodeName;
    if (!(n in all) || Number(u.port) !== containerPort(n, key)) throw new Error(`${uri} is not a node's ${key} address`);
    return `${u.protocol}//127.0.0.1:${key === 'NBDMIRROR_LISTEN' ? all[n].nbd : all[n].http}`;
  };
  const out: Record<string, string> = {
    ...env,
    NBDMIRROR_LISTEN: `127.0.0.1:${node.nbd}`,
    NBDMIRROR_HTTP: `127.0.0.1:${node.http}`,
    NBDMIRROR_PEER: move(env.NBDMIRROR_PEER!, 'NBDMIRROR_LISTEN'),
    NBDMIRROR_PEER_HTTP: move(env.NBDMIRROR_PEER_HTTP!, 'NBDMIRROR_HTTP'),
    NBDMIRROR_DATA_DIR: node.dataDir,
    NBDMIRROR_PMEM_DIR: node.pmemDir,
    NBDMIRROR_PMEM_SIZE: '16M',
  };
  t.comment(`${node.name}: ${Object.entries(out).filter(([k]) => k.startsWith('NBDMIRROR_')).map(([k, v]) => `${k}=${v}`).join(' ')}`);
  return out;
}

async function waitFor<T>(what: string, fn: () => Promise<T | null | undefined | false>, ms = 30_000): Promise<T> {
  const deadline = Date.now() + ms;
  let last: unknown = null;
  while (Date.now() < deadline) {
    try {
      const v = await fn();
      if (v) return v;
    } catch (err) {
      last = err;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`${what}: not reached in ${ms} ms (${String(last)})`);
}

async function rep(node: Local, exportName: string): Promise<Dict | undefined> {
  const s = await getStatus(node.http);
  return (s.replication?.exports as Dict[] | undefined)?.find((e) => e.name === exportName);
}

async function httpGet(port: number, p: string): Promise<{ status: number; text: string }> {
  const res = await fetch(`http://127.0.0.1:${port}${p}`, { signal: AbortSignal.timeout(10_000) });
  return { status: res.status, text: await res.text() };
}

t.test('the compose topology as processes: write, stop node-a, promote node-b, read back, node-a resynced', async (t) => {
  const [an, ah, bn, bh] = await freePorts(4);
  const mk = (name: NodeName, nbd: number, http: number): Local => {
    const dir = freshDir(t, name);
    return { name, nbd, http, dataDir: path.join(dir, 'data'), pmemDir: path.join(dir, 'shm'), proc: null };
  };
  const all: Record<NodeName, Local> = { 'node-a': mk('node-a', an!, ah!), 'node-b': mk('node-b', bn!, bh!) };
  const a = all['node-a'];
  const b = all['node-b'];
  const token = nodeEnv('node-a').NBDMIRROR_ADMIN_TOKEN!;
  const exportName = parseExport(nodeEnv('node-a').NBDMIRROR_EXPORT!.split(',')[0]!).name;
  const exportSize = parseExport(nodeEnv('node-a').NBDMIRROR_EXPORT!.split(',')[0]!).size;

  const start = async (node: Local, vars: Record<string, string> = {}): Promise<void> => {
    node.proc = await startServer(t, { bare: true, env: localEnv(t, node, all, vars), dataDir: node.dataDir });
    await waitFor(`${node.name}: GET /readyz is 200`, async () => (await httpGet(node.http, '/readyz')).status === 200);
    t.equal((await httpGet(node.http, '/healthz')).status, 200, `${node.name}: GET /healthz (the image's HEALTHCHECK)`);
  };
  const post = async (node: Local, p: string): Promise<{ status: number; body: Dict }> => {
    const res = await fetch(`http://127.0.0.1:${node.http}${p}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` },
      body: '{}',
      signal: AbortSignal.timeout(20_000),
    });
    return { status: res.status, body: (await res.json()) as Dict };
  };
  const connect = (node: Local): Promise<NbdClient> => NbdClient.connect({ host: '127.0.0.1', port: node.nbd }, { exportName, metaContexts: [] });
  const inSync = (primary: Local, secondary: Local) =>
    waitFor(`${primary.name} primary, linked, in sync with ${secondary.name}`, async () => {
      const [p, s] = [await rep(primary, exportName), await rep(secondary, exportName)];
      return p?.role === 'primary' && p.link?.state === 'connected' && p.outOfSync?.blocks === 0 && s?.role === 'secondary' && s.disk === 'UpToDate';
    });

  // docker compose up -d
  await Promise.all([start(b), start(a)]);
  await inSync(a, b);

  // Write through node-a (the README's mkfs + mount + write).
  const one = randomBytes(MiB);
  const two = randomBytes(MiB);
  const ca = await connect(a);
  t.equal(ca.size, exportSize, `${exportName} has the compose size`);
  t.equal(ca.readOnly, false, 'node-a is writable');
  await ca.pwrite(one, 0);
  await ca.pwrite(two, exportSize / 2);
  await ca.flush();
  await ca.disconnect();

  // docker compose stop node-a
  t.same(await a.proc!.stop(), { code: 0, signal: null }, 'node-a stops cleanly on SIGTERM');
  a.proc = null;

  // docker compose exec node-b nbdmirror promote disk0. node-b counts node-a as gone two peer timeouts after it
  // last heard from it (a clean stop does not end the link session); a promote before that is refused.
  const stopped = Date.now();
  await waitFor('node-b sees no live primary', async () => (await rep(b, exportName))?.session === null, 60_000);
  t.comment(`node-b let node-a's session go ${Date.now() - stopped} ms after node-a stopped`);
  const anonymous = await fetch(`http://127.0.0.1:${b.http}/v1/exports/${exportName}/promote`, { method: 'POST', body: '{}', signal: AbortSignal.timeout(10_000) });
  t.equal(anonymous.status, 401, "compose's NBDMIRROR_ADMIN_TOKEN is in force: a POST without it is refused");
  await anonymous.arrayBuffer();
  const promoted = await post(b, `/v1/exports/${exportName}/promote`);
  t.equal(promoted.status, 200, `promote node-b: ${JSON.stringify(promoted.body)}`);
  t.equal(promoted.body.role, 'primary');

  // Read the data back from node-b, and write there (a mounted filesystem would).
  const cb = await connect(b);
  t.equal(cb.readOnly, false, 'node-b is writable once promoted');
  t.ok((await cb.pread(0, MiB)).equals(one), 'node-b has what was written through node-a');
  t.ok((await cb.pread(exportSize / 2, MiB)).equals(two), 'all of it');
  const three = randomBytes(MiB);
  await cb.pwrite(three, exportSize / 4);
  await cb.flush();

  // NODE_A_ROLE=secondary docker compose up -d node-a: it comes back as node-b's secondary and is resynced.
  await start(a, { NODE_A_ROLE: 'secondary' });
  await inSync(b, a);
  const ca2 = await connect(a);
  t.equal(ca2.readOnly, true, 'node-a is a read-only secondary');
  t.ok((await ca2.pread(exportSize / 4, MiB)).equals(three), 'node-a got what node-b wrote while it was down');
  t.ok((await ca2.pread(0, MiB)).equals(one), 'and kept the rest');
  await ca2.disconnect();
  await cb.disconnect();

  // /metrics on both nodes exports every metric the dashboard uses.
  const dash = readFileSync(path.join(ROOT, 'deploy/grafana/dashboards/nbdmirror.json'), 'utf8');
  const dashMetrics = new Set([...dash.matchAll(/\b(nbdmirror_[a-z0-9_]+)\b/g)].map((m) => m[1]!.replace(/_(bucket|sum|count)$/, '')));
  for (const node of [a, b]) {
    const m = await httpGet(node.http, '/metrics');
    t.equal(m.status, 200, `${node.name}: GET /metrics`);
    const types = new Map([...m.text.matchAll(/^# TYPE (\S+) (\S+)$/gm)].map((x) => [x[1]!, x[2]!]));
    const missing = [...dashMetrics].filter((n) => !types.has(n));
    t.same(missing, [], `${node.name}: /metrics has every metric the dashboard uses`);
    const extra = [...types.keys()].filter((n) => n.startsWith('nbdmirror_') && !(n in METRICS));
    t.same(extra, [], `${node.name}: every nbdmirror_* metric is in this test's list (add new ones to METRICS)`);
    for (const [n, type] of types) if (n in METRICS) t.equal(type, METRICS[n], `${node.name}: ${n} is a ${METRICS[n]}`);
  }

  if (requireTool(t, 'prometheus')) await prometheusAndDashboard(t, all);

  for (const node of [a, b]) t.same(await node.proc!.stop(), { code: 0, signal: null }, `${node.name} stops cleanly`);
});
