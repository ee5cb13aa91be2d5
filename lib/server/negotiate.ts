// Option haggling as a pure step: (state, option, payload) → replies and what happens next. No sockets here;
// connection.ts feeds options in and writes the replies out (nbdkit protocol-handshake-newstyle.c).

import {
  BASE_ALLOCATION,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_NAME,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_SHUTDOWN,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
  nameOfOpt,
} from '../protocol/constants';
import {
  encodeExportNameReply,
  encodeInfoBlockSize,
  encodeInfoDescription,
  encodeInfoExport,
  encodeInfoName,
  encodeMetaContextReply,
  encodeOptionReply,
  encodeServerReply,
  parseExportNameRequest,
  parseInfoRequest,
  parseMetaContextRequest,
} from '../protocol/handshake';
import { BLOCK_SIZES, type ExportHandle, type ExportRegistry, transmissionFlags } from './exports';

/** Most options one handshake may send before we give up on the client (nbdkit uses the same bound). */
export const MAX_OPTIONS = 32;
/** Largest option payload we read (bytes): enough for a 4 KiB name and many meta-context queries. */
export const MAX_OPTION_LENGTH = 64 * 1024;
/** Context id we hand out for base:allocation. */
export const BASE_ALLOCATION_ID = 1;

export interface HandshakeState {
  noZeroes: boolean;
  structuredReplies: boolean;
  /** Result of the last SET_META_CONTEXT: for which export, and whether base:allocation was selected. */
  meta: { exportName: string; baseAllocation: boolean } | null;
  options: number;
}

export function initialHandshakeState(noZeroes: boolean): HandshakeState {
  return { noZeroes, structuredReplies: false, meta: null, options: 0 };
}

/** What transmission needs from the handshake. */
export interface Negotiated {
  export: ExportHandle;
  flags: number;
  structuredReplies: boolean;
  baseAllocation: boolean;
}

export type OptionOutcome =
  | { replies: Buffer[]; next: 'continue' }
  | { replies: Buffer[]; next: 'close'; reason: string }
  | { replies: Buffer[]; next: 'transmit'; negotiated: Negotiated };

export interface NegotiateContext {
  exports: ExportRegistry;
  shuttingDown: boolean;
}

const cont = (replies: Buffer[]): OptionOutcome => ({ replies, next: 'continue' });

function errorReply(option: number, type: number, message: string): Buffer {
  return encodeOptionReply(option, type, Buffer.from(message, 'utf8'));
}

/** Reply to an option whose payload exceeded MAX_OPTION_LENGTH (its payload has been skipped). */
export function tooBigReply(option: number, length: number): Buffer {
  return errorReply(option, NBD_REP_ERR_TOO_BIG, `option ${nameOfOpt(option)} payload of ${length} bytes is too large`);
}

/**
 * Handle one option. Mutates state (counts, negotiated features) and returns the replies to send.
 * Must be called with the whole payload (length ≤ MAX_OPTION_LENGTH).
 */
export function handleOption(state: HandshakeState, option: number, data: Buffer, ctx: NegotiateContext): OptionOutcome {
  state.options++;
  if (state.options > MAX_OPTIONS) {
    return { replies: [errorReply(option, NBD_REP_ERR_POLICY, 'too many options')], next: 'close', reason: 'too many options' };
  }
  if (ctx.shuttingDown && option !== NBD_OPT_EXPORT_NAME) {
    return { replies: [errorReply(option, NBD_REP_ERR_SHUTDOWN, 'server is shutting down')], next: 'close', reason: 'shutting down' };
  }
  switch (option) {
    case NBD_OPT_EXPORT_NAME: {
      const name = parseExportNameRequest(data);
      const exp = name === undefined || ctx.shuttingDown ? undefined : ctx.exports.find(name);
      // EXPORT_NAME has no error reply: an unknown export can only be answered by closing.
      if (exp === undefined) return { replies: [], next: 'close', reason: `unknown export "${name ?? ''}"` };
      const negotiated = negotiatedFor(state, exp);
      return {
        replies: [encodeExportNameReply(exp.device.size, negotiated.flags, state.noZeroes)],
        next: 'transmit',
        negotiated,
      };
    }
    case NBD_OPT_ABORT:
      return { replies: [encodeOptionReply(option, NBD_REP_ACK)], next: 'close', reason: 'client sent ABORT' };
    case NBD_OPT_LIST: {
      if (data.length !== 0) return cont([errorReply(option, NBD_REP_ERR_INVALID, 'LIST takes no payload')]);
      const replies = ctx.exports.all.map((e) => encodeOptionReply(option, NBD_REP_SERVER, encodeServerReply(e.name, e.description)));
      replies.push(encodeOptionReply(option, NBD_REP_ACK));
      return cont(replies);
    }
    case NBD_OPT_STARTTLS:
      if (data.length !== 0) return cont([errorReply(option, NBD_REP_ERR_INVALID, 'STARTTLS takes no payload')]);
      return cont([errorReply(option, NBD_REP_ERR_POLICY, 'TLS is not supported by this server')]);
    case NBD_OPT_STRUCTURED_REPLY:
      if (data.length !== 0) return cont([errorReply(option, NBD_REP_ERR_INVALID, 'STRUCTURED_REPLY takes no payload')]);
      state.structuredReplies = true;
      return cont([encodeOptionReply(option, NBD_REP_ACK)]);
    case NBD_OPT_INFO:
    case NBD_OPT_GO:
      return infoOrGo(state, option, data, ctx);
    case NBD_OPT_LIST_META_CONTEXT:
    case NBD_OPT_SET_META_CONTEXT:
      return metaContext(state, option, data, ctx);
    default:
      return cont([errorReply(option, NBD_REP_ERR_UNSUP, `option ${nameOfOpt(option)} is not supported`)]);
  }
}

