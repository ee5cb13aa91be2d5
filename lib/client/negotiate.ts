// Client side of the handshake phase: open a socket, read the greeting, then one small async function per
// option (the mirror image of nbdkit's protocol-handshake-newstyle.c). All wire encoding and decoding is done by
// lib/protocol/handshake.ts; this file only sequences it over a socket.

import * as net from 'node:net';
import {
  EXPORT_NAME_REPLY_SIZE,
  EXPORT_NAME_ZEROES,
  GREETING_SIZE,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOTSUP,
  NBD_EOVERFLOW,
  NBD_EPERM,
  NBD_ESHUTDOWN,
  NBD_REP_ACK,
  NBD_REP_ERR_BLOCK_SIZE_REQD,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_PLATFORM,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_SHUTDOWN,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
  OPTION_REPLY_HEADER_SIZE,
  isRepError,
  nameOfOpt,
} from '../protocol/constants';
import {
  type BlockSizes,
  decodeExportNameReply,
  decodeGreeting,
  decodeOptionReplyHeader,
  encodeClientFlags,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  parseErrorReplyMessage,
  parseInfoPayload,
  parseMetaContextReply,
  parseServerReply,
} from '../protocol/handshake';
import { FrameReader } from '../protocol/frame-reader';
import { ReceiveBuffers } from '../server/receive-buffers';
import { IoError, NbdmirrorError, PeerError, ProtocolError } from '../errors';
import type { ConnectTarget } from './uri';

/** Largest option reply payload we accept (64 KiB): real replies carry at most two 4 KiB strings. */
export const MAX_OPTION_REPLY_BYTES = 64 * 1024;
/** Replies to one option (e.g. exports listed by NBD_OPT_LIST) before we call the server hostile. */
export const MAX_OPTION_REPLIES = 100_000;
/** Default bound on connect + handshake, in milliseconds. */
export const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;
/** How long NBD_OPT_ABORT waits for the server's ACK before dropping the socket anyway (ms). */
const ABORT_WAIT_MS = 1_000;

const repErrorNames = new Map<number, string>([
  [NBD_REP_ERR_UNSUP, 'NBD_REP_ERR_UNSUP'],
  [NBD_REP_ERR_POLICY, 'NBD_REP_ERR_POLICY'],
  [NBD_REP_ERR_INVALID, 'NBD_REP_ERR_INVALID'],
  [NBD_REP_ERR_PLATFORM, 'NBD_REP_ERR_PLATFORM'],
  [NBD_REP_ERR_TLS_REQD, 'NBD_REP_ERR_TLS_REQD'],
  [NBD_REP_ERR_UNKNOWN, 'NBD_REP_ERR_UNKNOWN'],
  [NBD_REP_ERR_SHUTDOWN, 'NBD_REP_ERR_SHUTDOWN'],
  [NBD_REP_ERR_BLOCK_SIZE_REQD, 'NBD_REP_ERR_BLOCK_SIZE_REQD'],
  [NBD_REP_ERR_TOO_BIG, 'NBD_REP_ERR_TOO_BIG'],
]);

/** Closest NBD errno for an option error, so OptionError can be a PeerError like any other server refusal. */
function errnoOfRepError(reply: number): number {
  switch (reply) {
    case NBD_REP_ERR_UNSUP:
    case NBD_REP_ERR_PLATFORM:
      return NBD_ENOTSUP;
    case NBD_REP_ERR_POLICY:
    case NBD_REP_ERR_TLS_REQD:
      return NBD_EPERM;
    case NBD_REP_ERR_INVALID:
    case NBD_REP_ERR_UNKNOWN:
    case NBD_REP_ERR_BLOCK_SIZE_REQD:
      return NBD_EINVAL;
    case NBD_REP_ERR_SHUTDOWN:
      return NBD_ESHUTDOWN;
    case NBD_REP_ERR_TOO_BIG:
      return NBD_EOVERFLOW;
    default:
      return NBD_EIO;
  }
}

/** The server refused an option with an NBD_REP_ERR_* reply (e.g. NBD_REP_ERR_UNKNOWN for a missing export). */
export class OptionError extends PeerError {
  constructor(
    readonly option: number,
    readonly reply: number,
    readonly serverMessage: string,
    context = '',
  ) {
    const name = repErrorNames.get(reply) ?? `NBD_REP_ERR_${reply - 0x80000000}`;
    const what = reply === NBD_REP_ERR_UNKNOWN && context !== '' ? context : `NBD_OPT_${nameOfOpt(option)} refused`;
    super(`${what} (${name}${serverMessage !== '' ? `: ${serverMessage}` : ''})`, errnoOfRepError(reply));
  }
}

