// The NBD listener: accepts connections (bounded), hands each to a Connection, and stops gracefully:
// stop accepting, let connections finish in-flight requests and flush, then resolve.

import * as net from 'node:net';
import type { Address } from '../config';
import type { Logger } from '../log';
import type { NodeRequestStats } from '../metrics/request-stats';
import { BufferPool } from '../storage/buffer-pool';
import type { BusyPoll } from './busy-poll';
import { Connection } from './connection';
import { ReceiveBuffers } from './receive-buffers';
import type { PoolWriteCounts, ReplyWriterOptions } from './reply-writer';
import type { ExportRegistry } from './exports';

/** Connections served at once; past this new ones are closed at accept. */
export const MAX_CONNECTIONS = 1024;
/** Free READ payload buffers kept for reuse, over all connections (bounded: counted in the RSS budget). */
const READ_POOL_BYTES = 32 * 1024 * 1024;

export class NbdServer {
  private readonly server: net.Server;
  private readonly connections = new Set<Connection>();
  private nextId = 1;
  /** Long READ payload buffers, shared by the connections (see BufferPool). */
  private readonly readBuffers = new BufferPool(READ_POOL_BYTES);
  private stopping: Promise<void> | null = null;
  /** Long reply batches go to the thread pool while more than one connection is open (see ReplyWriter). */
  private readonly replyWriter: ReplyWriterOptions;
  /** Reply batches written from the thread pool, over all connections (the metrics' counts when given). */
  readonly replyWrites: PoolWriteCounts;

  constructor(
    private readonly exports: ExportRegistry,
    private readonly log: Logger,
    /** Connection counters for the metrics (none: not counted). */
    private readonly stats?: NodeRequestStats,
    replyWriter: ReplyWriterOptions = {},
    /** Keeps the event loop polling for a while after each socket read (none: the loop sleeps at once). */
    private readonly busyPoll?: BusyPoll,
  ) {
    this.replyWrites = stats?.replyPoolWrites ?? { pool: 0, partial: 0 };
    this.replyWriter = { worthIt: () => this.connections.size > 1, counts: this.replyWrites, ...replyWriter };
    // Paused at accept: reading starts only once the socket reads into the connection's own buffers (adopt).
    this.server = net.createServer({ noDelay: true, pauseOnConnect: true }, (socket) => this.accept(socket));
  }

  /** Listen on addr (port 0 picks a free port); resolves with the bound address. */
  listen(addr: Address): Promise<Address> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen({ host: addr.host, port: addr.port, exclusive: true }, () => {
        this.server.off('error', reject);
        const a = this.server.address() as net.AddressInfo;
        resolve({ host: a.address, port: a.port });
      });
    });
  }

  /**
   * Serve a connection accepted somewhere else: e.g. by another thread, which passed the descriptor on
   * (`new net.Socket({ fd, pauseOnCreate: true })` on this thread). It must not have started reading.
   */
  serve(socket: net.Socket): void {
    this.accept(socket);
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  private accept(socket: net.Socket): void {
    if (this.stopping || this.connections.size >= MAX_CONNECTIONS) {
      this.log.warn({ remote: socket.remoteAddress }, this.stopping ? 'refusing connection: stopping' : 'refusing connection: too many');
      socket.destroy();
      return;
    }
    const id = this.nextId++;
    const log = this.log.child({ conn: id });
    log.info({ remote: `${socket.remoteAddress}:${socket.remotePort}` }, 'connection accepted');
    const rx = new ReceiveBuffers();
    let conn: Connection | null = null;
    const poll = this.busyPoll;
    const adopted = adoptWithBuffers(socket, rx, (chunk) => {
      poll?.touch(); // returns at once when polling is off
      conn!.receive(chunk);
    });
    conn = new Connection(adopted, { exports: this.exports, log, buffers: this.readBuffers, rx, replyWriter: this.replyWriter });
    this.connections.add(conn);
    const st = this.stats;
    if (st) {
      st.connectionsAccepted++;
      st.connectionsOpen++;
    }
    void conn.closed.then(() => {
      this.connections.delete(conn);
      if (st) st.connectionsOpen--;
    });
  }

  /** Stop accepting; every connection answers new requests with ESHUTDOWN, finishes and flushes. */
  stop(): Promise<void> {
    if (this.stopping) return this.stopping;
    this.stopping = (async () => {
      const closed = new Promise<void>((r) => this.server.close(() => r()));
      for (const c of this.connections) c.shutdown();
      await Promise.all([...this.connections].map((c) => c.closed));
      await closed;
    })();
    return this.stopping;
  }
}

/**
 * The accepted socket's connection as a socket that reads into `rx`'s buffers and calls onChunk with each
 * read (the bytes are valid during the call only). net.Server has no `onread` option, so the connection handle
 * moves to a new net.Socket made with one (`handle` is the constructor option Node's own server uses). The
 * accepted socket, left without a handle, is destroyed, which also takes it off the server's connection count:
 * the Connection and NbdServer.connections track the new one. Reading starts in the new socket's constructor.
 */
function adoptWithBuffers(accepted: net.Socket, rx: ReceiveBuffers, onChunk: (chunk: Buffer) => void): net.Socket {
  const a = accepted as net.Socket & { _handle: unknown };
  const handle = a._handle;
  a._handle = null;
  accepted.destroy();
  return new net.Socket({ handle, onread: rx.onread(onChunk) } as net.SocketConstructorOpts);
}
