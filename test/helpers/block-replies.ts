// For tests of the reply path: an in-process server over a memory export whose every block says which it is,
// READ requests for runs of those blocks, and a check that each simple reply carries the bytes of its own
// request (a reply with another block's bytes names the block it came from).

import * as C from '../../lib/protocol/constants';
import { silentLogger } from '../../lib/log';
import { decodeReplyHeader } from '../../lib/protocol/reply';
import { encodeRequest } from '../../lib/protocol/request';
import { ExportRegistry } from '../../lib/server/exports';
import { NbdServer } from '../../lib/server/listener';
import { MemoryDevice } from '../../lib/storage/memory-device';
import type { RawConn } from './raw-socket';
import type { TapLike } from './spawn-server';

/** Blocks of blockSize bytes, each starting with its number, then a byte pattern of its own. */
export class NumberedBlocks {
  constructor(
    readonly blockSize: number,
    readonly count: number,
  ) {}

  content(b: number): Buffer {
    const buf = Buffer.alloc(this.blockSize);
    for (let i = 0; i < this.blockSize; i += 4) buf.writeUInt32BE((b * 2654435761 + i) >>> 0, i);
    buf.writeUInt32BE(b, 0);
    return buf;
  }

  /** Blocks first..first+n-1 as one buffer. */
  run(first: number, n: number): Buffer {
    return Buffer.concat(Array.from({ length: n }, (_, k) => this.content(first + k)));
  }

  /** An NbdServer on a free loopback port exporting these blocks as 'm'; stopped at teardown. */
  async serve(t: Pick<TapLike, 'teardown'>): Promise<{ server: NbdServer; port: number }> {
    const dev = new MemoryDevice({ size: this.count * this.blockSize });
    for (let b = 0; b < this.count; b++) await dev.pwrite(this.content(b), b * this.blockSize);
    const server = new NbdServer(new ExportRegistry([{ name: 'm', description: '', device: dev }]), silentLogger());
    const { port } = await server.listen({ host: '127.0.0.1', port: 0 });
    t.teardown(() => server.stop());
    return { server, port };
  }

  /** READ request i: `blocks` blocks from block `first`, cookie i. */
  request(i: number, first: number, blocks = 1): Buffer {
    return encodeRequest({ type: C.NBD_CMD_READ, flags: 0, cookie: BigInt(i), offset: first * this.blockSize, length: blocks * this.blockSize });
  }

  /**
   * Read n simple READ replies, in whatever order they come; request i asked for blocks(i) blocks from
   * first(i). Resolves with how many carried their own bytes, and up to five that did not.
   */
  async check(c: RawConn, n: number, first: (i: number) => number, blocks: (i: number) => number = () => 1, timeoutMs = 5000): Promise<{ good: number; bad: string[] }> {
    let good = 0;
    const bad: string[] = [];
    for (let k = 0; k < n; k++) {
      const h = decodeReplyHeader(await c.read(16, timeoutMs));
      if (h === null || h.kind !== 'simple' || h.error !== 0) throw new Error(`reply ${k}: not a simple success`);
      const i = Number(h.cookie);
      const data = await c.read(blocks(i) * this.blockSize, timeoutMs);
      if (data.equals(this.run(first(i), blocks(i)))) good++;
      else if (bad.length < 5) bad.push(`cookie ${i}: blocks from ${first(i)} expected, got bytes of block ${data.readUInt32BE(0)}`);
    }
    return { good, bad };
  }
}
