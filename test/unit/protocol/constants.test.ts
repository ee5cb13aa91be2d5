// lib/protocol/constants.ts: every wire value against the number doc/proto.md gives it, the two predicates,
// the fixed sizes against layouts built by the independent byte builder, and the nameOf*() helpers.

import t from 'tap';
import * as C from '../../../lib/protocol/constants';
import { bytes } from '../../helpers/bytes';

/** A big-endian 64-bit value from 8 ASCII characters, computed without Buffer's integer readers. */
function asciiMagic(s: string): bigint {
  let v = 0n;
  for (const ch of s) v = (v << 8n) | BigInt(ch.charCodeAt(0));
  return v;
}

t.test('magic numbers are the spec values', async (t) => {
  t.equal(C.NBD_MAGIC, asciiMagic('NBDMAGIC'), 'NBDMAGIC is ASCII "NBDMAGIC"');
  t.equal(C.NBD_MAGIC, 0x4e42444d41474943n);
  t.equal(C.NBD_IHAVEOPT, asciiMagic('IHAVEOPT'), 'IHAVEOPT is ASCII "IHAVEOPT"');
  t.equal(C.NBD_IHAVEOPT, 0x49484156454f5054n);
  t.equal(C.NBD_REP_MAGIC, 0x0003e889045565a9n);
  t.equal(C.NBD_REQUEST_MAGIC, 0x25609513);
  t.equal(C.NBD_SIMPLE_REPLY_MAGIC, 0x67446698);
  t.equal(C.NBD_STRUCTURED_REPLY_MAGIC, 0x668e33ef);
});

t.test('handshake and client flags', async (t) => {
  t.equal(C.NBD_FLAG_FIXED_NEWSTYLE, 0b01);
  t.equal(C.NBD_FLAG_NO_ZEROES, 0b10);
  t.equal(C.NBD_FLAG_C_FIXED_NEWSTYLE, 0b01);
  t.equal(C.NBD_FLAG_C_NO_ZEROES, 0b10);
});

t.test('option numbers', async (t) => {
  const table: [number, number][] = [
    [C.NBD_OPT_EXPORT_NAME, 1],
    [C.NBD_OPT_ABORT, 2],
    [C.NBD_OPT_LIST, 3],
    [C.NBD_OPT_PEEK_EXPORT, 4],
    [C.NBD_OPT_STARTTLS, 5],
    [C.NBD_OPT_INFO, 6],
    [C.NBD_OPT_GO, 7],
    [C.NBD_OPT_STRUCTURED_REPLY, 8],
    [C.NBD_OPT_LIST_META_CONTEXT, 9],
    [C.NBD_OPT_SET_META_CONTEXT, 10],
    [C.NBD_OPT_EXTENDED_HEADERS, 11],
  ];
  for (const [got, want] of table) t.equal(got, want);
});

t.test('option reply types', async (t) => {
  const table: [number, number][] = [
    [C.NBD_REP_ACK, 1],
    [C.NBD_REP_SERVER, 2],
    [C.NBD_REP_INFO, 3],
    [C.NBD_REP_META_CONTEXT, 4],
    [C.NBD_REP_ERR_UNSUP, 2 ** 31 + 1],
    [C.NBD_REP_ERR_POLICY, 2 ** 31 + 2],
    [C.NBD_REP_ERR_INVALID, 2 ** 31 + 3],
    [C.NBD_REP_ERR_PLATFORM, 2 ** 31 + 4],
    [C.NBD_REP_ERR_TLS_REQD, 2 ** 31 + 5],
    [C.NBD_REP_ERR_UNKNOWN, 2 ** 31 + 6],
    [C.NBD_REP_ERR_SHUTDOWN, 2 ** 31 + 7],
    [C.NBD_REP_ERR_BLOCK_SIZE_REQD, 2 ** 31 + 8],
    [C.NBD_REP_ERR_TOO_BIG, 2 ** 31 + 9],
    [C.NBD_REP_ERR_EXT_HEADER_REQD, 2 ** 31 + 10],
  ];
  for (const [got, want] of table) t.equal(got, want);
});

