// One client connection: handshake, then transmission with many requests in flight and replies sent in
// completion order. Memory is bounded by pausing the socket (in-flight requests and bytes, queued replies).
// Lifecycle: HANDSHAKE → TRANSMISSION → FINISHING (DISC, socket closed, or server stopping: in-flight
// requests complete, written data is flushed) → CLOSED.

import type { Socket } from 'node:net';
import {
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
  NBD_ENOTSUP,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_REPLY_FLAG_DONE,
  NBD_STATE_HOLE,
  OPTION_HEADER_SIZE,
  REQUEST_SIZE,
  SIMPLE_REPLY_SIZE,
  STRUCTURED_REPLY_HEADER_SIZE,
  nameOfCmd,
  nameOfOpt,
} from '../protocol/constants';
import { FrameReader } from '../protocol/frame-reader';
import { decodeClientFlags, decodeOptionHeader, encodeGreeting } from '../protocol/handshake';
import {
  encodeBlockStatus,
  encodeErrorChunk,
  encodeNoneChunk,
  encodeOffsetDataHeader,
  encodeOffsetHole,
  encodeSimpleReply,
  type Extent,
} from '../protocol/reply';
import { decodeRequest, type Request } from '../protocol/request';
import { type NbdmirrorError, ProtocolError, ShutdownError, toNbdErrno } from '../errors';
import type { Logger } from '../log';
import type { RequestStats } from '../metrics/request-stats';
import type { BlockDevice, WriteFlags } from '../storage/block-device';
import type { ExportRegistry } from './exports';
import {
  BASE_ALLOCATION_ID,
  type HandshakeState,
  handleOption,
  initialHandshakeState,
  MAX_OPTION_LENGTH,
  type Negotiated,
  tooBigReply,
} from './negotiate';
import type { BufferPool } from '../storage/buffer-pool';
import type { ReceiveBuffer, ReceiveBuffers } from './receive-buffers';
import { type ValidateContext, validateRequest } from './validate';
import { ReplyWriter, type ReplyWriterOptions } from './reply-writer';

/** The rest of a WRITE payload at least this long is read straight into its buffer (see directTarget). */
const DIRECT_READ_MIN = 16 * 1024;
const NO_BYTES = Buffer.alloc(0);
/** A client must finish the handshake within this many ms (a slow or idle handshake holds a slot). */
export const HANDSHAKE_TIMEOUT_MS = 30_000;
/** Requests in flight per connection before we stop reading from the socket. */
export const MAX_IN_FLIGHT_REQUESTS = 256;
/**
 * Payload bytes (write data held + read buffers) in flight per connection before we stop reading, unless the
 * export sets its own (ExportHandle.payloadBudget). Every long payload is memory the process keeps: malloc's
 * arena does not shrink after a burst, so the deepest burst sets the RSS for good. nbdcopy keeps 64 requests
 * of 256 KiB in flight on each of 4 connections; at 64 MiB per connection that grew the arena by 30 MiB,
 * while 8 MiB still keeps the socket busy (the same copy time).
 */
export const MAX_IN_FLIGHT_BYTES = 8 * 1024 * 1024;
/** Reply bytes queued in the socket (client not reading) before we stop reading requests (see above). */
export const MAX_QUEUED_REPLY_BYTES = 8 * 1024 * 1024;
/** On server stop, how long an idle connection is kept (answering ESHUTDOWN) so the client can DISC. */
export const SHUTDOWN_GRACE_MS = 1000;

const KNOWN_CLIENT_FLAGS = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

/** Reply bytes gathered per tick go into slabs of this size. */
const SLAB_SIZE = 64 * 1024;
/**
 * Written slabs kept per connection for reuse. A fresh slab per 64 KiB of replies is external memory, and V8
 * answers external allocation with mark-compacts: 4 KiB reads at 110k/s allocated 450 MB/s of slabs and ran
 * one every 150 ms.
 */
const SPARE_SLABS = 2;
/** A batch's list of pooled buffers or retired slabs when it has none. */
const NOTHING_HELD: readonly Buffer[] = Object.freeze([]);
/** Read payloads up to this size are copied next to their header (cheaper than a write chunk of their own). */
const COPY_PAYLOAD_MAX = 8 * 1024;
/**
 * Longer READs are never done synchronously: a thread-pool read costs the event loop a hand-off (about
 * 16 µs), less than copying a long read itself, and its copy overlaps the loop's own work (the socket write
 * of other replies). 1 MiB reads at QD8, with read buffers pooled: 1880–2150 IOPS synchronous, 2140–2320 async.
 */
