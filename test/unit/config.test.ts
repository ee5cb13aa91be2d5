// lib/config.ts: loadConfig(argv, env) — defaults, each flag, each NBDMIRROR_* variable, the JSON config file,
// precedence flags > env > file > defaults, --help, a UsageError with a clear message for every bad input, and a
// deeply frozen result. The environment is always passed in; process.env must come back untouched.

import t from 'tap';
import { existsSync } from 'node:fs';
import type { Test } from 'tap';
import * as path from 'node:path';
import { writeFileSync } from 'node:fs';
import { type Config, DEFAULTS, formatAddress, loadConfig, parseAddress, parseExport } from '../../lib/config';
import { UsageError } from '../../lib/errors';

const GiB = 2 ** 30;
const MiB = 2 ** 20;

function config(argv: string[], env: NodeJS.ProcessEnv = {}): Config {
  const r = loadConfig(argv, env);
  if (r.kind !== 'config') throw new Error(`expected a config, got ${r.kind}`);
  return r.config;
}

/** The UsageError loadConfig throws; fails the test if it returns or throws anything else. */
function usageError(t: Test, argv: string[], env: NodeJS.ProcessEnv = {}): string {
  try {
    loadConfig(argv, env);
  } catch (err) {
    t.ok(err instanceof UsageError, `${JSON.stringify(argv)}: a UsageError (got ${(err as Error).name})`);
    const msg = (err as Error).message;
    t.notMatch(msg, /^error:/, 'no commander "error:" prefix');
    t.notMatch(msg, /\n/, 'one line');
    return msg;
  }
  t.fail(`${JSON.stringify(argv)} ${JSON.stringify(env)} should have thrown`);
  return '';
}

function writeJson(dir: string, name: string, value: unknown): string {
  const file = path.join(dir, name);
  writeFileSync(file, typeof value === 'string' ? value : JSON.stringify(value));
  return file;
}

t.test('defaults', async (t) => {
  const c = config([]);
  t.same(c, {
    listen: { host: '127.0.0.1', port: 10809 },
    http: { host: '127.0.0.1', port: 9810 },
    dataDir: './data',
    exports: [{ name: 'disk0', size: GiB }],
    readOnly: false,
    logLevel: 'info',
    configFile: null,
    pmemSize: 256 * MiB,
    pmemDir: existsSync('/dev/shm') ? '/dev/shm' : './data',
    durability: 'disk',
    cacheSize: 64 * MiB,
    writeBypass: 256 * 1024,
    writeback: { high: 0.5, low: 0.25, maxAgeMs: 5000 },
    nodeId: null,
    role: null,
    peer: null,
    peerTimeoutMs: 5000,
    resyncRate: 0,
    busyPollMs: 0.1,
    adminToken: null,
  });
  t.equal(DEFAULTS.export, 'disk0=1G');
});

t.test('replication flags', async (t) => {
  const c = config(['--node-id', 'node-a', '--role', 'primary', '--peer', 'nbd://10.0.0.2:10809', '--peer-timeout', '750ms', '--resync-rate', '100M']);
  t.equal(c.nodeId, 'node-a');
  t.equal(c.role, 'primary');
  t.same(c.peer, { nbd: { host: '10.0.0.2', port: 10809 }, http: 'http://10.0.0.2:9810' }, '--peer-http defaults to the peer host, port 9810');
  t.equal(c.peerTimeoutMs, 750);
  t.equal(c.resyncRate, 100 * MiB);
  t.same(config(['--peer', 'nbd://[::1]:7000', '--peer-http', 'http://[::1]:7001/']).peer, { nbd: { host: '::1', port: 7000 }, http: 'http://[::1]:7001' });
  t.equal(config(['--peer', 'nbd://peer']).peer?.nbd.port, 10809, 'default NBD port');
  t.equal(config([], { NBDMIRROR_ROLE: 'secondary' }).role, 'secondary', 'from the environment');
  for (const [args, re] of [
    [['--role', 'leader'], /role/],
    [['--peer', 'http://x:1'], /invalid --peer/],
    [['--peer', 'nbd://x:99999'], /invalid --peer/],
    [['--peer-http', 'http://x:1'], /--peer-http needs --peer/],
    [['--peer', 'nbd://x:1', '--peer-http', 'ftp://x'], /invalid --peer-http/],
    [['--peer-timeout', '10ms'], /at least 50ms/],
    [['--resync-rate', 'fast'], /resync-rate/],
  ] as Array<[string[], RegExp]>) {
    t.throws(() => config(args), re, args.join(' '));
  }
});

