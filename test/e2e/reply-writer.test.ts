// ReplyWriter (lib/server/reply-writer.ts) over real loopback sockets: long batches written from the thread
// pool on the socket's descriptor, the rest (and whatever the kernel did not take) through the net.Socket.
// The receiver must get every byte in the order the batches were handed over; the descriptor must stay open,
// and the socket unended, while a pool write is in flight.

import t, { type Test } from 'tap';
import * as crypto from 'node:crypto';
import * as net from 'node:net';
import { type PoolWriteCounts, ReplyWriter, type ReplyWriterOptions } from '../../lib/server/reply-writer';

interface Pair {
  server: net.Socket;
  client: net.Socket;
  /** Everything the client received so far. */
  received: () => Buffer;
  /** Resolves once the client has received n bytes (or its socket ended). */
  receivedAtLeast: (n: number) => Promise<void>;
  clientEnded: Promise<void>;
}

async function pair(t: Test): Promise<Pair> {
  // The server's side never reads (it learns of a reset only by writing).
  const listener = net.createServer({ pauseOnConnect: true });
  await new Promise<void>((r) => listener.listen(0, '127.0.0.1', r));
  const port = (listener.address() as net.AddressInfo).port;
  const accepted = new Promise<net.Socket>((r) => listener.once('connection', r));
  const client = net.connect({ host: '127.0.0.1', port });
  const server = await accepted;
  listener.close();
  t.teardown(() => {
    client.destroy();
    server.destroy();
  });
  const chunks: Buffer[] = [];
  let total = 0;
  let waiter: { n: number; resolve: () => void } | null = null;
  let ended = false;
  const clientEnded = new Promise<void>((resolve) => {
    const end = (): void => {
      ended = true;
      waiter?.resolve();
      resolve();
    };
    client.on('end', end);
    client.on('close', end);
  });
  client.on('error', () => {});
  server.on('error', () => {});
  client.on('data', (d: Buffer) => {
    chunks.push(d);
    total += d.length;
    if (waiter !== null && total >= waiter.n) waiter.resolve();
  });
  return {
    server,
    client,
    received: () => Buffer.concat(chunks),
    receivedAtLeast: (n) =>
      total >= n || ended
        ? Promise.resolve()
        : new Promise<void>((resolve, reject) => {
            const timer = setTimeout(() => reject(new Error(`received ${total} of ${n} bytes in 20 s`)), 20_000);
            waiter = {
              n,
              resolve: () => {
                clearTimeout(timer);
                resolve();
              },
            };
          }),
    clientEnded,
  };
}

function writer(p: Pair, opts: ReplyWriterOptions): { w: ReplyWriter; counts: PoolWriteCounts } {
  const counts: PoolWriteCounts = { pool: 0, partial: 0 };
  return { w: new ReplyWriter(p.server, () => {}, { counts, ...opts }), counts };
}

/** A batch of 1-3 buffers of random bytes, `bytes` long in all. */
function batch(bytes: number): Buffer[] {
  const parts = 1 + crypto.randomInt(3);
  const out: Buffer[] = [];
  let left = bytes;
  for (let i = 0; i < parts; i++) {
    const n = i === parts - 1 ? left : Math.floor(left / 2);
    out.push(crypto.randomBytes(n));
    left -= n;
  }
  return out.filter((b) => b.length > 0);
}

const sum = (bufs: Buffer[]): number => bufs.reduce((a, b) => a + b.length, 0);

t.test('batches arrive in order across pool writes, partial writes and the socket path', async (t) => {
  const p = await pair(t);
  const { w, counts } = writer(p, { poolMin: 64 * 1024 });
  const sent: Buffer[] = [];
  const errors: unknown[] = [];
  let done = 0;
  const write = (bytes: number): Promise<void> =>
    new Promise((resolve) => {
      const b = batch(bytes);
      sent.push(...b);
      w.write(b, sum(b), (err) => {
        if (err) errors.push(err);
        done++;
        resolve();
      });
    });
  const sizes = [1 << 20, 16 * 1024, 300 * 1024, 4 << 20, 100, 2 << 20, 64 * 1024, 512 * 1024, 3 << 20, 70 * 1024];

  // While the client does not read, the kernel's buffers fill: writes are partial, the rest queues in the
  // net.Socket, and batches handed over meanwhile wait behind the pool write.
  p.client.pause();
  const first = sizes.map((n) => write(n));
  await new Promise((r) => setTimeout(r, 200));
  t.ok(w.pendingBytes > 0, 'bytes wait while the client does not read');
  p.client.resume();
  await Promise.all(first);
  // Then one batch at a time, each after the last is written: the socket has nothing queued, so every long
  // batch goes to the pool.
  for (const n of sizes) await write(n);

  const total = sum(sent);
  await p.receivedAtLeast(total);
  t.same(errors, [], 'every batch written');
  t.equal(done, 2 * sizes.length, 'every callback called');
  t.equal(w.pendingBytes, 0, 'nothing pending');
  t.ok(p.received().equals(Buffer.concat(sent)), `the client got the ${total} bytes in order`);
  t.ok(counts.pool >= sizes.filter((n) => n >= 64 * 1024).length, `pool writes: ${counts.pool}`);
  t.ok(counts.partial >= 1, `partial pool writes finished through the socket: ${counts.partial}`);
});