const SYNC_READ_MAX = 128 * 1024;
/** Event-loop rounds a pipelining client's replies may wait for more requests to share their write. */
const MAX_DEFER_ROUNDS = 4;
/** Payload bytes of long writes whose replies may wait for the end of a poll phase (see payloadRead). */
const LONG_WRITE_WAIT_BYTES = 1024 * 1024;
const OFFSET_DATA_HEADER_SIZE = STRUCTURED_REPLY_HEADER_SIZE + 8;
const OFFSET_HOLE_CHUNK_SIZE = STRUCTURED_REPLY_HEADER_SIZE + 12;
const FUA: WriteFlags = Object.freeze({ fua: true });
const NO_FLAGS: WriteFlags = Object.freeze({});

type Phase = 'flags' | 'options' | 'transmission' | 'finishing' | 'closed';

export interface ConnectionDeps {
  exports: ExportRegistry;
  log: Logger;
  /** Where long READ payload buffers come from (fresh ones otherwise). */
  buffers?: BufferPool;
  /**
   * The socket reads into these (net.Socket's onread, set up by the listener) and hands each read to
   * receive(), instead of emitting 'data' with a fresh buffer per read.
   */
  rx: ReceiveBuffers;
  /** When long reply batches are written from the thread pool (see ReplyWriter). */
  replyWriter?: ReplyWriterOptions;
}

export class Connection {
  private readonly reader = new FrameReader();
  private phase: Phase = 'flags';
  private hs: HandshakeState = initialHandshakeState(false);
  /** Remaining bytes of an oversized option payload being skipped. */
  private optionSkip: { option: number; length: number; remaining: number } | null = null;
  private device: BlockDevice | null = null;
  private vctx: ValidateContext | null = null;
  private stats: RequestStats | null = null;
  private structured = false;
  private exportName = '';
  /** A WRITE whose payload is still arriving. */
  private pendingWrite: { req: Request; buf: Buffer; filled: number } | null = null;
  /** A refused WRITE whose payload is being discarded; its error reply goes out once the payload is read. */
  private draining: { req: Request; err: NbdmirrorError; remaining: number } | null = null;
  private inFlight = 0;
  private inFlightBytes = 0;
  private paused = false;
  private wrote = false;
  private shuttingDown = false;
  private socketClosed = false;
  private handshakeTimer: NodeJS.Timeout | null;
  private graceTimer: NodeJS.Timeout | null = null;
  private graceOver = false;
  private finishing: Promise<void> | null = null;
  private resolveClosed!: () => void;
  /** Resolves when the connection is fully done (in-flight requests answered, data flushed, socket closed). */
  readonly closed = new Promise<void>((r) => (this.resolveClosed = r));
  private log: Logger;
  private readonly writer: ReplyWriter;