t.test('isRepError is "bit 31 set"', async (t) => {
  for (const ok of [C.NBD_REP_ACK, C.NBD_REP_SERVER, C.NBD_REP_INFO, C.NBD_REP_META_CONTEXT, 0, 0x7fffffff]) {
    t.equal(C.isRepError(ok), false, `0x${ok.toString(16)} is not an error`);
  }
  const errs = [
    C.NBD_REP_ERR_UNSUP, C.NBD_REP_ERR_POLICY, C.NBD_REP_ERR_INVALID, C.NBD_REP_ERR_PLATFORM, C.NBD_REP_ERR_TLS_REQD,
    C.NBD_REP_ERR_UNKNOWN, C.NBD_REP_ERR_SHUTDOWN, C.NBD_REP_ERR_BLOCK_SIZE_REQD, C.NBD_REP_ERR_TOO_BIG,
    C.NBD_REP_ERR_EXT_HEADER_REQD, 0x80000000, 0xffffffff,
  ];
  for (const e of errs) t.equal(C.isRepError(e), true, `0x${e.toString(16)} is an error`);
});

t.test('NBD_INFO types', async (t) => {
  t.equal(C.NBD_INFO_EXPORT, 0);
  t.equal(C.NBD_INFO_NAME, 1);
  t.equal(C.NBD_INFO_DESCRIPTION, 2);
  t.equal(C.NBD_INFO_BLOCK_SIZE, 3);
});

t.test('transmission flags are bits 0..11', async (t) => {
  const table: [number, number][] = [
    [C.NBD_FLAG_HAS_FLAGS, 0],
    [C.NBD_FLAG_READ_ONLY, 1],
    [C.NBD_FLAG_SEND_FLUSH, 2],
    [C.NBD_FLAG_SEND_FUA, 3],
    [C.NBD_FLAG_ROTATIONAL, 4],
    [C.NBD_FLAG_SEND_TRIM, 5],
    [C.NBD_FLAG_SEND_WRITE_ZEROES, 6],
    [C.NBD_FLAG_SEND_DF, 7],
    [C.NBD_FLAG_CAN_MULTI_CONN, 8],
    [C.NBD_FLAG_SEND_RESIZE, 9],
    [C.NBD_FLAG_SEND_CACHE, 10],
    [C.NBD_FLAG_SEND_FAST_ZERO, 11],
  ];
  for (const [got, bit] of table) t.equal(got, 2 ** bit, `bit ${bit}`);
});

t.test('commands and command flags', async (t) => {
  const cmds: [number, number][] = [
    [C.NBD_CMD_READ, 0],
    [C.NBD_CMD_WRITE, 1],
    [C.NBD_CMD_DISC, 2],
    [C.NBD_CMD_FLUSH, 3],
    [C.NBD_CMD_TRIM, 4],
    [C.NBD_CMD_CACHE, 5],
    [C.NBD_CMD_WRITE_ZEROES, 6],
    [C.NBD_CMD_BLOCK_STATUS, 7],
  ];
  for (const [got, want] of cmds) t.equal(got, want);
  const flags: [number, number][] = [
    [C.NBD_CMD_FLAG_FUA, 0],
    [C.NBD_CMD_FLAG_NO_HOLE, 1],
    [C.NBD_CMD_FLAG_DF, 2],
    [C.NBD_CMD_FLAG_REQ_ONE, 3],
    [C.NBD_CMD_FLAG_FAST_ZERO, 4],
  ];
  for (const [got, bit] of flags) t.equal(got, 2 ** bit, `command flag bit ${bit}`);
  t.equal(C.NBD_CMD_FLAG_KNOWN, 0b11111, 'KNOWN is exactly the five defined flags');
});

t.test('structured reply flags and types', async (t) => {
  t.equal(C.NBD_REPLY_FLAG_DONE, 1);
  t.equal(C.NBD_REPLY_TYPE_NONE, 0);
  t.equal(C.NBD_REPLY_TYPE_OFFSET_DATA, 1);
  t.equal(C.NBD_REPLY_TYPE_OFFSET_HOLE, 2);
  t.equal(C.NBD_REPLY_TYPE_BLOCK_STATUS, 5);
  t.equal(C.NBD_REPLY_TYPE_ERROR, 2 ** 15 + 1);
  t.equal(C.NBD_REPLY_TYPE_ERROR_OFFSET, 2 ** 15 + 2);
});

t.test('isReplyTypeError is "bit 15 set"', async (t) => {
  const notErr = [
    C.NBD_REPLY_TYPE_NONE, C.NBD_REPLY_TYPE_OFFSET_DATA, C.NBD_REPLY_TYPE_OFFSET_HOLE, C.NBD_REPLY_TYPE_BLOCK_STATUS,
    0x7fff,
  ];
  for (const v of notErr) t.equal(C.isReplyTypeError(v), false, `0x${v.toString(16)}`);
  for (const v of [C.NBD_REPLY_TYPE_ERROR, C.NBD_REPLY_TYPE_ERROR_OFFSET, 0x8000, 0x8003, 0xffff]) {
    t.equal(C.isReplyTypeError(v), true, `0x${v.toString(16)}`);
  }
});

