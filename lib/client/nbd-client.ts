// NBD client: fixed newstyle handshake (negotiate.ts), then a pipelined transmission phase. Requests are
// matched to replies by cookie, so any number (up to maxInFlight) are outstanding and replies may arrive in any
// order, interleaved chunk by chunk. Receive buffering is a FrameReader; read data is copied straight from it
// into the caller's result buffer, never concatenated. All wire encoding/decoding comes from lib/protocol.

import type * as net from 'node:net';
import {
  BASE_ALLOCATION,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_ESHUTDOWN,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_ROTATIONAL,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_RESIZE,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_REP_ERR_UNSUP,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  SIMPLE_REPLY_SIZE,
  STRUCTURED_REPLY_HEADER_SIZE,
  isReplyTypeError,
  nameOfCmd,
  nameOfError,
} from '../protocol/constants';
import type { BlockSizes } from '../protocol/handshake';
import type { FrameReader } from '../protocol/frame-reader';
import { decodeReplyHeader, type Extent, parseBlockStatus, parseErrorChunk, parseOffsetHole } from '../protocol/reply';
import { encodeRequest } from '../protocol/request';
import { IoError, NotSupportedError, PeerError, ProtocolError, ShutdownError } from '../errors';
import {
  type ExportDetails,
  type ExportEntry,
  OptionChannel,
  OptionError,
  exportNameOption,
  greet,
  infoOrGo,
  listExports,
  listMetaContexts,
  negotiateStructuredReplies,
  setMetaContexts,
} from './negotiate';
import type { ConnectTarget } from './uri';

export { OptionError } from './negotiate';
export type { ExportEntry } from './negotiate';
export type { BlockSizes } from '../protocol/handshake';
export type { Extent } from '../protocol/reply';
export type { ConnectTarget } from './uri';

/** Requests on the wire at once before further ones queue in the client (Crucible-style bound). */
export const DEFAULT_MAX_IN_FLIGHT = 64;

/**
 * A cookie is the request's in-flight slot (its low SLOT_BITS bits) above a sequence number, so a reply finds
 * its request by index, and a reply for a slot's earlier request is still told apart. A Map from cookie to
 * request was old-generation garbage: V8 allocates the grown or rehashed table of a Map that lives in the old
 * generation there too, and a Map with a set and a delete per request rehashes every few dozen requests (the
 * mirroring primary spent a tenth of its time in major GCs).
 */
const SLOT_BITS = 16;
const MAX_SLOTS = 2 ** SLOT_BITS;
/** Sequence numbers run in [1, SEQ_WRAP): a cookie stays below 2^53, exact as a JS number. */
const SEQ_WRAP = 2 ** (53 - SLOT_BITS);
const COOKIE_LIMIT = 2n ** 53n;
/** Largest BLOCK_STATUS chunk payload accepted (16 MiB = 2M extents): a bound against a hostile server. */
const MAX_BLOCK_STATUS_PAYLOAD = 16 * 1024 * 1024;
/** Error chunk payload: errno + length + a message of at most 4096 bytes + an optional 8-byte offset. */
const MAX_ERROR_CHUNK_PAYLOAD = 6 + 4096 + 8;
const DEFAULT_DISCONNECT_TIMEOUT_MS = 5_000;

export interface TransmissionFlags {
  raw: number;
  readOnly: boolean;
  canFlush: boolean;
  canFua: boolean;
  rotational: boolean;
  canTrim: boolean;
  canZero: boolean;
  canDf: boolean;
  canMultiConn: boolean;
  canResize: boolean;
  canCache: boolean;
  canFastZero: boolean;
}

export function decodeTransmissionFlags(raw: number): TransmissionFlags {
  const has = (bit: number): boolean => (raw & bit) !== 0;
  return {
    raw,
    readOnly: has(NBD_FLAG_READ_ONLY),
    canFlush: has(NBD_FLAG_SEND_FLUSH),
    canFua: has(NBD_FLAG_SEND_FUA),
    rotational: has(NBD_FLAG_ROTATIONAL),
    canTrim: has(NBD_FLAG_SEND_TRIM),
    canZero: has(NBD_FLAG_SEND_WRITE_ZEROES),
    canDf: has(NBD_FLAG_SEND_DF),
    canMultiConn: has(NBD_FLAG_CAN_MULTI_CONN),
    canResize: has(NBD_FLAG_SEND_RESIZE),
    canCache: has(NBD_FLAG_SEND_CACHE),
    canFastZero: has(NBD_FLAG_SEND_FAST_ZERO),
  };
}

