// The connection's reply slabs (lib/server/connection.ts) are reused once the socket has written them: a slab
// must never be reused while a queued write still points into it. A client that stops reading makes the
// replies of thousands of short reads queue in the server (kernel buffers full, then Node's write queue), so
// slabs are retired and new ones needed while the old ones are still queued; every reply must still carry the
// bytes of its own block.

import t from 'tap';
import * as C from '../../lib/protocol/constants';
import { decodeReplyHeader } from '../../lib/protocol/reply';
import { encodeRequest } from '../../lib/protocol/request';
import { silentLogger } from '../../lib/log';
import { ExportRegistry } from '../../lib/server/exports';
import { NbdServer } from '../../lib/server/listener';
import { MemoryDevice } from '../../lib/storage/memory-device';
import { RawConn } from '../helpers/raw-socket';

const BLOCK = 4096;
const BLOCKS = 1024;

/** Block b: its number in the first 4 bytes, then a byte pattern of its own. */
function content(b: number): Buffer {
  const buf = Buffer.alloc(BLOCK, (b * 7 + 3) % 251);
  buf.writeUInt32BE(b, 0);
  return buf;
}

t.test('reply slabs reused only after the socket wrote them', async (t) => {
  const dev = new MemoryDevice({ size: BLOCKS * BLOCK });
  for (let b = 0; b < BLOCKS; b++) await dev.pwrite(content(b), b * BLOCK);
  const server = new NbdServer(new ExportRegistry([{ name: 'm', description: '', device: dev }]), silentLogger());
  const { port } = await server.listen({ host: '127.0.0.1', port: 0 });
  t.teardown(() => server.stop());

  for (const round of [1, 2]) {
    const c = await RawConn.connect(port);
    t.teardown(() => c.destroy());
    await c.handshake('m');
    // 24 MiB of replies: more than loopback's socket buffers and the server's 8 MiB reply budget.
    const N = 6000;
    const block = (i: number): number => (i * 389 + round) % BLOCKS;
    c.socket.pause();
    const reqs: Buffer[] = [];
    for (let i = 0; i < N; i++) {
      reqs.push(encodeRequest({ type: C.NBD_CMD_READ, flags: 0, cookie: BigInt(i), offset: block(i) * BLOCK, length: BLOCK }));
    }
    c.send(Buffer.concat(reqs));
    await new Promise((r) => setTimeout(r, 300)); // the server fills every buffer it has, then waits
    c.socket.resume();
    let good = 0;
    const bad: string[] = [];
    for (let n = 0; n < N; n++) {
      const h = decodeReplyHeader(await c.read(16));
      if (h === null || h.kind !== 'simple' || h.error !== 0) throw new Error(`reply ${n}: not a simple success`);
      const i = Number(h.cookie);
      const data = await c.read(BLOCK);
      if (data.equals(content(block(i)))) good++;
      else if (bad.length < 5) bad.push(`cookie ${i}: block ${block(i)} expected, got bytes of block ${data.readUInt32BE(0)}`);
    }
    t.equal(good, N, `round ${round}: every reply holds its own block`);
    t.same(bad, [], 'no reply carries other bytes');
  }
});

// A batch with long read payloads (pooled buffers) but no full slab must not take the slabs retired after it:
// its write completes later, when the client reads, and by then later batches have retired slabs of their own,
// still queued behind it. Reads of 16 KiB (pooled buffers) and of 4 KiB (copied into the slab, so slabs fill),
// sent a few at a time so that they make many small batches, with the client paused.
t.test('a batch frees only the slabs and buffers it carried', async (t) => {
  const dev = new MemoryDevice({ size: BLOCKS * BLOCK });
  for (let b = 0; b < BLOCKS; b++) await dev.pwrite(content(b), b * BLOCK);
  const server = new NbdServer(new ExportRegistry([{ name: 'm', description: '', device: dev }]), silentLogger());
  const { port } = await server.listen({ host: '127.0.0.1', port: 0 });
  t.teardown(() => server.stop());

  const c = await RawConn.connect(port);
  t.teardown(() => c.destroy());
  await c.handshake('m');
  const N = 3000;
  const blocks = (i: number): number => (i % 3 === 0 ? 1 : 4);
  const first = (i: number): number => (i * 389) % (BLOCKS - 4);
  const expected = (i: number): Buffer => Buffer.concat(Array.from({ length: blocks(i) }, (_, k) => content(first(i) + k)));
  c.socket.pause();
  const reqs: Buffer[] = [];
  for (let i = 0; i < N; i++) {
    reqs.push(encodeRequest({ type: C.NBD_CMD_READ, flags: 0, cookie: BigInt(i), offset: first(i) * BLOCK, length: blocks(i) * BLOCK }));
  }
  for (let i = 0; i < N; i += 3) {
    c.send(Buffer.concat(reqs.slice(i, i + 3)));
    await new Promise((r) => setTimeout(r, 1));
  }
  await new Promise((r) => setTimeout(r, 300));
  c.socket.resume();
  let good = 0;
  const bad: string[] = [];
  for (let n = 0; n < N; n++) {
    const h = decodeReplyHeader(await c.read(16));
    if (h === null || h.kind !== 'simple' || h.error !== 0) throw new Error(`reply ${n}: not a simple success`);
    const i = Number(h.cookie);
    const data = await c.read(blocks(i) * BLOCK);
    if (data.equals(expected(i))) good++;
    else if (bad.length < 5) bad.push(`cookie ${i}: blocks from ${first(i)} expected, got bytes of block ${data.readUInt32BE(0)}`);
  }
  t.equal(good, N, 'every reply holds its own blocks');
  t.same(bad, [], 'no reply carries other bytes');
});