  constructor(
    private readonly socket: Socket,
    private readonly deps: ConnectionDeps,
  ) {
    this.log = deps.log;
    socket.setNoDelay(true);
    this.writer = new ReplyWriter(socket, () => this.maybeResume(), deps.replyWriter);
    socket.on('drain', () => this.maybeResume());
    socket.on('error', (err) => this.log.debug({ err }, 'socket error'));
    socket.on('close', () => this.onSocketClose());
    this.handshakeTimer = setTimeout(() => this.abort('handshake timed out'), HANDSHAKE_TIMEOUT_MS);
    this.handshakeTimer.unref();
    socket.write(encodeGreeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES));
    deps.rx.direct = this.directTarget;
  }

  /** Server is stopping: refuse new work with ESHUTDOWN, finish what is in flight, flush, close. */
  shutdown(): void {
    if (this.shuttingDown) return;
    this.shuttingDown = true;
    if (this.phase === 'flags' || this.phase === 'options' || this.phase === 'closed') {
      // Nothing was exported on this connection (or it already ended), so there is nothing to finish.
      this.abort('server stopping');
      return;
    }
    this.graceTimer = setTimeout(() => {
      this.graceOver = true;
      this.maybeFinish();
    }, SHUTDOWN_GRACE_MS);
    this.graceTimer.unref();
  }

  // ---------------------------------------------------------------------------------------------------------
  // Receive path

  /**
   * One socket read, in a buffer of deps.rx. Once it is processed, whatever is left unread is copied out of
   * that buffer, which the next read may overwrite.
   */
  receive(chunk: Buffer): void {
    const pw = this.pendingWrite;
    if (pw !== null && chunk.buffer === pw.buf.buffer && chunk.byteOffset === pw.buf.byteOffset + pw.filled) {
      // The read went straight into the payload (directTarget); nothing else is buffered meanwhile.
      pw.filled += chunk.length;
      if (pw.filled === pw.buf.length) {
        this.payloadRead = true;
        this.onData(NO_BYTES); // process() dispatches the write
        this.payloadRead = false;
        if (this.flushQueued && (this.longWriteBytesWaiting += pw.buf.length) >= LONG_WRITE_WAIT_BYTES) this.flushReplies();
      }
      return;
    }
    this.onData(chunk);
    this.reader.detach();
  }

  /**
   * The rest of a long WRITE payload still to arrive, for the socket's next read to land in (see
   * ReceiveBuffers.direct); null to read into the receive buffers. While a payload is pending the reader
   * holds nothing (process() moved everything buffered into it), so the next bytes on the wire are its own.
   */
  private readonly directTarget = (): Buffer | null => {
    const pw = this.pendingWrite;
    if (pw === null || pw.buf.length - pw.filled < DIRECT_READ_MIN || this.phase !== 'transmission') return null;
    return pw.buf.subarray(pw.filled);
  };

  private onData(chunk: Buffer): void {
    if (this.phase === 'finishing' || this.phase === 'closed') return;
    this.reader.push(chunk);
    const before = this.requestsSeen;
    this.inInput = true;
    try {
      this.process();
      this.pipelined = this.requestsSeen - before >= 2;
    } catch (err) {
      if (err instanceof ProtocolError) this.abort(err.message);
      else {
        this.log.error({ err }, 'internal error while processing input');
        this.abort('internal error');
      }
    } finally {
      this.inInput = false;
    }
  }

  private process(): void {
    for (;;) {
      switch (this.phase) {
        case 'flags': {
          const flags = decodeClientFlags(this.reader.peek(4) ?? Buffer.alloc(0));
          if (flags === null) return;
          this.reader.consume(4);
          if ((flags & ~KNOWN_CLIENT_FLAGS) !== 0) return this.abort(`unknown client flags 0x${flags.toString(16)}`);
          this.hs = initialHandshakeState((flags & NBD_FLAG_C_NO_ZEROES) !== 0);
          this.phase = 'options';
          continue;
        }
        case 'options':
          if (!this.processOption()) return;
          continue;
        case 'transmission':
          if (this.paused || !this.processRequest()) return;
          continue;
        default:
          return;
      }
    }
  }

  /** Handle at most one option; false when more input is needed or the handshake ended. */
  private processOption(): boolean {
    if (this.optionSkip) {
      this.optionSkip.remaining -= this.reader.skip(this.optionSkip.remaining);
      if (this.optionSkip.remaining > 0) return false;
      const { option, length } = this.optionSkip;
      this.optionSkip = null;
      this.hs.options++;
      this.socket.write(tooBigReply(option, length));
      return true;
    }
    const hb = this.reader.peek(OPTION_HEADER_SIZE);
    if (hb === null) return false;
    const hdr = decodeOptionHeader(hb)!;
    if (hdr.length > MAX_OPTION_LENGTH) {
      this.reader.consume(OPTION_HEADER_SIZE);
      this.optionSkip = { option: hdr.option, length: hdr.length, remaining: hdr.length };
      return true;
    }
    if (this.reader.length < OPTION_HEADER_SIZE + hdr.length) return false;
    this.reader.consume(OPTION_HEADER_SIZE);
    const data = Buffer.from(this.reader.take(hdr.length)!); // its own copy: see receive()
    const out = handleOption(this.hs, hdr.option, data, { exports: this.deps.exports, shuttingDown: this.shuttingDown });
    this.log.debug({ option: nameOfOpt(hdr.option), next: out.next }, 'option');
    for (const r of out.replies) this.socket.write(r);
    if (out.next === 'close') {
      this.log.info({ reason: out.reason }, 'handshake ended');
      this.phase = 'closed';
      this.socket.end();
      return false;
    }
    if (out.next === 'transmit') this.startTransmission(out.negotiated);
    return true;
  }

  private startTransmission(n: Negotiated): void {
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.handshakeTimer = null;
    this.device = n.export.device;
    this.exportName = n.export.name;
    this.stats = n.export.stats ?? null;
    this.answerAtOnce = n.export.answerAtOnce === true;
    this.maxInFlightBytes = n.export.payloadBudget ?? MAX_IN_FLIGHT_BYTES;
    this.maxQueuedReplyBytes = n.export.payloadBudget ?? MAX_QUEUED_REPLY_BYTES;
    this.structured = n.structuredReplies;
    this.vctx = { size: n.export.device.size, flags: n.flags, structuredReplies: n.structuredReplies, baseAllocation: n.baseAllocation };
    this.log = this.log.child({ export: n.export.name });
    this.log.info({ structuredReplies: n.structuredReplies, baseAllocation: n.baseAllocation }, 'transmission started');
    this.phase = 'transmission';
  }

  /** Take at most one request (or payload piece) off the input; false when more input is needed. */
  private processRequest(): boolean {
    const dr = this.draining;
    if (dr) {
      dr.remaining -= this.reader.skip(dr.remaining);
      if (dr.remaining > 0) return false;
      this.draining = null;
      // Replying only now: clients (libnbd) treat a reply to a request they are still sending as a bug.
      this.replyError(dr.req, dr.err);
      return true;
    }
    const pw = this.pendingWrite;
    if (pw) {
      pw.filled += this.reader.readInto(pw.buf, pw.filled, pw.buf.length - pw.filled);
      if (pw.filled < pw.buf.length) return false;
      this.pendingWrite = null;
      this.dispatch(pw.req, pw.buf, true);
      return true;
    }
    const hb = this.reader.peek(REQUEST_SIZE);
    if (hb === null) return false;
    const req = decodeRequest(hb)!; // throws ProtocolError on bad magic → disconnect
    this.reader.consume(REQUEST_SIZE);
    this.requestsSeen++;
    this.onRequest(req);
    return this.phase === 'transmission';
  }

  private onRequest(req: Request): void {
    if (req.type === NBD_CMD_DISC) {
      this.log.debug('client sent DISC');
      this.phase = 'finishing';
      this.maybeFinish();
      return;
    }
    let err: NbdmirrorError | null = validateRequest(req, this.vctx!);
    if (err === null && this.shuttingDown) err = new ShutdownError('server is shutting down');
    if (req.type === NBD_CMD_WRITE) {
      if (err !== null) {
        // A refused write's payload is discarded as it arrives, never buffered.
        this.stats?.refused(req.type);
        this.draining = { req, err, remaining: req.length };
        return;
      }
      if (this.reader.length >= req.length) {
        this.dispatch(req, this.reader.take(req.length)!);
      } else {
        const buf = this.payloadBuffer(req.length);
        this.pendingWrite = { req, buf, filled: this.reader.readInto(buf, 0, req.length) };
      }
      return;
    }
    if (err !== null) {
      this.stats?.refused(req.type);
      return this.replyError(req, err);
    }
    this.dispatch(req, null);
  }

  /** @param ownPayload payload came from payloadBuffer: it is given back once the device is done with it */
  private dispatch(req: Request, payload: Buffer | null, ownPayload = false): void {
    if (req.type === NBD_CMD_WRITE || req.type === NBD_CMD_TRIM || req.type === NBD_CMD_WRITE_ZEROES) this.wrote = true;
    const st = this.stats;
    const t0 = st === null ? 0 : st.begin(req.type);
    let p: Promise<void> | null;
    try {
      p = this.start(req, payload);
    } catch (err) {
      p = Promise.reject(err);
    }
    // A device owns a WRITE payload until its promise settles; after a failure part of the stack (a mirror
    // write still in flight) may hold it yet, so only a success gives it back.
    const give = ownPayload && payload !== null && payload.length > COPY_PAYLOAD_MAX ? this.deps.buffers : undefined;
    if (p === null) {
      // done and answered already: nothing was in flight
      give?.give(payload!);
      st?.end(req.type, req.length, t0);
      return;
    }
    const bytes = req.type === NBD_CMD_READ || req.type === NBD_CMD_WRITE ? req.length : 0;
    this.inFlight++;
    this.inFlightBytes += bytes;
    this.maybePause();
    // A payload still in the receive buffer is pinned there until the device is done with it (as for `give`,
    // only a success says so).
    const held: ReceiveBuffer | null = !ownPayload && payload !== null ? this.deps.rx.hold(payload) : null;
    const ok = give !== undefined ? () => give.give(payload!) : held !== null ? () => this.deps.rx.release(held) : undefined;
    p.then(ok, (err: unknown) => this.replyError(req, err)).then(() => {
      // FLUSH and BLOCK_STATUS carry no data: their length is not counted as bytes.
      st?.end(req.type, req.type === NBD_CMD_FLUSH || req.type === NBD_CMD_BLOCK_STATUS ? 0 : req.length, t0);
      this.inFlight--;
      this.inFlightBytes -= bytes;
      this.maybeResume();
      this.maybeFinish();
    });
  }

  /**
   * Start a validated request: null when it completed synchronously and its reply is queued (a write the
   * device took at once), else a promise that settles once the reply is queued (rejects with the device's
   * error, which the caller turns into an error reply).
   */
  private start(req: Request, payload: Buffer | null): Promise<void> | null {
    if (req.type === NBD_CMD_WRITE) {
      const dev = this.device!;
      const flags = (req.flags & NBD_CMD_FLAG_FUA) !== 0 ? FUA : NO_FLAGS;
      const p = dev.pwriteFast !== undefined ? dev.pwriteFast(payload!, req.offset, flags) : dev.pwrite(payload!, req.offset, flags);
      if (p === null) {
        this.replySimple(req.cookie, 0);
        // Nothing is in flight, but the client may not be reading its replies.
        this.maybePause();
        return null;
      }
      return p.then(() => this.replySimple(req.cookie, 0));
    }
    if (req.type === NBD_CMD_READ) {
      if (!this.readNow(this.device!, req)) return this.read(this.device!, req);
      this.maybePause(); // as for a write answered at once: the client may not be reading its replies
      return null;
    }
    return this.execute(req);
  }

  // ---------------------------------------------------------------------------------------------------------
  // Acting on requests

  /** Run a validated request against the device and send its reply; rejects with the device's error. */
  private async execute(req: Request): Promise<void> {
    const dev = this.device!;
    const fua = (req.flags & NBD_CMD_FLAG_FUA) !== 0;
    switch (req.type) {
      case NBD_CMD_READ:
        return this.read(dev, req);
      case NBD_CMD_FLUSH:
        await dev.flush();
        break;
      case NBD_CMD_TRIM:
        if (req.length > 0) await dev.trim(req.offset, req.length, { fua });
        break;
      case NBD_CMD_WRITE_ZEROES:
        if (req.length > 0) {
          await dev.zero(req.offset, req.length, {
            fua,
            mayTrim: (req.flags & NBD_CMD_FLAG_NO_HOLE) === 0,
            fastZero: (req.flags & NBD_CMD_FLAG_FAST_ZERO) !== 0,
          });
        }
        break;
      case NBD_CMD_CACHE:
        if (req.length > 0) await dev.cache(req.offset, req.length);
        break;
      case NBD_CMD_BLOCK_STATUS:
        return this.blockStatus(dev, req);
      default:
        throw new Error(`execute: unvalidated command ${req.type}`);
    }
    this.replySimple(req.cookie, 0);
  }

  /**
   * A READ that waits for the device. With preadCb and the extents at hand (or not wanted), one promise for
   * the whole request instead of one per layer of the stack (see BlockDevice.preadCb).
   */
  private read(dev: BlockDevice, req: Request): Promise<void> {
    const { offset, length, cookie } = req;
    if (dev.preadCb === undefined || length === 0) return this.readAsync(dev, req);
    const holes = this.wantsHoles(dev, req);
    const extents = holes ? (dev.extentsNow?.(offset, length) ?? null) : null;
    if (holes && extents === null) return this.readAsync(dev, req);
    const buf = this.payloadBuffer(length);
    return new Promise((resolve, reject) => {
      dev.preadCb!(buf, offset, (err) => {
        if (err !== null) return reject(err);
        try {
          if (!this.closedForReplies()) this.replyRead(cookie, offset, length, extents, buf);
          resolve();
        } catch (e) {
          reject(e);
        }
      });
    });
  }

  private async readAsync(dev: BlockDevice, req: Request): Promise<void> {
    const { offset, length, cookie } = req;
    if (this.structured && length === 0) {
      if (this.closedForReplies()) return;
      const at = this.reserve(STRUCTURED_REPLY_HEADER_SIZE); // before reading this.slab: reserve may replace it
      encodeNoneChunk(cookie, this.slab, at);
      return;
    }
    const extents = this.wantsHoles(dev, req) ? await dev.extents(offset, length) : null;
    const buf = this.payloadBuffer(length);
    if (length > 0) await dev.pread(buf, offset);
    if (this.closedForReplies()) return;
    this.replyRead(cookie, offset, length, extents, buf);
  }

  /** A structured READ reply reports holes as OFFSET_HOLE chunks, unless the client asked for one chunk (DF). */
  private wantsHoles(dev: BlockDevice, req: Request): boolean {
    return this.structured && (req.flags & NBD_CMD_FLAG_DF) === 0 && dev.caps.extents;
  }

  /**
   * The READ without waiting, when the device has all its bytes at hand (BlockDevice.preadNow): true when
   * the reply is queued. A small read of data is read straight into the reply slab, behind its header.
   */
  private readNow(dev: BlockDevice, req: Request): boolean {
    const { offset, length, cookie } = req;
    if (dev.preadNow === undefined || length === 0 || length > SYNC_READ_MAX) return false;
    let extents: Extent[] | null = null;
    if (this.wantsHoles(dev, req)) {
      extents = dev.extentsNow?.(offset, length) ?? null;
      if (extents === null) return false;
    }
    if (this.closedForReplies()) return true;
    const first = extents === null ? null : extents[0];
    const oneExtent = first == null || first.length >= length;
    if (oneExtent && first != null && (first.flags & NBD_STATE_HOLE) !== 0) {
      const at = this.reserve(OFFSET_HOLE_CHUNK_SIZE);
      encodeOffsetHole(cookie, NBD_REPLY_FLAG_DONE, offset, length, this.slab, at);
      return true;
    }
    if (oneExtent && length <= COPY_PAYLOAD_MAX) {
      const header = this.structured ? OFFSET_DATA_HEADER_SIZE : SIMPLE_REPLY_SIZE;
      const at = this.reserve(header + length); // before reading this.slab: reserve may replace it
      const slab = this.slab;
      if (!dev.preadNow(slab.subarray(at + header, at + header + length), offset)) {
        this.slabPos = at; // give the room back: nothing was queued after it
        return false;
      }
      if (this.structured) encodeOffsetDataHeader(cookie, NBD_REPLY_FLAG_DONE, offset, length, slab, at);
      else encodeSimpleReply(cookie, 0, slab, at);
      return true;
    }
    const buf = this.payloadBuffer(length);
    if (!dev.preadNow(buf, offset)) {
      this.deps.buffers?.give(buf); // nothing else holds it
      return false;
    }
    this.replyRead(cookie, offset, length, extents, buf);
    return true;
  }

  /** Queue the reply of a READ whose bytes are in buf (from payloadBuffer): structured chunks or simple. */
  private replyRead(cookie: bigint, offset: number, length: number, extents: Extent[] | null, buf: Buffer): void {
    if (this.structured) {
      this.replyChunks(cookie, offset, length, extents, buf);
    } else {
      this.replySimple(cookie, 0);
      this.replyData(buf);
    }
    this.sentPooled(buf);
  }

  /** A structured READ reply of buf: holes (per extents, if given) as OFFSET_HOLE, the rest as OFFSET_DATA. */
  private replyChunks(cookie: bigint, offset: number, length: number, extents: Extent[] | null, buf: Buffer): void {
    let pos = 0;
    const chunks: Array<{ pos: number; len: number; hole: boolean }> = [];
    for (const e of extents ?? []) {
      const len = Math.min(e.length, length - pos);
      if (len <= 0) break;
      const hole = (e.flags & NBD_STATE_HOLE) !== 0;
      const prev = chunks[chunks.length - 1];
      if (prev && prev.hole === hole) prev.len += len;
      else chunks.push({ pos, len, hole });
      pos += len;
    }
    if (pos < length) {
      const prev = chunks[chunks.length - 1];
      if (prev && !prev.hole) prev.len += length - pos;
      else chunks.push({ pos, len: length - pos, hole: false });
    }
    for (let i = 0; i < chunks.length; i++) {
      const c = chunks[i]!;
      const flags = i === chunks.length - 1 ? NBD_REPLY_FLAG_DONE : 0;
      if (c.hole) {
        const at = this.reserve(OFFSET_HOLE_CHUNK_SIZE);
        encodeOffsetHole(cookie, flags, offset + c.pos, c.len, this.slab, at);
      } else {
        const at = this.reserve(OFFSET_DATA_HEADER_SIZE);
        encodeOffsetDataHeader(cookie, flags, offset + c.pos, c.len, this.slab, at);
        this.replyData(c.pos === 0 && c.len === length ? buf : buf.subarray(c.pos, c.pos + c.len));
      }
    }
  }

  private async blockStatus(dev: BlockDevice, req: Request): Promise<void> {
    let extents = await dev.extents(req.offset, req.length);
    if (extents.length === 0) extents = [{ length: req.length, flags: 0 }];
    if ((req.flags & NBD_CMD_FLAG_REQ_ONE) !== 0) {
      const first = extents[0]!;
      extents = [{ length: Math.min(first.length, req.length), flags: first.flags }];
    }
    this.send(encodeBlockStatus(req.cookie, NBD_REPLY_FLAG_DONE, BASE_ALLOCATION_ID, extents));
  }

  // ---------------------------------------------------------------------------------------------------------
  // Replies and flow control

  private replyError(req: Request, err: unknown): void {
    const errno = toNbdErrno(err);
    this.stats?.error(req.type, errno);
    const message = err instanceof Error ? err.message : String(err);
    const expected = errno === NBD_ENOTSUP && (req.flags & NBD_CMD_FLAG_FAST_ZERO) !== 0;
    this.log[expected ? 'debug' : 'warn']({ cmd: nameOfCmd(req.type), offset: req.offset, length: req.length, errno, err: message }, 'request failed');
    // READ and BLOCK_STATUS must use structured replies once negotiated; other commands may stay simple.
    if (this.structured && (req.type === NBD_CMD_READ || req.type === NBD_CMD_BLOCK_STATUS)) {
      this.send(encodeErrorChunk(req.cookie, NBD_REPLY_FLAG_DONE, errno, message));
    } else {
      this.replySimple(req.cookie, errno);
    }
  }

  // Replies are gathered per event-loop tick and leave in one socket write (a writev only when large read
  // payloads ride along): headers, and read payloads up to COPY_PAYLOAD_MAX, are written into `slab`; bytes
  // of the slab that were handed to the socket are never written again (a new slab is started instead).

  private slab: Buffer = Buffer.allocUnsafeSlow(SLAB_SIZE);
  private slabStart = 0;
  private slabPos = 0;
  /** Full slabs replaced since the last flush: free again once that flush's write has completed. */
  private retiredSlabs: Buffer[] = [];
  /** Written slabs, ready for reuse (at most SPARE_SLABS). */
  private readonly spareSlabs: Buffer[] = [];
  /** Buffers to write at the end of this tick, in order (the slab's pending bytes come after them). */
  private out: Buffer[] = [];
  private outBytes = 0;
  /** Pooled payload buffers among `out`, given back when their write completes. */
  private outPooled: Buffer[] = [];
  private flushQueued = false;
  /** Requests decoded so far, and whether the last read brought several (see flushNextRound). */
  private requestsSeen = 0;
  private pipelined = false;
  /** Input is being processed: a reply queued now is for a request completed at once (see flushNextRound). */
  private inInput = false;
  /**
   * A long WRITE's payload has just been read straight into its buffer (receive()): its reply, if the write
   * completes at once, waits for the end of this poll phase. libuv goes on reading the socket in that phase
   * while reads fill their buffers, so a client streaming long writes (nbdcopy: 64 of 256 KiB in flight) has
   * about 16 of them read in one phase, and their replies share a socket write instead of one each. Once the
   * writes answered so carry LONG_WRITE_WAIT_BYTES, their replies go at once: a client with few requests in
   * flight (fio's 1 MiB writes at depth 8) would otherwise wait with nothing left to send.
   */
  private payloadRead = false;
  private longWriteBytesWaiting = 0;
  /** The export's answerAtOnce: replies are never deferred. */
  private answerAtOnce = false;
  /** Limits before reading pauses (see MAX_IN_FLIGHT_BYTES, ExportHandle.payloadBudget). */
  private maxInFlightBytes = MAX_IN_FLIGHT_BYTES;
  private maxQueuedReplyBytes = MAX_QUEUED_REPLY_BYTES;
  private deferRounds = 0;
  private seenAtDefer = 0;

  /** No reply can be delivered any more (the socket is gone): replies are dropped. */
  private closedForReplies(): boolean {
    return this.socketClosed || this.socket.destroyed;
  }

  /** Room for n reply bytes at the end of the slab; returns their offset in this.slab. */
  private reserve(n: number): number {
    if (this.slabPos + n > this.slab.length) {
      this.cutSlab();
      if (this.slab.length === SLAB_SIZE) this.retiredSlabs.push(this.slab);
      this.slab = n <= SLAB_SIZE ? (this.spareSlabs.pop() ?? Buffer.allocUnsafeSlow(SLAB_SIZE)) : Buffer.allocUnsafeSlow(n);
      this.slabStart = 0;
      this.slabPos = 0;
    }
    const at = this.slabPos;
    this.slabPos += n;
    if (!this.flushQueued) {
      this.flushQueued = true;
      if (this.inInput && !this.answerAtOnce && (this.pipelined || this.payloadRead)) {
        setImmediate(this.pipelined ? this.flushNextRound : this.flushReplies);
      } else process.nextTick(this.flushReplies);
    }
    return at;
  }

  private cutSlab(): void {
    if (this.slabPos === this.slabStart) return;
    this.out.push(this.slab.subarray(this.slabStart, this.slabPos));
    this.outBytes += this.slabPos - this.slabStart;
    this.slabStart = this.slabPos;
  }

  private replySimple(cookie: bigint, error: number): void {
    if (this.closedForReplies()) return;
    const at = this.reserve(SIMPLE_REPLY_SIZE); // before reading this.slab: reserve may start a new one
    encodeSimpleReply(cookie, error, this.slab, at);
  }

  /** Read payload bytes that follow the header just queued. */
  private replyData(data: Buffer): void {
    if (data.length <= COPY_PAYLOAD_MAX) {
      const at = this.reserve(data.length);
      data.copy(this.slab, at);
      return;
    }
    this.send(data);
  }

  /** A buffer for a READ or WRITE payload of `length` bytes: pooled when long (see BufferPool). */
  private payloadBuffer(length: number): Buffer {
    const pool = this.deps.buffers;
    return pool !== undefined && length > COPY_PAYLOAD_MAX ? pool.take(length) : Buffer.allocUnsafe(length);
  }

  /** buf (from payloadBuffer) was queued: it goes back to the pool once the socket has written it. */
  private sentPooled(buf: Buffer): void {
    if (this.deps.buffers !== undefined && buf.length > COPY_PAYLOAD_MAX && !this.closedForReplies()) this.outPooled.push(buf);
  }

  /** Queue a buffer as it is (not copied; it must not change until written). */
  private send(b: Buffer): void {
    if (this.closedForReplies() || b.length === 0) return;
    this.reserve(0); // schedules the flush
    this.cutSlab();
    this.out.push(b);
    this.outBytes += b.length;
  }

  /**
   * A client that pipelines (several requests arrived in one read) gets its replies a little later: the flush
   * waits one event-loop round, and another as long as each round brings new requests (up to
   * MAX_DEFER_ROUNDS), so their replies share one socket write. A write costs several µs of CPU on loopback
   * (delivery, waking the client), so fewer and larger ones raise throughput at depth. The wait ends by
   * itself: a client whose requests are all in flight sends nothing new until it gets replies. A client with
   * one request in flight is answered in the same round.
   *
   * Only replies to requests completed while their input is processed wait so. Replies completed later (a
   * mirrored write, once the peer answered) arrive in batches already, and each of them has waited for
   * another round trip, so they leave in the same round; and the replication link's export never defers
   * (ExportHandle.answerAtOnce): its peer round trip is on the path of every mirrored write, and a fixed
   * number of client requests in flight makes the mirror's throughput its latency. A server alone is not
   * changed by either rule (its writes complete at once).
   */
  private readonly flushNextRound = (): void => {
    this.deferRounds = 0;
    this.seenAtDefer = this.requestsSeen;
    setImmediate(this.flushWhenQuiet);
  };

  private readonly flushWhenQuiet = (): void => {
    if (this.requestsSeen !== this.seenAtDefer && ++this.deferRounds < MAX_DEFER_ROUNDS && this.outBytes + this.slabPos - this.slabStart < SLAB_SIZE) {
      this.seenAtDefer = this.requestsSeen;
      setImmediate(this.flushWhenQuiet);
      return;
    }
    this.flushReplies();
  };

  /**
   * After the write of a batch: its pooled buffers, and the slabs retired before it, are free again (the
   * socket writes in order, so every earlier write is done too). After a failed write they are dropped.
   */
  private afterWrite(pooled: readonly Buffer[], slabs: readonly Buffer[], err: Error | null | undefined): void {
    if (err) return;
    if (pooled.length !== 0) {
      const pool = this.deps.buffers!;
      for (const b of pooled) pool.give(b);
    }
    for (const s of slabs) if (this.spareSlabs.length < SPARE_SLABS) this.spareSlabs.push(s);
  }

  private readonly flushReplies = (): void => {
    this.flushQueued = false;
    this.longWriteBytesWaiting = 0;
    this.cutSlab();
    const out = this.out;
    const bytes = this.outBytes;
    this.out = [];
    this.outBytes = 0;
    // The batch's own lists (or none): an empty list left in place goes on filling with later batches' buffers,
    // which this batch's callback must not free.
    const pooled = this.outPooled.length !== 0 ? this.outPooled : NOTHING_HELD;
    if (pooled.length !== 0) this.outPooled = [];
    const slabs = this.retiredSlabs.length !== 0 ? this.retiredSlabs : NOTHING_HELD;
    if (slabs.length !== 0) this.retiredSlabs = [];
    if (out.length === 0 || this.closedForReplies()) return;
    const done = pooled.length === 0 && slabs.length === 0 ? undefined : (err?: Error | null): void => this.afterWrite(pooled, slabs, err);
    this.writer.write(out, bytes, done);
  };

  /** Reply bytes queued: in the socket, plus those gathered this tick. */
  private queuedReplyBytes(): number {
    return this.writer.pendingBytes + this.outBytes + (this.slabPos - this.slabStart);
  }

  private maybePause(): void {
    if (this.paused) return;
    if (
      this.inFlight >= MAX_IN_FLIGHT_REQUESTS ||
      this.inFlightBytes >= this.maxInFlightBytes ||
      this.queuedReplyBytes() >= this.maxQueuedReplyBytes
    ) {
      this.paused = true;
      this.socket.pause();
    }
  }

  private maybeResume(): void {
    if (!this.paused) return;
    if (
      this.inFlight < MAX_IN_FLIGHT_REQUESTS &&
      this.inFlightBytes < this.maxInFlightBytes &&
      this.queuedReplyBytes() < this.maxQueuedReplyBytes
    ) {
      this.paused = false;
      if (this.phase !== 'transmission') return;
      this.socket.resume();
      try {
        this.process();
      } catch (err) {
        this.abort(err instanceof Error ? err.message : String(err));
      }
    }
  }

  // ---------------------------------------------------------------------------------------------------------
  // Ending

  private onSocketClose(): void {
    this.socketClosed = true;
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    if (this.phase === 'flags' || this.phase === 'options' || this.phase === 'closed') {
      this.phase = 'closed';
      this.cleanup();
      return;
    }
    this.phase = 'finishing';
    this.maybeFinish();
  }

  /** Once nothing is in flight: flush what this connection wrote (durable on disconnect), then close. */
  private maybeFinish(): void {
    if (this.finishing || this.inFlight > 0) return;
    const stopping = this.shuttingDown && (this.graceOver || this.phase === 'finishing');
    if (this.phase !== 'finishing' && !stopping) return;
    this.phase = 'finishing';
    this.finishing = (async () => {
      if (this.wrote && this.device) {
        try {
          await this.device.flush();
        } catch (err) {
          this.log.error({ err }, 'flush on disconnect failed');
        }
      }
      this.log.info('connection closed');
      this.phase = 'closed';
      if (!this.socket.destroyed) this.writer.end();
      this.cleanup();
    })();
  }

  /** Drop the connection at once (protocol violation, handshake timeout). */
  private abort(reason: string): void {
    this.log.info({ reason, export: this.exportName || undefined }, 'dropping connection');
    if (this.phase === 'transmission') {
      // In-flight requests still complete (and are flushed) before the connection counts as closed.
      this.phase = 'finishing';
      this.socket.destroy();
      this.maybeFinish();
      return;
    }
    this.phase = 'closed';
    this.socket.destroy();
    this.cleanup();
  }

  private cleanup(): void {
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    if (this.graceTimer) clearTimeout(this.graceTimer);
    this.resolveClosed();
  }
}
