// The multi-conn ceiling: nbdmirror's NBD connections (the same code as the server) over the plainest file
// device, served by one event loop or by several. Each loop is a worker thread with its own NbdServer; the
// main thread accepts and hands each connection, by its descriptor, to the loop with the fewest open ones,
// so a client's connections land on different loops, as nbd-server's land in different processes. A WRITE
// is one synchronous pwrite into the file (as the server's region bypass does for long writes), a READ a
// synchronous pread (the long ones in the thread pool, as the server reads a file on tmpfs), FLUSH an
// fdatasync. FILE_SERVER_POOL_WRITES=1 sends writes of 64 KiB and more to the thread pool instead. No
// region, cache, allocation map or replication: what this serves is the most that more than one event loop
// could give the copies before any storage state has to be shared between the loops.
// bench/ceiling/multi-loop.sh compares it with nbd-server and the server.
//
// Not a pattern for the server: Node has no dup(2), so the accepted socket stays open on the main thread too
// (kept, never read, never closed: closing it would close whatever descriptor now has its number) after a
// loop took it over. A server would rather let every loop listen on the one listening socket (a net.Server
// given its descriptor works in Node 20 worker threads, but the kernel then picks the loop), or use
// `reusePort` (Node 22.12 and later).
//
// Usage: node dist/bench/ceiling/file-server.js PORT FILE [LOOPS]   (LOOPS 1..8, default 1; SIGTERM stops
// it and prints how many connections each loop took)

import { fdatasync, openSync, read, readSync, statSync, write, writeSync, constants as fsc } from 'node:fs';
import * as net from 'node:net';
import { isMainThread, parentPort, Worker, workerData } from 'node:worker_threads';
import { silentLogger } from '../../lib/log';
import { NodeRequestStats } from '../../lib/metrics/request-stats';
import { ExportRegistry } from '../../lib/server/exports';
import { NbdServer } from '../../lib/server/listener';
import { type BlockDevice, type Extent, type WriteFlags, fullCapabilities } from '../../lib/storage/block-device';

interface LoopInit {
  file: string;
  size: number;
  /** Connections closed per loop (Int32Array over a SharedArrayBuffer), this loop's at `index`. */
  closed: SharedArrayBuffer;
  index: number;
}

/** A file written in place: every completed write is in the page cache, so one fdatasync covers all loops. */
function fileDevice(fd: number, size: number): BlockDevice {
  const poolWrites = process.env.FILE_SERVER_POOL_WRITES === '1';
  const sync = (): Promise<void> => new Promise((resolve, reject) => fdatasync(fd, (err) => (err ? reject(err) : resolve())));
  const readCb = (buf: Buffer, offset: number, done: (err: Error | null) => void): void => {
    read(fd, buf, 0, buf.length, offset, (err, n) => done(err ?? (n === buf.length ? null : new Error(`short read at ${offset}`))));
  };
  const writeAt = (buf: Buffer, offset: number): void => {
    let at = 0;
    while (at < buf.length) at += writeSync(fd, buf, at, buf.length - at, offset + at);
  };
  const pwriteFast = (buf: Buffer, offset: number, flags?: WriteFlags): Promise<void> | null => {
    if (poolWrites && buf.length >= 65536) {
      return new Promise<void>((resolve, reject) =>
        write(fd, buf, 0, buf.length, offset, (err, n) => (err ? reject(err) : n !== buf.length ? reject(new Error(`short write at ${offset}`)) : resolve())),
      ).then(() => (flags?.fua === true ? sync() : undefined));
    }
    writeAt(buf, offset);
    return flags?.fua === true ? sync() : null;
  };
  return {
    size,
    caps: fullCapabilities(false),
    pread: (buf, offset) => new Promise((resolve, reject) => readCb(buf, offset, (err) => (err ? reject(err) : resolve()))),
    preadCb: readCb,
    // As BackingFile does on a memory filesystem: short reads are a synchronous copy out of the page cache.
    preadNow: (buf, offset) => {
      let at = 0;
      while (at < buf.length) {
        const n = readSync(fd, buf, at, buf.length - at, offset + at);
        if (n === 0) throw new Error(`short read at ${offset}`);
        at += n;
      }
      return true;
    },
    pwrite: (buf, offset, flags) => pwriteFast(buf, offset, flags) ?? Promise.resolve(),
    pwriteFast,
    flush: sync,
    trim: () => Promise.resolve(),
    zero: (offset, length) => {
      writeAt(Buffer.alloc(length), offset);
      return Promise.resolve();
    },
    cache: () => Promise.resolve(),
    extents: (_offset: number, length: number): Promise<Extent[]> => Promise.resolve([{ length, flags: 0 }]),
    close: () => Promise.resolve(),
  };
}