t.test('--busy-poll: a duration down to microseconds, 0 turns it off, at most 10ms', async (t) => {
  t.equal(config(['--busy-poll', '0']).busyPollMs, 0, 'off');
  t.equal(config(['--busy-poll', '50us']).busyPollMs, 0.05);
  t.equal(config(['--busy-poll', '2ms']).busyPollMs, 2);
  t.equal(config(['--busy-poll', '10ms']).busyPollMs, 10, 'the bound itself');
  t.equal(config([], { NBDMIRROR_BUSY_POLL: '300us' }).busyPollMs, 0.3, 'from the environment');
  t.equal(config(['--config', writeJson(t.testdir(), 'off.json', { busyPoll: 0 })]).busyPollMs, 0, 'a JSON number in the config file');
  t.match(usageError(t, ['--busy-poll', '11ms']), /--busy-poll must be at most 10ms/);
  t.match(usageError(t, ['--busy-poll', '1']), /at most 10ms/, 'no unit means seconds');
  t.match(usageError(t, ['--busy-poll', '-5us']), /invalid --busy-poll "-5us"/);
  t.match(usageError(t, ['--busy-poll', '5ns']), /invalid --busy-poll/);
});

t.test('--admin-token: required off loopback, at least 8 characters', async (t) => {
  t.equal(config([]).adminToken, null, 'none by default (loopback HTTP)');
  t.equal(config(['--admin-token', 'sekrit-token']).adminToken, 'sekrit-token');
  t.equal(config([], { NBDMIRROR_ADMIN_TOKEN: 'from-the-env' }).adminToken, 'from-the-env', 'from the environment');
  t.equal(config(['--http', '0.0.0.0:9810', '--admin-token', 'sekrit-token']).http.host, '0.0.0.0', 'any address with a token');
  for (const host of ['127.0.0.2', 'localhost', '[::1]']) t.equal(config(['--http', `${host}:9810`]).adminToken, null, `${host} is loopback: no token needed`);
  t.match(usageError(t, ['--http', '0.0.0.0:9810']), /not on loopback: set --admin-token/);
  t.match(usageError(t, ['--http', '10.1.2.3:9810']), /NBDMIRROR_ADMIN_TOKEN/);
  t.match(usageError(t, ['--admin-token', 'short']), /at least 8 characters/);
});

t.test('storage engine flags', async (t) => {
  const c = config([
    '--pmem-size', '64M', '--pmem-dir', '/mnt/pmem', '--durability', 'pmem', '--cache-size', '0',
    '--writeback-high', '80', '--writeback-low', '10%', '--writeback-max-age', '250ms',
  ]);
  t.equal(c.pmemSize, 64 * MiB);
  t.equal(c.pmemDir, '/mnt/pmem');
  t.equal(c.durability, 'pmem');
  t.equal(c.cacheSize, 0);
  t.same(c.writeback, { high: 0.8, low: 0.1, maxAgeMs: 250 });
  t.equal(config(['--writeback-max-age', '2m']).writeback.maxAgeMs, 120_000);
  t.equal(config(['--writeback-max-age', '3']).writeback.maxAgeMs, 3000, 'plain number = seconds');
  t.equal(config(['--pmem-dir', '/x'], { NBDMIRROR_DURABILITY: 'pmem' }).durability, 'pmem', 'from the environment');
  for (const [args, re] of [
    [['--durability', 'ram'], /durability/],
    [['--pmem-size', 'lots'], /invalid --pmem-size/],
    [['--writeback-high', '150'], /percentage/],
    [['--writeback-low', '60', '--writeback-high', '50'], /must be below/],
    [['--writeback-max-age', 'soon'], /e.g. 500ms/],
    [['--cache-size', '-1'], /invalid --cache-size/],
  ] as Array<[string[], RegExp]>) {
    t.throws(() => config(args), re, args.join(' '));
  }
});

