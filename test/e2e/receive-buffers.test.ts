// The connection's reused receive buffers (lib/server/receive-buffers.ts) on a real socket: a WRITE payload
// a device keeps past the read it arrived in must not be overwritten by later reads, and requests cut at any
// byte across reads must still decode.

import t from 'tap';
import * as C from '../../lib/protocol/constants';
import { decodeReplyHeader } from '../../lib/protocol/reply';
import { encodeRequest } from '../../lib/protocol/request';
import { silentLogger } from '../../lib/log';
import { ExportRegistry } from '../../lib/server/exports';
import { NbdServer } from '../../lib/server/listener';
import { MemoryDevice } from '../../lib/storage/memory-device';
import { PassThroughDevice } from '../helpers/pass-through';
import { RawConn } from '../helpers/raw-socket';

const BLOCK = 4096;

/** Keeps every WRITE's buffer, unwritten, until release(); then writes what the buffer holds at that moment. */
class HoldingDevice extends PassThroughDevice<MemoryDevice> {
  held: Array<{ buf: Buffer; offset: number; resolve: () => void }> = [];
  private waiters: Array<() => void> = [];

  override pwrite(buf: Buffer, offset: number): Promise<void> {
    return new Promise((resolve) => {
      this.held.push({ buf, offset, resolve });
      for (const w of this.waiters.splice(0)) w();
    });
  }

  async holding(n: number): Promise<void> {
    const deadline = Date.now() + 10_000;
    while (this.held.length < n) {
      if (Date.now() > deadline) throw new Error(`only ${this.held.length} of ${n} writes arrived`);
      await new Promise<void>((r) => {
        this.waiters.push(r);
        setTimeout(r, 100);
      });
    }
  }

  /** Write the held buffers (as they are now) to the inner device and complete them; returns them. */
  async release(filter: (offset: number) => boolean): Promise<Array<{ buf: Buffer; offset: number }>> {
    const out = this.held.filter((h) => filter(h.offset));
    this.held = this.held.filter((h) => !filter(h.offset));
    for (const h of out) {
      await this.inner.pwrite(h.buf, h.offset);
      h.resolve();
    }
    return out;
  }
}

function writes(first: number, count: number, fill: (i: number) => number, cookieBase: bigint): Buffer {
  const parts: Buffer[] = [];
  for (let i = 0; i < count; i++) {
    parts.push(encodeRequest({ type: C.NBD_CMD_WRITE, flags: 0, cookie: cookieBase + BigInt(i), offset: (first + i) * BLOCK, length: BLOCK }));
    parts.push(Buffer.alloc(BLOCK, fill(i)));
  }
  return Buffer.concat(parts);
}

async function readBlock(c: RawConn, block: number, cookie: bigint): Promise<Buffer> {
  c.send(encodeRequest({ type: C.NBD_CMD_READ, flags: 0, cookie, offset: block * BLOCK, length: BLOCK }));
  const h = decodeReplyHeader(await c.read(16));
  if (h === null || h.kind !== 'simple' || h.error !== 0 || h.cookie !== cookie) throw new Error('bad READ reply');
  return c.read(BLOCK);
}

