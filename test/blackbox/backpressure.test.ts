// Memory per connection is bounded: a client that streams large writes as fast as it can, and one that
// never reads its replies, must not make the server buffer without limit (it pauses the socket instead).

import t from 'tap';
import { readFileSync } from 'node:fs';
import * as C from '../../lib/protocol/constants';
import { encodeRequest } from '../../lib/protocol/request';
import { RawConn } from '../helpers/raw-socket';
import { startServer } from '../helpers/spawn-server';

/**
 * Anonymous resident memory of a process in bytes (Linux /proc): what buffering would grow. The mapped pmem
 * region (file-backed, bounded by --pmem-size) is deliberately not counted.
 */
function rssOf(pid: number): number {
  const m = /RssAnon:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) * 1024 : 0;
}

/** Write everything, honouring the socket's own backpressure, until done or the deadline passes. */
async function pump(c: RawConn, make: (i: number) => Buffer[], count: number, deadline: number): Promise<number> {
  let sent = 0;
  for (let i = 0; i < count && Date.now() < deadline; i++) {
    for (const b of make(i)) {
      if (!c.socket.write(b)) {
        await Promise.race([
          new Promise((r) => c.socket.once('drain', r)),
          new Promise((r) => setTimeout(r, Math.max(0, deadline - Date.now()))),
        ]);
      }
      sent += b.length;
    }
  }
  return sent;
}

t.test('a writer that never reads replies cannot grow server memory without bound', async (t) => {
  const srv = await startServer(t, { args: ['--export', 'disk0=256M'] });
  const base = rssOf(srv.pid);
  const c = await RawConn.connect(srv.nbdPort);
  await c.handshake('disk0');
  // Never read from c: replies pile up on the server side until it stops reading requests.
  c.socket.pause();
  const payload = Buffer.alloc(32 << 20, 0xa5);
  let peak = 0;
  const sampler = setInterval(() => (peak = Math.max(peak, rssOf(srv.pid))), 50);
  t.teardown(() => clearInterval(sampler));
  const total = 1024; // up to 32 GiB offered; the deadline ends it long before
  const deadline = Date.now() + 8000;
  const sent = await pump(
    c,
    (i) => [encodeRequest({ type: C.NBD_CMD_WRITE, flags: 0, cookie: BigInt(i), offset: (i % 8) * (32 << 20), length: payload.length }), payload],
    total,
    deadline,
  );
  clearInterval(sampler);
  peak = Math.max(peak, rssOf(srv.pid));
  t.ok(sent >= 256 << 20, `client pushed ${(sent / 2 ** 20).toFixed(0)} MiB`);
  // In flight ≤ 8 MiB (MAX_IN_FLIGHT_BYTES) + one 32 MiB payload being received + socket buffers, and
  // slack for V8 (about 55 MiB in all here; 90-120 MiB with the 64 MiB budgets this replaced).
  const growth = peak - base;
  t.ok(growth < 100 * 2 ** 20, `server anonymous RSS grew by ${(growth / 2 ** 20).toFixed(0)} MiB (peak ${(peak / 2 ** 20).toFixed(0)} MiB)`);
  c.destroy();
  // The server is healthy afterwards.
  const d = await RawConn.connect(srv.nbdPort);
  await d.handshake('disk0');
  d.send(encodeRequest({ type: C.NBD_CMD_READ, flags: 0, cookie: 1n, offset: 0, length: 4096 }));
  const reply = await d.read(16 + 4096, 20_000);
  t.equal(reply.readUInt32BE(4), 0, 'reads still served');
  d.destroy();
  const exit = await srv.stop();
  t.equal(exit.code, 0);
});

t.test('a reader that never reads its replies stops the server reading, not its memory', async (t) => {
  const srv = await startServer(t, { args: ['--export', 'disk0=256M'] });
  const base = rssOf(srv.pid);
  const c = await RawConn.connect(srv.nbdPort);
  await c.handshake('disk0');
  c.socket.pause();
  let peak = 0;
  const sampler = setInterval(() => (peak = Math.max(peak, rssOf(srv.pid))), 50);
  t.teardown(() => clearInterval(sampler));
  // 2000 × 32 MiB reads = 62.5 GiB of replies asked for; only the request headers are sent.
  const deadline = Date.now() + 5000;
  const sent = await pump(
    c,
    (i) => [encodeRequest({ type: C.NBD_CMD_READ, flags: 0, cookie: BigInt(i), offset: (i % 8) * (32 << 20), length: 32 << 20 })],
    2000,
    deadline,
  );
  await new Promise((r) => setTimeout(r, Math.max(0, deadline - Date.now())));
  clearInterval(sampler);
  peak = Math.max(peak, rssOf(srv.pid));
  t.equal(sent, 2000 * 28, 'all request headers were sent');
  // Replies queued ≤ 8 MiB (MAX_QUEUED_REPLY_BYTES) + one 32 MiB read in flight + socket buffers + V8's slack.
  const growth = peak - base;
  t.ok(growth < 100 * 2 ** 20, `server anonymous RSS grew by ${(growth / 2 ** 20).toFixed(0)} MiB (peak ${(peak / 2 ** 20).toFixed(0)} MiB)`);
  c.destroy();
  const exit = await srv.stop();
  t.equal(exit.code, 0, 'stops cleanly afterwards');
});
