// lib/errors.ts: a catalogue test (fastify errors.test.js) over every NbdmirrorError subclass the module exports,
// and toNbdErrno for our errors, Node system errors and things that are not errors at all.

import t from 'tap';
import { readFileSync } from 'node:fs';
import * as errors from '../../lib/errors';
import { NbdmirrorError, PeerError, toNbdErrno } from '../../lib/errors';

// Wire errno values written out (doc/proto.md "Error values"), not imported from constants.ts.
const EPERM = 1;
const EIO = 5;
const ENOMEM = 12;
const EINVAL = 22;
const ENOSPC = 28;
const EOVERFLOW = 75;
const ENOTSUP = 95;
const ESHUTDOWN = 108;
const WIRE_ERRNOS = new Set([EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN]);

/**
 * Every concrete subclass, by export name: its stable code, the errno it maps to, and the constructor arguments
 * after the message. A class exported from lib/errors.ts but missing here fails the catalogue test.
 */
const CATALOGUE: Record<string, { code: string; errno: number; args?: unknown[] }> = {
  ProtocolError: { code: 'PROTOCOL', errno: EINVAL },
  InvalidRequestError: { code: 'INVALID_REQUEST', errno: EINVAL },
  OutOfRangeError: { code: 'OUT_OF_RANGE', errno: EINVAL },
  NoSpaceError: { code: 'NO_SPACE', errno: ENOSPC },
  ReadOnlyError: { code: 'READ_ONLY', errno: EPERM },
  NotSupportedError: { code: 'NOT_SUPPORTED', errno: ENOTSUP },
  TooLargeError: { code: 'TOO_LARGE', errno: EINVAL },
  OverflowError: { code: 'OVERFLOW', errno: EOVERFLOW },
  ShutdownError: { code: 'SHUTDOWN', errno: ESHUTDOWN },
  IoError: { code: 'IO', errno: EIO },
  NoMemoryError: { code: 'NO_MEMORY', errno: ENOMEM },
  UsageError: { code: 'USAGE', errno: EINVAL },
  LockedError: { code: 'LOCKED', errno: EIO },
  CorruptStateError: { code: 'CORRUPT', errno: EIO },
  // The remote server's errno is passed through as it is.
  PeerError: { code: 'PEER', errno: ENOTSUP, args: [ENOTSUP] },
  ConflictError: { code: 'CONFLICT', errno: EIO, args: ['split-brain'] },
};

type ErrorCtor = new (message: string, ...rest: unknown[]) => NbdmirrorError;

/** The concrete NbdmirrorError subclasses among the module's exports, found by walking the exports. */
function exportedSubclasses(): [string, ErrorCtor][] {
  const found: [string, ErrorCtor][] = [];
  for (const [name, value] of Object.entries(errors as Record<string, unknown>)) {
    if (typeof value === 'function' && value.prototype instanceof NbdmirrorError) found.push([name, value as ErrorCtor]);
  }
  return found;
}

t.test('the catalogue lists exactly the exported subclasses', async (t) => {
  const found = exportedSubclasses().map(([name]) => name).sort();
  t.ok(found.length >= 14, `found ${found.length} subclasses by walking the exports`);
  t.same(found, Object.keys(CATALOGUE).sort(), 'every exported subclass has a catalogue entry, and no entry is stale');
  t.notOk(found.includes('NbdmirrorError'), 'the abstract base is not itself a concrete class');
});

