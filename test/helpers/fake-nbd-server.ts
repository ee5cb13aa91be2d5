// A scripted NBD server for client tests (Crucible's fake downstairs): it speaks just enough of the handshake,
// records what the client sent, and hands each transmission request to the test, which writes whatever
// replies — well-formed or deliberately broken — it wants, built with the lib/protocol encoders.

import * as net from 'node:net';
import {
  BASE_ALLOCATION,
  NBD_CMD_WRITE,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_NO_ZEROES,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  OPTION_HEADER_SIZE,
  REQUEST_SIZE,
} from '../../lib/protocol/constants';
import { FrameReader } from '../../lib/protocol/frame-reader';
import {
  decodeOptionHeader,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoExport,
  encodeMetaContextReply,
  encodeOptionReply,
  parseMetaContextRequest,
} from '../../lib/protocol/handshake';
import { type Request, decodeRequest } from '../../lib/protocol/request';
import type { ConnectTarget } from '../../lib/client/uri';

export const FAKE_SIZE = 1024 * 1024;
export const FAKE_FLAGS = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_DF;

/** How the fake answers one option: replies to send, and whether transmission starts (or the socket closes). */
export interface OptionOutcome {
  replies: Buffer[];
  next?: 'transmission' | 'close';
}

export interface FakeOptions {
  handshakeFlags?: number;
  /** Override the answer to some options; return undefined to fall back to the defaults below. */
  onOption?: (option: number, data: Buffer) => OptionOutcome | undefined;
  /** Contexts the server knows (name → id); SET_META_CONTEXT selects those queried. Default base:allocation → 7. */
  contexts?: ReadonlyMap<string, number>;
  /** Called for each transmission request (payload for WRITE). */
  onRequest?: (req: Request, payload: Buffer | undefined, sock: net.Socket) => void;
}

export interface FakeServer {
  target: ConnectTarget;
  /** Client flags word received. */
  clientFlags(): number | undefined;
  /** Options received, in order. */
  options(): number[];
  /** Requests received, in order. */
  requests(): Request[];
  /** The most recent client socket. */
  socket(): net.Socket | undefined;
  close(): Promise<void>;
}

export function defaultOption(option: number, data: Buffer, contexts: ReadonlyMap<string, number>, noZeroes: boolean): OptionOutcome {
  switch (option) {
    case NBD_OPT_STRUCTURED_REPLY:
      return { replies: [encodeOptionReply(option, NBD_REP_ACK)] };
    case NBD_OPT_SET_META_CONTEXT: {
      const req = parseMetaContextRequest(data);
      const replies = [...contexts]
        .filter(([name]) => req?.queries.includes(name) === true)
        .map(([name, id]) => encodeOptionReply(option, NBD_REP_META_CONTEXT, encodeMetaContextReply(id, name)));
      return { replies: [...replies, encodeOptionReply(option, NBD_REP_ACK)] };
    }
    case NBD_OPT_GO:
      return {
        replies: [encodeOptionReply(option, NBD_REP_INFO, encodeInfoExport(FAKE_SIZE, FAKE_FLAGS)), encodeOptionReply(option, NBD_REP_ACK)],
        next: 'transmission',
      };
    case NBD_OPT_EXPORT_NAME:
      return { replies: [encodeExportNameReply(FAKE_SIZE, FAKE_FLAGS, noZeroes)], next: 'transmission' };
    case NBD_OPT_ABORT:
      return { replies: [encodeOptionReply(option, NBD_REP_ACK)], next: 'close' };
    default:
      return { replies: [encodeOptionReply(option, NBD_REP_ERR_UNSUP)] };
  }
}

export async function startFake(opts: FakeOptions = {}): Promise<FakeServer> {
  const handshakeFlags = opts.handshakeFlags ?? NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;
  const contexts = opts.contexts ?? new Map([[BASE_ALLOCATION, 7]]);
  let clientFlags: number | undefined;
  const options: number[] = [];
  const requests: Request[] = [];
  const sockets = new Set<net.Socket>();
  let last: net.Socket | undefined;

  const server = net.createServer((sock) => {
    sockets.add(sock);
    last = sock;
    sock.setNoDelay(true);
    sock.on('close', () => sockets.delete(sock));
    sock.on('error', () => undefined);
    const r = new FrameReader();
    let phase: 'flags' | 'options' | 'transmission' | 'closed' = 'flags';
    let pendingWrite: Request | undefined;
    sock.write(encodeGreeting(handshakeFlags));
    sock.on('data', (chunk: Buffer) => {
      r.push(chunk);
      try {
        serve();
      } catch {
        sock.destroy(); // a client that breaks the protocol just loses its connection
      }
    });
    const serve = (): void => {
      for (;;) {
        if (phase === 'closed') return;
        if (phase === 'flags') {
          const b = r.take(4);
          if (b === null) return;
          clientFlags = b.readUInt32BE(0);
          phase = 'options';
        } else if (phase === 'options') {
          const hb = r.peek(OPTION_HEADER_SIZE);
          if (hb === null) return;
          const h = decodeOptionHeader(hb)!;
          if (r.length < OPTION_HEADER_SIZE + h.length) return;
          r.consume(OPTION_HEADER_SIZE);
          const data = Buffer.from(r.take(h.length)!);
          options.push(h.option);
          const noZeroes = (clientFlags! & 2) !== 0;
          const out = opts.onOption?.(h.option, data) ?? defaultOption(h.option, data, contexts, noZeroes);
          for (const b of out.replies) sock.write(b);
          if (out.next === 'close') {
            phase = 'closed';
            sock.end();
            return;
          }
          if (out.next === 'transmission') phase = 'transmission';
        } else if (pendingWrite !== undefined) {
          const payload = r.take(pendingWrite.length);
          if (payload === null) return;
          const req = pendingWrite;
          pendingWrite = undefined;
          opts.onRequest?.(req, Buffer.from(payload), sock);
        } else {
          const b = r.take(REQUEST_SIZE);
          if (b === null) return;
          const req = decodeRequest(b)!;
          requests.push(req);
          if (req.type === NBD_CMD_WRITE && req.length > 0) pendingWrite = req;
          else opts.onRequest?.(req, undefined, sock);
        }
      }
    };
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  return {
    target: { host: '127.0.0.1', port },
    clientFlags: () => clientFlags,
    options: () => options,
    requests: () => requests,
    socket: () => last,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}