export function describeTarget(target: ConnectTarget): string {
  if ('path' in target) return `unix:${target.path}`;
  return target.host.includes(':') ? `[${target.host}]:${target.port}` : `${target.host}:${target.port}`;
}

/**
 * A socket in the handshake phase with a FrameReader in front of it: read(n) resolves with exactly n bytes or
 * rejects once the socket has failed and fewer than n bytes remain buffered.
 */
export class OptionChannel {
  private readonly reader = new FrameReader();
  private want: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  private failure: Error | null = null;
  private connected = false;
  private timer: NodeJS.Timeout | undefined;

  /** Where each socket read goes: the handshake's onData, then (after detach) the transmission phase's owner. */
  private sink: (chunk: Buffer) => void = (chunk) => this.onData(chunk);

  private constructor(
    readonly socket: net.Socket,
    readonly where: string,
    private readonly tcp: boolean,
  ) {
    socket.on('connect', this.onConnect);
    socket.on('error', this.onError);
    socket.on('close', this.onClose);
  }

  /**
   * Start connecting; the timer bounds connect plus handshake and is cleared by detach().
   * @param onRead called on every socket read, before its bytes are handled (see ConnectOptions.onRead)
   */
  static open(target: ConnectTarget, timeoutMs: number = DEFAULT_CONNECT_TIMEOUT_MS, onRead?: () => void): OptionChannel {
    // The socket reads into reused buffers (see lib/server/receive-buffers.ts): a read's bytes are valid only
    // during the sink's call.
    let ch: OptionChannel | null = null;
    const onread = new ReceiveBuffers().onread(
      onRead === undefined
        ? (chunk) => ch!.sink(chunk)
        : (chunk) => {
            onRead();
            ch!.sink(chunk);
          },
    );
    const socket = 'path' in target ? net.connect({ path: target.path, onread }) : net.connect({ host: target.host, port: target.port, onread });
    ch = new OptionChannel(socket, describeTarget(target), !('path' in target));
    if (timeoutMs > 0 && Number.isFinite(timeoutMs)) {
      ch.timer = setTimeout(() => {
        const phase = ch.connected ? 'handshake with' : 'connect to';
        socket.destroy(new IoError(`${phase} ${ch.where} timed out after ${timeoutMs} ms`));
      }, timeoutMs);
    }
    return ch;
  }

  private onConnect = (): void => {
    this.connected = true;
    // The spec asks both ends to disable Nagle on TCP so a request header is not held back waiting for an ACK.
    if (this.tcp) this.socket.setNoDelay(true);
  };

  private onData(chunk: Buffer): void {
    // A copy: handshake replies are parsed across awaits, after later reads reused the receive buffer.
    this.reader.push(Buffer.from(chunk));
    this.satisfy();
  }

  private onError = (err: Error): void => {
    if (err instanceof NbdmirrorError) return this.fail(err);
    const msg = this.connected
      ? `connection to ${this.where} failed during the handshake: ${err.message}`
      : `cannot connect to ${this.where}: ${err.message}`;
    this.fail(new IoError(msg, { cause: err }));
  };

  private onClose = (): void => {
    this.fail(new IoError(`${this.where} closed the connection during the handshake`));
  };

  private fail(err: Error): void {
    this.failure ??= err;
    const w = this.want;
    if (w !== null && this.reader.length < w.n) {
      this.want = null;
      w.reject(this.failure);
    }
  }

  private satisfy(): void {
    const w = this.want;
    if (w !== null && this.reader.length >= w.n) {
      this.want = null;
      w.resolve(this.reader.take(w.n)!);
    }
  }

