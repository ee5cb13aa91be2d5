// One typed, frozen Config built once from flags > NBDMIRROR_* environment > config file > defaults.
// Every problem is a UsageError with one clear line; server.ts turns it into exit code 2.

import { readFileSync } from 'node:fs';
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

export interface Config {
  listen: Address;
  http: Address;
  dataDir: string;
  exports: readonly ExportConfig[];
  readOnly: boolean;
  logLevel: LogLevel;
  configFile: string | null;
}

export const DEFAULTS = {
  listen: '127.0.0.1:10809',
  http: '127.0.0.1:9810',
  dataDir: './data',
  export: 'disk0=1G',
  logLevel: 'info' as LogLevel,
};

/** Export names become file names (NAME.img), so they are restricted to a safe set. */
const EXPORT_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

/** What `nbdmirror-server --help` prints and what loadConfig parses. */
export function serverCommand(): Command {
  return new Command('nbdmirror-server')
    .description('Replicated NBD server (nbdmirror). Every flag is also a config-file key and an NBDMIRROR_* variable.')
    .addOption(new Option('--config <file>', 'JSON config file whose keys are the long flag names').env('NBDMIRROR_CONFIG'))
    .addOption(new Option('--listen <host:port>', 'NBD listen address').default(DEFAULTS.listen).env('NBDMIRROR_LISTEN'))
    .addOption(new Option('--http <host:port>', 'HTTP address for /healthz (port 0 picks a free one)').default(DEFAULTS.http).env('NBDMIRROR_HTTP'))
    .addOption(new Option('--data-dir <dir>', 'directory for backing files').default(DEFAULTS.dataDir).env('NBDMIRROR_DATA_DIR'))
    .addOption(
      new Option('--export <name=size>', `export to serve, created if absent; repeatable, comma-separated in the env (default: "${DEFAULTS.export}")`)
        .argParser(collectExports)
        .env('NBDMIRROR_EXPORT'),
    )
    .addOption(new Option('--read-only', 'serve every export read-only').default(false).env('NBDMIRROR_READ_ONLY'))
    .addOption(new Option('--log-level <level>', 'log level').choices(LOG_LEVELS).default(DEFAULTS.logLevel).env('NBDMIRROR_LOG_LEVEL'))
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
  };
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
};

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
    } else if (typeof value !== 'string') {
      throw new UsageError(`config file ${file}: "${key}" must be a string`);
    } else if (attr === 'logLevel' && !(LOG_LEVELS as readonly string[]).includes(value)) {
      throw new UsageError(`config file ${file}: "log-level" must be one of ${LOG_LEVELS.join(', ')}`);
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

export function parseAddress(text: string, what: string): Address {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:\s]+)):(\d{1,5})$/.exec(text);
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) throw new UsageError(`invalid --${what} address "${text}": use HOST:PORT, e.g. 127.0.0.1:10809`);
  return { host: (m[1] ?? m[2])!, port };
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
