// Long replies written from the thread pool (lib/server/reply-writer.ts) while several connections are open:
// two clients read 512 KiB blocks at once, one of them pausing so its kernel buffers fill (pool writes the
// kernel takes only in part). Every reply must carry the bytes of its own block, in whole, and a lone
// connection's replies never go to the pool.

import t from 'tap';
import { NumberedBlocks } from '../helpers/block-replies';
import { RawConn } from '../helpers/raw-socket';

const blocks = new NumberedBlocks(512 * 1024, 64);

/** n READs of one block each on c (the client paused for pauseMs first, if any); the replies checked. */
async function readBlocks(c: RawConn, n: number, seed: number, pauseMs: number): Promise<{ good: number; bad: string[] }> {
  const block = (i: number): number => (i * 37 + seed) % blocks.count;
  if (pauseMs > 0) c.socket.pause();
  c.send(Buffer.concat(Array.from({ length: n }, (_, i) => blocks.request(i, block(i)))));
  if (pauseMs > 0) setTimeout(() => c.socket.resume(), pauseMs);
  return blocks.check(c, n, block, undefined, 20_000);
}

t.test('two connections reading long blocks: pool writes, every reply whole and its own', async (t) => {
  const { server, port } = await blocks.serve(t);
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
  const { server, port } = await blocks.serve(t);
  const a = await RawConn.connect(port);
  t.teardown(() => a.destroy());
  await a.handshake('m');
  const r = await readBlocks(a, 32, 3, 0);
  t.equal(r.good, 32, 'every reply holds its own block');
  t.equal(server.replyWrites.pool, 0, 'no pool writes');
});
