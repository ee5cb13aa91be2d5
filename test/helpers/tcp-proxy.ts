// An in-process TCP proxy for putting faults on a link (e.g. the replication link between two nbdmirror nodes):
// extra one-way delay, a peer that goes silent (pause/resume), dropped connections (all at once, or after N
// bytes upstream), refused connections. node:net only, 127.0.0.1 by default.
//
// Each accepted connection gets an upstream connection to the target and two directions (up = client→target,
// down = target→client). A direction is a FIFO of chunks stamped with the time they become due (arrival + the
// delay at arrival), drained by pump() with one timer per direction, so byte order holds whatever the delay
// does. Backpressure: the source socket is paused while the destination's write() returns false (until
// 'drain'), and while the direction holds more than HOLD_LIMIT bytes (delay/pause), so memory stays bounded.
// A FIN is forwarded after the bytes before it (half-close is preserved); an error, reset or destroy on one
// side destroys the other.

import * as net from 'node:net';
import { performance } from 'node:perf_hooks';

export interface TcpProxyOptions {
  target: { host: string; port: number };
  /** Default 127.0.0.1:0 (an ephemeral port). */
  listen?: { host?: string; port?: number };
}

export interface TcpProxyStats {
  /** Connections accepted and forwarded (refused ones are not counted). */
  connections: number;
  /** Connections currently open. */
  active: number;
  /** Bytes written to the target (client→target). */
  bytesUp: number;
  /** Bytes written to clients (target→client). */
  bytesDown: number;
}

/** Bytes one direction may hold (delayed or paused) before its source socket is paused. */
const HOLD_LIMIT = 4 * 1024 * 1024;

interface Chunk {
  buf: Buffer;
  due: number;
}

class Direction {
  private queue: Array<Chunk | undefined> = [];
  private head = 0;
  private held = 0;
  private blocked = false;
  private srcPaused = false;
  private timer: NodeJS.Timeout | undefined;
  /** The source sent FIN. */
  srcEnded = false;
  private endSent = false;
  private dead = false;

  constructor(
    private readonly proxy: TcpProxy,
    private readonly src: net.Socket,
    private readonly dst: net.Socket,
    readonly up: boolean,
  ) {}

  push(buf: Buffer): void {
    if (this.dead) return;
    this.queue.push({ buf, due: performance.now() + this.proxy.delayMs });
    this.held += buf.length;
    this.pump();
  }

  onEnd(): void {
    this.srcEnded = true;
    this.pump();
  }

  /** Forward whatever is due, in order, until paused, blocked, or the head is not due yet. */
  pump(): void {
    if (this.timer !== undefined) {
      clearTimeout(this.timer);
      this.timer = undefined;
    }
    while (!this.dead && this.head < this.queue.length) {
      if (this.proxy.isHolding() || this.blocked || this.dst.destroyed) break;
      const chunk = this.queue[this.head]!;
      const wait = chunk.due - performance.now();
      if (wait > 0) {
        this.timer = setTimeout(() => {
          this.timer = undefined;
          this.pump();
        }, Math.ceil(wait));
        break;
      }
      this.queue[this.head++] = undefined; // let it be collected
      if (this.head > 1024 && this.head * 2 > this.queue.length) {
        this.queue = this.queue.slice(this.head);
        this.head = 0;
      }
      this.held -= chunk.buf.length;
      if (this.up) {
        const limit = this.proxy.takeUpBudget(chunk.buf.length);
        if (limit !== null) {
          // dropAfterBytes trips here: forward exactly the remaining budget, then drop every connection once
          // those bytes have been handed to the kernel.
          const part = chunk.buf.subarray(0, limit);
          this.proxy.countUp(part.length);
          if (part.length > 0) this.dst.write(part, () => this.proxy.dropAll());
          else this.proxy.dropAll();
          return;
        }
      }
      if (this.up) this.proxy.countUp(chunk.buf.length);
      else this.proxy.countDown(chunk.buf.length);
      if (!this.dst.write(chunk.buf)) {
        this.blocked = true;
        this.dst.once('drain', () => {
          this.blocked = false;
          this.pump();
        });
      }
    }
    if (this.dead) return;
    if (this.head >= this.queue.length && this.srcEnded && !this.endSent && !this.proxy.isHolding() && !this.dst.destroyed) {
      this.endSent = true;
      this.dst.end();
    }
    this.flow();
  }

  /** Pause the source while the destination is full or we hold too much; resume it otherwise. */
  private flow(): void {
    const stop = this.blocked || this.held >= HOLD_LIMIT;
    if (stop && !this.srcPaused) {
      this.srcPaused = true;
      this.src.pause();
    } else if (!stop && this.srcPaused) {
      this.srcPaused = false;
      this.src.resume();
    }
  }

  kill(): void {
    this.dead = true;
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
    this.queue = [];
    this.head = 0;
    this.held = 0;
  }
}

interface Conn {
  client: net.Socket;
  upstream: net.Socket;
  up: Direction;
  down: Direction;
  closed: number;
  retired: boolean;
}

export class TcpProxy {
  readonly port: number;
  readonly host: string;
  /** @internal */ delayMs = 0;
  private paused = false;
  private refusing = false;
  private closing: Promise<void> | undefined;
  private upBudget: number | null = null;
  private dropping = false;
  private readonly conns = new Set<Conn>();
  private readonly counters: TcpProxyStats = { connections: 0, active: 0, bytesUp: 0, bytesDown: 0 };

