// One typed, frozen Config built once from flags > NBDMIRROR_* environment > config file > defaults.
// Every problem is a UsageError with one clear line; server.ts turns it into exit code 2.

import { existsSync, readFileSync } from 'node:fs';
import { Command, CommanderError, Option } from 'commander';
import { UsageError } from './errors';
import { LOG_LEVELS, type LogLevel } from './log';
import { parseSize } from './size';

export interface Address {
  host: string;
  port: number;
}

export interface ExportConfig {
  name: string;
  size: number;
}

export type Durability = 'disk' | 'pmem';

export type Role = 'primary' | 'secondary';

export interface Config {
  listen: Address;
  http: Address;
  dataDir: string;
  exports: readonly ExportConfig[];
  readOnly: boolean;
  logLevel: LogLevel;
  configFile: string | null;
  /** Bytes of the pmem region (4 KiB pages). */
  pmemSize: number;
  pmemDir: string;
  durability: Durability;
  /** Bytes of clean blocks kept in the read cache (0 disables it). */
  cacheSize: number;
  /** Writes of at least this many bytes may go straight to the backing file, past the region (0: never). */
  writeBypass: number;
  /** A name for this node in logs and status (the node's uuid in node.json identifies it on the wire). */
  nodeId: string | null;
  /** Role every export takes at start; null = the role stored in NAME.meta.json (new: primary without a peer, else secondary). */
  role: Role | null;
  /** The peer node, or null for a single node. */
  peer: { nbd: Address; http: string } | null;
  /** A peer request unanswered this long (ms) marks the peer out of date and the primary goes on degraded. */
  peerTimeoutMs: number;
  /** Resync bytes per second; 0 = as fast as the link goes. */
  resyncRate: number;
  /** After each socket read the event loop polls this long (ms) before it may sleep (0: never polls). */
  busyPollMs: number;
  /** Bearer token the HTTP POST endpoints require (and this node sends to its peer); null = none. */
  adminToken: string | null;
  writeback: {
    /** Fractions of the region's pages: start writing back above high, stop at low. */
    high: number;
    low: number;
    /** Write back pages dirty for longer than this (ms). */
    maxAgeMs: number;
  };
}

export const DEFAULTS = {
  listen: '127.0.0.1:10809',
  http: '127.0.0.1:9810',
  dataDir: './data',
  export: 'disk0=1G',
  logLevel: 'info' as LogLevel,
  pmemSize: '256M',
  /** Where the region lives unless --pmem-dir says otherwise: tmpfs when the machine has it. */
  pmemDir: '/dev/shm (else the data dir)',
  durability: 'disk' as Durability,
  cacheSize: '64M',
  writeBypass: '256K',
  writebackHigh: '50',
  writebackLow: '25',
  writebackMaxAge: '5s',
  peerTimeout: '5s',
  resyncRate: '0',
  busyPoll: '100us',
};

/** --busy-poll's upper bound (ms). */
const MAX_BUSY_POLL_MS = 10;

/** Export names become file names (NAME.img), so they are restricted to a safe set. */
const EXPORT_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

