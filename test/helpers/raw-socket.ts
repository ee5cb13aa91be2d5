// A raw TCP peer for hand-crafted protocol tests: send arbitrary bytes, read exact byte counts, expect
// the server to close. Deliberately dumb so tests control every byte on the wire.

import * as net from 'node:net';
import {
  BASE_ALLOCATION,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_OPT_GO,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  OPTION_REPLY_HEADER_SIZE,
} from '../../lib/protocol/constants';
import {
  decodeOptionReplyHeader,
  encodeClientFlags,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  type OptionReplyHeader,
} from '../../lib/protocol/handshake';
import { decodeReplyHeader } from '../../lib/protocol/reply';

export class RawConn {
  private buf = Buffer.alloc(0);
  private ended = false;
  private waiters: Array<() => void> = [];

  private constructor(readonly socket: net.Socket) {
    socket.on('data', (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.wake();
    });
    const end = (): void => {
      this.ended = true;
      this.wake();
    };
    socket.on('end', end);
    socket.on('close', end);
    socket.on('error', end);
  }

  static connect(port: number, host = '127.0.0.1'): Promise<RawConn> {
    return new Promise((resolve, reject) => {
      const s = net.connect({ port, host }, () => resolve(new RawConn(s)));
      s.once('error', reject);
    });
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  private async waitFor(pred: () => boolean, timeoutMs: number, what: string): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!pred()) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  send(b: Buffer): void {
    this.socket.write(b);
  }

  /** Exactly n bytes, or throw if the server closes first or the time runs out. */
  async read(n: number, timeoutMs = 5000): Promise<Buffer> {
    await this.waitFor(() => this.buf.length >= n || this.ended, timeoutMs, `${n} bytes`);
    if (this.buf.length < n) throw new Error(`connection closed with ${this.buf.length} of ${n} bytes`);
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return Buffer.from(out);
  }

  /** The next reply, which must be a simple one (no payload read). */
  async simpleReply(): Promise<{ error: number; cookie: bigint }> {
    const h = decodeReplyHeader(await this.read(16));
    if (h === null || h.kind !== 'simple') throw new Error('expected a simple reply');
    return { error: h.error, cookie: h.cookie };
  }

  /** The next n replies, all simple and without payload: error by cookie. */
  async simpleReplies(n: number): Promise<Map<bigint, number>> {
    const out = new Map<bigint, number>();
    for (let i = 0; i < n; i++) {
      const r = await this.simpleReply();
      out.set(r.cookie, r.error);
    }
    return out;
  }

  /** Resolves true when the server closes the connection within timeoutMs (any unread bytes are dropped). */
  async closedWithin(timeoutMs = 5000): Promise<boolean> {
    try {
      await this.waitFor(() => this.ended, timeoutMs, 'close');
      return true;
    } catch {
      return false;
    }
  }

  get pending(): number {
    return this.buf.length;
  }

  destroy(): void {
    this.socket.destroy();
  }

  // -- handshake helpers --------------------------------------------------------------------------------

  /** Read the 18-byte greeting and send client flags (fixed newstyle + no zeroes by default). */
  async greet(flags = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES): Promise<Buffer> {
    const g = await this.read(18);
    this.send(encodeClientFlags(flags));
    return g;
  }

  async optionReply(): Promise<OptionReplyHeader & { payload: Buffer }> {
    const h = decodeOptionReplyHeader(await this.read(OPTION_REPLY_HEADER_SIZE))!;
    return { ...h, payload: await this.read(h.length) };
  }

  /** Read option replies up to and including the final (ACK or error) one. */
  async optionReplies(): Promise<Array<OptionReplyHeader & { payload: Buffer }>> {
    const out: Array<OptionReplyHeader & { payload: Buffer }> = [];
    for (;;) {
      const r = await this.optionReply();
      out.push(r);
      if (r.type === NBD_REP_ACK || r.type >= 0x80000000) return out;
    }
  }

  /** Full handshake to transmission with GO; optionally structured replies and base:allocation. */
  async handshake(exportName = '', opts: { structured?: boolean; meta?: boolean } = {}): Promise<{ size: number; flags: number }> {
    await this.greet();
    if (opts.structured) {
      this.send(encodeOption(NBD_OPT_STRUCTURED_REPLY));
      await this.optionReplies();
      if (opts.meta) {
        this.send(encodeOption(NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest({ name: exportName, queries: [BASE_ALLOCATION] })));
        await this.optionReplies();
      }
    }
    this.send(encodeOption(NBD_OPT_GO, encodeInfoRequest({ name: exportName, infos: [] })));
    const replies = await this.optionReplies();
    const last = replies[replies.length - 1]!;
    if (last.type !== NBD_REP_ACK) throw new Error(`GO failed: 0x${last.type.toString(16)} ${last.payload.toString()}`);
    const info = replies.find((r) => r.payload.length === 12 && r.payload.readUInt16BE(0) === 0)!;
    return { size: Number(info.payload.readBigUInt64BE(2)), flags: info.payload.readUInt16BE(10) };
  }
}
