// Replies to long WRITEs that complete at once (lib/server/connection.ts, payloadRead): the payload of a long
// write is read straight into its buffer, and its reply waits for the end of that poll phase, so a client
// streaming long writes gets the replies of those read in one phase in one socket write. A lone long write
// (nothing behind it) must still be answered, whether its payload came in one read or in pieces.

import t from 'tap';
import * as C from '../../lib/protocol/constants';
import { decodeReplyHeader } from '../../lib/protocol/reply';
import { encodeRequest } from '../../lib/protocol/request';
import { ReplyWriter } from '../../lib/server/reply-writer';
import { startTestNode } from '../helpers/in-process';
import { RawConn } from '../helpers/raw-socket';

const LONG = 256 * 1024;

function longWrite(i: number, cookie: bigint): Buffer[] {
  return [encodeRequest({ type: C.NBD_CMD_WRITE, flags: 0, cookie, offset: i * LONG, length: LONG }), Buffer.alloc(LONG, 1 + (i % 250))];
}

t.test('replies to long writes', async (t) => {
  // A node's export: its writes complete at once (into the region, or straight to the backing file).
  const { port } = await startTestNode(t, { exports: ['m=64M'] });

  // Count the reply batches the connection hands to its writer (every connection in this process).
  let batches = 0;
  const write = ReplyWriter.prototype.write;
  ReplyWriter.prototype.write = function (this: ReplyWriter, ...args: Parameters<ReplyWriter['write']>): void {
    batches++;
    write.apply(this, args);
  };
  t.teardown(() => {
    ReplyWriter.prototype.write = write;
  });

  t.test('a stream of long writes is answered in fewer socket writes than writes', async (t) => {
    const c = await RawConn.connect(port);
    t.teardown(() => c.destroy());
    await c.handshake('m');
    const N = 128; // 32 MiB: far more than loopback's socket buffers, so the server reads behind the client
    batches = 0;
    for (let i = 0; i < N; i++) for (const b of longWrite(i % 256, BigInt(i))) c.send(b);
    const r = await c.simpleReplies(N);
    t.equal(r.size, N, 'a reply for every write');
    t.ok([...r.values()].every((e) => e === 0), 'every write succeeded');
    t.ok(batches < N / 2, `replies of writes read in one poll phase share a batch (${batches} batches for ${N} writes)`);
    c.send(encodeRequest({ type: C.NBD_CMD_READ, flags: 0, cookie: 999n, offset: 7 * LONG, length: LONG }));
    t.match(decodeReplyHeader(await c.read(16)), { kind: 'simple', cookie: 999n, error: 0 });
    t.ok((await c.read(LONG)).every((b) => b === 8), 'the data is there');
  });

  t.test('a lone long write is answered, its payload in one piece or in many', async (t) => {
    const c = await RawConn.connect(port);
    t.teardown(() => c.destroy());
    await c.handshake('m');
    c.socket.setNoDelay(true);
    const [hdr, payload] = longWrite(3, 77n);
    c.send(Buffer.concat([hdr!, payload!]));
    let h = decodeReplyHeader(await c.read(16));
    t.match(h, { kind: 'simple', cookie: 77n, error: 0 }, 'answered with nothing behind it');
    // In pieces, with pauses: the last read completes the payload and nothing follows it.
    c.send(hdr!);
    for (let at = 0; at < LONG; at += 40 * 1024) {
      c.send(Buffer.from(payload!.subarray(at, Math.min(LONG, at + 40 * 1024))));
      await new Promise((r) => setTimeout(r, 5));
    }
    h = decodeReplyHeader(await c.read(16));
    t.match(h, { kind: 'simple', cookie: 77n, error: 0 }, 'answered after a payload in pieces');
    // A short request behind a long write, in the same send: both answered, in order of completion.
    c.send(Buffer.concat([hdr!, payload!, encodeRequest({ type: C.NBD_CMD_FLUSH, flags: 0, cookie: 78n, offset: 0, length: 0 })]));
    const r = await c.simpleReplies(2);
    t.same([...r.entries()], [
      [77n, 0],
      [78n, 0],
    ]);
  });
});
