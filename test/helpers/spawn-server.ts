// Spawn the BUILT server (dist/server.js) as a child process for black-box tests: port 0 for NBD and HTTP,
// wait (bounded) for its "listening" log line, and parse the ports from it. t.teardown kills the process by
// PID (SIGKILL if it is still alive) even when the test fails, and prints the server's log tail then.
// Build first: `npx tsc -p .` (the tests run against dist/, never against lib/ directly).

import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync } from 'node:fs';
import * as path from 'node:path';

export const SERVER_JS = path.resolve(__dirname, '..', '..', 'dist', 'server.js');

/** How long the server may take to print "listening" (ms). */
const READY_TIMEOUT_MS = 15_000;
/** How long stop() waits after SIGTERM before it gives up and SIGKILLs (ms). */
const STOP_TIMEOUT_MS = 20_000;
/** Server output kept for diagnostics (characters; older output is dropped). */
const MAX_LOG_CHARS = 4 * 1024 * 1024;

/** The parts of a tap Test this helper uses. */
export interface TapLike {
  testdir(): string;
  readonly testdirName: string;
  teardown(fn: () => unknown): void;
  passing?(): boolean;
}

const madeTestdir = new WeakSet<object>();

/** Servers still running. If the test process exits without its teardowns (e.g. a crash), kill them. */
const live = new Set<number>();
process.on('exit', () => {
  for (const pid of live) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
});

/**
 * The test's fixture directory, created once. t.testdir() wipes the directory on every call, so black-box
 * tests call this instead (it never wipes what an earlier call, or a running server, put there).
 */
export function scratchDir(t: TapLike): string {
  if (madeTestdir.has(t)) return t.testdirName;
  const dir = t.testdir();
  madeTestdir.add(t);
  return dir;
}

/** A fresh, empty directory under the test's fixture directory. */
export function freshDir(t: TapLike, prefix: string): string {
  return mkdtempSync(path.join(scratchDir(t), `${prefix}-`));
}

export interface StartOptions {
  /** Extra server flags. --listen/--http default to 127.0.0.1:0 and --data-dir to dataDir unless given here. */
  args?: readonly string[];
  dataDir?: string;
  /** Extra environment for the server (merged over process.env). */
  env?: NodeJS.ProcessEnv;
  /** Working directory of the server process (default: the test's). */
  cwd?: string;
  /** Pass args exactly as given: no --listen/--http/--data-dir defaults (to test the server's own defaults). */
  bare?: boolean;
}

export interface ExitStatus {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface ServerProcess {
  readonly pid: number;
  readonly nbdPort: number;
  readonly httpPort: number;
  readonly dataDir: string;
  /** nbd://127.0.0.1:PORT/NAME; without a name the URI selects the default export (""). */
  uri(exportName?: string): string;
  /** SIGTERM, then wait for the exit (SIGKILL after STOP_TIMEOUT_MS). */
  stop(): Promise<ExitStatus>;
  /** SIGKILL and wait for the exit. */
  kill(): Promise<void>;
  /** Wait for the process to exit by itself (after a signal the test sent); rejects after ms. */
  waitExit(ms?: number): Promise<ExitStatus>;
  /** Everything the server printed so far (stdout and stderr interleaved, bounded). */
  logs(): string;
  /** The last n lines of logs(), for assertion messages. */
  logTail(n?: number): string;
  /**
   * Wait (bounded, default 5 s) until the logs match: the server logs asynchronously, so a line about a
   * client that has already exited may arrive a little later. Resolves false on timeout.
   */
  waitForLog(match: RegExp | ((logs: string) => boolean), ms?: number): Promise<boolean>;
  readonly exited: boolean;
}

/** Value of --flag VALUE or --flag=VALUE in args, if present. */
function flagValue(args: readonly string[], flag: string): string | undefined {
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === flag) return args[i + 1];
    if (a.startsWith(`${flag}=`)) return a.slice(flag.length + 1);
  }
  return undefined;
}

function parsePort(addr: unknown, what: string): number {
  if (typeof addr !== 'string') throw new Error(`"listening" line has no ${what} address`);
  const port = Number(addr.slice(addr.lastIndexOf(':') + 1));
  if (!Number.isInteger(port) || port <= 0 || port > 65535) throw new Error(`bad ${what} address "${addr}"`);
  return port;
}

