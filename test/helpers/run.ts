// Run an external command (no shell) with a hard time limit and capture what it printed, for black-box
// tests that drive real NBD clients. A command that outlives its limit is killed by PID (SIGKILL); run()
// never rejects because of the command's exit status: callers assert on `code` and attach describe(r).

import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';

export interface RunOptions {
  /** Kill the command (SIGKILL) after this many ms. Default 60 s. */
  timeoutMs?: number;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** Written to the command's stdin, which is then closed (stdin is /dev/null otherwise). */
  input?: string | Buffer;
}

export interface RunResult {
  cmd: string;
  args: readonly string[];
  /** Exit code, or null when the command died of a signal. */
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
  ms: number;
}

/** Keep at most this much of each stream (bytes): enough for fio's JSON, bounded for runaway output. */
const MAX_CAPTURE = 16 * 1024 * 1024;

export function run(cmd: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  const timeoutMs = opts.timeoutMs ?? 60_000;
  const started = Date.now();
  return new Promise((resolve) => {
    const child = spawn(cmd, [...args], {
      env: opts.env ?? process.env,
      cwd: opts.cwd,
      stdio: [opts.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'],
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let outLen = 0;
    let errLen = 0;
    child.stdout!.on('data', (d: Buffer) => {
      if (outLen < MAX_CAPTURE) out.push(d);
      outLen += d.length;
    });
    child.stderr!.on('data', (d: Buffer) => {
      if (errLen < MAX_CAPTURE) err.push(d);
      errLen += d.length;
    });
    if (opts.input !== undefined) {
      child.stdin!.on('error', () => undefined); // the command may exit without reading its input
      child.stdin!.end(opts.input);
    }
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      if (child.pid !== undefined) {
        try {
          process.kill(child.pid, 'SIGKILL');
        } catch {
          // already gone
        }
      }
    }, timeoutMs);
    let spawnError: Error | null = null;
    child.on('error', (e) => {
      spawnError = e;
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({
        cmd,
        args,
        code: spawnError !== null ? 127 : code,
        signal,
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8') + (spawnError !== null ? `\n[spawn failed: ${(spawnError as Error).message}]` : ''),
        timedOut,
        ms: Date.now() - started,
      });
    });
  });
}

/** A short, bounded account of a run for assertion messages. */
export function describe(r: RunResult, maxChars = 4000): string {
  const clip = (s: string): string => (s.length > maxChars ? `${s.slice(0, maxChars / 2)}\n…\n${s.slice(-maxChars / 2)}` : s);
  const how = r.timedOut ? `timed out after ${r.ms} ms` : r.signal !== null ? `killed by ${r.signal}` : `exit ${r.code}`;
  // Long arguments (inline scripts) are shortened so the output stays readable.
  const args = r.args.map((a) => (a.length > 200 ? `${a.slice(0, 60).replace(/\s+/g, ' ')}…[${a.length} chars]` : a));
  return `$ ${r.cmd} ${args.join(' ')}\n(${how}, ${r.ms} ms)\n--- stdout\n${clip(r.stdout)}\n--- stderr\n${clip(r.stderr)}`;
}

/** sha256 (hex) of a file's contents, streamed. */
export function sha256File(file: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const h = createHash('sha256');
    createReadStream(file, { highWaterMark: 1 << 20 })
      .on('data', (d) => h.update(d))
      .on('error', reject)
      .on('end', () => resolve(h.digest('hex')));
  });
}

export function sha256(data: Buffer | string): string {
  return createHash('sha256').update(data).digest('hex');
}

let pythonCache: string | null | undefined;

/**
 * A python3 interpreter that can `import nbd` (python3-libnbd), or null. Debian installs the module for
 * /usr/bin/python3 only, and a python3 earlier on PATH (pyenv) cannot see it — which also breaks nbdsh.
 */
export function pythonWithNbd(): string | null {
  if (pythonCache !== undefined) return pythonCache;
  pythonCache = null;
  for (const candidate of ['/usr/bin/python3', 'python3']) {
    const r = spawnSync(candidate, ['-c', 'import nbd'], { stdio: 'ignore', timeout: 10_000 });
    if (r.status === 0) {
      pythonCache = candidate;
      break;
    }
  }
  return pythonCache;
}

/** Run a Python script (given as text) with the libnbd bindings. */
export function runPython(python: string, script: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  return run(python, ['-c', script, ...args], opts);
}
