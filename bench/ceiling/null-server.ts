// The front end alone: nbdmirror's NBD listener and connections (the same code as the server) over a device
// that does nothing. A WRITE completes at once (pwriteFast returns null, as when the region takes it), a READ
// leaves its buffer as it is. What this serves per second, and the CPU it spends per request, is the ceiling
// of the request path before any storage work. bench/ceiling/run.sh compares it with nbdkit and the server.
//
// Usage: node dist/bench/ceiling/null-server.js PORT [SIZE_BYTES]   (SIGTERM stops it)

import { silentLogger } from '../../lib/log';
import { ExportRegistry } from '../../lib/server/exports';
import { NbdServer } from '../../lib/server/listener';
import { type BlockDevice, type Extent, fullCapabilities } from '../../lib/storage/block-device';

const port = Number(process.argv[2]);
const size = Number(process.argv[3] ?? 1 << 30);
if (!Number.isInteger(port) || port <= 0 || !Number.isSafeInteger(size) || size <= 0) {
  process.stderr.write('usage: null-server.js PORT [SIZE_BYTES]\n');
  process.exit(2);
}

const done = Promise.resolve();
const device: BlockDevice = {
  size,
  caps: fullCapabilities(false),
  pread: () => done,
  preadNow: () => true,
  pwrite: () => done,
  pwriteFast: () => null,
  flush: () => done,
  trim: () => done,
  zero: () => done,
  cache: () => done,
  extents: (_offset: number, length: number): Promise<Extent[]> => Promise.resolve([{ length, flags: 0 }]),
  close: () => done,
};

const server = new NbdServer(new ExportRegistry([{ name: 'disk0', description: 'null', device }]), silentLogger());
server.listen({ host: '127.0.0.1', port }).then(
  () => process.stdout.write(`listening on 127.0.0.1:${port}\n`),
  (err: unknown) => {
    process.stderr.write(`${String(err)}\n`);
    process.exit(1);
  },
);
process.on('SIGTERM', () => void server.stop().then(() => process.exit(0)));