export interface HandshakeOptions {
  /** Bound on connect plus handshake, ms (default 10 s; 0 = none). */
  connectTimeoutMs?: number;
}

export interface ConnectOptions extends HandshakeOptions {
  /** Export to open; "" (default) is the server's default export. */
  exportName?: string;
  /** Negotiate NBD_OPT_STRUCTURED_REPLY (default true). */
  structuredReplies?: boolean;
  /** Queries for NBD_OPT_SET_META_CONTEXT (default ['base:allocation']; needs structured replies). */
  metaContexts?: readonly string[];
  /** Enter transmission with NBD_OPT_EXPORT_NAME instead of NBD_OPT_GO (what Linux nbd-client does). */
  useExportName?: boolean;
  /** Requests on the wire at once; more are queued in order (default 64). */
  maxInFlight?: number;
  /**
   * Called on every read from the socket, before its bytes are handled. A node's replication link passes its
   * busy polling's touch() here, so that the event loop keeps polling while it waits for the peer's replies.
   */
  onRead?: (() => void) | undefined;
}

/** What NBD_OPT_INFO reports, plus the meta contexts NBD_OPT_LIST_META_CONTEXT lists for the export. */
export interface ExportInfo {
  exportName: string;
  description: string | undefined;
  size: number;
  flags: TransmissionFlags;
  blockSizes: BlockSizes | undefined;
  metaContexts: string[];
}

/** One outstanding (or queued) request and what its reply has assembled so far. */
interface Pending {
  /** Set when sent (0n while queued). */
  cookie: bigint;
  /** In-flight slot, -1 while queued. */
  slot: number;
  type: number;
  flags: number;
  offset: number;
  length: number;
  /** WRITE payload until it is handed to the socket. */
  payload: Buffer | undefined;
  /** READ result, allocated when the first reply bytes arrive. */
  buf: Buffer | undefined;
  /** READ bytes delivered so far (data and holes). */
  covered: number;
  extents: Map<string, Extent[]> | undefined;
  /** First error chunk (or simple reply error); the request rejects with it once the reply is complete. */
  error: PeerError | undefined;
  /** A structured chunk has arrived: a simple reply for this cookie is now a protocol violation. */
  structured: boolean;
  resolve: (value: never) => void;
  reject: (err: Error) => void;
}

/** Receiver state between socket reads. */
type Rx =
  | { kind: 'header' }
  /** Copying `remaining` bytes of read data into p.buf at pos. */
  | { kind: 'data'; p: Pending; pos: number; remaining: number; done: boolean }
  /** Waiting for the 8-byte offset that starts an OFFSET_DATA payload. */
  | { kind: 'offset'; p: Pending; dataLength: number; done: boolean }
  /** Waiting for a small chunk payload (hole, block status, error) to be buffered whole. */
  | { kind: 'payload'; p: Pending; type: number; length: number; done: boolean };

const RX_HEADER: Rx = { kind: 'header' };

/** open → disconnecting (disconnect() called, draining) → closed; or open → closed on any failure. */
type State = 'open' | 'disconnecting' | 'closed';

/** Why a request range cannot be sent, or null. Offsets travel as 64-bit integers but are JS numbers here. */
function rangeError(offset: number, length: number): RangeError | null {
  if (!Number.isSafeInteger(offset) || offset < 0) return new RangeError(`offset ${offset} is not a non-negative safe integer`);
  if (!Number.isInteger(length) || length < 0 || length > 0xffff_ffff) return new RangeError(`length ${length} is not a 32-bit unsigned integer`);
  return null;
}

export class NbdClient {
  /** Export size in bytes. */
  readonly size: number;
  /** Transmission flags as sent by the server, and decoded. */
  readonly transmissionFlags: number;
  readonly flags: TransmissionFlags;
  /** NBD_INFO_BLOCK_SIZE constraints, when the server sent them. */
  readonly blockSizes: BlockSizes | undefined;
  /** The server's canonical export name (NBD_INFO_NAME) or the name we asked for. */
  readonly exportName: string;
  readonly description: string | undefined;
  readonly structuredReplies: boolean;
  /** Meta contexts selected by NBD_OPT_SET_META_CONTEXT: name → id. */
  readonly metaContexts: ReadonlyMap<string, number>;
  /** Resolves when the socket is closed: null after a clean disconnect(), else the reason. Never rejects. */
  readonly closed: Promise<Error | null>;