/** What `nbdmirror-server --help` prints and what loadConfig parses. */
export function serverCommand(): Command {
  return new Command('nbdmirror-server')
    .description('Replicated NBD server (nbdmirror). Every flag is also a config-file key and an NBDMIRROR_* variable.')
    .addOption(new Option('--config <file>', 'JSON config file whose keys are the long flag names').env('NBDMIRROR_CONFIG'))
    .addOption(new Option('--listen <host:port>', 'NBD listen address').default(DEFAULTS.listen).env('NBDMIRROR_LISTEN'))
    .addOption(new Option('--http <host:port>', 'HTTP address for /healthz, /readyz, /metrics, /v1/status and the admin endpoints (port 0 picks a free one)').default(DEFAULTS.http).env('NBDMIRROR_HTTP'))
    .addOption(new Option('--data-dir <dir>', 'directory for backing files').default(DEFAULTS.dataDir).env('NBDMIRROR_DATA_DIR'))
    .addOption(
      new Option('--export <name=size>', `export to serve, created if absent; repeatable, comma-separated in the env (default: "${DEFAULTS.export}")`)
        .argParser(collectExports)
        .env('NBDMIRROR_EXPORT'),
    )
    .addOption(new Option('--read-only', 'serve every export read-only').default(false).env('NBDMIRROR_READ_ONLY'))
    .addOption(new Option('--log-level <level>', 'log level').choices(LOG_LEVELS).default(DEFAULTS.logLevel).env('NBDMIRROR_LOG_LEVEL'))
    .addOption(new Option('--pmem-size <size>', 'size of the pmem region (4 KiB pages)').default(DEFAULTS.pmemSize).env('NBDMIRROR_PMEM_SIZE'))
    .addOption(new Option('--pmem-dir <dir>', `directory of the pmem region file (default: ${DEFAULTS.pmemDir})`).env('NBDMIRROR_PMEM_DIR'))
    .addOption(
      new Option('--durability <mode>', 'disk: FLUSH/FUA reach the backing files; pmem: the region counts as non-volatile')
        .choices(['disk', 'pmem'])
        .default(DEFAULTS.durability)
        .env('NBDMIRROR_DURABILITY'),
    )
    .addOption(new Option('--cache-size <size>', 'read cache of clean blocks (0 disables)').default(DEFAULTS.cacheSize).env('NBDMIRROR_CACHE_SIZE'))
    .addOption(
      new Option('--write-bypass <size>', 'writes this long (whole pages) go straight to the backing file (0 disables)')
        .default(DEFAULTS.writeBypass)
        .env('NBDMIRROR_WRITE_BYPASS'),
    )
    .addOption(new Option('--writeback-high <percent>', 'start writeback above this share of dirty region pages').default(DEFAULTS.writebackHigh).env('NBDMIRROR_WRITEBACK_HIGH'))
    .addOption(new Option('--writeback-low <percent>', 'stop writeback at this share of dirty region pages').default(DEFAULTS.writebackLow).env('NBDMIRROR_WRITEBACK_LOW'))
    .addOption(new Option('--writeback-max-age <duration>', 'write back pages dirty for longer than this (e.g. 500ms, 5s)').default(DEFAULTS.writebackMaxAge).env('NBDMIRROR_WRITEBACK_MAX_AGE'))
    .addOption(new Option('--node-id <id>', "this node's name in logs and status (default: the host name)").env('NBDMIRROR_NODE_ID'))
    .addOption(
      new Option('--role <role>', 'role of every export at start (default: as stored; a new export is primary without --peer, else secondary)')
        .choices(['primary', 'secondary'])
        .env('NBDMIRROR_ROLE'),
    )
    .addOption(new Option('--peer <uri>', 'NBD address of the peer node, nbd://HOST:PORT (none: single node)').env('NBDMIRROR_PEER'))
    .addOption(new Option('--peer-http <url>', "the peer's HTTP address, http://HOST:PORT (default: from --peer, port 9810)").env('NBDMIRROR_PEER_HTTP'))
    .addOption(new Option('--peer-timeout <duration>', 'mark the peer out of date and go on degraded after it is silent this long').default(DEFAULTS.peerTimeout).env('NBDMIRROR_PEER_TIMEOUT'))
    .addOption(new Option('--resync-rate <size>', 'resync bytes per second, e.g. 100M (0: as fast as the link goes)').default(DEFAULTS.resyncRate).env('NBDMIRROR_RESYNC_RATE'))
    .addOption(
      new Option('--busy-poll <duration>', 'after each request, poll for the next one this long before sleeping (e.g. 100us, 0 disables; grows up to 4x while requests keep arriving just after it): lower latency at low queue depth for some CPU')
        .default(DEFAULTS.busyPoll)
        .env('NBDMIRROR_BUSY_POLL'),
    )
    .addOption(
      new Option('--admin-token <token>', 'bearer token the admin POST endpoints require; the same on both nodes (required when --http is not on loopback)').env(
        'NBDMIRROR_ADMIN_TOKEN',
      ),
    )
    .helpOption('-h, --help', 'show this help')
    .allowExcessArguments(false);
}

function collectExports(value: string, previous: string[] | undefined): string[] {
  return [...(previous ?? []), ...value.split(',').map((s) => s.trim()).filter((s) => s !== '')];
}

export type LoadResult = { kind: 'config'; config: Config } | { kind: 'help'; text: string };

/**
 * Parse argv (without node and script) and env into a Config. Returns the help text for --help.
 * Throws UsageError for anything invalid.
 */
