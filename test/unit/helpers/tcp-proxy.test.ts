// test/helpers/tcp-proxy.ts against real local TCP servers on 127.0.0.1: bytes pass through unchanged (with
// backpressure and half-close), delay adds at least its one-way time per direction and keeps order, pause holds
// and resume delivers in order, dropAll / refuse / dropAfterBytes close what they should, stats count, close()
// does not hang. Timing is asserted as lower bounds only; every wait is bounded.

import * as net from 'node:net';
import { randomBytes } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import t from 'tap';
import type { Test } from 'tap';
import { TcpProxy, startTcpProxy } from '../../helpers/tcp-proxy';

const MiB = 1024 * 1024;
const WAIT_MS = 10_000;

/** Reject if `p` has not settled within `ms`. */
function within<T>(p: Promise<T>, what: string, ms = WAIT_MS): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** A socket end that collects what it reads and can wait for a byte count or for close. */
class Peer {
  private chunks: Buffer[] = [];
  private size = 0;
  closed = false;
  ended = false;
  private waiters: Array<() => void> = [];

  constructor(readonly socket: net.Socket) {
    socket.on('data', (d: Buffer) => {
      this.chunks.push(d);
      this.size += d.length;
      this.wake();
    });
    socket.on('end', () => {
      this.ended = true;
      this.wake();
    });
    socket.on('close', () => {
      this.closed = true;
      this.wake();
    });
    socket.on('error', () => undefined);
  }

  get length(): number {
    return this.size;
  }