t.test('each flag', async (t) => {
  t.same(config(['--listen', '0.0.0.0:10810']).listen, { host: '0.0.0.0', port: 10810 });
  t.same(config(['--listen=[::1]:0']).listen, { host: '::1', port: 0 }, 'IPv6 in brackets, port 0');
  t.same(config(['--listen', 'localhost:65535']).listen, { host: 'localhost', port: 65535 });
  t.same(config(['--http', '127.0.0.1:0']).http, { host: '127.0.0.1', port: 0 });
  t.equal(config(['--data-dir', '/var/lib/nbd']).dataDir, '/var/lib/nbd');
  t.same(config(['--export', 'a=1M']).exports, [{ name: 'a', size: MiB }]);
  t.same(config(['--export', 'a=1M', '--export', 'b.2_x-y=4096']).exports, [
    { name: 'a', size: MiB },
    { name: 'b.2_x-y', size: 4096 },
  ], 'repeatable, in order');
  t.same(config(['--export', 'a=1M,b=2M']).exports, [{ name: 'a', size: MiB }, { name: 'b', size: 2 * MiB }], 'comma-separated');
  t.equal(config(['--read-only']).readOnly, true);
  for (const level of ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']) {
    t.equal(config(['--log-level', level]).logLevel, level, `log level ${level}`);
  }
});

t.test('each NBDMIRROR_* variable', async (t) => {
  t.same(config([], { NBDMIRROR_LISTEN: '10.0.0.1:1' }).listen, { host: '10.0.0.1', port: 1 });
  t.same(config([], { NBDMIRROR_HTTP: '10.0.0.1:2', NBDMIRROR_ADMIN_TOKEN: 'env-token' }).http, { host: '10.0.0.1', port: 2 });
  t.equal(config([], { NBDMIRROR_DATA_DIR: '/srv/d' }).dataDir, '/srv/d');
  t.same(config([], { NBDMIRROR_EXPORT: 'x=1M' }).exports, [{ name: 'x', size: MiB }]);
  t.same(config([], { NBDMIRROR_EXPORT: 'x=1M, y=2G ,z=512' }).exports, [
    { name: 'x', size: MiB },
    { name: 'y', size: 2 * GiB },
    { name: 'z', size: 512 },
  ], 'comma-separated, blanks trimmed');
  t.equal(config([], { NBDMIRROR_LOG_LEVEL: 'debug' }).logLevel, 'debug');
  for (const v of ['1', 'true', 'TRUE', 'yes', 'on']) t.equal(config([], { NBDMIRROR_READ_ONLY: v }).readOnly, true, `READ_ONLY=${v}`);
  for (const v of ['0', 'false', 'no', 'off', '']) t.equal(config([], { NBDMIRROR_READ_ONLY: v }).readOnly, false, `READ_ONLY=${v}`);
  t.match(usageError(t, [], { NBDMIRROR_READ_ONLY: 'maybe' }), /read-only.*"maybe"/);
  t.equal(config([], { NBDMIRROR_UNRELATED: 'x', PATH: '/bin' }).listen.port, 10809, 'other variables are ignored');
});