  private readonly contextNames = new Map<number, string>();
  /** Requests in flight by slot (see SLOT_BITS); free slots are a stack. */
  private readonly slots: (Pending | undefined)[];
  private readonly freeSlots: Int32Array;
  private freeTop: number;
  private seq = 0;
  private queue: Pending[] = [];
  private queueHead = 0;
  private state: State = 'open';
  private closeReason: Error | null = null;
  private rx: Rx = RX_HEADER;
  private idleWaiters: (() => void)[] = [];
  private resolveClosed!: (reason: Error | null) => void;

  private constructor(
    private readonly socket: net.Socket,
    private readonly reader: FrameReader,
    private readonly where: string,
    details: ExportDetails,
    structuredReplies: boolean,
    metaContexts: Map<string, number>,
    private readonly maxInFlight: number,
  ) {
    this.slots = new Array<Pending | undefined>(maxInFlight).fill(undefined);
    this.freeSlots = new Int32Array(maxInFlight);
    this.freeTop = this.resetSlots();
    this.size = details.size;
    this.transmissionFlags = details.transmissionFlags;
    this.flags = decodeTransmissionFlags(details.transmissionFlags);
    this.blockSizes = details.blockSizes;
    this.exportName = details.exportName;
    this.description = details.description;
    this.structuredReplies = structuredReplies;
    this.metaContexts = metaContexts;
    for (const [name, id] of metaContexts) this.contextNames.set(id, name);
    this.closed = new Promise((resolve) => {
      this.resolveClosed = resolve;
    });
    socket.on('error', this.onError);
    socket.on('close', this.onClose);
    if (socket.closed) {
      // The server hung up right after the handshake, before our 'close' listener existed.
      this.fail(new IoError(`${where} closed the connection`));
      this.resolveClosed(this.closeReason);
    } else if (reader.length > 0) {
      // Bytes that arrived with the last option reply belong to the transmission phase.
      this.onData(Buffer.alloc(0));
    }
  }

  get readOnly(): boolean { return this.flags.readOnly; }
  get canFlush(): boolean { return this.flags.canFlush; }
  get canFua(): boolean { return this.flags.canFua; }
  get canTrim(): boolean { return this.flags.canTrim; }
  get canZero(): boolean { return this.flags.canZero; }
  get canFastZero(): boolean { return this.flags.canFastZero; }
  get canDf(): boolean { return this.flags.canDf; }
  get canCache(): boolean { return this.flags.canCache; }
  get canMultiConn(): boolean { return this.flags.canMultiConn; }
  /** Requests sent and not yet answered. */
  get inFlightCount(): number { return this.maxInFlight - this.freeTop; }
  /** Requests waiting for a free in-flight slot. */
  get queuedCount(): number { return this.queue.length - this.queueHead; }

  /** Every slot free (slot 0 on top). */
  private resetSlots(): number {
    const n = this.maxInFlight;
    for (let i = 0; i < n; i++) this.freeSlots[i] = n - 1 - i;
    return (this.freeTop = n);
  }

  // -------------------------------------------------------------------------------------------------------------
  // Handshake