  /** Exactly n bytes (only one read may be outstanding). */
  read(n: number): Promise<Buffer> {
    if (this.reader.length >= n) return Promise.resolve(this.reader.take(n)!);
    if (this.failure !== null) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      this.want = { n, resolve, reject };
    });
  }

  send(buf: Buffer): void {
    this.socket.write(buf);
  }

  /**
   * Hand the socket over to the transmission phase: our listeners go, socket reads go to onChunk from now on
   * (valid during the call only), and the reader (with any bytes that arrived after the last option reply)
   * goes to the new owner.
   */
  detach(onChunk: (chunk: Buffer) => void): FrameReader {
    clearTimeout(this.timer);
    this.sink = onChunk;
    this.socket.off('connect', this.onConnect);
    this.socket.off('error', this.onError);
    this.socket.off('close', this.onClose);
    return this.reader;
  }

  /** Hard close (used on every failure path). */
  destroy(): void {
    clearTimeout(this.timer);
    this.socket.destroy();
  }

  /**
   * Soft disconnect: NBD_OPT_ABORT, then wait briefly for the ACK (servers may also just close), then close.
   * Never rejects: the session is over either way.
   */
  async abort(): Promise<void> {
    clearTimeout(this.timer);
    try {
      this.send(encodeOption(NBD_OPT_ABORT));
      await Promise.race([
        this.read(OPTION_REPLY_HEADER_SIZE),
        new Promise((resolve) => setTimeout(resolve, ABORT_WAIT_MS).unref()),
      ]);
    } catch {
      // The server closing instead of acknowledging is allowed by the spec.
    } finally {
      this.socket.destroy();
    }
  }
}

export interface Greeting {
  fixedNewstyle: boolean;
  noZeroes: boolean;
}

/** Read the server greeting and answer with the client flags matching what the server offered. */
export async function greet(ch: OptionChannel): Promise<Greeting> {
  const g = decodeGreeting(await ch.read(GREETING_SIZE))!;
  const fixedNewstyle = (g.handshakeFlags & NBD_FLAG_FIXED_NEWSTYLE) !== 0;
  const noZeroes = (g.handshakeFlags & NBD_FLAG_NO_ZEROES) !== 0;
  ch.send(encodeClientFlags((fixedNewstyle ? NBD_FLAG_C_FIXED_NEWSTYLE : 0) | (noZeroes ? NBD_FLAG_C_NO_ZEROES : 0)));
  return { fixedNewstyle, noZeroes };
}

interface OptionReply {
  type: number;
  data: Buffer;
}

async function readReply(ch: OptionChannel, option: number): Promise<OptionReply> {
  const h = decodeOptionReplyHeader(await ch.read(OPTION_REPLY_HEADER_SIZE))!;
  if (h.option !== option) {
    throw new ProtocolError(`reply to NBD_OPT_${nameOfOpt(h.option)} while waiting for NBD_OPT_${nameOfOpt(option)}`);
  }
  if (h.length > MAX_OPTION_REPLY_BYTES) {
    throw new ProtocolError(`option reply of ${h.length} bytes exceeds ${MAX_OPTION_REPLY_BYTES}`);
  }
  return { type: h.type, data: await ch.read(h.length) };
}

/**
 * Send one option and collect its replies up to the final one. onReply handles each non-final, non-error
 * reply type (returning false for a type it does not expect, a protocol error). Resolves on NBD_REP_ACK and
 * rejects with OptionError on an error reply.
 */
async function haggle(
  ch: OptionChannel,
  option: number,
  payload: Buffer,
  onReply: (r: OptionReply) => boolean,
  context = '',
): Promise<void> {
  ch.send(encodeOption(option, payload));
  for (let i = 0; i < MAX_OPTION_REPLIES; i++) {
    const r = await readReply(ch, option);
    if (r.type === NBD_REP_ACK) {
      if (r.data.length !== 0) throw new ProtocolError('NBD_REP_ACK with a payload');
      return;
    }
    if (isRepError(r.type)) throw new OptionError(option, r.type, parseErrorReplyMessage(r.data), context);
    if (!onReply(r)) throw new ProtocolError(`unexpected reply type ${r.type} to NBD_OPT_${nameOfOpt(option)}`);
  }
  throw new ProtocolError(`more than ${MAX_OPTION_REPLIES} replies to NBD_OPT_${nameOfOpt(option)}`);
}

/** NBD_OPT_STRUCTURED_REPLY: true when acknowledged, false when the server declines. */
export async function negotiateStructuredReplies(ch: OptionChannel): Promise<boolean> {
  try {
    await haggle(ch, NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(0), () => false);
    return true;
  } catch (err) {
    if (err instanceof OptionError) return false;
    throw err;
  }
}

function collectMetaContexts(into: Map<string, number>) {
  return (r: OptionReply): boolean => {
    if (r.type !== NBD_REP_META_CONTEXT) return false;
    const mc = parseMetaContextReply(r.data);
    if (mc === undefined) throw new ProtocolError('malformed NBD_REP_META_CONTEXT');
    into.set(mc.name, mc.id);
    return true;
  };
}

