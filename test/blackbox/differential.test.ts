// Differential black box: one libnbd (Python) request script runs against the reference server
// `nbdkit memory SIZE` and against dist/server.js with an export of the same (deliberately unaligned) size.
// libnbd's client-side checks are off (set_strict_mode(0)), so invalid requests reach the servers. The
// script splits its results in two: `compare` holds what the NBD spec fixes (read-back data hashes, status
// and errno of every request, zeros after WRITE_ZEROES, bytes around a TRIM untouched, a FAST_ZERO that
// either zeroes or fails with ENOTSUP and changes nothing) and must be equal for both servers; `info` holds
// answers where the spec allows different valid behaviour — content inside a trimmed range, FAST_ZERO
// outcome, zero-length requests — and is only reported. Block status is not compared: allocation
// granularity legitimately differs (nbdkit memory: any byte, nbdmirror: 4 KiB blocks) — but every extent
// flagged NBD_STATE_ZERO must read as zeros on both. A third script sends WRITEs the server must refuse
// while their (large) payload is still arriving; nbdkit drains the payload and then replies, and the
// connection stays usable.

import t from 'tap';
import type { Test } from 'tap';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import * as path from 'node:path';
import { requireThat, requireTool } from '../helpers/requires';
import { describe, pythonWithNbd, run, type RunResult } from '../helpers/run';
import { freshDir, startServer } from '../helpers/spawn-server';
import { tmpfsDir } from '../helpers/tmpfs';
import { freePort } from '../helpers/nbdkit';

/** 16 MiB + 1536: not a multiple of 4096, so the server's partial tail block is exercised. */
const SIZE = 16 * 1024 * 1024 + 1536;

