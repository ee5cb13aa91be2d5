// READs that wait for their device go through BlockDevice.preadCb when the device has it (one promise per
// request instead of one per layer). On a real socket: the replies carry the right bytes whether the device
// answers later or before preadCb returns, simple and structured, with holes or DF; a failed read gets its
// error reply (EIO) and the connection goes on; and reads are answered in whatever order the device finishes.

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

const KiB = 1024;
const MiB = 1024 * KiB;
/** Longer than the server's synchronous-read limit, so every READ here waits for the device. */
const LONG = 256 * KiB;
const FAIL_AT = 8 * MiB;

/**
 * A memory device read through preadCb: with no synchronous reads at all, answered before preadCb returns
 * when `sync`, else on a later turn of the event loop (the later, the smaller the offset: replies come back
 * out of order); a read at or past FAIL_AT fails with EIO.
 */
class CallbackDevice extends PassThroughDevice<MemoryDevice> {
  sync = false;
  cbReads = 0;

  preadCb(buf: Buffer, offset: number, done: (err: Error | null) => void): void {
    this.cbReads++;
    const answer = (): void => {
      if (offset + buf.length > FAIL_AT) return done(Object.assign(new Error('EIO: injected read failure'), { code: 'EIO' }));
      this.inner.pread(buf, offset).then(() => done(null), done);
    };
    if (this.sync) {
      // MemoryDevice's pread copies before its promise settles; take the bytes now to answer synchronously.
      if (offset + buf.length > FAIL_AT) return answer();
      if (!this.inner.preadNow!(buf, offset)) throw new Error('MemoryDevice reads synchronously');
      return done(null);
    }
    setTimeout(answer, Math.max(0, 20 - offset / MiB));
  }

  extentsNow(offset: number, length: number): ReturnType<MemoryDevice['extentsNow']> {
    return this.inner.extentsNow?.(offset, length) ?? null;
  }
}

function pattern(length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = ((i * 13 + seed) % 253) + 1;
  return b;
}

t.test('READs through preadCb', async (t) => {
  const mem = new MemoryDevice({ size: 16 * MiB });
  const model = pattern(4 * MiB, 3);
  await mem.pwrite(model, 0); // [4 MiB, 16 MiB) stays a hole
  const dev = new CallbackDevice(mem);
  const server = new NbdServer(new ExportRegistry([{ name: 'cb', description: '', device: dev }]), silentLogger());
  const { port } = await server.listen({ host: '127.0.0.1', port: 0 });
  t.teardown(() => server.stop());

  for (const sync of [false, true]) {
    t.test(`simple replies, device answers ${sync ? 'before preadCb returns' : 'later, out of order'}`, async (t) => {
      dev.sync = sync;
      const before = dev.cbReads;
      const c = await RawConn.connect(port);
      t.teardown(() => c.destroy());
      await c.handshake('cb');
      const offsets = [0, 3 * MiB, MiB + 12_345, 2 * MiB, 512 * KiB];
      for (const [i, off] of offsets.entries()) {
        c.send(encodeRequest({ type: C.NBD_CMD_READ, flags: 0, cookie: BigInt(100 + i), offset: off, length: LONG }));
      }
      // A failing read among them, and one after it.
      c.send(encodeRequest({ type: C.NBD_CMD_READ, flags: 0, cookie: 200n, offset: FAIL_AT - 4096, length: LONG }));
      c.send(encodeRequest({ type: C.NBD_CMD_READ, flags: 0, cookie: 201n, offset: 0, length: LONG }));
      const got = new Map<bigint, { error: number; data: Buffer | null }>();
      for (let i = 0; i < offsets.length + 2; i++) {
        const h = decodeReplyHeader(await c.read(16));
        if (h === null || h.kind !== 'simple') throw new Error('expected a simple reply');
        got.set(h.cookie, { error: h.error, data: h.error === 0 ? await c.read(LONG) : null });
      }
      for (const [i, off] of offsets.entries()) {
        const r = got.get(BigInt(100 + i));
        t.ok(r !== undefined && r.error === 0 && r.data!.equals(model.subarray(off, off + LONG)), `read at ${off}`);
      }
      t.equal(got.get(200n)?.error, C.NBD_EIO, 'the failed read: EIO');
      t.ok(got.get(201n)?.data?.equals(model.subarray(0, LONG)), 'the connection goes on after it');
      t.equal(dev.cbReads - before, offsets.length + 2, 'every READ went through preadCb');
    });
  }

  t.test('structured replies: data and holes, DF, and an error chunk', async (t) => {
    dev.sync = false;
    const c = await RawConn.connect(port);
    t.teardown(() => c.destroy());
    await c.handshake('cb', { structured: true, meta: true });
    // Across the end of the data: an OFFSET_DATA chunk, then an OFFSET_HOLE chunk.
    const off = 4 * MiB - 100 * KiB;
    c.send(encodeRequest({ type: C.NBD_CMD_READ, flags: 0, cookie: 1n, offset: off, length: LONG }));
    const out = Buffer.alloc(LONG, 0xee);
    for (let done = false; !done; ) {
      const h = decodeReplyHeader(await c.read(20))!;
      if (h.kind !== 'structured' || h.cookie !== 1n) throw new Error('expected a structured reply to cookie 1');
      const p = await c.read(h.length);
      const at = Number(p.readBigUInt64BE(0)) - off;
      if (h.type === C.NBD_REPLY_TYPE_OFFSET_DATA) p.copy(out, at, 8);
      else if (h.type === C.NBD_REPLY_TYPE_OFFSET_HOLE) out.fill(0, at, at + p.readUInt32BE(8));
      else throw new Error(`unexpected chunk type ${h.type}`);
      done = (h.flags & C.NBD_REPLY_FLAG_DONE) !== 0;
    }
    const want = Buffer.concat([model.subarray(off), Buffer.alloc(LONG - (4 * MiB - off))]);
    t.ok(out.equals(want), 'data, then zeros for the hole');
    // DF: one OFFSET_DATA chunk with every byte.
    c.send(encodeRequest({ type: C.NBD_CMD_READ, flags: C.NBD_CMD_FLAG_DF, cookie: 2n, offset: off, length: LONG }));
    const dh = decodeReplyHeader(await c.read(20))!;
    t.ok(dh.kind === 'structured' && dh.type === C.NBD_REPLY_TYPE_OFFSET_DATA && dh.flags === C.NBD_REPLY_FLAG_DONE, 'one DATA chunk');
    t.ok((await c.read(8 + LONG)).subarray(8).equals(want), 'with every byte');
    // A failure: an ERROR chunk carrying EIO.
    c.send(encodeRequest({ type: C.NBD_CMD_READ, flags: C.NBD_CMD_FLAG_DF, cookie: 3n, offset: FAIL_AT, length: LONG }));
    const eh = decodeReplyHeader(await c.read(20))!;
    t.ok(eh.kind === 'structured' && eh.type === C.NBD_REPLY_TYPE_ERROR && (eh.flags & C.NBD_REPLY_FLAG_DONE) !== 0, 'ERROR chunk');
    t.equal((await c.read(eh.kind === 'structured' ? eh.length : 0)).readUInt32BE(0), C.NBD_EIO);
  });
});
