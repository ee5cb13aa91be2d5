// Two nbdmirror nodes as real processes on loopback, each with --peer pointing at the other (optionally
// through a TcpProxy on the NBD link), fixed ports so either can be SIGKILLed and restarted on the same
// address and data dir. Also: HTTP POST for the admin endpoints, waiting for a replication state, and a
// content hash of an export read over NBD (what "byte-identical copies" is checked with).

import { createHash } from 'node:crypto';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as net from 'node:net';
import { NbdClient } from '../../lib/client/nbd-client';
import { freshDir, startServer, type ServerProcess, type TapLike } from './spawn-server';
import { getStatus } from './status';

/**
 * n distinct free loopback ports: all are held open until every one is chosen, so none repeats. They come from
 * below the kernel's ephemeral range when there is room there: a port from that range (what listen(0) gives)
 * can be taken, between this check and the server's listen or at a restart on the same port, as the local
 * port of an outgoing connection of any test running in parallel, and the server then fails with EADDRINUSE.
 * Each port is also claimed for this process's lifetime (claimPort): test files run in parallel processes,
 * and two of them drawing the same port, one between the other's check and listen, failed the same way.
 */
export async function freePorts(n: number): Promise<number[]> {
  const [lo, hi] = fixedPortRange();
  const servers: net.Server[] = [];
  const listen = (s: net.Server, port: number): Promise<boolean> =>
    new Promise((resolve, reject) => {
      s.once('error', (err: NodeJS.ErrnoException) => (err.code === 'EADDRINUSE' || err.code === 'EACCES' ? resolve(false) : reject(err)));
      s.listen(port, '127.0.0.1', () => resolve(true));
    });
  try {
    for (let tries = 0; servers.length < n; tries++) {
      const s = net.createServer();
      const port = hi > lo && tries < 1000 ? lo + Math.floor(Math.random() * (hi - lo)) : 0;
      if (port !== 0 && !claimPort(port)) continue;
      if (await listen(s, port)) servers.push(s);
    }
    return servers.map((s) => (s.address() as net.AddressInfo).port);
  } finally {
    await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
  }
}

const CLAIMS = path.join(os.tmpdir(), 'nbdmirror-test-ports');
const claimed: string[] = [];

/**
 * Claim a port for the rest of this process among the test processes of this machine: a file named after it
 * holding our pid, made exclusively. A claim whose process is gone is taken over. Claims go at exit.
 */
export function claimPort(port: number): boolean {
  mkdirSync(CLAIMS, { recursive: true });
  const file = path.join(CLAIMS, String(port));
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      writeFileSync(file, String(process.pid), { flag: 'wx' });
      if (claimed.length === 0) process.once('exit', () => claimed.forEach((f) => rmSync(f, { force: true })));
      claimed.push(file);
      return true;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    const owner = Number(readFileSync(file, 'utf8')) || 0;
    if (owner === process.pid || processAlive(owner)) return false;
    rmSync(file, { force: true }); // its process is gone
  }
  return false;
}