export function loadConfig(argv: readonly string[], env: NodeJS.ProcessEnv): LoadResult {
  const cmd = serverCommand();
  let captured = '';
  cmd.exitOverride().configureOutput({ writeOut: (s) => (captured += s), writeErr: (s) => (captured += s) });
  // commander reads the environment from process.env; give it exactly the env we were handed.
  const saved = process.env;
  process.env = env;
  try {
    cmd.parse([...argv], { from: 'user' });
  } catch (err) {
    if (err instanceof CommanderError) {
      if (err.code === 'commander.helpDisplayed' || err.code === 'commander.help') return { kind: 'help', text: captured };
      throw new UsageError(err.message.replace(/^error: /, ''));
    }
    throw err;
  } finally {
    process.env = saved;
  }
  // commander sets a boolean flag to true when its variable exists, whatever the value; take the value itself
  // so that NBDMIRROR_READ_ONLY=0/false means false (parseBool below checks it).
  if (cmd.getOptionValueSource('readOnly') === 'env') cmd.setOptionValueWithSource('readOnly', env.NBDMIRROR_READ_ONLY, 'env');
  const opts = cmd.opts<Record<string, unknown>>();
  const configFile = typeof opts.config === 'string' ? opts.config : null;
  if (configFile !== null) applyConfigFile(cmd, configFile);
  const o = cmd.opts<Record<string, unknown>>();
  const readOnly = parseBool(o.readOnly, 'read-only');
  const exportsList = ((o.export as string[] | undefined) ?? [DEFAULTS.export]).map(parseExport);
  // An empty NBDMIRROR_EXPORT, "--export ," or "export": [] leaves nothing to serve.
  if (exportsList.length === 0) throw new UsageError('no export given: use --export NAME=SIZE, e.g. disk0=1G');
  if (String(o.dataDir) === '') throw new UsageError('--data-dir must not be empty');
  const seen = new Set<string>();
  for (const e of exportsList) {
    if (seen.has(e.name)) throw new UsageError(`export "${e.name}" is given twice`);
    seen.add(e.name);
  }
  const config: Config = {
    listen: parseAddress(String(o.listen), 'listen'),
    http: parseAddress(String(o.http), 'http'),
    dataDir: String(o.dataDir),
    exports: exportsList,
    readOnly,
    logLevel: o.logLevel as LogLevel,
    configFile,
    pmemSize: parseSize(String(o.pmemSize), '--pmem-size'),
    pmemDir: typeof o.pmemDir === 'string' && o.pmemDir !== '' ? o.pmemDir : defaultPmemDir(String(o.dataDir)),
    durability: o.durability as Durability,
    cacheSize: parseSize(String(o.cacheSize), '--cache-size'),
    writeBypass: parseSize(String(o.writeBypass), '--write-bypass'),
    writeback: parseWriteback(String(o.writebackHigh), String(o.writebackLow), String(o.writebackMaxAge)),
    nodeId: typeof o.nodeId === 'string' && o.nodeId !== '' ? o.nodeId : null,
    role: o.role === 'primary' || o.role === 'secondary' ? o.role : null,
    peer: parsePeer(o.peer, o.peerHttp),
    peerTimeoutMs: parseDuration(String(o.peerTimeout), 'peer-timeout'),
    resyncRate: parseSize(String(o.resyncRate), '--resync-rate'),
    busyPollMs: parseDuration(String(o.busyPoll), 'busy-poll'),
    adminToken: typeof o.adminToken === 'string' && o.adminToken !== '' ? o.adminToken : null,
  };
  if (config.peerTimeoutMs < 50) throw new UsageError('--peer-timeout must be at least 50ms');
  if (config.busyPollMs > MAX_BUSY_POLL_MS) throw new UsageError(`--busy-poll must be at most ${MAX_BUSY_POLL_MS}ms (a longer window only burns CPU)`);
  if (config.adminToken === null && !isLoopback(config.http.host)) {
    throw new UsageError(`--http ${formatAddress(config.http)} is not on loopback: set --admin-token (or NBDMIRROR_ADMIN_TOKEN) so that only operators can promote, demote or resync`);
  }
  if (config.adminToken !== null && config.adminToken.length < 8) throw new UsageError('--admin-token must be at least 8 characters');
  return { kind: 'config', config: deepFreeze(config) };
}