  /**
   * Connect and negotiate: structured replies and meta contexts (when asked and offered), then NBD_OPT_GO
   * (falling back to NBD_OPT_EXPORT_NAME when the server does not know GO, or when useExportName is set, or
   * when the server is not fixed newstyle). Rejects with IoError (connect/timeout/closed), OptionError (the
   * server refused, e.g. unknown export) or ProtocolError.
   */
  static async connect(target: ConnectTarget, options: ConnectOptions = {}): Promise<NbdClient> {
    const exportName = options.exportName ?? '';
    const maxInFlight = options.maxInFlight ?? DEFAULT_MAX_IN_FLIGHT;
    if (!Number.isInteger(maxInFlight) || maxInFlight < 1 || maxInFlight > MAX_SLOTS) throw new RangeError(`maxInFlight ${maxInFlight} must be in [1, ${MAX_SLOTS}]`);
    const queries = options.metaContexts ?? [BASE_ALLOCATION];
    const ch = OptionChannel.open(target, options.connectTimeoutMs, options.onRead);
    try {
      const greeting = await greet(ch);
      let structured = false;
      let contexts = new Map<string, number>();
      // Only EXPORT_NAME may be sent to a server that is not fixed newstyle.
      if (greeting.fixedNewstyle && (options.structuredReplies ?? true)) {
        structured = await negotiateStructuredReplies(ch);
        if (structured && queries.length > 0) {
          try {
            contexts = await setMetaContexts(ch, exportName, queries);
          } catch (err) {
            if (!(err instanceof OptionError)) throw err; // no contexts: blockStatus() will refuse
          }
        }
      }
      let details: ExportDetails;
      if (!greeting.fixedNewstyle || options.useExportName === true) {
        details = await exportNameOption(ch, exportName, greeting.noZeroes);
      } else {
        try {
          details = await infoOrGo(ch, NBD_OPT_GO, exportName);
        } catch (err) {
          if (!(err instanceof OptionError && err.reply === NBD_REP_ERR_UNSUP)) throw err;
          details = await exportNameOption(ch, exportName, greeting.noZeroes);
        }
      }
      // Nothing is read between these two statements: the client exists before the next socket read.
      let client: NbdClient | null = null;
      const reader = ch.detach((chunk) => client!.receive(chunk));
      client = new NbdClient(ch.socket, reader, ch.where, details, structured, contexts, maxInFlight);
      return client;
    } catch (err) {
      // A refused option leaves the session healthy, so end it softly as the spec asks; otherwise hard.
      if (err instanceof OptionError) await ch.abort();
      else ch.destroy();
      throw err;
    }
  }

  /** Run fn in a fresh handshake session, then NBD_OPT_ABORT. */
  private static async optionSession<T>(target: ConnectTarget, options: HandshakeOptions, fn: (ch: OptionChannel) => Promise<T>): Promise<T> {
    const ch = OptionChannel.open(target, options.connectTimeoutMs);
    let result: T;
    try {
      const greeting = await greet(ch);
      if (!greeting.fixedNewstyle) throw new NotSupportedError(`${ch.where} is not a fixed-newstyle NBD server`);
      result = await fn(ch);
    } catch (err) {
      // NBD_OPT_ABORT after a refused option; a hard close otherwise (also for non-fixed servers, which would
      // not understand ABORT).
      if (err instanceof OptionError) await ch.abort();
      else ch.destroy();
      throw err;
    }
    await ch.abort();
    return result;
  }

  /** NBD_OPT_LIST: the exports the server is willing to list. */
  static list(target: ConnectTarget, options: HandshakeOptions = {}): Promise<ExportEntry[]> {
    return NbdClient.optionSession(target, options, listExports);
  }

  /**
   * NBD_OPT_INFO for one export without opening it, plus the meta contexts it offers (empty when the server
   * has no structured replies or refuses the listing). Rejects with OptionError for an unknown export.
   */
  static info(target: ConnectTarget, exportName = '', options: HandshakeOptions = {}): Promise<ExportInfo> {
    return NbdClient.optionSession(target, options, async (ch) => {
      let metaContexts: string[] = [];
      if (await negotiateStructuredReplies(ch)) {
        try {
          metaContexts = await listMetaContexts(ch, exportName, []);
        } catch (err) {
          if (!(err instanceof OptionError)) throw err;
        }
      }
      const d = await infoOrGo(ch, NBD_OPT_INFO, exportName);
      return {
        exportName: d.exportName,
        description: d.description,
        size: d.size,
        flags: decodeTransmissionFlags(d.transmissionFlags),
        blockSizes: d.blockSizes,
        metaContexts,
      };
    });
  }

  /** NBD_OPT_LIST_META_CONTEXT: contexts of an export matching queries (all of them for no queries). */
  static listMetaContexts(target: ConnectTarget, exportName = '', queries: readonly string[] = [], options: HandshakeOptions = {}): Promise<string[]> {
    return NbdClient.optionSession(target, options, async (ch) => {
      if (!(await negotiateStructuredReplies(ch))) return [];
      return listMetaContexts(ch, exportName, queries);
    });
  }