export async function startServer(t: TapLike, opts: StartOptions = {}): Promise<ServerProcess> {
  if (!existsSync(SERVER_JS)) throw new Error(`${SERVER_JS} is missing: run \`npx tsc -p .\` before the black-box tests`);
  const extra = opts.args ?? [];
  const args: string[] = [SERVER_JS];
  const bare = opts.bare === true;
  if (!bare && flagValue(extra, '--listen') === undefined) args.push('--listen', '127.0.0.1:0');
  if (!bare && flagValue(extra, '--http') === undefined) args.push('--http', '127.0.0.1:0');
  let dataDir = flagValue(extra, '--data-dir');
  if (bare) {
    dataDir ??= opts.dataDir ?? path.resolve(opts.cwd ?? process.cwd(), 'data');
  } else if (dataDir === undefined) {
    dataDir = opts.dataDir ?? freshDir(t, 'data');
    mkdirSync(dataDir, { recursive: true });
    args.push('--data-dir', dataDir);
  }
  // Keep the pmem region with the data (not in the shared /dev/shm), so restarts of this data dir recover
  // from it and tap's fixture cleanup removes it.
  if (!bare && flagValue(extra, '--pmem-dir') === undefined && opts.env?.NBDMIRROR_PMEM_DIR === undefined) {
    args.push('--pmem-dir', path.join(dataDir, 'pmem'));
  }
  // A small region unless a test asks otherwise: it is preallocated at every start, and tests start many.
  if (!bare && flagValue(extra, '--pmem-size') === undefined && opts.env?.NBDMIRROR_PMEM_SIZE === undefined) {
    args.push('--pmem-size', '16M');
  }
  args.push(...extra);

  const child: ChildProcess = spawn(process.execPath, args, {
    env: { ...process.env, ...opts.env },
    cwd: opts.cwd,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const pid = child.pid;
  if (pid === undefined) {
    const err = await new Promise<Error>((resolve) => child.once('error', resolve));
    throw new Error(`cannot spawn the server: ${err.message}`);
  }

  live.add(pid);
  let output = '';
  const append = (s: string): void => {
    output += s;
    if (output.length > MAX_LOG_CHARS) output = output.slice(-MAX_LOG_CHARS / 2);
  };
  let status: ExitStatus | null = null;
  const exited = new Promise<ExitStatus>((resolve) => {
    child.once('exit', (code, signal) => {
      live.delete(pid);
      status = { code, signal };
      resolve(status);
    });
  });
  const waitExit = async (ms: number): Promise<ExitStatus | null> => {
    if (status !== null) return status;
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<null>((resolve) => (timer = setTimeout(() => resolve(null), ms)));
    try {
      return await Promise.race([exited, timeout]);
    } finally {
      clearTimeout(timer);
    }
  };
  const signal = (sig: NodeJS.Signals): void => {
    if (status !== null) return;
    try {
      process.kill(pid, sig);
    } catch {
      // already gone
    }
  };
  const logs = (): string => output;
  const logTail = (n = 40): string => output.split('\n').slice(-n - 1).join('\n');

  // Registered before anything can fail, so the process never outlives the test.
  t.teardown(async () => {
    if (status === null) {
      signal('SIGKILL');
      await waitExit(10_000);
    }
    if (t.passing && !t.passing()) {
      process.stderr.write(`--- nbdmirror-server (pid ${pid}) output, last lines:\n${logTail(60)}\n`);
    }
  });

  // Wait for the "listening" line (one JSON object per line on stdout).
  const ready = new Promise<{ nbd: number; http: number }>((resolve, reject) => {
    let pending = '';
    const timer = setTimeout(() => reject(new Error(`server did not print "listening" within ${READY_TIMEOUT_MS} ms`)), READY_TIMEOUT_MS);
    child.stdout!.setEncoding('utf8');
    child.stderr!.setEncoding('utf8');
    child.stderr!.on('data', (s: string) => append(s));
    child.stdout!.on('data', (s: string) => {
      append(s);
      pending += s;
      let nl: number;
      while ((nl = pending.indexOf('\n')) >= 0) {
        const line = pending.slice(0, nl);
        pending = pending.slice(nl + 1);
        if (!line.includes('"listening"')) continue;
        try {
          const rec = JSON.parse(line) as Record<string, unknown>;
          if (rec.msg !== 'listening') continue;
          clearTimeout(timer);
          resolve({ nbd: parsePort(rec.nbd, 'nbd'), http: parsePort(rec.http, 'http') });
        } catch (err) {
          clearTimeout(timer);
          reject(err as Error);
        }
      }
    });
    void exited.then((s) => {
      clearTimeout(timer);
      reject(new Error(`server exited before listening (code ${s.code}, signal ${s.signal})`));
    });
  });

  let ports: { nbd: number; http: number };
  try {
    ports = await ready;
  } catch (err) {
    signal('SIGKILL');
    await waitExit(10_000);
    throw new Error(`${(err as Error).message}\n$ node ${args.join(' ')}\n--- server output:\n${logTail(60)}`);
  }

  const dir = dataDir;
  return {
    pid,
    nbdPort: ports.nbd,
    httpPort: ports.http,
    dataDir: dir,
    uri: (exportName?: string) => `nbd://127.0.0.1:${ports.nbd}${exportName === undefined ? '' : `/${exportName}`}`,
    async stop() {
      signal('SIGTERM');
      const s = await waitExit(STOP_TIMEOUT_MS);
      if (s !== null) return s;
      signal('SIGKILL');
      await waitExit(10_000);
      throw new Error(`server pid ${pid} did not stop within ${STOP_TIMEOUT_MS} ms of SIGTERM (killed)\n${logTail(60)}`);
    },
    async kill() {
      signal('SIGKILL');
      await waitExit(10_000);
    },
    async waitExit(ms = STOP_TIMEOUT_MS) {
      const s = await waitExit(ms);
      if (s === null) throw new Error(`server pid ${pid} did not exit within ${ms} ms\n${logTail(60)}`);
      return s;
    },
    logs,
    logTail,
    async waitForLog(match, ms = 5000) {
      const test = typeof match === 'function' ? match : (s: string) => match.test(s);
      const deadline = Date.now() + ms;
      for (;;) {
        if (test(output)) return true;
        if (Date.now() >= deadline) return false;
        await new Promise((r) => setTimeout(r, 20));
      }
    },
    get exited() {
      return status !== null;
    },
  };
}