  data(): Buffer {
    return Buffer.concat(this.chunks, this.size);
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  /** Resolve once pred() holds (checked on every event), reject after ms. */
  until(pred: () => boolean, what: string, ms = WAIT_MS): Promise<void> {
    const wait = new Promise<void>((resolve) => {
      const check = (): void => {
        if (pred()) resolve();
        else this.waiters.push(check);
      };
      check();
    });
    return within(wait, what, ms);
  }

  bytes(n: number, ms = WAIT_MS): Promise<Buffer> {
    return this.until(() => this.size >= n || this.closed, `${n} bytes`, ms).then(() => {
      if (this.size < n) throw new Error(`closed after ${this.size} of ${n} bytes`);
      return this.data();
    });
  }

  gone(ms = WAIT_MS): Promise<void> {
    return this.until(() => this.closed, 'socket close', ms);
  }
}

interface TestServer {
  port: number;
  /** Server-side peers, one per accepted connection, in accept order. */
  peers: Peer[];
  nextPeer(ms?: number): Promise<Peer>;
}

/**
 * A local server closed in teardown. 'echo' writes back what it reads and ends when the client ends; a function
 * mode gets each accepted socket to drive itself.
 */
async function startServer(t: Test, mode: 'echo' | ((sock: net.Socket, peer: Peer) => void)): Promise<TestServer> {
  const peers: Peer[] = [];
  const sockets = new Set<net.Socket>();
  let onPeer: (() => void) | undefined;
  const server = net.createServer({ allowHalfOpen: true }, (sock) => {
    sockets.add(sock);
    sock.on('close', () => sockets.delete(sock));
    const peer = new Peer(sock);
    peers.push(peer);
    if (mode === 'echo') {
      sock.on('data', (d: Buffer) => sock.write(d));
      sock.on('end', () => sock.end());
    } else {
      mode(sock, peer);
    }
    onPeer?.();
  });
  t.teardown(
    () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  );
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  return {
    port,
    peers,
    nextPeer: (ms = WAIT_MS) => {
      const want = peers.length;
      const p = new Promise<Peer>((resolve) => {
        const check = (): void => {
          if (peers.length > want) resolve(peers[want]!);
          else onPeer = check;
        };
        check();
      });
      return within(p, 'server connection', ms);
    },
  };
}

/** Connect a client (destroyed in teardown). */
async function connect(t: Test, port: number, opts: { allowHalfOpen?: boolean } = {}): Promise<Peer> {
  const sock = net.connect({ host: '127.0.0.1', port, allowHalfOpen: opts.allowHalfOpen ?? false });
  t.teardown(() => sock.destroy());
  const peer = new Peer(sock);
  await within(
    new Promise<void>((resolve, reject) => {
      sock.once('connect', resolve);
      sock.once('error', reject);
    }),
    'connect',
  );
  return peer;
}

/** A proxy to an echo server, with both closed in teardown. */
async function echoProxy(t: Test): Promise<{ proxy: TcpProxy; server: TestServer }> {
  const server = await startServer(t, 'echo');
  const proxy = await startTcpProxy(t, { target: { host: '127.0.0.1', port: server.port } });
  return { proxy, server };
}

t.test('listens on 127.0.0.1 with an ephemeral port and an nbd:// url', async (t) => {
  const { proxy } = await echoProxy(t);
  t.equal(proxy.host, '127.0.0.1');
  t.ok(proxy.port > 0);
  t.equal(proxy.url, `nbd://127.0.0.1:${proxy.port}`);
  t.same(proxy.stats, { connections: 0, active: 0, bytesUp: 0, bytesDown: 0 });
});

t.test('1 MiB of random bytes round-trips unchanged through an echo server; stats count it', async (t) => {
  const { proxy, server } = await echoProxy(t);
  const payload = randomBytes(MiB);
  const client = await connect(t, proxy.port);
  client.socket.write(payload);
  const back = await client.bytes(MiB);
  t.equal(back.length, MiB);
  t.ok(back.equals(payload), 'echoed bytes equal what was sent');
  t.ok(server.peers[0]!.data().equals(payload), 'the server received exactly what was sent');
  t.same(proxy.stats, { connections: 1, active: 1, bytesUp: MiB, bytesDown: MiB });
  client.socket.end();
  await client.gone();
  await server.peers[0]!.gone();
  await within(
    (async () => {
      while (proxy.stats.active !== 0) await sleep(5);
    })(),
    'active to reach 0',
  );
  t.same(proxy.stats, { connections: 1, active: 0, bytesUp: MiB, bytesDown: MiB });
});

t.test('independent random 1 MiB each way, slow readers on both ends (backpressure), half-close forwarded', async (t) => {
  const fromServer = randomBytes(MiB);
  const fromClient = randomBytes(MiB);
  const server = await startServer(t, (sock) => {
    // Do not read for a while, so the proxy's upstream writes back up; then read and send our own megabyte.
    sock.pause();
    setTimeout(() => sock.resume(), 200);
    sock.write(fromServer, () => sock.end());
  });
  const proxy = await startTcpProxy(t, { target: { host: '127.0.0.1', port: server.port } });
  const client = await connect(t, proxy.port, { allowHalfOpen: true });
  client.socket.pause();
  setTimeout(() => client.socket.resume(), 200);
  client.socket.write(fromClient, () => client.socket.end());
  const sp = await server.nextPeer();
  const [atClient, atServer] = await Promise.all([client.bytes(MiB), sp.bytes(MiB)]);
  t.ok(atClient.equals(fromServer), 'client got the server bytes unchanged');
  t.ok(atServer.equals(fromClient), 'server got the client bytes unchanged');
  await client.until(() => client.ended, 'FIN at the client');
  await sp.until(() => sp.ended, 'FIN at the server');
  t.equal(client.length, MiB, 'nothing extra after the data');
  t.equal(sp.length, MiB);
  t.equal(proxy.stats.bytesUp, MiB);
  t.equal(proxy.stats.bytesDown, MiB);
});

t.test('backpressure: a target that stops reading stops the proxy reading from the client', async (t) => {
  const total = 64 * MiB;
  let serverSock: net.Socket | undefined;
  const server = await startServer(t, (sock) => {
    serverSock = sock;
    sock.pause();
  });
  const proxy = await startTcpProxy(t, { target: { host: '127.0.0.1', port: server.port } });
  const client = await connect(t, proxy.port);
  const payload = randomBytes(total);
  client.socket.write(payload);
  const sp = await server.nextPeer();

  // Wait until the proxy stops moving bytes upstream.
  let last = -1;
  let still = 0;
  await within(
    (async () => {
      while (still < 3) {
        await sleep(50);
        const now = proxy.stats.bytesUp;
        still = now === last ? still + 1 : 0;
        last = now;
      }
    })(),
    'upstream to stall',
  );
  // Without backpressure the proxy would have read (and queued in its upstream socket) all 64 MiB; with it,
  // only what fits in kernel buffers and stream high-water marks.
  t.ok(proxy.stats.bytesUp < total / 2, `proxy stalled after ${(proxy.stats.bytesUp / MiB).toFixed(1)} MiB`);
  t.ok(client.socket.writableLength > 0, 'the client is left holding unsent bytes');

  serverSock!.resume();
  const got = await sp.bytes(total, 30_000);
  t.ok(got.equals(payload), 'all bytes arrive unchanged once the target reads again');
  t.equal(proxy.stats.bytesUp, total);
});

t.test('setDelay(50) makes a round trip take at least 100 ms and keeps order when the delay changes', async (t) => {
  const { proxy } = await echoProxy(t);
  const client = await connect(t, proxy.port);
  proxy.setDelay(50);
  const t0 = performance.now();
  client.socket.write('ping');
  await client.bytes(4);
  const rtt = performance.now() - t0;
  t.ok(rtt >= 100, `round trip ${rtt.toFixed(1)} ms >= 100 ms`);
  t.equal(client.data().toString(), 'ping');

  // A chunk sent under a long delay must not be overtaken by later chunks sent with a shorter (or no) delay.
  proxy.setDelay(150);
  client.socket.write('A');
  await sleep(10);
  proxy.setDelay(0);
  client.socket.write('B');
  await sleep(10);
  client.socket.write('C');
  const all = await client.bytes(7);
  t.equal(all.toString(), 'pingABC', 'order preserved across delay changes');

  t.throws(() => proxy.setDelay(-1), RangeError);
  t.throws(() => proxy.setDelay(Number.NaN), RangeError);
});

t.test('pause holds bytes both ways with connections open; resume delivers them in order', async (t) => {
  const { proxy, server } = await echoProxy(t);
  const client = await connect(t, proxy.port);
  client.socket.write('warm');
  await client.bytes(4);
  const sp = server.peers[0]!;

  proxy.pause();
  const parts = ['one,', 'two,', 'three,', 'four'];
  for (const p of parts) {
    client.socket.write(p);
    await sleep(5);
  }
  await sleep(100);
  t.equal(sp.length, 4, 'server received nothing while paused');
  t.equal(client.length, 4, 'client received nothing while paused');
  t.notOk(client.closed, 'client connection still open');
  t.notOk(sp.closed, 'server connection still open');

  // Down direction too: server-originated bytes are held as well.
  sp.socket.write('|down');
  await sleep(100);
  t.equal(client.length, 4, 'server→client bytes are held too');

  proxy.resume();
  const want = 'warm' + '|down' + parts.join('');
  const got = await client.bytes(want.length);
  // '|down' was sent by the server before it saw (and echoed) the held upstream bytes.
  t.equal(got.toString(), want, 'held bytes delivered in order after resume');
  t.equal(sp.data().toString(), 'warm' + parts.join(''));
});

t.test('dropAll destroys every connection on both sides; new connections still work', async (t) => {
  const { proxy, server } = await echoProxy(t);
  const a = await connect(t, proxy.port);
  const b = await connect(t, proxy.port);
  a.socket.write('a');
  b.socket.write('b');
  await a.bytes(1);
  await b.bytes(1);
  t.equal(proxy.stats.active, 2);

  proxy.dropAll();
  await a.gone();
  await b.gone();
  await Promise.all(server.peers.map((p) => p.gone()));
  t.equal(proxy.stats.active, 0);

  const c = await connect(t, proxy.port);
  c.socket.write('again');
  t.equal((await c.bytes(5)).toString(), 'again');
  t.equal(proxy.stats.connections, 3);
});

t.test('refuse(true) closes new connections immediately without reaching the target; refuse(false) restores', async (t) => {
  const { proxy, server } = await echoProxy(t);
  const open = await connect(t, proxy.port);
  proxy.refuse(true);

  const sock = net.connect({ host: '127.0.0.1', port: proxy.port });
  t.teardown(() => sock.destroy());
  const refused = new Peer(sock);
  sock.write('hello?');
  await refused.gone();
  t.equal(refused.length, 0, 'nothing came back');
  t.equal(server.peers.length, 1, 'the target saw no new connection');

  open.socket.write('still');
  t.equal((await open.bytes(5)).toString(), 'still', 'existing connection unaffected');

  proxy.refuse(false);
  const c = await connect(t, proxy.port);
  c.socket.write('ok');
  t.equal((await c.bytes(2)).toString(), 'ok');
  t.equal(proxy.stats.connections, 2, 'refused connection not counted');
});

t.test('dropAfterBytes forwards exactly n more bytes upstream, then drops every connection, once', async (t) => {
  const { proxy, server } = await echoProxy(t);
  const a = await connect(t, proxy.port);
  const other = await connect(t, proxy.port);
  a.socket.write('1234');
  await a.bytes(4);
  other.socket.write('xy');
  await other.bytes(2);

  proxy.dropAfterBytes(10); // counted from now, across all connections
  a.socket.write('abcd');
  await a.bytes(8);
  t.notOk(a.closed, 'still open below the limit');
  a.socket.write('efghijklmnop'); // 4 + 6 = 10: "efghij" goes through, the rest does not
  await a.gone();
  await other.gone();
  const sa = server.peers[0]!;
  await sa.gone();
  t.equal(sa.data().toString(), '1234abcdefghij', 'target received exactly 10 bytes after arming');
  t.equal(proxy.stats.active, 0);

  // Fired once: later traffic flows freely.
  const c = await connect(t, proxy.port);
  const big = randomBytes(64 * 1024);
  c.socket.write(big);
  t.ok((await c.bytes(big.length)).equals(big), 'no second drop');
  t.notOk(c.closed);

  // null disarms; 0 drops right away.
  proxy.dropAfterBytes(5);
  proxy.dropAfterBytes(null);
  c.socket.write('0123456789');
  await c.bytes(big.length + 10);
  t.notOk(c.closed, 'disarmed');
  proxy.dropAfterBytes(0);
  await c.gone();
  t.throws(() => proxy.dropAfterBytes(-1), RangeError);
});

t.test('a target that refuses or resets closes the client side', async (t) => {
  // A port with nothing listening: bind one, note the port, close it. The kernel may hand that port straight
  // back to the proxy's own listener, which would then connect to itself, again and again: then try another.
  let proxy: TcpProxy | null = null;
  for (let attempt = 0; attempt < 5 && proxy === null; attempt++) {
    const tmp = net.createServer();
    await new Promise<void>((resolve) => tmp.listen(0, '127.0.0.1', resolve));
    const deadPort = (tmp.address() as net.AddressInfo).port;
    await new Promise<void>((resolve) => tmp.close(() => resolve()));
    // Nothing connects to the proxy before the check, so a proxy on the dead port has not looped yet.
    const p = await TcpProxy.start({ target: { host: '127.0.0.1', port: deadPort } });
    if (p.port === deadPort) await p.close();
    else proxy = p;
  }
  if (proxy === null) throw new Error('no free port distinct from the proxy');
  t.teardown(() => proxy!.close());
  const client = await connect(t, proxy.port);
  await client.gone();
  t.equal(proxy.stats.active, 0);

  const server = await startServer(t, (sock) => sock.on('data', () => sock.destroy()));
  const proxy2 = await startTcpProxy(t, { target: { host: '127.0.0.1', port: server.port } });
  const c2 = await connect(t, proxy2.port);
  c2.socket.write('boom');
  await c2.gone();
});

t.test('close() with open connections and held data resolves, closes clients, stops listening', async (t) => {
  const server = await startServer(t, 'echo');
  const proxy = await TcpProxy.start({ target: { host: '127.0.0.1', port: server.port } });
  t.teardown(() => proxy.close());
  const a = await connect(t, proxy.port);
  const b = await connect(t, proxy.port);
  a.socket.write('x');
  await a.bytes(1);
  proxy.pause();
  proxy.setDelay(10_000);
  b.socket.write('held');
  await sleep(20);

  await within(proxy.close(), 'close()');
  await a.gone();
  await b.gone();
  t.equal(proxy.stats.active, 0);
  await within(proxy.close(), 'second close()');

  const err = await within(
    new Promise<Error | null>((resolve) => {
      const s = net.connect({ host: '127.0.0.1', port: proxy.port });
      s.once('connect', () => {
        s.destroy();
        resolve(null);
      });
      s.once('error', resolve);
    }),
    'connect after close',
  );
  t.match(err, { code: 'ECONNREFUSED' }, 'no longer listening');
});