const SCRIPT = String.raw`
import errno, hashlib, json, random, sys
import nbd

uri, mode = sys.argv[1], sys.argv[2]
cmp = {}   # what the spec fixes: compared between the servers
info = {}  # where the spec allows different valid answers: reported only
K = 1024
M = 1024 * 1024

def ename(e):
    return errno.errorcode.get(e.errno, str(e.errno)) if e.errno else 'no-errno: ' + str(e.string)

def sha(b):
    return hashlib.sha256(bytes(b)).hexdigest()[:16]

def attempt(fn):
    try:
        r = fn()
        return {'ok': True} if r is None else {'ok': True, 'value': r}
    except nbd.Error as e:
        return {'ok': False, 'errno': ename(e)}

def rec(label, fn):
    cmp[label] = attempt(fn)

rng = random.Random(12345)
def data(n):
    return rng.randbytes(n)

def close(h):
    try:
        h.shutdown()
    except nbd.Error:
        pass   # the connection may already be dead; that was recorded

def connect():
    h = nbd.NBD()
    h.set_strict_mode(0)   # no client-side checks: invalid requests go to the server
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h

h = connect()
size = h.get_size()
cmp['size'] = size
for f in ['is_read_only', 'can_trim', 'can_zero', 'can_fast_zero', 'can_fua', 'can_flush', 'can_cache', 'can_multi_conn', 'can_df']:
    cmp[f] = getattr(h, f)()
cmp['structured'] = h.get_structured_replies_negotiated()
cmp['base_allocation'] = h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)

def read_sha(off, n):
    return lambda: sha(h.pread(n, off))

if mode == 'rw':
    # A fresh export reads as zeros (both servers document it for a new export).
    rec('fresh_read', read_sha(0, 64 * K))
    # Plain, unaligned, FUA and tail writes, read back.
    rec('write_1M', lambda: h.pwrite(data(M), 0))
    rec('write_unaligned_small', lambda: h.pwrite(data(3), 4095))
    rec('write_unaligned', lambda: h.pwrite(data(70001), 1000001))
    rec('write_fua', lambda: h.pwrite(data(256 * K), 2 * M, nbd.CMD_FLAG_FUA))
    rec('write_tail', lambda: h.pwrite(data(1000), size - 1000))
    rec('write_last_byte', lambda: h.pwrite(b'\x5a', size - 1))
    rec('read_4M', read_sha(0, 4 * M))
    rec('read_tail', read_sha(size - 5000, 5000))
    rec('read_last_byte', lambda: bytes(h.pread(1, size - 1)).hex())
    rec('flush', lambda: h.flush())
    # FUA is valid on every command once negotiated (spec "Command flags").
    rec('flush_fua', lambda: h.flush(nbd.CMD_FLAG_FUA))
    rec('read_fua', lambda: sha(h.pread(4096, 0, nbd.CMD_FLAG_FUA)))
    # WRITE_ZEROES: the range reads as zeros afterwards, with or without NO_HOLE / FUA.
    rec('zero_aligned', lambda: h.zero(256 * K, 512 * K))
    rec('zero_unaligned', lambda: h.zero(4000, 1000))
    rec('zero_no_hole', lambda: h.zero(10000, 600 * K + 3, nbd.CMD_FLAG_NO_HOLE))
    rec('zero_fua', lambda: h.zero(8192, 2 * M + 100, nbd.CMD_FLAG_FUA))
    rec('zero_tail', lambda: h.zero(700, size - 700))
    rec('read_after_zero', read_sha(0, 4 * M))
    rec('read_tail_after_zero', read_sha(size - 5000, 5000))
    # TRIM: the status and the bytes around each range are fixed; inside, the content is unspecified.
    h.pwrite(data(2 * M), 4 * M)
    before = bytes(h.pread(2 * M, 4 * M))
    rec('trim_aligned', lambda: h.trim(512 * K, 4 * M + 256 * K))      # [256K, 768K) of the window
    rec('trim_unaligned', lambda: h.trim(10001, 5 * M + 3))            # [M+3, M+10004)
    rec('trim_fua', lambda: h.trim(64 * K, 5 * M + 64 * K, nbd.CMD_FLAG_FUA))  # [M+64K, M+128K)
    after = bytes(h.pread(2 * M, 4 * M))
    outside = [(0, 256 * K), (768 * K, M + 3), (M + 10004, M + 64 * K), (M + 128 * K, 2 * M)]
    cmp['trim_outside_unchanged'] = all(after[a:b] == before[a:b] for a, b in outside)
    info['trim_inside_reads_zero'] = {
        'aligned': after[256 * K:768 * K] == bytes(512 * K),
        'unaligned': after[M + 3:M + 10004] == bytes(10001),
        'fua': after[M + 64 * K:M + 128 * K] == bytes(64 * K),
    }
    # FAST_ZERO: the server may fail it with ENOTSUP (and change nothing) or zero the range.
    def fast_zero(label, off, n, flags):
        h.pwrite(data(n), off)
        old = bytes(h.pread(n, off))
        r = attempt(lambda: h.zero(n, off, nbd.CMD_FLAG_FAST_ZERO | flags))
        new = bytes(h.pread(n, off))
        info[label] = r
        cmp[label + '_consistent'] = (r['ok'] and new == bytes(n)) or (not r['ok'] and r['errno'] == 'ENOTSUP' and new == old)
    fast_zero('fast_zero', 8 * M, 256 * K, 0)
    fast_zero('fast_zero_unaligned', 8 * M + 300, 10000, 0)
    fast_zero('fast_zero_no_hole', 9 * M, 64 * K, nbd.CMD_FLAG_NO_HOLE)
    # CACHE is a hint: success, and the data is unchanged.
    rec('cache', lambda: h.cache(M, 0))
    rec('cache_tail', lambda: h.cache(1000, size - 1000))
    rec('read_after_cache', read_sha(0, 4 * M))
    # Out of range: READ/TRIM/CACHE/BLOCK_STATUS → EINVAL, WRITE/WRITE_ZEROES → ENOSPC (spec "Error values").
    rec('read_at_end', lambda: h.pread(1, size))
    rec('read_straddle', lambda: h.pread(4096, size - 100))
    rec('read_far', lambda: h.pread(512, 1 << 62))
    rec('write_straddle', lambda: h.pwrite(data(M), size - 5))   # the refused 1 MiB payload must be drained
    rec('write_at_end', lambda: h.pwrite(b'x' * 512, size))
    rec('zero_straddle', lambda: h.zero(100, size - 50))
    rec('trim_straddle', lambda: h.trim(100, size - 50))
    rec('cache_straddle', lambda: h.cache(100, size - 50))
    rec('block_status_past_end', lambda: h.block_status(100, size, lambda *a: 0))
    # Command flags on commands that do not take them → EINVAL.
    rec('read_no_hole', lambda: h.pread(512, 0, nbd.CMD_FLAG_NO_HOLE))
    rec('read_fast_zero', lambda: h.pread(512, 0, nbd.CMD_FLAG_FAST_ZERO))
    rec('read_unknown_flag', lambda: h.pread(512, 0, 0x20))
    rec('write_df', lambda: h.pwrite(b'y' * 512, 0, nbd.CMD_FLAG_DF))
    rec('write_req_one', lambda: h.pwrite(b'y' * 512, 0, nbd.CMD_FLAG_REQ_ONE))
    rec('trim_no_hole', lambda: h.trim(4096, 0, nbd.CMD_FLAG_NO_HOLE))
    rec('flush_df', lambda: h.flush(nbd.CMD_FLAG_DF))
    # The connection survived every refusal, and no refused request changed any data.
    rec('read_after_errors', read_sha(0, 4 * M))
    rec('read_tail_after_errors', read_sha(size - 5000, 5000))
    # Zero-length requests: the spec leaves the answer to the server.
    info['read_len0'] = attempt(lambda: sha(h.pread(0, 0)))
    info['write_len0'] = attempt(lambda: h.pwrite(b'', 0))
    info['trim_len0'] = attempt(lambda: h.trim(0, 0))
    rec('alive_after_info', read_sha(0, M))
    # base:allocation may differ in granularity, but NBD_STATE_ZERO is a promise: such extents read as zeros,
    # and the extents of each reply are contiguous from the requested offset.
    def status_truthful():
        off, bad, contiguous = 0, [], True
        while off < size:
            got = []
            h.block_status(size - off, off, lambda ctx, o, ents, err: got.append((o, list(ents))) or 0)
            o, ents = got[0]
            contiguous = contiguous and o == off and len(got) == 1
            pos = off
            for i in range(0, len(ents), 2):
                n, flags = min(ents[i], size - pos), ents[i + 1]
                if flags & nbd.STATE_ZERO and bytes(h.pread(n, pos)) != bytes(n):
                    bad.append([pos, n, flags])
                pos += n
            if pos == off:
                return {'error': 'no progress'}
            off = pos
        return {'zero_extents_read_zero': bad == [], 'contiguous': contiguous}
    rec('block_status_truthful', status_truthful)
    # Multi-conn: after a flush on one connection, another connection sees the write.
    h2 = connect()
    rec('mc_write', lambda: h.pwrite(b'multi-conn!' * 100, 12 * M + 7))
    rec('mc_flush', lambda: h.flush())
    rec('mc_read_other', lambda: bytes(h2.pread(1100, 12 * M + 7)) == b'multi-conn!' * 100)
    close(h2)
elif mode == 'refused_write':
    # A refused WRITE whose payload (here the largest the server allows, 32 MiB) is still arriving when the
    # server decides: the request must be answered with an error and the connection must stay usable.
    # Each case on a fresh connection, so one failure cannot hide another.
    big = data(32 * M)
    cases = [
        ('big_write_past_end', lambda: h.pwrite(big, size - 16 * M)),              # ENOSPC
        ('big_write_bad_flag', lambda: h.pwrite(big[:16 * M], 0, nbd.CMD_FLAG_DF)),  # EINVAL (16 MiB fits)
    ]
    for label, fn in cases:
        close(h)
        h = connect()
        rec(label, fn)
        rec(label + '_then_read', read_sha(0, 4096))
elif mode == 'ro':
    # Read-only export: reads and flush work; a write that reaches the server is refused with EPERM.
    rec('ro_read', read_sha(0, M))
    rec('ro_flush', lambda: h.flush())
    rec('ro_write', lambda: h.pwrite(b'z' * 4096, 0))
    rec('ro_write_fua', lambda: h.pwrite(b'z' * 4096, 0, nbd.CMD_FLAG_FUA))
    # TRIM / WRITE_ZEROES were not advertised: EPERM and EINVAL are both defensible.
    info['ro_trim'] = attempt(lambda: h.trim(4096, 0))
    info['ro_zero'] = attempt(lambda: h.zero(4096, 0))
    rec('ro_read_after', read_sha(0, M))
close(h)
print(json.dumps({'compare': cmp, 'info': info}, sort_keys=True))
`;

