// The connection's reply slabs (lib/server/connection.ts) are reused once the socket has written them: a slab
// must never be reused while a queued write still points into it. A client that stops reading makes the
// replies of thousands of short reads queue in the server (kernel buffers full, then Node's write queue), so
// slabs are retired and new ones needed while the old ones are still queued; every reply must still carry the
// bytes of its own block.

import t from 'tap';
import { NumberedBlocks } from '../helpers/block-replies';
import { RawConn } from '../helpers/raw-socket';

const blocks = new NumberedBlocks(4096, 1024);

t.test('reply slabs reused only after the socket wrote them', async (t) => {
  const { port } = await blocks.serve(t);
  for (const round of [1, 2]) {
    const c = await RawConn.connect(port);
    t.teardown(() => c.destroy());
    await c.handshake('m');
    // 24 MiB of replies: more than loopback's socket buffers and the server's 8 MiB reply budget.
    const N = 6000;
    const block = (i: number): number => (i * 389 + round) % blocks.count;
    c.socket.pause();
    c.send(Buffer.concat(Array.from({ length: N }, (_, i) => blocks.request(i, block(i)))));
    await new Promise((r) => setTimeout(r, 300)); // the server fills every buffer it has, then waits
    c.socket.resume();
    const { good, bad } = await blocks.check(c, N, block);
    t.equal(good, N, `round ${round}: every reply holds its own block`);
    t.same(bad, [], 'no reply carries other bytes');
  }
});

// A batch with long read payloads (pooled buffers) but no full slab must not take the slabs retired after it:
// its write completes later, when the client reads, and by then later batches have retired slabs of their own,
// still queued behind it. Reads of 16 KiB (pooled buffers) and of 4 KiB (copied into the slab, so slabs fill),
// sent a few at a time so that they make many small batches, with the client paused.
t.test('a batch frees only the slabs and buffers it carried', async (t) => {
  const { port } = await blocks.serve(t);
  const c = await RawConn.connect(port);
  t.teardown(() => c.destroy());
  await c.handshake('m');
  const N = 3000;
  const count = (i: number): number => (i % 3 === 0 ? 1 : 4);
  const first = (i: number): number => (i * 389) % (blocks.count - 4);
  c.socket.pause();
  for (let i = 0; i < N; i += 3) {
    c.send(Buffer.concat([i, i + 1, i + 2].filter((j) => j < N).map((j) => blocks.request(j, first(j), count(j)))));
    await new Promise((r) => setTimeout(r, 1));
  }
  await new Promise((r) => setTimeout(r, 300));
  c.socket.resume();
  const { good, bad } = await blocks.check(c, N, first, count);
  t.equal(good, N, 'every reply holds its own blocks');
  t.same(bad, [], 'no reply carries other bytes');
});