t.test('base:allocation', async (t) => {
  t.equal(C.NBD_STATE_HOLE, 1);
  t.equal(C.NBD_STATE_ZERO, 2);
  t.equal(C.BASE_ALLOCATION, 'base:allocation');
});

t.test('wire errors are the Linux errno values', async (t) => {
  const table: [number, number][] = [
    [C.NBD_SUCCESS, 0],
    [C.NBD_EPERM, 1],
    [C.NBD_EIO, 5],
    [C.NBD_ENOMEM, 12],
    [C.NBD_EINVAL, 22],
    [C.NBD_ENOSPC, 28],
    [C.NBD_EOVERFLOW, 75],
    [C.NBD_ENOTSUP, 95],
    [C.NBD_ESHUTDOWN, 108],
  ];
  for (const [got, want] of table) t.equal(got, want);
});

t.test('fixed sizes match the layouts', async (t) => {
  t.equal(C.GREETING_SIZE, bytes().u64(0n).u64(0n).u16(0).length, 'greeting: magic, IHAVEOPT, 16-bit flags');
  t.equal(C.OPTION_HEADER_SIZE, bytes().u64(0n).u32(0).u32(0).length, 'option: IHAVEOPT, option, length');
  t.equal(C.OPTION_REPLY_HEADER_SIZE, bytes().u64(0n).u32(0).u32(0).u32(0).length, 'option reply header');
  t.equal(C.REQUEST_SIZE, bytes().u32(0).u16(0).u16(0).u64(0n).u64(0n).u32(0).length, 'request');
  t.equal(C.SIMPLE_REPLY_SIZE, bytes().u32(0).u32(0).u64(0n).length, 'simple reply');
  t.equal(C.STRUCTURED_REPLY_HEADER_SIZE, bytes().u32(0).u16(0).u16(0).u64(0n).u32(0).length, 'chunk header');
  t.equal(C.EXPORT_NAME_REPLY_SIZE, bytes().u64(0n).u16(0).length, 'export name reply without zeroes');
  t.equal(C.EXPORT_NAME_ZEROES, 124);
  t.equal(C.MAX_STRING_LENGTH, 4096);
});

t.test('nameOfOpt', async (t) => {
  const known: [number, string][] = [
    [1, 'EXPORT_NAME'], [2, 'ABORT'], [3, 'LIST'], [4, 'PEEK_EXPORT'], [5, 'STARTTLS'], [6, 'INFO'], [7, 'GO'],
    [8, 'STRUCTURED_REPLY'], [9, 'LIST_META_CONTEXT'], [10, 'SET_META_CONTEXT'], [11, 'EXTENDED_HEADERS'],
  ];
  for (const [v, name] of known) t.equal(C.nameOfOpt(v), name);
  t.equal(new Set(known.map(([v]) => C.nameOfOpt(v))).size, known.length, 'names are distinct');
  for (const v of [0, 12, 99, 0x7fffffff, 0xffffffff]) t.equal(C.nameOfOpt(v), `OPT_${v}`, `unknown ${v}`);
});

t.test('nameOfCmd', async (t) => {
  const known: [number, string][] = [
    [0, 'READ'], [1, 'WRITE'], [2, 'DISC'], [3, 'FLUSH'], [4, 'TRIM'], [5, 'CACHE'], [6, 'WRITE_ZEROES'],
    [7, 'BLOCK_STATUS'],
  ];
  for (const [v, name] of known) t.equal(C.nameOfCmd(v), name);
  t.equal(new Set(known.map(([v]) => C.nameOfCmd(v))).size, known.length, 'names are distinct');
  for (const v of [8, 9, 42, 0xffff]) t.equal(C.nameOfCmd(v), `CMD_${v}`, `unknown ${v}`);
});

t.test('nameOfError', async (t) => {
  const known: [number, string][] = [
    [0, 'OK'], [1, 'EPERM'], [5, 'EIO'], [12, 'ENOMEM'], [22, 'EINVAL'], [28, 'ENOSPC'], [75, 'EOVERFLOW'],
    [95, 'ENOTSUP'], [108, 'ESHUTDOWN'],
  ];
  for (const [v, name] of known) t.equal(C.nameOfError(v), name);
  t.equal(new Set(known.map(([v]) => C.nameOfError(v))).size, known.length, 'names are distinct');
  for (const v of [2, 13, 999, 0xffffffff]) t.equal(C.nameOfError(v), `E${v}`, `unknown ${v}`);
});