/** Whether a process with this pid exists (signal 0 checks without sending anything). */
function processAlive(pid: number): boolean {
  if (pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Ports [lo, hi) for fixed test addresses: under the ephemeral range (empty when there is no room). */
function fixedPortRange(): [number, number] {
  let ephemeralLow = 32768;
  try {
    ephemeralLow = Number(readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0]) || ephemeralLow;
  } catch {
    // not Linux: keep the usual default
  }
  return [20000, Math.min(ephemeralLow, 32768)];
}

export interface NodeSpec {
  name: 'a' | 'b';
  nbdPort: number;
  httpPort: number;
  dataDir: string;
}

export interface Node extends NodeSpec {
  proc: ServerProcess | null;
  /** Start (or restart) the process; extra flags are appended (e.g. --role). */
  start(extra?: readonly string[]): Promise<ServerProcess>;
  kill(): Promise<void>;
  stop(): Promise<void>;
  uri(exportName?: string): string;
  status(): Promise<any>;
  /** The replication status of one export. */
  rep(exportName?: string): Promise<any>;
  post(path: string, body?: unknown): Promise<{ status: number; body: any }>;
}

export interface PairOptions {
  /** --export flags for both nodes (default disk0=64M). */
  exports?: readonly string[];
  /** Extra flags for both. */
  args?: readonly string[];
  /** Where each node's NBD link points (default: the other node's NBD port); used to put a proxy between. */
  peerNbdPort?: { a?: number; b?: number };
}

export async function makePair(t: TapLike, opts: PairOptions = {}): Promise<{ a: Node; b: Node }> {
  const [pa, ha, pb, hb] = await freePorts(4);
  const specs = {
    a: { name: 'a' as const, nbdPort: pa!, httpPort: ha!, dataDir: freshDir(t, 'node-a') },
    b: { name: 'b' as const, nbdPort: pb!, httpPort: hb!, dataDir: freshDir(t, 'node-b') },
  };
  const make = (self: NodeSpec, other: NodeSpec, peerNbd: number | undefined): Node => {
    const node: Node = {
      ...self,
      proc: null,
      async start(extra: readonly string[] = []) {
        node.proc = await startServer(t, {
          dataDir: self.dataDir,
          args: [
            '--listen',
            `127.0.0.1:${self.nbdPort}`,
            '--http',
            `127.0.0.1:${self.httpPort}`,
            '--node-id',
            `node-${self.name}`,
            '--peer',
            `nbd://127.0.0.1:${peerNbd ?? other.nbdPort}`,
            '--peer-http',
            `http://127.0.0.1:${other.httpPort}`,
            ...(opts.exports ?? ['disk0=64M']).flatMap((e) => ['--export', e]),
            ...(opts.args ?? []),
            ...extra,
          ],
        });
        return node.proc;
      },
      async kill() {
        await node.proc?.kill();
        node.proc = null;
      },
      async stop() {
        await node.proc?.stop();
        node.proc = null;
      },
      uri: (e = 'disk0') => `nbd://127.0.0.1:${self.nbdPort}/${e}`,
      status: () => getStatus(self.httpPort),
      async rep(e = 'disk0') {
        const s = await getStatus(self.httpPort);
        return s.replication.exports.find((x: { name: string }) => x.name === e);
      },
      post: (path, body) => postJson(self.httpPort, path, body),
    };
    return node;
  };
  return { a: make(specs.a, specs.b, opts.peerNbdPort?.a), b: make(specs.b, specs.a, opts.peerNbdPort?.b) };
}

export async function postJson(port: number, path: string, body: unknown = {}): Promise<{ status: number; body: any }> {
  const res = await fetch(`http://127.0.0.1:${port}${path}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(20_000),
  });
  return { status: res.status, body: await res.json() };
}

/** Poll until pred(replication status of the export) holds; rejects with the last status after ms. */
export async function waitRep(node: Node, pred: (rep: any) => boolean, ms = 20_000, exportName = 'disk0'): Promise<any> {
  const deadline = Date.now() + ms;
  let last: any = null;
  while (Date.now() < deadline) {
    try {
      last = await node.rep(exportName);
      if (pred(last)) return last;
    } catch (err) {
      last = String(err);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`node ${node.name}: condition not reached in ${ms} ms; last status: ${JSON.stringify(last)}`);
}

/** Both nodes linked and nothing left to resync. */
export async function waitInSync(a: Node, b: Node, ms = 30_000): Promise<void> {
  await waitRep(a, (r) => r.role === 'primary' && r.link?.state === 'connected' && r.outOfSync.blocks === 0, ms);
  await waitRep(b, (r) => r.disk === 'UpToDate', ms);
}

/** sha256 of an export's content, read over NBD in 4 MiB requests. */
export async function hashExport(uri: string): Promise<string> {
  const u = new URL(uri);
  const c = await NbdClient.connect({ host: u.hostname, port: Number(u.port) }, { exportName: u.pathname.slice(1) });
  try {
    const h = createHash('sha256');
    for (let off = 0; off < c.size; off += 4 << 20) h.update(await c.pread(off, Math.min(4 << 20, c.size - off)));
    return h.digest('hex');
  } finally {
    await c.disconnect();
  }
}