/** Requests in the rw script that are invalid and must reach the server (not be refused by libnbd). */
const INVALID_RW = 16;

type Mode = 'rw' | 'ro' | 'refused_write';

interface ScriptResult {
  compare: Record<string, unknown>;
  info: Record<string, unknown>;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Wait for p, at most ms (the timer never keeps the process alive). */
function within(p: Promise<unknown>, ms: number): Promise<unknown> {
  return Promise.race([p, new Promise((r) => setTimeout(r, ms).unref())]);
}

/** `nbdkit -f ... memory SIZE` on a free 127.0.0.1 port; killed by PID in t.teardown. */
async function startNbdkit(tt: Test, extra: string[]): Promise<{ uri: string; stderr: () => string }> {
  let lastError = '';
  for (let attempt = 0; attempt < 3; attempt++) {
    const port = await freePort();
    const pidfile = path.join(freshDir(tt, 'nbdkit'), 'nbdkit.pid');
    const child = spawn('nbdkit', ['-f', '--exit-with-parent', '-P', pidfile, '-i', '127.0.0.1', '-p', String(port), ...extra, 'memory', String(SIZE)], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const pid = child.pid;
    if (pid === undefined) throw new Error('cannot spawn nbdkit');
    let out = '';
    let exited = false;
    const exitP = new Promise<void>((r) =>
      child.on('exit', () => {
        exited = true;
        r();
      }),
    );
    child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr!.on('data', (d: Buffer) => (out += d.toString()));
    tt.teardown(async () => {
      if (exited) return;
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone
      }
      await within(exitP, 5000);
    });
    // nbdkit writes its pidfile once it is listening.
    const deadline = Date.now() + 10_000;
    while (!existsSync(pidfile) && !exited && Date.now() < deadline) await sleep(25);
    if (existsSync(pidfile) && !exited) return { uri: `nbd://127.0.0.1:${port}`, stderr: () => out };
    lastError = `nbdkit on port ${port}: ${exited ? 'exited' : 'not ready in 10 s'}\n${out}`;
    if (!exited) break;
  }
  throw new Error(lastError);
}

async function runScript(python: string, uri: string, mode: Mode): Promise<{ r: RunResult; res: ScriptResult | null }> {
  const r = await run(python, ['-c', SCRIPT, uri, mode], { timeoutMs: 60_000 });
  let res: ScriptResult | null = null;
  try {
    res = JSON.parse(r.stdout.trim().split('\n').pop() ?? '') as ScriptResult;
  } catch {
    res = null;
  }
  return { r, res };
}

/** Keys whose values differ, for a readable failure message. */
function differences(a: Record<string, unknown>, b: Record<string, unknown>): Record<string, { nbdkit: unknown; nbdmirror: unknown }> {
  const out: Record<string, { nbdkit: unknown; nbdmirror: unknown }> = {};
  for (const k of new Set([...Object.keys(a), ...Object.keys(b)])) {
    if (JSON.stringify(a[k]) !== JSON.stringify(b[k])) out[k] = { nbdkit: a[k], nbdmirror: b[k] };
  }
  return out;
}

const TITLES: Record<Mode, string> = {
  rw: 'differential-rw: reads, writes, zeroes, trims, cache, flush and refused requests answer alike',
  ro: 'differential-ro: a read-only export answers alike',
  refused_write: 'differential-refused-write: a refused large WRITE gets its error and the connection survives',
};

const python = pythonWithNbd();
if (requireTool(t, 'nbdkit')) {
  if (requireThat(t, python !== null, 'differential: no python3 can import nbd (install python3-libnbd)')) {
    const runs: Array<{ mode: Mode; title: string; tmpfs: boolean }> = [
      ...(['rw', 'ro', 'refused_write'] as const).map((mode) => ({ mode, title: TITLES[mode], tmpfs: false })),
      // Files in memory: the server answers reads synchronously (in the request loop, into the reply buffer).
      { mode: 'rw', title: 'differential-rw-tmpfs: the same with the data dir on tmpfs (synchronous reads)', tmpfs: true },
    ];
    for (const { mode, title, tmpfs } of runs) {
      t.test(title, async (tt) => {
        const ro = mode === 'ro' ? ['-r'] : [];
        let dataDir: string | undefined;
        if (tmpfs) {
          const dir = tmpfsDir(tt, 'differential');
          if (!requireThat(tt, dir !== null, '/dev/shm is not a tmpfs')) return;
          dataDir = dir!;
        }
        const ref = await startNbdkit(tt, ro);
        const srv = await startServer(tt, { args: ['--export', `disk0=${SIZE}`, ...(mode === 'ro' ? ['--read-only'] : [])], ...(dataDir ? { dataDir } : {}) });

        const a = await runScript(python!, ref.uri, mode);
        tt.equal(a.r.code, 0, 'script runs against nbdkit', a.r.code === 0 ? {} : { run: describe(a.r), nbdkit: ref.stderr() });
        const b = await runScript(python!, srv.uri("disk0"), mode);
        tt.equal(b.r.code, 0, 'script runs against nbdmirror', b.r.code === 0 ? {} : { run: describe(b.r), server: srv.logTail() });
        if (a.res === null || b.res === null) {
          tt.fail('both runs produced a JSON result', { nbdkit: a.r.stdout, nbdmirror: b.r.stdout });
          return;
        }
        const minResults = { rw: 60, ro: 15, refused_write: 14 }[mode];
        tt.ok(Object.keys(a.res.compare).length > minResults, `${Object.keys(a.res.compare).length} compared results`);
        const diff = differences(a.res.compare, b.res.compare);
        tt.same(diff, {}, 'every spec-fixed result is the same on both servers', { server: Object.keys(diff).length ? srv.logTail() : '' });
        tt.same(b.res.compare, a.res.compare, 'full comparison');

        // The invalid requests really went over the wire (libnbd did not refuse them client-side).
        const expected = { rw: INVALID_RW, ro: 2, refused_write: 2 }[mode];
        const count = (): number => (ref.stderr().match(/invalid request/g) ?? []).length;
        for (const deadline = Date.now() + 5000; count() < expected && Date.now() < deadline; ) await sleep(20);
        const refused = count();
        tt.ok(refused >= expected, `nbdkit saw ${refused} invalid requests (≥ ${expected})`, { nbdkit: ref.stderr() });

        // Where the spec allows either answer, say what each server chose.
        tt.comment(`nbdkit info:    ${JSON.stringify(a.res.info)}`);
        tt.comment(`nbdmirror info: ${JSON.stringify(b.res.info)}`);
        for (const [k, v] of Object.entries(b.res.info)) {
          if (k.startsWith('fast_zero')) {
            const r = v as { ok: boolean; errno?: string };
            tt.ok(r.ok || r.errno === 'ENOTSUP', `${k}: success or ENOTSUP (spec)`, { got: r });
          }
        }
      });
    }
  }
}
