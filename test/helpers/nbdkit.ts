// Start a real nbdkit (the reference server) for client tests: on a free loopback TCP port or on a Unix socket
// in a private temporary directory; wait until it accepts connections; kill it by PID in t.teardown, which tap
// runs whether the test passed or failed. --exit-with-parent covers a test process that dies without teardown.

import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import type { ConnectTarget } from '../../lib/client/uri';
import { freePorts } from './two-nodes';

/** How long nbdkit may take to accept its first connection (ms). */
const READY_TIMEOUT_MS = 10_000;
/** Probe interval while waiting for the listener (ms). */
const PROBE_INTERVAL_MS = 25;
/** Grace after SIGTERM before SIGKILL (ms). */
const STOP_TIMEOUT_MS = 3_000;
/** Port races (another process grabbing the port we picked) are retried this many times. */
const START_ATTEMPTS = 3;

/** The parts of a tap Test this helper uses. */
export interface NbdkitTap {
  teardown(fn: () => unknown): void;
}

export interface NbdkitOptions {
  /** 'tcp' (default): 127.0.0.1 on a free port; 'unix': a socket in a fresh temporary directory. */
  transport?: 'tcp' | 'unix';
  /** Filters, outermost first, e.g. ['error'] → --filter=error. */
  filters?: readonly string[];
  /** nbdkit options placed before the plugin (e.g. ['-r'] for read-only). */
  serverArgs?: readonly string[];
}

export interface Nbdkit {
  readonly pid: number;
  readonly target: ConnectTarget;
  /** nbd:// or nbd+unix:// URI of the default export, or of `exportName`. */
  uri(exportName?: string): string;
  /** nbdkit's stderr so far (for diagnostics). */
  stderr(): string;
  /** Stop it now (SIGTERM, then SIGKILL); also done by teardown. */
  stop(): Promise<void>;
}

/** A port free on 127.0.0.1 at the time of the call (see freePorts: not one outgoing connections may take). */
export async function freePort(): Promise<number> {
  const [port] = await freePorts(1);
  return port!;
}

function exited(child: ChildProcess): boolean {
  return child.exitCode !== null || child.signalCode !== null;
}

function waitExit(child: ChildProcess, ms: number): Promise<boolean> {
  if (exited(child)) return Promise.resolve(true);
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(false), ms);
    child.once('exit', () => {
      clearTimeout(timer);
      resolve(true);
    });
  });
}

async function stopChild(child: ChildProcess): Promise<void> {
  if (exited(child) || child.pid === undefined) return;
  try {
    process.kill(child.pid, 'SIGTERM');
  } catch {
    return; // already gone
  }
  if (await waitExit(child, STOP_TIMEOUT_MS)) return;
  try {
    process.kill(child.pid, 'SIGKILL');
  } catch {
    return;
  }
  await waitExit(child, STOP_TIMEOUT_MS);
}

function canConnect(target: ConnectTarget): Promise<boolean> {
  return new Promise((resolve) => {
    const s = 'path' in target ? net.connect(target.path) : net.connect(target.port, target.host);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

async function startOnce(t: NbdkitTap, pluginArgs: readonly string[], opts: NbdkitOptions): Promise<Nbdkit | 'retry'> {
  const unix = opts.transport === 'unix';
  let target: ConnectTarget;
  let listenArgs: string[];
  let dir: string | undefined;
  if (unix) {
    // Not t.testdir(): its path can exceed the 108-byte limit of a Unix socket address.
    dir = mkdtempSync(path.join(os.tmpdir(), 'nbdkit-'));
    const sock = path.join(dir, 'nbd.sock');
    target = { path: sock };
    listenArgs = ['-U', sock];
  } else {
    const port = await freePort();
    target = { host: '127.0.0.1', port };
    listenArgs = ['-i', '127.0.0.1', '-p', String(port)];
  }
  const args = [
    '-f',
    '--exit-with-parent',
    ...listenArgs,
    ...(opts.filters ?? []).map((f) => `--filter=${f}`),
    ...(opts.serverArgs ?? []),
    ...pluginArgs,
  ];
  const child = spawn('nbdkit', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr!.setEncoding('utf8');
  child.stderr!.on('data', (d: string) => {
    if (err.length < 64 * 1024) err += d;
  });
  const spawnError = new Promise<Error>((resolve) => child.once('error', resolve));

  const stop = async (): Promise<void> => {
    await stopChild(child);
    if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
  };
  t.teardown(stop);

  const deadline = Date.now() + READY_TIMEOUT_MS;
  for (;;) {
    if (await canConnect(target)) break;
    const failed = await Promise.race([
      spawnError,
      new Promise<null>((resolve) => setTimeout(() => resolve(null), PROBE_INTERVAL_MS)),
    ]);
    if (failed !== null) throw new Error(`cannot run nbdkit: ${failed.message}`);
    if (exited(child)) {
      if (!unix && /address already in use/i.test(err)) return 'retry';
      throw new Error(`nbdkit ${args.join(' ')} exited (${child.exitCode ?? child.signalCode}): ${err.trim()}`);
    }
    if (Date.now() > deadline) throw new Error(`nbdkit did not accept connections within ${READY_TIMEOUT_MS} ms: ${err.trim()}`);
  }

  const uri = (exportName = ''): string => {
    const exp = encodeURIComponent(exportName);
    return 'path' in target ? `nbd+unix:///${exp}?socket=${target.path}` : `nbd://127.0.0.1:${target.port}/${exp}`;
  };
  return { pid: child.pid!, target, uri, stderr: () => err, stop };
}

/**
 * Start `nbdkit -f --exit-with-parent <listen> [--filter=…] <serverArgs> <pluginArgs>`, e.g.
 * startNbdkit(t, ['memory', '64M']). Resolves once it accepts connections.
 */
export async function startNbdkit(t: NbdkitTap, pluginArgs: readonly string[], opts: NbdkitOptions = {}): Promise<Nbdkit> {
  for (let attempt = 1; ; attempt++) {
    const r = await startOnce(t, pluginArgs, opts);
    if (r !== 'retry') return r;
    if (attempt >= START_ATTEMPTS) throw new Error(`nbdkit could not bind a free port in ${START_ATTEMPTS} attempts`);
  }
}
