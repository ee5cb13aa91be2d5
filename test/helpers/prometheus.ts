// A real Prometheus server on loopback for the metrics tests: its config is written for the port it gets
// (a config may scrape Prometheus itself), its data lives in the test's scratch dir, and it is SIGKILLed in
// teardown. query() returns the HTTP API's JSON answer.

import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { freshDir, type TapLike } from './spawn-server';
import { freePorts } from './two-nodes';

export interface PromAnswer {
  status: string;
  error?: string;
  data?: { result: Array<{ metric?: Record<string, string>; value: [number, string] }> };
}

export interface Prometheus {
  readonly port: number;
  query(q: string): Promise<PromAnswer>;
  /** The last few KiB of its stderr (for failure messages). */
  log(): string;
}

export async function startPrometheus(t: TapLike, config: (port: number) => string): Promise<Prometheus> {
  const dir = freshDir(t, 'prometheus');
  const [port] = await freePorts(1);
  const file = path.join(dir, 'prometheus.yml');
  writeFileSync(file, config(port!));
  const prom = spawn('prometheus', [`--config.file=${file}`, `--storage.tsdb.path=${path.join(dir, 'tsdb')}`, `--web.listen-address=127.0.0.1:${port}`], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let log = '';
  prom.stderr!.on('data', (d: Buffer) => (log = (log + d.toString()).slice(-4000)));
  const exited = new Promise((r) => prom.once('exit', r));
  t.teardown(async () => {
    if (prom.exitCode === null && prom.pid !== undefined) process.kill(prom.pid, 'SIGKILL');
    await Promise.race([exited, new Promise((r) => setTimeout(r, 5000).unref())]);
  });
  return {
    port: port!,
    log: () => log,
    async query(q) {
      const res = await fetch(`http://127.0.0.1:${port}/api/v1/query?query=${encodeURIComponent(q)}`, { signal: AbortSignal.timeout(5000) });
      return (await res.json()) as PromAnswer;
    },
  };
}