const FILE_KEYS: Record<string, string> = {
  listen: 'listen',
  http: 'http',
  'data-dir': 'dataDir',
  dataDir: 'dataDir',
  export: 'export',
  exports: 'export',
  'read-only': 'readOnly',
  readOnly: 'readOnly',
  'log-level': 'logLevel',
  logLevel: 'logLevel',
  'pmem-size': 'pmemSize',
  pmemSize: 'pmemSize',
  'pmem-dir': 'pmemDir',
  pmemDir: 'pmemDir',
  durability: 'durability',
  'cache-size': 'cacheSize',
  cacheSize: 'cacheSize',
  'write-bypass': 'writeBypass',
  writeBypass: 'writeBypass',
  'writeback-high': 'writebackHigh',
  writebackHigh: 'writebackHigh',
  'writeback-low': 'writebackLow',
  writebackLow: 'writebackLow',
  'writeback-max-age': 'writebackMaxAge',
  writebackMaxAge: 'writebackMaxAge',
  'node-id': 'nodeId',
  nodeId: 'nodeId',
  role: 'role',
  peer: 'peer',
  'peer-http': 'peerHttp',
  peerHttp: 'peerHttp',
  'peer-timeout': 'peerTimeout',
  peerTimeout: 'peerTimeout',
  'resync-rate': 'resyncRate',
  resyncRate: 'resyncRate',
  'busy-poll': 'busyPoll',
  busyPoll: 'busyPoll',
  'admin-token': 'adminToken',
  adminToken: 'adminToken',
};

/** Keys whose config-file value may be a JSON number (sizes in bytes, percentages, seconds). */
const NUMERIC_KEYS = new Set(['pmemSize', 'cacheSize', 'writeBypass', 'writebackHigh', 'writebackLow', 'writebackMaxAge', 'peerTimeout', 'resyncRate', 'busyPoll']);

/** Config-file values fill in what neither a flag nor the environment set. */
function applyConfigFile(cmd: Command, file: string): void {
  let parsed: unknown;
  try {
    parsed = JSON.parse(readFileSync(file, 'utf8'));
  } catch (err) {
    throw new UsageError(`cannot read config file ${file}: ${(err as Error).message}`);
  }
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
    throw new UsageError(`config file ${file} must hold a JSON object`);
  }
  for (const [key, value] of Object.entries(parsed as Record<string, unknown>)) {
    const attr = FILE_KEYS[key];
    if (attr === undefined) throw new UsageError(`config file ${file}: unknown key "${key}"`);
    const source = cmd.getOptionValueSource(attr);
    if (source === 'cli' || source === 'env') continue;
    let v: unknown = value;
    if (attr === 'export') {
      const list = Array.isArray(value) ? value : [value];
      if (!list.every((x) => typeof x === 'string')) throw new UsageError(`config file ${file}: "export" must be a list of "name=size" strings`);
      v = list;
    } else if (attr === 'readOnly') {
      if (typeof value !== 'boolean') throw new UsageError(`config file ${file}: "${key}" must be true or false`);
    } else if (typeof value === 'number' && NUMERIC_KEYS.has(attr)) {
      v = String(value);
    } else if (typeof value !== 'string') {
      throw new UsageError(`config file ${file}: "${key}" must be a string`);
    } else if (attr === 'logLevel' && !(LOG_LEVELS as readonly string[]).includes(value)) {
      throw new UsageError(`config file ${file}: "log-level" must be one of ${LOG_LEVELS.join(', ')}`);
    } else if (attr === 'durability' && value !== 'disk' && value !== 'pmem') {
      throw new UsageError(`config file ${file}: "durability" must be "disk" or "pmem"`);
    } else if (attr === 'role' && value !== 'primary' && value !== 'secondary') {
      throw new UsageError(`config file ${file}: "role" must be "primary" or "secondary"`);
    }
    cmd.setOptionValueWithSource(attr, v, 'config');
  }
}

function parseBool(v: unknown, what: string): boolean {
  if (typeof v === 'boolean') return v;
  // From the environment: NBDMIRROR_READ_ONLY=1/true/yes/0/false/no.
  const s = String(v).toLowerCase();
  if (['1', 'true', 'yes', 'on'].includes(s)) return true;
  if (['0', 'false', 'no', 'off', ''].includes(s)) return false;
  throw new UsageError(`invalid ${what} value "${String(v)}": use true or false`);
}