  private constructor(
    private readonly server: net.Server,
    private readonly target: { host: string; port: number },
  ) {
    const addr = server.address() as net.AddressInfo;
    this.port = addr.port;
    this.host = addr.address;
  }

  static async start(opts: TcpProxyOptions): Promise<TcpProxy> {
    let proxy: TcpProxy | undefined;
    const server = net.createServer({ allowHalfOpen: true }, (sock) => {
      if (proxy === undefined) sock.destroy();
      else proxy.accept(sock);
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(opts.listen?.port ?? 0, opts.listen?.host ?? '127.0.0.1', () => {
        server.off('error', reject);
        resolve();
      });
    });
    server.on('error', () => undefined);
    proxy = new TcpProxy(server, { ...opts.target });
    return proxy;
  }

  get url(): string {
    const host = this.host.includes(':') ? `[${this.host}]` : this.host;
    return `nbd://${host}:${this.port}`;
  }

  get stats(): Readonly<TcpProxyStats> {
    return { ...this.counters };
  }

  /** Extra one-way delay added to every chunk in each direction (ms), preserving order. 0 = none. Applies to chunks arriving from now on. */
  setDelay(ms: number): void {
    if (!Number.isFinite(ms) || ms < 0) throw new RangeError(`delay must be a finite number >= 0, got ${ms}`);
    this.delayMs = ms;
  }

  /** Stop forwarding bytes (and FINs), holding them; connections stay open — a peer that has gone silent. */
  pause(): void {
    this.paused = true;
  }

  /** Forward what was held, in order (still subject to the delay), and carry on. */
  resume(): void {
    if (!this.paused) return;
    this.paused = false;
    this.pumpAll();
  }

  /** Destroy every current connection on both sides. New connections are still accepted unless refuse(true). */
  dropAll(): void {
    this.dropping = false;
    for (const c of [...this.conns]) this.kill(c);
  }

  /** Refuse (immediately close) new connections while true. */
  refuse(on: boolean): void {
    this.refusing = on;
  }

  /** Drop every connection after this many more bytes flow client→target in total (null = off); fires once. */
  dropAfterBytes(n: number | null): void {
    if (n !== null && (!Number.isInteger(n) || n < 0)) throw new RangeError(`byte count must be an integer >= 0, got ${n}`);
    this.upBudget = n;
    if (n === 0) {
      this.upBudget = null;
      this.dropAll();
    }
  }

  /** Destroy every connection and stop listening. */
  close(): Promise<void> {
    this.closing ??= new Promise<void>((resolve) => {
      this.refusing = true;
      this.server.close(() => resolve());
      this.dropAll();
    });
    return this.closing;
  }

  /** @internal True while nothing may be forwarded (paused, or a dropAfterBytes drop is in flight). */
  isHolding(): boolean {
    return this.paused || this.dropping;
  }

  /** @internal For an up chunk of `len` bytes: null to forward it all, else how many bytes to forward before the drop. */
  takeUpBudget(len: number): number | null {
    if (this.upBudget === null) return null;
    if (len < this.upBudget) {
      this.upBudget -= len;
      return null;
    }
    const rest = this.upBudget;
    this.upBudget = null;
    this.dropping = true;
    return rest;
  }

  /** @internal */ countUp(n: number): void {
    this.counters.bytesUp += n;
  }

  /** @internal */ countDown(n: number): void {
    this.counters.bytesDown += n;
  }

  private pumpAll(): void {
    for (const c of this.conns) {
      c.up.pump();
      c.down.pump();
    }
  }

  private accept(client: net.Socket): void {
    if (this.refusing || this.closing !== undefined) {
      client.on('error', () => undefined);
      client.destroy();
      return;
    }
    client.setNoDelay(true);
    const upstream = net.connect({ host: this.target.host, port: this.target.port, allowHalfOpen: true });
    upstream.setNoDelay(true);
    const conn: Conn = {
      client,
      upstream,
      up: new Direction(this, client, upstream, true),
      down: new Direction(this, upstream, client, false),
      closed: 0,
      retired: false,
    };
    this.conns.add(conn);
    this.counters.connections++;
    this.counters.active++;

    client.on('data', (b: Buffer) => conn.up.push(b));
    upstream.on('data', (b: Buffer) => conn.down.push(b));
    client.on('end', () => conn.up.onEnd());
    upstream.on('end', () => conn.down.onEnd());
    client.on('error', () => undefined);
    upstream.on('error', () => undefined);
    const onClose = (dir: Direction) => (hadError: boolean) => {
      conn.closed++;
      // A side that went away without a clean FIN (error, reset, destroy, failed connect) takes the other with
      // it. After a clean FIN its direction still flushes and forwards the FIN; the other side then closes too.
      if (hadError || !dir.srcEnded) this.kill(conn);
      else if (conn.closed === 2) this.retire(conn);
    };
    client.on('close', onClose(conn.up));
    upstream.on('close', onClose(conn.down));
  }

  private kill(conn: Conn): void {
    conn.up.kill();
    conn.down.kill();
    conn.client.destroy();
    conn.upstream.destroy();
    this.retire(conn);
  }

  private retire(conn: Conn): void {
    if (conn.retired) return;
    conn.retired = true;
    conn.up.kill();
    conn.down.kill();
    this.conns.delete(conn);
    this.counters.active--;
  }
}

/** Start a proxy closed in t.teardown (which tap runs whether the test passed or failed). */
export async function startTcpProxy(t: { teardown(fn: () => unknown): void }, opts: TcpProxyOptions): Promise<TcpProxy> {
  const proxy = await TcpProxy.start(opts);
  t.teardown(() => proxy.close());
  return proxy;
}