  // -------------------------------------------------------------------------------------------------------------
  // Commands. Flags are passed through as asked: the server, not the client, decides whether e.g. FUA without
  // NBD_FLAG_SEND_FUA is an error, which keeps this client usable for testing servers. Buffers passed to pwrite
  // must not change until its promise settles.

  /** NBD_CMD_READ: resolves with exactly `length` bytes (holes read as zeroes). */
  pread(offset: number, length: number, opts: { df?: boolean } = {}): Promise<Buffer> {
    return this.request<Buffer>(NBD_CMD_READ, opts.df === true ? NBD_CMD_FLAG_DF : 0, offset, length);
  }

  /** NBD_CMD_WRITE of all of buf at offset. */
  pwrite(buf: Buffer, offset: number, opts: { fua?: boolean } = {}): Promise<void> {
    return this.request<void>(NBD_CMD_WRITE, opts.fua === true ? NBD_CMD_FLAG_FUA : 0, offset, buf.length, buf);
  }

  /**
   * pwrite() completed by callbacks instead of a promise (the mirror's hot path). Exactly one of them is
   * called, never synchronously from inside this call.
   */
  pwriteCallbacks(buf: Buffer, offset: number, fua: boolean, resolve: () => void, reject: (err: Error) => void): void {
    const err = this.state !== 'open' ? (this.closeReason ?? new ShutdownError('client is disconnecting')) : rangeError(offset, buf.length);
    if (err !== null) {
      queueMicrotask(() => reject(err));
      return;
    }
    this.enqueue(this.pending(NBD_CMD_WRITE, fua ? NBD_CMD_FLAG_FUA : 0, offset, buf.length, buf, resolve as (value: never) => void, reject));
  }

  flush(): Promise<void> {
    return this.request<void>(NBD_CMD_FLUSH, 0, 0, 0);
  }

  trim(offset: number, length: number, opts: { fua?: boolean } = {}): Promise<void> {
    return this.request<void>(NBD_CMD_TRIM, opts.fua === true ? NBD_CMD_FLAG_FUA : 0, offset, length);
  }

  /** NBD_CMD_WRITE_ZEROES; noHole asks the server to allocate, fastZero to fail with ENOTSUP unless fast. */
  zero(offset: number, length: number, opts: { fua?: boolean; noHole?: boolean; fastZero?: boolean } = {}): Promise<void> {
    const flags =
      (opts.fua === true ? NBD_CMD_FLAG_FUA : 0) |
      (opts.noHole === true ? NBD_CMD_FLAG_NO_HOLE : 0) |
      (opts.fastZero === true ? NBD_CMD_FLAG_FAST_ZERO : 0);
    return this.request<void>(NBD_CMD_WRITE_ZEROES, flags, offset, length);
  }

  cache(offset: number, length: number): Promise<void> {
    return this.request<void>(NBD_CMD_CACHE, 0, offset, length);
  }

  /**
   * NBD_CMD_BLOCK_STATUS: extents per selected meta context, starting at offset. The server may describe less
   * than `length` (or, for the last extent, more). Rejects with NotSupportedError when no context was selected,
   * since the spec forbids sending the command then.
   */
  blockStatus(offset: number, length: number, opts: { reqOne?: boolean } = {}): Promise<Map<string, Extent[]>> {
    if (this.metaContexts.size === 0) {
      return Promise.reject(new NotSupportedError('no meta context was negotiated; NBD_CMD_BLOCK_STATUS is not allowed'));
    }
    return this.request<Map<string, Extent[]>>(NBD_CMD_BLOCK_STATUS, opts.reqOne === true ? NBD_CMD_FLAG_REQ_ONE : 0, offset, length);
  }

