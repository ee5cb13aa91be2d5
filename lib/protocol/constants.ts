// NBD wire constants (NetworkBlockDevice/nbd doc/proto.md). Pure data: no I/O here.

/** "NBDMAGIC": first 8 bytes the server sends. */
export const NBD_MAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": newstyle magic, also the prefix of every client option. */
export const NBD_IHAVEOPT = 0x49484156454f5054n;
/** Magic that starts every option reply. */
export const NBD_REP_MAGIC = 0x3e889045565a9n;

export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// Handshake flags (server → client, 16 bits).
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;

// Client flags (client → server, 32 bits).
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

// Options.
export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_PEEK_EXPORT = 4;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;
export const NBD_OPT_EXTENDED_HEADERS = 11;

// Option reply types.
export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
const REP_ERR = 0x80000000;
export const NBD_REP_ERR_UNSUP = REP_ERR + 1;
export const NBD_REP_ERR_POLICY = REP_ERR + 2;
export const NBD_REP_ERR_INVALID = REP_ERR + 3;
export const NBD_REP_ERR_PLATFORM = REP_ERR + 4;
export const NBD_REP_ERR_TLS_REQD = REP_ERR + 5;
export const NBD_REP_ERR_UNKNOWN = REP_ERR + 6;
export const NBD_REP_ERR_SHUTDOWN = REP_ERR + 7;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = REP_ERR + 8;
export const NBD_REP_ERR_TOO_BIG = REP_ERR + 9;
export const NBD_REP_ERR_EXT_HEADER_REQD = REP_ERR + 10;

export function isRepError(type: number): boolean {
  return type >= REP_ERR;
}

// NBD_REP_INFO payload types.
export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

// Transmission flags (16 bits).
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_RESIZE = 1 << 9;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;

// Commands.
export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;

// Command flags.
export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;
/** Every command flag this server understands. */
export const NBD_CMD_FLAG_KNOWN =
  NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_DF | NBD_CMD_FLAG_REQ_ONE | NBD_CMD_FLAG_FAST_ZERO;

// Structured reply flags and chunk types.
export const NBD_REPLY_FLAG_DONE = 1 << 0;
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
export const NBD_REPLY_TYPE_ERROR = (1 << 15) + 1;
export const NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2;

export function isReplyTypeError(type: number): boolean {
  return (type & (1 << 15)) !== 0;
}

// base:allocation status flags.
export const NBD_STATE_HOLE = 1 << 0;
export const NBD_STATE_ZERO = 1 << 1;

export const BASE_ALLOCATION = 'base:allocation';

// Errors on the wire (values are the Linux errno numbers the spec fixes).
export const NBD_SUCCESS = 0;
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

// Fixed sizes of wire structures, in bytes.
export const GREETING_SIZE = 18; // NBDMAGIC + IHAVEOPT + 16-bit flags
export const OPTION_HEADER_SIZE = 16; // IHAVEOPT + option + length
export const OPTION_REPLY_HEADER_SIZE = 20; // magic + option + type + length
export const REQUEST_SIZE = 28;
export const SIMPLE_REPLY_SIZE = 16;
export const STRUCTURED_REPLY_HEADER_SIZE = 20;
/** EXPORT_NAME reply: size + transmission flags (+124 zero bytes unless NO_ZEROES). */
export const EXPORT_NAME_REPLY_SIZE = 10;
export const EXPORT_NAME_ZEROES = 124;
/** Strings (export names, descriptions, messages): the spec's hard limit. */
export const MAX_STRING_LENGTH = 4096;

const names = (entries: Record<string, number>): Map<number, string> =>
  new Map(Object.entries(entries).map(([k, v]) => [v, k]));

const optNames = names({
  EXPORT_NAME: NBD_OPT_EXPORT_NAME, ABORT: NBD_OPT_ABORT, LIST: NBD_OPT_LIST, PEEK_EXPORT: NBD_OPT_PEEK_EXPORT,
  STARTTLS: NBD_OPT_STARTTLS, INFO: NBD_OPT_INFO, GO: NBD_OPT_GO, STRUCTURED_REPLY: NBD_OPT_STRUCTURED_REPLY,
  LIST_META_CONTEXT: NBD_OPT_LIST_META_CONTEXT, SET_META_CONTEXT: NBD_OPT_SET_META_CONTEXT,
  EXTENDED_HEADERS: NBD_OPT_EXTENDED_HEADERS,
});
const cmdNames = names({
  READ: NBD_CMD_READ, WRITE: NBD_CMD_WRITE, DISC: NBD_CMD_DISC, FLUSH: NBD_CMD_FLUSH, TRIM: NBD_CMD_TRIM,
  CACHE: NBD_CMD_CACHE, WRITE_ZEROES: NBD_CMD_WRITE_ZEROES, BLOCK_STATUS: NBD_CMD_BLOCK_STATUS,
});
const errNames = names({
  OK: NBD_SUCCESS, EPERM: NBD_EPERM, EIO: NBD_EIO, ENOMEM: NBD_ENOMEM, EINVAL: NBD_EINVAL, ENOSPC: NBD_ENOSPC,
  EOVERFLOW: NBD_EOVERFLOW, ENOTSUP: NBD_ENOTSUP, ESHUTDOWN: NBD_ESHUTDOWN,
});

/** Name of an option for logs, e.g. "GO" or "OPT_99". */
export function nameOfOpt(opt: number): string {
  return optNames.get(opt) ?? `OPT_${opt}`;
}
/** Name of a command for logs and metric labels, e.g. "READ". */
export function nameOfCmd(cmd: number): string {
  return cmdNames.get(cmd) ?? `CMD_${cmd}`;
}
/** Name of a wire error, e.g. "EINVAL". */
export function nameOfError(err: number): string {
  return errNames.get(err) ?? `E${err}`;
}