t.test('no pool writes below poolMin, when worthIt says no, or with poolMin 0', async (t) => {
  for (const opts of [{ poolMin: 8 << 20 }, { worthIt: () => false }, { poolMin: 0 }] as ReplyWriterOptions[]) {
    const p = await pair(t);
    const { w, counts } = writer(p, opts);
    const b = batch(1 << 20);
    await new Promise<void>((resolve) => w.write(b, sum(b), () => resolve()));
    await p.receivedAtLeast(sum(b));
    t.equal(counts.pool, 0, `${JSON.stringify(opts)}: through the socket`);
    t.ok(p.received().equals(Buffer.concat(b)), 'bytes intact');
  }
});

t.test('the descriptor stays open while a pool write is in flight', async (t) => {
  for (let round = 0; round < 20; round++) {
    const p = await pair(t);
    const { w, counts } = writer(p, {});
    const order: string[] = [];
    const b = batch(4 << 20);
    let writeErr: NodeJS.ErrnoException | null = null;
    w.write(b, sum(b), (err) => {
      writeErr = err ?? null;
      order.push('written');
    });
    t.equal(counts.pool, 1, 'the batch went to the pool');
    const closed = new Promise<void>((r) => p.server.once('close', () => (order.push('closed'), r())));
    p.server.destroy(); // while the thread pool writes: the handle's close must wait for it
    await closed;
    // The kernel may take only part of the batch; its rest, handed to the destroyed net.Socket, fails with
    // ERR_STREAM_DESTROYED. The pool write itself must never fail (EBADF: the descriptor closed under it).
    const e = writeErr as NodeJS.ErrnoException | null;
    if (e !== null && !(e.code === 'ERR_STREAM_DESTROYED' && counts.partial === 1)) {
      t.fail(`round ${round}: the pool write failed: ${String(e)}`);
      return;
    }
    if (order.join() !== 'written,closed') {
      t.fail(`round ${round}: ${order.join()}`);
      return;
    }
  }
  t.pass('20 rounds: the write returned before the socket closed, without error');
});

t.test('end() waits for the pool write and the batches behind it', async (t) => {
  const p = await pair(t);
  const { w, counts } = writer(p, {});
  p.client.pause();
  const a = batch(6 << 20);
  const b = batch(1000);
  const c = batch(2 << 20);
  w.write(a, sum(a), undefined);
  w.write(b, sum(b), undefined);
  w.write(c, sum(c), undefined);
  w.end();
  setTimeout(() => p.client.resume(), 100);
  await p.clientEnded;
  t.equal(counts.pool, 1, 'the first batch went to the pool');
  t.ok(p.received().equals(Buffer.concat([...a, ...b, ...c])), 'every byte arrived before the end');
});

t.test('a peer that reset the connection: the pool write fails, the callbacks get the error', async (t) => {
  const p = await pair(t);
  const { w, counts } = writer(p, {});
  p.client.resetAndDestroy();
  await new Promise((r) => setTimeout(r, 100));
  const errs: (Error | null | undefined)[] = [];
  const wrote = new Promise<void>((resolve) => {
    const a = batch(4 << 20);
    w.write(a, sum(a), (err) => {
      errs.push(err);
      resolve();
    });
  });
  const b = batch(10);
  w.write(b, sum(b), (err) => errs.push(err));
  await wrote;
  await new Promise((r) => setImmediate(r));
  t.equal(counts.pool, 1, 'the batch went to the pool');
  t.equal(errs.length, 2, 'both callbacks called');
  t.match(String((errs[0] as NodeJS.ErrnoException | undefined)?.code), /^(ECONNRESET|EPIPE)$/, 'with the write error');
  t.ok(errs[1] instanceof Error, 'the waiting batch gets an error too');
  t.ok(p.server.destroyed, 'the socket is destroyed');
});
