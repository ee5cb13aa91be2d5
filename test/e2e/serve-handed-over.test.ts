// NbdServer.serve(): a connection accepted by another listener (as a loop that is handed connections by
// another thread gets them: bench/ceiling/file-server.ts) is served like one the NbdServer accepted itself:
// handshake, writes and reads, and it counts in the server's connections until it closes.

import * as net from 'node:net';
import t from 'tap';
import { NbdClient } from '../../lib/client/nbd-client';
import { silentLogger } from '../../lib/log';
import { NodeRequestStats } from '../../lib/metrics/request-stats';
import { ExportRegistry } from '../../lib/server/exports';
import { NbdServer } from '../../lib/server/listener';
import { MemoryDevice } from '../../lib/storage/memory-device';

t.test('a connection accepted elsewhere is served through serve()', async (t) => {
  const device = new MemoryDevice({ size: 8 << 20 });
  const stats = new NodeRequestStats();
  const nbd = new NbdServer(new ExportRegistry([{ name: 'disk0', description: 'memory', device }]), silentLogger(), stats);
  let handed = 0;
  // The other listener does nothing but accept, paused, and hand the socket on.
  const front = net.createServer({ pauseOnConnect: true, noDelay: true }, (socket) => {
    handed++;
    nbd.serve(socket);
  });
  await new Promise<void>((resolve) => front.listen({ host: '127.0.0.1', port: 0 }, resolve));
  t.teardown(async () => {
    await nbd.stop();
    await new Promise<void>((resolve) => front.close(() => resolve()));
  });
  const port = (front.address() as net.AddressInfo).port;

  const clients = await Promise.all([0, 1].map(() => NbdClient.connect({ host: '127.0.0.1', port }, { exportName: 'disk0' })));
  t.equal(handed, 2, 'both connections came through the other listener');
  t.equal(nbd.connectionCount, 2, 'and count as the server\'s');
  t.equal(clients[0]!.size, 8 << 20, 'the handshake told the export size');

  const a = Buffer.alloc(256 << 10, 0xa5);
  const b = Buffer.alloc(4096, 0x3c);
  await clients[0]!.pwrite(a, 1 << 20);
  await clients[1]!.pwrite(b, 1 << 20);
  const back = await clients[0]!.pread(1 << 20, a.length);
  t.ok(back.subarray(0, 4096).equals(b), 'a write on one connection is read on the other');
  t.ok(back.subarray(4096).equals(a.subarray(4096)), 'and the rest is the first write');
  t.equal(stats.connectionsAccepted, 2, 'the server counted them in');

  await Promise.all(clients.map((c) => c.disconnect()));
  const deadline = Date.now() + 5000;
  while (nbd.connectionCount !== 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
  t.equal(nbd.connectionCount, 0, 'and out again when they closed');
  t.equal(stats.connectionsOpen, 0);
});