function defaultPmemDir(dataDir: string): string {
  return existsSync('/dev/shm') ? '/dev/shm' : dataDir;
}

function parsePercent(text: string, what: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*%?\s*$/.exec(text);
  const v = m ? Number(m[1]) : NaN;
  if (!(v >= 0 && v <= 100)) throw new UsageError(`invalid --${what} "${text}": use a percentage from 0 to 100`);
  return v / 100;
}

/** A duration in milliseconds (fractions allowed) from e.g. "100us", "500ms", "5s", "2m"; no unit means seconds. */
export function parseDuration(text: string, what: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m)?\s*$/.exec(text);
  if (!m) throw new UsageError(`invalid --${what} "${text}": use e.g. 500ms, 5s or 2m`);
  const unit = m[2] ?? 's';
  return Number(m[1]) * (unit === 'us' ? 0.001 : unit === 'ms' ? 1 : unit === 's' ? 1000 : 60_000);
}

function parseWriteback(high: string, low: string, maxAge: string): Config['writeback'] {
  const h = parsePercent(high, 'writeback-high');
  const l = parsePercent(low, 'writeback-low');
  if (l >= h) throw new UsageError(`--writeback-low (${low}) must be below --writeback-high (${high})`);
  const maxAgeMs = parseDuration(maxAge, 'writeback-max-age');
  if (maxAgeMs <= 0) throw new UsageError('--writeback-max-age must be positive');
  return { high: h, low: l, maxAgeMs };
}

export function parseExport(text: string): ExportConfig {
  const eq = text.indexOf('=');
  if (eq < 0) throw new UsageError(`invalid export "${text}": use NAME=SIZE, e.g. disk0=1G`);
  const name = text.slice(0, eq);
  if (!EXPORT_NAME.test(name)) {
    throw new UsageError(`invalid export name "${name}": use letters, digits, ".", "_" and "-" (at most 64, not starting with . _ -)`);
  }
  const size = parseSize(text.slice(eq + 1), `size of export ${name}`);
  if (size < 512) throw new UsageError(`export ${name}: size must be at least 512 bytes`);
  return { name, size };
}

/** --peer nbd://HOST:PORT and --peer-http http://HOST:PORT (default: the peer's host, port 9810). */
function parsePeer(peer: unknown, peerHttp: unknown): Config['peer'] {
  if (typeof peer !== 'string' || peer === '') {
    if (typeof peerHttp === 'string' && peerHttp !== '') throw new UsageError('--peer-http needs --peer');
    return null;
  }
  const m = /^nbd:\/\/(\[[0-9a-fA-F:.]+\]|[^:/\s]+)(?::(\d{1,5}))?\/?$/.exec(peer);
  const port = m?.[2] === undefined ? 10809 : Number(m[2]);
  if (!m || port < 1 || port > 65535) throw new UsageError(`invalid --peer "${peer}": use nbd://HOST:PORT, e.g. nbd://10.0.0.2:10809`);
  const host = m[1]!.replace(/^\[|\]$/g, '');
  let http = typeof peerHttp === 'string' && peerHttp !== '' ? peerHttp : `http://${m[1]}:9810`;
  try {
    const u = new URL(http);
    if (u.protocol !== 'http:' || u.pathname !== '/' || u.search !== '') throw new Error('not a base URL');
    http = `${u.protocol}//${u.host}`;
  } catch {
    throw new UsageError(`invalid --peer-http "${String(peerHttp)}": use http://HOST:PORT`);
  }
  return { nbd: { host, port }, http };
}

export function parseAddress(text: string, what: string): Address {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:\s]+)):(\d{1,5})$/.exec(text);
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) throw new UsageError(`invalid --${what} address "${text}": use HOST:PORT, e.g. 127.0.0.1:10809`);
  return { host: (m[1] ?? m[2])!, port };
}

/** 127.0.0.0/8, ::1 and localhost: addresses only this machine can reach. */
export function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host);
}

export function formatAddress(a: Address): string {
  return a.host.includes(':') ? `[${a.host}]:${a.port}` : `${a.host}:${a.port}`;
}

function deepFreeze<T>(o: T): T {
  if (o !== null && typeof o === 'object') {
    for (const v of Object.values(o)) deepFreeze(v);
    Object.freeze(o);
  }
  return o;
}