  /**
   * Soft disconnect: refuse new requests, let every outstanding one finish, send NBD_CMD_DISC and wait for the
   * server to close (destroying the socket after timeoutMs). Resolves even if the connection already failed.
   */
  async disconnect(timeoutMs = DEFAULT_DISCONNECT_TIMEOUT_MS): Promise<void> {
    if (this.state === 'open') {
      this.state = 'disconnecting';
      await this.whenIdle();
      if (this.state === 'disconnecting') {
        this.socket.write(encodeRequest({ flags: 0, type: NBD_CMD_DISC, cookie: 0n, offset: 0, length: 0 }));
        this.socket.end();
      }
    }
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      this.closed,
      new Promise<void>((resolve) => {
        timer = setTimeout(() => {
          this.socket.destroy();
          resolve();
        }, timeoutMs);
      }),
    ]);
    clearTimeout(timer);
  }

  /** Hard close: drop the socket now, rejecting every outstanding request with ShutdownError. */
  async close(): Promise<void> {
    this.fail(new ShutdownError('connection closed by the client'));
    await this.closed;
  }

  // -------------------------------------------------------------------------------------------------------------
  // Sending

  private request<T>(type: number, flags: number, offset: number, length: number, payload?: Buffer): Promise<T> {
    const err = this.state !== 'open' ? (this.closeReason ?? new ShutdownError('client is disconnecting')) : rangeError(offset, length);
    if (err !== null) return Promise.reject(err);
    return new Promise<T>((resolve, reject) => {
      this.enqueue(this.pending(type, flags, offset, length, payload, resolve as (value: never) => void, reject));
    });
  }

  private pending(type: number, flags: number, offset: number, length: number, payload: Buffer | undefined, resolve: (value: never) => void, reject: (err: Error) => void): Pending {
    return {
      cookie: 0n,
      slot: -1,
      type,
      flags,
      offset,
      length,
      payload,
      buf: undefined,
      covered: 0,
      extents: undefined,
      error: undefined,
      structured: false,
      resolve,
      reject,
    };
  }

  private enqueue(p: Pending): void {
    if (this.freeTop > 0) this.send(p);
    else this.queue.push(p);
  }

  private send(p: Pending): void {
    const slot = this.freeSlots[--this.freeTop]!;
    this.seq = this.seq + 1 < SEQ_WRAP ? this.seq + 1 : 1;
    p.slot = slot;
    p.cookie = BigInt(this.seq * MAX_SLOTS + slot);
    this.slots[slot] = p;
    const header = encodeRequest({ flags: p.flags, type: p.type, cookie: p.cookie, offset: p.offset, length: p.length });
    // Every request of this tick leaves in one writev: the socket stays corked until the next tick. The
    // payload is never copied into a combined buffer.
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      process.nextTick(this.uncork);
    }
    this.socket.write(header);
    if (p.payload !== undefined) {
      this.socket.write(p.payload);
      p.payload = undefined;
    }
  }

  private corked = false;
  private readonly uncork = (): void => {
    this.corked = false;
    this.socket.uncork();
  };

  /** Fill freed in-flight slots from the queue, in submission order. */
  private pump(): void {
    while (this.state !== 'closed' && this.freeTop > 0 && this.queueHead < this.queue.length) {
      const p = this.queue[this.queueHead]!;
      this.queue[this.queueHead++] = undefined as unknown as Pending; // release for GC
      this.send(p);
    }
    if (this.queueHead === this.queue.length) {
      this.queue = [];
      this.queueHead = 0;
    } else if (this.queueHead > 1024 && this.queueHead * 2 > this.queue.length) {
      this.queue = this.queue.slice(this.queueHead);
      this.queueHead = 0;
    }
    if (this.inFlightCount === 0 && this.queueHead === this.queue.length) this.notifyIdle();
  }

  private whenIdle(): Promise<void> {
    if (this.inFlightCount === 0 && this.queuedCount === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private notifyIdle(): void {
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const w of waiters) w();
  }

  // -------------------------------------------------------------------------------------------------------------
  // Receiving

  /** One socket read (its buffer is read into again afterwards: what is left unread is copied out). */
  private receive(chunk: Buffer): void {
    this.onData(chunk);
    this.reader.detach();
  }

  private onData(chunk: Buffer): void {
    this.reader.push(chunk);
    try {
      this.drain();
    } catch (err) {
      this.fail(err instanceof Error ? err : new ProtocolError(String(err)));
    }
  }

  private onError = (err: Error): void => {
    this.fail(new IoError(`connection to ${this.where} failed: ${err.message}`, { cause: err }));
  };

  private onClose = (): void => {
    if (this.state === 'disconnecting' && this.inFlightCount === 0 && this.queuedCount === 0) {
      this.state = 'closed';
    } else {
      this.fail(new IoError(`${this.where} closed the connection`));
    }
    this.resolveClosed(this.closeReason);
  };

  /** Tear the connection down and reject everything outstanding with err (first reason wins). */
  private fail(err: Error): void {
    if (this.state === 'closed') return;
    this.state = 'closed';
    this.closeReason = err;
    this.socket.destroy();
    // In flight in the order sent (by cookie), then the queue.
    const sent = this.slots.filter((p): p is Pending => p !== undefined).sort((a, b) => (a.cookie < b.cookie ? -1 : 1));
    const pending = [...sent, ...this.queue.slice(this.queueHead)];
    this.slots.fill(undefined);
    this.resetSlots();
    this.queue = [];
    this.queueHead = 0;
    for (const p of pending) p.reject(err);
    this.notifyIdle();
  }

  /** Consume as many complete frames (or partial read data) as are buffered. Throws ProtocolError. */
  private drain(): void {
    const r = this.reader;
    while (this.state !== 'closed') {
      const rx = this.rx;
      switch (rx.kind) {
        case 'header': {
          if (r.length < SIMPLE_REPLY_SIZE) return;
          const h = decodeReplyHeader(r.peek(Math.min(r.length, STRUCTURED_REPLY_HEADER_SIZE))!);
          if (h === null) return;
          r.consume(h.headerSize);
          if (h.kind === 'simple') this.onSimpleReply(h.cookie, h.error);
          else this.onChunkHeader(h.cookie, h.flags, h.type, h.length);
          break;
        }
        case 'data': {
          const n = r.readInto(rx.p.buf!, rx.pos, rx.remaining);
          if (n === 0) return;
          rx.pos += n;
          rx.remaining -= n;
          rx.p.covered += n;
          if (rx.remaining === 0) {
            this.rx = RX_HEADER;
            if (rx.done) this.complete(rx.p);
          }
          break;
        }
        case 'offset': {
          const b = r.take(8);
          if (b === null) return;
          const p = rx.p;
          const offset = Number(b.readBigUInt64BE(0));
          this.checkWithinRequest(p, offset, rx.dataLength, 'OFFSET_DATA');
          p.buf ??= Buffer.alloc(p.length);
          this.rx = { kind: 'data', p, pos: offset - p.offset, remaining: rx.dataLength, done: rx.done };
          break;
        }
        case 'payload': {
          const b = r.take(rx.length);
          if (b === null) return;
          this.rx = RX_HEADER;
          this.onChunkPayload(rx.p, rx.type, b);
          if (rx.done) this.complete(rx.p);
          break;
        }
      }
    }
  }

  private lookup(cookie: bigint): Pending {
    const p = cookie < COOKIE_LIMIT ? this.slots[Number(cookie) % MAX_SLOTS] : undefined;
    if (p === undefined || p.cookie !== cookie) throw new ProtocolError(`reply for unknown cookie ${cookie}`);
    return p;
  }

  private peerError(p: Pending, errno: number, message: string): PeerError {
    const where = p.type === NBD_CMD_FLUSH ? '' : ` at offset ${p.offset} length ${p.length}`;
    return new PeerError(`${nameOfCmd(p.type)}${where} failed: ${nameOfError(errno)}${message !== '' ? ` (${message})` : ''}`, errno);
  }

  private onSimpleReply(cookie: bigint, error: number): void {
    const p = this.lookup(cookie);
    if (p.structured) throw new ProtocolError(`simple reply to cookie ${cookie} after structured chunks`);
    if (error !== 0) {
      p.error = this.peerError(p, error, '');
      this.complete(p);
    } else if (p.type === NBD_CMD_READ && p.length > 0) {
      // A simple READ reply is followed by exactly `length` bytes, which fully overwrite the buffer.
      p.buf = Buffer.allocUnsafe(p.length);
      this.rx = { kind: 'data', p, pos: 0, remaining: p.length, done: true };
    } else {
      this.complete(p);
    }
  }

  private onChunkHeader(cookie: bigint, flags: number, type: number, length: number): void {
    if (!this.structuredReplies) throw new ProtocolError('structured reply chunk without NBD_OPT_STRUCTURED_REPLY');
    const p = this.lookup(cookie);
    p.structured = true;
    const done = (flags & NBD_REPLY_FLAG_DONE) !== 0;
    const unexpected = (): ProtocolError => new ProtocolError(`reply chunk type ${type} (length ${length}) is invalid for ${nameOfCmd(p.type)}`);
    switch (type) {
      case NBD_REPLY_TYPE_NONE:
        if (length !== 0 || !done) throw new ProtocolError('NBD_REPLY_TYPE_NONE must be empty and carry NBD_REPLY_FLAG_DONE');
        this.complete(p);
        return;
      case NBD_REPLY_TYPE_OFFSET_DATA:
        if (p.type !== NBD_CMD_READ || length < 9) throw unexpected();
        this.rx = { kind: 'offset', p, dataLength: length - 8, done };
        return;
      case NBD_REPLY_TYPE_OFFSET_HOLE:
        if (p.type !== NBD_CMD_READ || length !== 12) throw unexpected();
        this.rx = { kind: 'payload', p, type, length, done };
        return;
      case NBD_REPLY_TYPE_BLOCK_STATUS:
        if (p.type !== NBD_CMD_BLOCK_STATUS || length > MAX_BLOCK_STATUS_PAYLOAD) throw unexpected();
        this.rx = { kind: 'payload', p, type, length, done };
        return;
      default:
        // Unknown error types are still errors (bit 15); any other unknown type requires a hard disconnect.
        if (!isReplyTypeError(type) || length < 6 || length > MAX_ERROR_CHUNK_PAYLOAD) throw unexpected();
        this.rx = { kind: 'payload', p, type, length, done };
    }
  }

  private checkWithinRequest(p: Pending, offset: number, length: number, what: string): void {
    if (offset < p.offset || offset + length > p.offset + p.length) {
      throw new ProtocolError(`${what} [${offset}, +${length}) outside request [${p.offset}, +${p.length})`);
    }
  }

  private onChunkPayload(p: Pending, type: number, payload: Buffer): void {
    if (type === NBD_REPLY_TYPE_OFFSET_HOLE) {
      const hole = parseOffsetHole(payload);
      if (hole === undefined) throw new ProtocolError('malformed OFFSET_HOLE chunk');
      this.checkWithinRequest(p, hole.offset, hole.size, 'OFFSET_HOLE');
      p.buf ??= Buffer.alloc(p.length); // zero-filled: holes need no further work
      p.covered += hole.size;
    } else if (type === NBD_REPLY_TYPE_BLOCK_STATUS) {
      const bs = parseBlockStatus(payload);
      if (bs === undefined) throw new ProtocolError('malformed BLOCK_STATUS chunk');
      const name = this.contextNames.get(bs.contextId);
      if (name === undefined) throw new ProtocolError(`BLOCK_STATUS for unnegotiated meta context id ${bs.contextId}`);
      if (bs.extents.some((e) => e.length === 0)) throw new ProtocolError('BLOCK_STATUS extent of length 0');
      p.extents ??= new Map();
      const list = p.extents.get(name);
      if (list === undefined) p.extents.set(name, bs.extents);
      else list.push(...bs.extents);
    } else {
      const e = parseErrorChunk(type, payload);
      if (e === undefined) throw new ProtocolError(`malformed error chunk (type ${type})`);
      if (e.error === 0) throw new ProtocolError('error chunk with error 0');
      if (e.offset !== undefined) this.checkWithinRequest(p, e.offset, 0, 'ERROR_OFFSET');
      p.error ??= this.peerError(p, e.error, e.message);
    }
  }

  /** The reply to p is complete: settle it and free its slot. Throws (leaving p in flight) on a short READ. */
  private complete(p: Pending): void {
    if (p.error === undefined && p.type === NBD_CMD_READ && p.covered !== p.length) {
      throw new ProtocolError(`READ reply covered ${p.covered} of ${p.length} bytes`);
    }
    this.slots[p.slot] = undefined;
    this.freeSlots[this.freeTop++] = p.slot;
    p.slot = -1;
    if (p.error !== undefined) p.reject(p.error);
    else if (p.type === NBD_CMD_READ) (p.resolve as (b: Buffer) => void)(p.buf ?? Buffer.alloc(0));
    else if (p.type === NBD_CMD_BLOCK_STATUS) (p.resolve as (m: Map<string, Extent[]>) => void)(p.extents ?? new Map());
    else (p.resolve as () => void)();
    this.pump();
    // The spec: a client that receives NBD_ESHUTDOWN MUST initiate a soft disconnect.
    if (p.error?.errno === NBD_ESHUTDOWN && this.state === 'open') void this.disconnect();
  }
}
