// A connection stops reading requests once its payload budget is in flight (MAX_IN_FLIGHT_BYTES, or the
// export's own ExportHandle.payloadBudget, as the replication link has): a client that streams long writes
// to a device that holds them gets that many into the server and no more, until the device lets go.

import t from 'tap';
import * as C from '../../lib/protocol/constants';
import { decodeReplyHeader } from '../../lib/protocol/reply';
import { encodeRequest } from '../../lib/protocol/request';
import { silentLogger } from '../../lib/log';
import { ExportRegistry } from '../../lib/server/exports';
import { NbdServer } from '../../lib/server/listener';
import { MAX_IN_FLIGHT_BYTES } from '../../lib/server/connection';
import { MemoryDevice } from '../../lib/storage/memory-device';
import { PassThroughDevice } from '../helpers/pass-through';
import { RawConn } from '../helpers/raw-socket';

const MiB = 1 << 20;

/** Holds every WRITE until release(). */
class HoldingDevice extends PassThroughDevice<MemoryDevice> {
  held: Array<{ buf: Buffer; offset: number; resolve: () => void }> = [];

  override pwrite(buf: Buffer, offset: number): Promise<void> {
    return new Promise((resolve) => this.held.push({ buf, offset, resolve }));
  }

  async release(): Promise<void> {
    for (const h of this.held.splice(0)) {
      await this.inner.pwrite(h.buf, h.offset);
      h.resolve();
    }
  }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** How many writes the device holds once that number has stopped growing (bounded wait). */
async function settledCount(dev: HoldingDevice): Promise<number> {
  let last = -1;
  for (let i = 0; i < 100 && dev.held.length !== last; i++) {
    last = dev.held.length;
    await sleep(150);
  }
  return dev.held.length;
}

t.test('long writes in flight stop at the payload budget, per export', async (t) => {
  const small = new HoldingDevice(new MemoryDevice({ size: 64 * MiB }));
  const large = new HoldingDevice(new MemoryDevice({ size: 64 * MiB }));
  const budget = 4 * MAX_IN_FLIGHT_BYTES;
  const server = new NbdServer(
    new ExportRegistry([
      { name: 'default', description: '', device: small },
      { name: 'large', description: '', device: large, payloadBudget: budget },
    ]),
    silentLogger(),
  );
  const { port } = await server.listen({ host: '127.0.0.1', port: 0 });
  t.teardown(() => server.stop());

  for (const [name, dev, limit] of [
    ['default', small, MAX_IN_FLIGHT_BYTES],
    ['large', large, budget],
  ] as const) {
    const c = await RawConn.connect(port);
    t.teardown(() => c.destroy());
    await c.handshake(name);
    const count = 48; // 48 MiB offered: more than either budget
    for (let i = 0; i < count; i++) {
      c.send(encodeRequest({ type: C.NBD_CMD_WRITE, flags: 0, cookie: BigInt(i), offset: i * MiB, length: MiB }));
      c.send(Buffer.alloc(MiB, 1 + (i % 250)));
    }
    const held = await settledCount(dev);
    const want = limit / MiB;
    // Reading pauses once the budget is reached: at most one more payload can be on its way in.
    t.ok(held >= want && held <= want + 1, `${name}: ${held} writes of 1 MiB taken in, budget ${want} MiB`);
    // Letting go resumes reading; every write completes and lands.
    let released = 0;
    for (let round = 0; round < 250 && released < count; round++) {
      released += dev.held.length;
      await dev.release();
      await sleep(20);
    }
    t.equal(released, count, `${name}: every write reached the device`);
    let ok = 0;
    for (let i = 0; i < count; i++) {
      const h = decodeReplyHeader(await c.read(16, 20_000));
      if (h !== null && h.kind === 'simple' && h.error === 0) ok++;
    }
    t.equal(ok, count, `${name}: all ${count} writes succeeded`);
    const back = Buffer.alloc(MiB);
    await dev.inner.pread(back, (count - 1) * MiB);
    t.ok(back.every((b) => b === 1 + ((count - 1) % 250)), `${name}: the last write landed`);
  }
});