t.test('the config file', async (t) => {
  const dir = t.testdir();

  t.test('kebab-case keys', async (t) => {
    const file = writeJson(dir, 'kebab.json', {
      listen: '0.0.0.0:1',
      http: '0.0.0.0:2',
      'data-dir': '/d',
      export: ['f=2M', 'g=1G'],
      'read-only': true,
      'log-level': 'warn',
      'pmem-size': 268435456,
      'pmem-dir': '/p',
      durability: 'pmem',
      'cache-size': '1M',
      'write-bypass': '1M',
      'writeback-high': 90,
      'writeback-low': '5',
      'writeback-max-age': '1s',
      'busy-poll': '250us',
      'admin-token': 'file-token',
    });
    t.same(config(['--config', file]), {
      listen: { host: '0.0.0.0', port: 1 },
      http: { host: '0.0.0.0', port: 2 },
      dataDir: '/d',
      exports: [{ name: 'f', size: 2 * MiB }, { name: 'g', size: GiB }],
      readOnly: true,
      logLevel: 'warn',
      configFile: file,
      pmemSize: 256 * MiB,
      pmemDir: '/p',
      durability: 'pmem',
      cacheSize: MiB,
      writeBypass: MiB,
      writeback: { high: 0.9, low: 0.05, maxAgeMs: 1000 },
      nodeId: null,
      role: null,
      peer: null,
      peerTimeoutMs: 5000,
      resyncRate: 0,
      busyPollMs: 0.25,
      adminToken: 'file-token',
    });
    t.throws(() => config(['--config', writeJson(dir, 'bad-dur.json', { durability: 'ram' })]), /"durability" must be/);
    t.throws(() => config(['--config', writeJson(dir, 'bad-role.json', { role: 'boss' })]), /"role" must be/);
    const rep = config(['--config', writeJson(dir, 'rep.json', { 'node-id': 'n1', role: 'secondary', peer: 'nbd://p:1', 'peer-http': 'http://p:2', 'peer-timeout': 2, 'resync-rate': '1M' })]);
    t.same([rep.nodeId, rep.role, rep.peer, rep.peerTimeoutMs, rep.resyncRate], ['n1', 'secondary', { nbd: { host: 'p', port: 1 }, http: 'http://p:2' }, 2000, MiB]);
  });

  t.test('camelCase keys, "exports", a single export string', async (t) => {
    const file = writeJson(dir, 'camel.json', { dataDir: '/c', readOnly: false, logLevel: 'error', exports: 'one=1M' });
    const c = config(['--config', file]);
    t.equal(c.dataDir, '/c');
    t.equal(c.readOnly, false);
    t.equal(c.logLevel, 'error');
    t.same(c.exports, [{ name: 'one', size: MiB }]);
  });

  t.test('NBDMIRROR_CONFIG names the file', async (t) => {
    const file = writeJson(dir, 'env.json', { 'data-dir': '/from-file' });
    const c = config([], { NBDMIRROR_CONFIG: file });
    t.equal(c.dataDir, '/from-file');
    t.equal(c.configFile, file);
  });

  t.test('an empty object changes nothing', async (t) => {
    const file = writeJson(dir, 'empty.json', {});
    t.same({ ...config(['--config', file]), configFile: null }, config([]));
  });

  t.test('bad files', async (t) => {
    const missing = path.join(dir, 'missing.json');
    t.match(usageError(t, ['--config', missing]), new RegExp(`cannot read config file ${missing.replace(/[.]/g, '\\.')}`));
    t.match(usageError(t, ['--config', writeJson(dir, 'broken.json', '{"listen": ')]), /cannot read config file .*broken\.json/);
    t.match(usageError(t, ['--config', writeJson(dir, 'array.json', [1])]), /must hold a JSON object/);
    t.match(usageError(t, ['--config', writeJson(dir, 'null.json', 'null')]), /must hold a JSON object/);
    t.match(usageError(t, ['--config', writeJson(dir, 'str.json', '"x"')]), /must hold a JSON object/);
    t.match(usageError(t, ['--config', writeJson(dir, 'unknown.json', { lissen: '1.2.3.4:5' })]), /unknown key "lissen"/);
    t.match(usageError(t, ['--config', writeJson(dir, 'config.json', { config: 'other.json' })]), /unknown key "config"/);
    t.match(usageError(t, ['--config', writeJson(dir, 'port.json', { listen: 10809 })]), /"listen" must be a string/);
    t.match(usageError(t, ['--config', writeJson(dir, 'dd.json', { 'data-dir': ['a'] })]), /"data-dir" must be a string/);
    t.match(usageError(t, ['--config', writeJson(dir, 'ro.json', { 'read-only': 'yes' })]), /"read-only" must be true or false/);
    t.match(usageError(t, ['--config', writeJson(dir, 'ro2.json', { readOnly: 1 })]), /"readOnly" must be true or false/);
    t.match(usageError(t, ['--config', writeJson(dir, 'exp.json', { export: [1] })]), /"export" must be a list of "name=size" strings/);
    t.match(usageError(t, ['--config', writeJson(dir, 'exp2.json', { exports: { a: 1 } })]), /"export" must be a list/);
    t.match(usageError(t, ['--config', writeJson(dir, 'lvl.json', { 'log-level': 'loud' })]), /"log-level" must be one of fatal, error, warn, info, debug, trace, silent/);
    t.match(usageError(t, ['--config', writeJson(dir, 'lvl2.json', { logLevel: 3 })]), /"logLevel" must be a string/);
    t.match(usageError(t, ['--config', writeJson(dir, 'badexp.json', { export: ['nosize'] })]), /invalid export "nosize"/);
    t.match(usageError(t, ['--config', writeJson(dir, 'badaddr.json', { http: 'nowhere' })]), /invalid --http address "nowhere"/);
    t.match(usageError(t, ['--config', writeJson(dir, 'noexp.json', { export: [] })]), /no export given/);
    t.match(usageError(t, ['--config', writeJson(dir, 'nodir.json', { 'data-dir': '' })]), /--data-dir must not be empty/);
  });
});