t.test('receive buffers', async (t) => {
  const holding = new HoldingDevice(new MemoryDevice({ size: 16 << 20 }));
  const server = new NbdServer(new ExportRegistry([{ name: 'held', description: '', device: holding }]), silentLogger());
  const { port } = await server.listen({ host: '127.0.0.1', port: 0 });
  t.teardown(() => server.stop());

  t.test('payloads held by the device keep their bytes while later reads arrive', async (t) => {
    const c = await RawConn.connect(port);
    t.teardown(() => c.destroy());
    await c.handshake('held');
    // ~200 KiB per batch: several socket reads, so receive buffers fill and turn over while payloads are held.
    const N = 48;
    c.send(writes(0, N, (i) => 1 + i, 1000n));
    await holding.holding(N);
    c.send(writes(N, N, (i) => 101 + i, 2000n));
    await holding.holding(2 * N);
    // The second batch completes first; the first batch's buffers were pinned all along.
    const second = await holding.release((o) => o >= N * BLOCK);
    const first = await holding.release(() => true);
    let intact = 0;
    for (const h of [...first, ...second]) {
      const block = h.offset / BLOCK;
      const want = block < N ? 1 + block : 101 + block - N;
      if (h.buf.length === BLOCK && h.buf.every((b) => b === want)) intact++;
    }
    t.equal(intact, 2 * N, 'every held payload still holds what the client sent');
    const r = await c.simpleReplies(2 * N);
    t.equal(r.size, 2 * N);
    t.ok([...r.values()].every((e) => e === 0), 'all writes succeeded');
    for (const block of [0, 1, N - 1, N, 2 * N - 1]) {
      const want = block < N ? 1 + block : 101 + block - N;
      t.ok((await readBlock(c, block, 5000n + BigInt(block))).every((b) => b === want), `block ${block} reads back`);
    }
  });

  t.test('requests cut at every few bytes across reads', async (t) => {
    const c = await RawConn.connect(port);
    t.teardown(() => c.destroy());
    await c.handshake('held');
    c.socket.setNoDelay(true);
    const N = 6;
    const wire = writes(200, N, (i) => 0xa0 + i, 3000n);
    // Pieces of 1 to 37 bytes, each its own write after a pause, so the server sees many partial requests.
    const pieces: Buffer[] = [];
    for (let at = 0, k = 0; at < wire.length; k++) {
      const n = k < 40 ? 1 + (k % 37) : 997;
      pieces.push(wire.subarray(at, at + n));
      at += n;
    }
    for (const p of pieces) {
      c.send(Buffer.from(p));
      await new Promise((r) => setTimeout(r, 1));
    }
    await holding.holding(N);
    const done = await holding.release(() => true);
    t.equal(done.length, N);
    t.ok(
      done.every((h) => h.buf.every((b) => b === 0xa0 + (h.offset / BLOCK - 200))),
      'payloads assembled across many reads are intact',
    );
    const r = await c.simpleReplies(N);
    t.ok([...r.values()].every((e) => e === 0));
  });
});

t.test('the rest of a long WRITE payload is read straight into its buffer, and no further', async (t) => {
  const mem = new MemoryDevice({ size: 8 << 20 });
  const server = new NbdServer(new ExportRegistry([{ name: 'mem', description: '', device: mem }]), silentLogger());
  const { port } = await server.listen({ host: '127.0.0.1', port: 0 });
  t.teardown(() => server.stop());
  const c = await RawConn.connect(port);
  t.teardown(() => c.destroy());
  await c.handshake('mem');
  c.socket.setNoDelay(true);
  const model = Buffer.alloc(8 << 20);
  // Writes of 17 KiB to 300 KiB at unaligned offsets. Each goes out in pieces with pauses between them, so the
  // server holds a partial payload when the next read comes. The last piece carries the next request's
  // header, and often all of it, in the same send: a read into the payload must stop where the payload ends.
  let seed = 7;
  const rnd = (n: number): number => {
    seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
    return seed % n;
  };
  const count = 24;
  const wire: Buffer[] = [];
  for (let i = 0; i < count; i++) {
    const length = (17 << 10) + rnd(283 << 10);
    const offset = rnd((8 << 20) - length);
    const payload = Buffer.alloc(length);
    for (let k = 0; k < length; k += 4096) payload.fill((i * 37 + k / 4096) & 0xff, k, Math.min(length, k + 4096));
    payload.copy(model, offset);
    wire.push(encodeRequest({ type: C.NBD_CMD_WRITE, flags: 0, cookie: BigInt(i), offset, length }), payload);
  }
  const all = Buffer.concat(wire);
  for (let at = 0; at < all.length; ) {
    const n = 1 + rnd(400 << 10);
    c.send(all.subarray(at, at + n));
    at += n;
    await new Promise((r) => setTimeout(r, 2));
  }
  const r = await c.simpleReplies(count);
  t.equal(r.size, count, 'a reply to every write');
  t.ok([...r.values()].every((e) => e === 0), 'all succeeded');
  const back = Buffer.alloc(8 << 20);
  await mem.pread(back, 0);
  t.ok(back.equals(model), 'the device holds every write, byte for byte');
  t.ok((await readBlock(c, 100, 9000n)).equals(model.subarray(100 * BLOCK, 101 * BLOCK)), 'and reads it back over the same connection');
});