function negotiatedFor(state: HandshakeState, exp: ExportHandle): Negotiated {
  const meta = state.meta;
  return {
    export: exp,
    flags: transmissionFlags(exp.device, state.structuredReplies),
    structuredReplies: state.structuredReplies,
    // Contexts chosen for another export do not carry over (spec: SET_META_CONTEXT is per export name).
    baseAllocation: state.structuredReplies && meta !== null && meta.baseAllocation && meta.exportName === exp.name,
  };
}

function infoOrGo(state: HandshakeState, option: number, data: Buffer, ctx: NegotiateContext): OptionOutcome {
  const req = parseInfoRequest(data);
  if (req === undefined) return cont([errorReply(option, NBD_REP_ERR_INVALID, 'malformed INFO/GO request')]);
  const exp = ctx.exports.find(req.name);
  if (exp === undefined) return cont([errorReply(option, NBD_REP_ERR_UNKNOWN, `unknown export "${req.name}"`)]);
  const negotiated = negotiatedFor(state, exp);
  const replies = [encodeOptionReply(option, NBD_REP_INFO, encodeInfoExport(exp.device.size, negotiated.flags))];
  if (req.infos.includes(NBD_INFO_NAME)) replies.push(encodeOptionReply(option, NBD_REP_INFO, encodeInfoName(exp.name)));
  if (req.infos.includes(NBD_INFO_DESCRIPTION)) {
    replies.push(encodeOptionReply(option, NBD_REP_INFO, encodeInfoDescription(exp.description)));
  }
  // Block sizes go to every client, asked or not, so none has to guess the limits.
  replies.push(encodeOptionReply(option, NBD_REP_INFO, encodeInfoBlockSize(BLOCK_SIZES)));
  replies.push(encodeOptionReply(option, NBD_REP_ACK));
  if (option === NBD_OPT_INFO) return cont(replies);
  return { replies, next: 'transmit', negotiated };
}

function metaContext(state: HandshakeState, option: number, data: Buffer, ctx: NegotiateContext): OptionOutcome {
  const isSet = option === NBD_OPT_SET_META_CONTEXT;
  if (!state.structuredReplies) {
    return cont([errorReply(option, NBD_REP_ERR_INVALID, 'meta contexts need structured replies first')]);
  }
  const req = parseMetaContextRequest(data);
  if (req === undefined) return cont([errorReply(option, NBD_REP_ERR_INVALID, 'malformed meta context request')]);
  const exp = ctx.exports.find(req.name);
  if (exp === undefined) return cont([errorReply(option, NBD_REP_ERR_UNKNOWN, `unknown export "${req.name}"`)]);
  let base = false;
  if (!isSet && req.queries.length === 0) base = true; // LIST with no query lists everything
  for (const q of req.queries) {
    if (q === BASE_ALLOCATION) base = true;
    else if (!isSet && q === 'base:') base = true; // a namespace query lists its contexts (LIST only)
  }
  if (isSet) state.meta = { exportName: exp.name, baseAllocation: base };
  const replies: Buffer[] = [];
  if (base) replies.push(encodeOptionReply(option, NBD_REP_META_CONTEXT, encodeMetaContextReply(isSet ? BASE_ALLOCATION_ID : 0, BASE_ALLOCATION)));
  replies.push(encodeOptionReply(option, NBD_REP_ACK));
  return cont(replies);
}