t.test('precedence: flags > env > file > defaults', async (t) => {
  const dir = t.testdir();
  const file = writeJson(dir, 'all.json', {
    listen: '1.1.1.1:1',
    http: '1.1.1.1:2',
    'data-dir': '/file',
    export: ['file=1M'],
    'read-only': true,
    'log-level': 'warn',
    'admin-token': 'file-token',
  });
  const env = {
    NBDMIRROR_LISTEN: '2.2.2.2:1',
    NBDMIRROR_HTTP: '2.2.2.2:2',
    NBDMIRROR_DATA_DIR: '/env',
    NBDMIRROR_EXPORT: 'env=2M',
    NBDMIRROR_READ_ONLY: '0',
    NBDMIRROR_LOG_LEVEL: 'debug',
  };
  const flags = ['--listen', '3.3.3.3:1', '--http', '3.3.3.3:2', '--data-dir', '/flag', '--export', 'flag=3M', '--log-level', 'trace'];

  const fileOnly = config(['--config', file]);
  t.same([fileOnly.listen.host, fileOnly.http.host, fileOnly.dataDir, fileOnly.exports[0]?.name, fileOnly.readOnly, fileOnly.logLevel],
    ['1.1.1.1', '1.1.1.1', '/file', 'file', true, 'warn'], 'file beats defaults');

  const envOverFile = config(['--config', file], env);
  t.same([envOverFile.listen.host, envOverFile.http.host, envOverFile.dataDir, envOverFile.exports[0]?.name, envOverFile.readOnly, envOverFile.logLevel],
    ['2.2.2.2', '2.2.2.2', '/env', 'env', false, 'debug'], 'env beats the file (NBDMIRROR_READ_ONLY=0 beats "read-only": true)');

  const flagsOverAll = config([...flags, '--config', file], env);
  t.same([flagsOverAll.listen.host, flagsOverAll.http.host, flagsOverAll.dataDir, flagsOverAll.exports, flagsOverAll.logLevel],
    ['3.3.3.3', '3.3.3.3', '/flag', [{ name: 'flag', size: 3 * MiB }], 'trace'], 'flags beat env and file');
  t.equal(flagsOverAll.exports.length, 1, 'flag exports replace env exports rather than adding to them');

  t.equal(config(['--read-only'], { NBDMIRROR_READ_ONLY: 'false' }).readOnly, true, '--read-only beats the env');
  const partial = config(['--config', file], { NBDMIRROR_DATA_DIR: '/env' });
  t.equal(partial.dataDir, '/env', 'per key: env for data-dir');
  t.equal(partial.listen.host, '1.1.1.1', 'per key: file for listen');
  t.equal(config(['--config', writeJson(dir, 'ro-false.json', { 'read-only': false })], { NBDMIRROR_READ_ONLY: '1' }).readOnly, true);
});

t.test('--help', async (t) => {
  for (const flag of ['--help', '-h']) {
    const r = loadConfig([flag], {});
    if (r.kind !== 'help') throw new Error('expected help');
    for (const f of ['--config', '--listen', '--http', '--data-dir', '--export', '--read-only', '--log-level', '--help']) {
      t.match(r.text, f, `${flag} mentions ${f}`);
    }
    for (const v of ['NBDMIRROR_CONFIG', 'NBDMIRROR_LISTEN', 'NBDMIRROR_EXPORT', 'NBDMIRROR_READ_ONLY', 'NBDMIRROR_LOG_LEVEL']) {
      t.match(r.text, v, `${flag} mentions ${v}`);
    }
    t.match(r.text, /Usage: nbdmirror-server/);
  }
  const r = loadConfig(['--listen', 'bogus', '--help'], {});
  t.equal(r.kind, 'help', '--help wins over a bad value elsewhere');
});