t.test('each subclass: a distinct stable code and the expected errno', async (t) => {
  const codes = new Map<string, string>();
  for (const [name, Ctor] of exportedSubclasses()) {
    const want = CATALOGUE[name];
    if (want === undefined) {
      t.fail(`${name} is exported but has no catalogue entry (add its code and errno mapping)`);
      continue;
    }
    const args = want.args ?? [];
    const a = new Ctor(`${name} happened`, ...args);
    const b = new Ctor('again', ...args);
    t.ok(a instanceof Error && a instanceof NbdmirrorError && a instanceof Ctor, `${name}: instanceof`);
    t.equal(a.name, name, `${name}: name is the class name`);
    t.equal(a.message, `${name} happened`, `${name}: message`);
    t.equal(a.code, want.code, `${name}: code ${want.code}`);
    t.equal(b.code, a.code, `${name}: the code is the same on every instance`);
    t.match(a.stack, new RegExp(`^${name}: ${name} happened`), `${name}: stack starts with name and message`);
    const errno = toNbdErrno(a);
    t.equal(errno, want.errno, `${name}: toNbdErrno → ${want.errno}`);
    t.ok(WIRE_ERRNOS.has(errno), `${name}: ${errno} is an errno the spec allows on the wire`);
    const clash = codes.get(a.code);
    t.equal(clash, undefined, `${name}: code ${a.code} is not also used by ${clash ?? 'another class'}`);
    codes.set(a.code, name);
  }
  t.equal(codes.size, Object.keys(CATALOGUE).length, 'one code per class');
});

t.test('cause is kept', async (t) => {
  const cause = new Error('root');
  const e = new errors.IoError('wrapped', { cause });
  t.equal(e.cause, cause);
  t.equal(toNbdErrno(e), EIO, 'the cause does not change the mapping');
  const sys = Object.assign(new Error('disk full'), { code: 'ENOSPC' });
  t.equal(toNbdErrno(new errors.ReadOnlyError('ro', { cause: sys })), EPERM, 'our class wins over its cause');
});

t.test('PeerError passes the remote errno through', async (t) => {
  for (const errno of [EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN]) {
    const e = new PeerError('remote failed', errno);
    t.equal(e.errno, errno);
    t.equal(toNbdErrno(e), errno, `remote errno ${errno}`);
  }
  t.equal(toNbdErrno(new PeerError('remote said 0', 0)), EIO, 'errno 0 (no error given) becomes EIO');
});

t.test('Node system errors by code', async (t) => {
  const table: [string, number][] = [
    ['ENOSPC', ENOSPC],
    ['EDQUOT', ENOSPC],
    ['EFBIG', ENOSPC],
    ['EROFS', EPERM],
    ['EPERM', EPERM],
    ['EACCES', EPERM],
    ['ENOMEM', ENOMEM],
    ['EIO', EIO],
    ['ENOENT', EIO],
    ['EBADF', EIO],
    ['EINVAL', EIO],
    ['ECONNRESET', EIO],
    ['ERR_INVALID_ARG_TYPE', EIO],
    ['', EIO],
  ];
  for (const [code, want] of table) {
    const e = Object.assign(new Error(`system ${code}`), { code, errno: -1, syscall: 'write' });
    t.equal(toNbdErrno(e), want, `${code || '(empty code)'} → ${want}`);
  }
  let real: unknown;
  try {
    readFileSync('/nonexistent/nbdmirror-errors-test');
  } catch (e) {
    real = e;
  }
  t.equal((real as NodeJS.ErrnoException).code, 'ENOENT', 'a real fs error');
  t.equal(toNbdErrno(real), EIO, 'a real ENOENT maps to EIO');
});

t.test('anything that is not an error maps to EIO', async (t) => {
  const values: [string, unknown][] = [
    ['undefined', undefined],
    ['null', null],
    ['0', 0],
    ['28', 28],
    ['"ENOSPC"', 'ENOSPC'],
    ['true', true],
    ['symbol', Symbol('ENOSPC')],
    ['bigint', 28n],
    ['{}', {}],
    ['[]', []],
    ['{ code: 28 }', { code: 28 }],
    ['{ code: null }', { code: null }],
    ['null-prototype object', Object.create(null) as unknown],
    ['function', () => ENOSPC],
    ['plain Error', new Error('plain')],
    ['TypeError', new TypeError('bug')],
  ];
  for (const [label, v] of values) t.equal(toNbdErrno(v), EIO, label);
});
