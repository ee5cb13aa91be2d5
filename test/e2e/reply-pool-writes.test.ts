// Long replies written from the thread pool (lib/server/reply-writer.ts) while several connections are open:
// two clients read 512 KiB blocks at once, one of them pausing so its kernel buffers fill (pool writes the
// kernel takes only in part). Every reply must carry the bytes of its own block, in whole, and a lone
// connection's replies never go to the pool.

import t, { type Test } from 'tap';
import * as C from '../../lib/protocol/constants';
import { decodeReplyHeader } from '../../lib/protocol/reply';
import { encodeRequest } from '../../lib/protocol/request';
import { silentLogger } from '../../lib/log';
import { ExportRegistry } from '../../lib/server/exports';
import { NbdServer } from '../../lib/server/listener';
import { MemoryDevice } from '../../lib/storage/memory-device';
import { RawConn } from '../helpers/raw-socket';

const BLOCK = 512 * 1024;
const BLOCKS = 64;

/** Block b: its number in the first 4 bytes, then a byte pattern of its own. */
function content(b: number): Buffer {
  const buf = Buffer.alloc(BLOCK);
  for (let i = 0; i < BLOCK; i += 4) buf.writeUInt32BE((b * 2654435761 + i) >>> 0, i);
  buf.writeUInt32BE(b, 0);
  return buf;
}

async function serve(t: Test): Promise<{ server: NbdServer; port: number }> {
  const dev = new MemoryDevice({ size: BLOCKS * BLOCK });
  for (let b = 0; b < BLOCKS; b++) await dev.pwrite(content(b), b * BLOCK);
  const server = new NbdServer(new ExportRegistry([{ name: 'm', description: '', device: dev }]), silentLogger());
  const { port } = await server.listen({ host: '127.0.0.1', port: 0 });
  t.teardown(() => server.stop());
  return { server, port };
}

/** n READs of whole blocks on c; resolves with how many replies held the right bytes, and any mismatch. */
async function readBlocks(c: RawConn, n: number, seed: number, pauseMs: number): Promise<{ good: number; bad: string[] }> {
  const block = (i: number): number => (i * 37 + seed) % BLOCKS;
  const reqs: Buffer[] = [];
  for (let i = 0; i < n; i++) {
    reqs.push(encodeRequest({ type: C.NBD_CMD_READ, flags: 0, cookie: BigInt(i), offset: block(i) * BLOCK, length: BLOCK }));
  }
  if (pauseMs > 0) c.socket.pause();
  c.send(Buffer.concat(reqs));
  if (pauseMs > 0) setTimeout(() => c.socket.resume(), pauseMs);
  let good = 0;
  const bad: string[] = [];
  for (let k = 0; k < n; k++) {
    const h = decodeReplyHeader(await c.read(16, 20_000));
    if (h === null || h.kind !== 'simple' || h.error !== 0) throw new Error(`reply ${k}: not a simple success`);
    const i = Number(h.cookie);
    const data = await c.read(BLOCK, 20_000);
    if (data.equals(content(block(i)))) good++;
    else if (bad.length < 5) bad.push(`cookie ${i}: block ${block(i)} expected, got bytes of block ${data.readUInt32BE(0)}`);
  }
  return { good, bad };
}

t.test('two connections reading long blocks: pool writes, every reply whole and its own', async (t) => {
  const { server, port } = await serve(t);
  const a = await RawConn.connect(port);
  const b = await RawConn.connect(port);
  t.teardown(() => (a.destroy(), b.destroy()));
  await a.handshake('m');
  await b.handshake('m');
  const N = 96; // 48 MiB per connection: more than the kernel's buffers and the 8 MiB reply budget
  const [ra, rb] = await Promise.all([readBlocks(a, N, 1, 300), readBlocks(b, N, 5, 0)]);
  t.equal(ra.good, N, 'connection a (paused a while): every reply holds its own block');
  t.equal(rb.good, N, 'connection b: every reply holds its own block');
  t.same([...ra.bad, ...rb.bad], [], 'no reply carries other bytes');
  t.ok(server.replyWrites.pool > 0, `replies written from the thread pool: ${server.replyWrites.pool} batches, ${server.replyWrites.partial} in part`);
});

t.test('a lone connection writes through its socket', async (t) => {
  const { server, port } = await serve(t);
  const a = await RawConn.connect(port);
  t.teardown(() => a.destroy());
  await a.handshake('m');
  const r = await readBlocks(a, 32, 3, 0);
  t.equal(r.good, 32, 'every reply holds its own block');
  t.equal(server.replyWrites.pool, 0, 'no pool writes');
});