/** A worker thread: one NbdServer that serves the descriptors the main thread sends, until asked for its count. */
function runLoop(init: LoopInit): void {
  const port = parentPort!;
  const closed = new Int32Array(init.closed);
  const stats = new NodeRequestStats();
  // The listener keeps connectionsOpen; its decrements are the closes the main thread needs to see.
  let openNow = 0;
  Object.defineProperty(stats, 'connectionsOpen', {
    get: () => openNow,
    set: (n: number) => {
      if (n < openNow) Atomics.add(closed, init.index, openNow - n);
      openNow = n;
    },
  });
  const server = new NbdServer(new ExportRegistry([{ name: 'disk0', description: 'file', device: fileDevice(openSync(init.file, fsc.O_RDWR), init.size) }]), silentLogger(), stats);
  port.on('message', (m: { fd: number } | 'count') => {
    if (m === 'count') {
      port.postMessage(stats.connectionsAccepted);
      return;
    }
    const socket = new net.Socket({ fd: m.fd, readable: true, writable: true, pauseOnCreate: true } as net.SocketConstructorOpts);
    server.serve(socket);
  });
}

async function main(): Promise<void> {
  const [portArg, file, loopsArg] = process.argv.slice(2);
  const portNo = Number(portArg);
  const loops = Number(loopsArg ?? 1);
  if (!Number.isInteger(portNo) || portNo <= 0 || file === undefined || !Number.isInteger(loops) || loops < 1 || loops > 8) {
    process.stderr.write('usage: file-server.js PORT FILE [LOOPS 1..8]\n');
    process.exit(2);
  }
  const { size } = statSync(file);
  const closedBuf = new SharedArrayBuffer(4 * loops);
  const closed = new Int32Array(closedBuf);
  const handed = new Array<number>(loops).fill(0);
  const open = (i: number): number => handed[i]! - Atomics.load(closed, i);
  const workers = Array.from({ length: loops }, (_, index) => new Worker(__filename, { workerData: { file, size, closed: closedBuf, index } satisfies LoopInit }));
  const handedOver: net.Socket[] = []; // see the header: kept so that their descriptors stay open
  const listener = net.createServer({ pauseOnConnect: true, noDelay: true }, (socket) => {
    const fd = (socket as net.Socket & { _handle: { fd: number } })._handle.fd;
    let best = 0;
    for (let i = 1; i < loops; i++) if (open(i) < open(best)) best = i;
    handed[best]!++;
    workers[best]!.postMessage({ fd });
    handedOver.push(socket);
  });
  await new Promise<void>((resolve, reject) => {
    listener.once('error', reject);
    listener.listen({ host: '127.0.0.1', port: portNo, exclusive: true }, resolve);
  });
  process.stdout.write(`listening on 127.0.0.1:${portNo} with ${loops} event loop(s)\n`);
  process.on('SIGTERM', () => {
    const counts = workers.map(
      (w) => new Promise<number>((resolve) => {
        w.once('message', resolve);
        w.postMessage('count');
        setTimeout(() => resolve(-1), 2000).unref();
      }),
    );
    void Promise.all(counts).then((c) => {
      process.stderr.write(`connections per loop: ${c.join(' ')}\n`);
      process.exit(0);
    });
  });
}

if (isMainThread) void main();
else runLoop(workerData as LoopInit);