t.test('bad input: one clear UsageError each', async (t) => {
  const cases: [string[], NodeJS.ProcessEnv, RegExp][] = [
    [['--listen', 'localhost'], {}, /invalid --listen address "localhost": use HOST:PORT/],
    [['--listen', ':10809'], {}, /invalid --listen address/],
    [['--listen', 'host:'], {}, /invalid --listen address/],
    [['--listen', 'host:65536'], {}, /invalid --listen address "host:65536"/],
    [['--listen', 'host:123456'], {}, /invalid --listen address/],
    [['--listen', '::1:10809'], {}, /invalid --listen address/],
    [['--http', 'a b:1'], {}, /invalid --http address/],
    [[], { NBDMIRROR_HTTP: 'x' }, /invalid --http address "x"/],
    [['--export', 'disk0'], {}, /invalid export "disk0": use NAME=SIZE/],
    [['--export', '=1G'], {}, /invalid export name ""/],
    [['--export', '.hidden=1G'], {}, /invalid export name ".hidden"/],
    [['--export', '../x=1G'], {}, /invalid export name/],
    [['--export', 'a/b=1G'], {}, /invalid export name "a\/b"/],
    [['--export', `${'a'.repeat(65)}=1G`], {}, /invalid export name/],
    [['--export', 'a=1Q'], {}, /invalid size of export a "1Q"/],
    [['--export', 'a=511'], {}, /export a: size must be at least 512 bytes/],
    [['--export', 'a=8P'], {}, /too large/],
    [['--export', 'a=1M', '--export', 'a=2M'], {}, /export "a" is given twice/],
    [[], { NBDMIRROR_EXPORT: 'a=1M,a=1M' }, /export "a" is given twice/],
    [[], { NBDMIRROR_EXPORT: 'bad' }, /invalid export "bad"/],
    [['--log-level', 'loud'], {}, /loud.*Allowed choices are fatal, error, warn, info, debug, trace, silent/],
    [[], { NBDMIRROR_LOG_LEVEL: 'loud' }, /loud/],
    [['--bogus'], {}, /unknown option '--bogus'/],
    [['extra'], {}, /too many arguments/],
    [['--listen'], {}, /option '--listen <host:port>' argument missing/],
    [['--data-dir'], {}, /argument missing/],
    [['--data-dir', ''], {}, /--data-dir must not be empty/],
    [[], { NBDMIRROR_DATA_DIR: '' }, /--data-dir must not be empty/],
    [['--export', ','], {}, /no export given: use --export NAME=SIZE/],
    [[], { NBDMIRROR_EXPORT: '' }, /no export given/],
    [[], { NBDMIRROR_EXPORT: ' , ' }, /no export given/],
  ];
  for (const [argv, env, re] of cases) t.match(usageError(t, argv, env), re, `${JSON.stringify(argv)} ${JSON.stringify(env)}`);
  t.equal(parseExport('a=512').size, 512, 'exactly 512 bytes is allowed');
  t.equal(parseExport(`${'a'.repeat(64)}=1M`).name.length, 64, 'a 64-character name is allowed');
});

t.test('process.env is restored, also after an error', async (t) => {
  const before = process.env;
  config([], { NBDMIRROR_DATA_DIR: '/x' });
  t.equal(process.env, before, 'after success');
  usageError(t, ['--listen', 'bad'], { NBDMIRROR_DATA_DIR: '/x' });
  t.equal(process.env, before, 'after a UsageError');
  loadConfig(['--help'], {});
  t.equal(process.env, before, 'after --help');
  t.equal(process.env.NBDMIRROR_DATA_DIR, before.NBDMIRROR_DATA_DIR, 'nothing leaked into the real environment');
});

t.test('the config is frozen all the way down', async (t) => {
  const c = config(['--export', 'a=1M,b=2M']);
  t.ok(Object.isFrozen(c));
  t.ok(Object.isFrozen(c.listen));
  t.ok(Object.isFrozen(c.http));
  t.ok(Object.isFrozen(c.exports));
  t.ok(c.exports.every((e) => Object.isFrozen(e)));
  t.throws(() => {
    (c as { dataDir: string }).dataDir = '/elsewhere';
  }, TypeError, 'assignment throws in strict mode');
  t.throws(() => (c.exports as ExportsMutable).push({ name: 'c', size: 1 }), TypeError);
  t.equal(c.dataDir, './data');
  const again = config([]);
  t.not(again.exports, c.exports, 'each call builds a fresh config');
});
type ExportsMutable = { name: string; size: number }[];

t.test('parseAddress and formatAddress round-trip', async (t) => {
  for (const text of ['127.0.0.1:10809', '[::1]:0', 'example.com:80', '[fe80::1]:65535']) {
    t.equal(formatAddress(parseAddress(text, 'listen')), text, text);
  }
});