/** NBD_OPT_SET_META_CONTEXT: the contexts the server selected, name → id. */
export async function setMetaContexts(ch: OptionChannel, exportName: string, queries: readonly string[]): Promise<Map<string, number>> {
  const selected = new Map<string, number>();
  await haggle(ch, NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest({ name: exportName, queries: [...queries] }), collectMetaContexts(selected));
  return selected;
}

/** NBD_OPT_LIST_META_CONTEXT: names of the contexts matching queries (all of them when queries is empty). */
export async function listMetaContexts(ch: OptionChannel, exportName: string, queries: readonly string[]): Promise<string[]> {
  const found = new Map<string, number>();
  await haggle(ch, NBD_OPT_LIST_META_CONTEXT, encodeMetaContextRequest({ name: exportName, queries: [...queries] }), collectMetaContexts(found));
  return [...found.keys()];
}

export interface ExportEntry {
  name: string;
  description: string;
}

/** NBD_OPT_LIST. */
export async function listExports(ch: OptionChannel): Promise<ExportEntry[]> {
  const out: ExportEntry[] = [];
  await haggle(ch, NBD_OPT_LIST, Buffer.alloc(0), (r) => {
    if (r.type !== NBD_REP_SERVER) return false;
    const s = parseServerReply(r.data);
    if (s === undefined) throw new ProtocolError('malformed NBD_REP_SERVER');
    out.push(s);
    return true;
  });
  return out;
}

/** What NBD_OPT_INFO / NBD_OPT_GO / NBD_OPT_EXPORT_NAME tell us about an export. */
export interface ExportDetails {
  /** The server's canonical name when it sent NBD_INFO_NAME, else the name we asked for. */
  exportName: string;
  description: string | undefined;
  size: number;
  transmissionFlags: number;
  blockSizes: BlockSizes | undefined;
}

/** Info types we ask for; NBD_INFO_EXPORT always comes. */
const WANTED_INFOS = [NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE];

/**
 * NBD_OPT_INFO or NBD_OPT_GO. After a successful GO the socket is in the transmission phase.
 * Rejects with OptionError (e.g. NBD_REP_ERR_UNKNOWN, or NBD_REP_ERR_UNSUP from servers without GO).
 */
export async function infoOrGo(ch: OptionChannel, option: typeof NBD_OPT_INFO | typeof NBD_OPT_GO, exportName: string): Promise<ExportDetails> {
  let size: number | undefined;
  let transmissionFlags = 0;
  const details: ExportDetails = { exportName, description: undefined, size: 0, transmissionFlags: 0, blockSizes: undefined };
  await haggle(
    ch,
    option,
    encodeInfoRequest({ name: exportName, infos: WANTED_INFOS }),
    (r) => {
      if (r.type !== NBD_REP_INFO) return false;
      const info = parseInfoPayload(r.data);
      if (info === undefined) throw new ProtocolError('malformed NBD_REP_INFO');
      // Unknown info types are ignored, as the spec requires.
      if ('size' in info) {
        size = info.size;
        transmissionFlags = info.flags;
      } else if ('name' in info) details.exportName = info.name;
      else if ('description' in info) details.description = info.description;
      else if ('sizes' in info) details.blockSizes = info.sizes;
      return true;
    },
    `server has no export "${exportName}"`,
  );
  if (size === undefined) throw new ProtocolError(`NBD_OPT_${nameOfOpt(option)} succeeded without NBD_INFO_EXPORT`);
  details.size = size;
  details.transmissionFlags = transmissionFlags;
  return details;
}

/**
 * NBD_OPT_EXPORT_NAME: the old way into transmission. The server cannot refuse with a message; it just closes,
 * which we report as an unknown export.
 */
export async function exportNameOption(ch: OptionChannel, exportName: string, noZeroes: boolean): Promise<ExportDetails> {
  ch.send(encodeOption(NBD_OPT_EXPORT_NAME, Buffer.from(exportName, 'utf8')));
  const need = EXPORT_NAME_REPLY_SIZE + (noZeroes ? 0 : EXPORT_NAME_ZEROES);
  let reply: Buffer;
  try {
    reply = await ch.read(need);
  } catch (err) {
    if (err instanceof IoError) {
      throw new IoError(`${ch.where} closed the connection after NBD_OPT_EXPORT_NAME (no export "${exportName}"?)`, { cause: err });
    }
    throw err;
  }
  const r = decodeExportNameReply(reply, noZeroes)!;
  return { exportName, description: undefined, size: r.size, transmissionFlags: r.flags, blockSizes: undefined };
}
