// Black box: both ways a client can enter transmission, driven by clients nobody here wrote.
// - NBD_OPT_GO (fixed newstyle): libnbd's default, qemu-io, and the Linux nbd-client. This kernel has no
//   NBD driver, so nbd-client (netlink mode) gets a device target that is not /dev/nbdN: it negotiates
//   first (and prints the export size it got) and only then rejects the target, so no device is ever
//   attached, even on a machine that has the driver. nbd-client -l exercises NBD_OPT_LIST.
// - NBD_OPT_EXPORT_NAME: libnbd with the FIXED_NEWSTYLE handshake flag cleared must fall back to it (no
//   structured replies, simple replies only), with and without NO_ZEROES.
// Data written through one path is read back through the other. libnbd's option mode also walks LIST,
// LIST_META_CONTEXT, INFO on one export and GO on another (the meta context must follow the GO export).

import t from 'tap';
import type { Test } from 'tap';
import * as path from 'node:path';
import { requireThat, requireTool } from '../helpers/requires';
import { describe, pythonWithNbd, run, type RunResult } from '../helpers/run';
import { type ServerProcess, freshDir, startServer } from '../helpers/spawn-server';

const MiB = 1024 * 1024;

/**
 * Python (libnbd): connect with the given handshake flags (or the default when "default"), report what was
 * negotiated, then run the ops: "w:OFF:LEN:SEED" writes seeded bytes, "r:OFF:LEN:SEED" checks them,
 * "z:OFF:LEN" zeroes then checks zeros, "Z:OFF:LEN" checks zeros, "t:OFF:LEN" trims, "f" flushes.
 */
const CLIENT = String.raw`
import json, random, sys
import nbd
uri, flags = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.set_full_info(True)   # ask for NBD_INFO_NAME (GO only)
if flags != 'default':
    h.set_handshake_flags(int(flags))
out = {'ops': []}
try:
    h.connect_uri(uri)
except nbd.Error as e:
    print(json.dumps({'connect_error': e.string}))
    sys.exit(0)
out['protocol'] = h.get_protocol()
out['handshake_flags'] = h.get_handshake_flags()
out['structured'] = h.get_structured_replies_negotiated()
out['size'] = h.get_size()
try:
    out['export_name'] = h.get_canonical_export_name()
except nbd.Error:
    out['export_name'] = None
out['can'] = {f: getattr(h, 'can_' + f)() for f in ['flush', 'fua', 'trim', 'zero', 'cache', 'multi_conn']}
def pattern(n, seed):
    return random.Random(int(seed)).randbytes(n)
for op in sys.argv[3:]:
    p = op.split(':')
    try:
        if p[0] == 'w':
            h.pwrite(pattern(int(p[2]), p[3]), int(p[1]))
            res = 'ok'
        elif p[0] == 'r':
            res = 'ok' if bytes(h.pread(int(p[2]), int(p[1]))) == pattern(int(p[2]), p[3]) else 'MISMATCH'
        elif p[0] == 'z':
            h.zero(int(p[2]), int(p[1]))
            res = 'ok' if bytes(h.pread(int(p[2]), int(p[1]))) == bytes(int(p[2])) else 'NOT-ZERO'
        elif p[0] == 'Z':
            res = 'ok' if bytes(h.pread(int(p[2]), int(p[1]))) == bytes(int(p[2])) else 'NOT-ZERO'
        elif p[0] == 't':
            h.trim(int(p[2]), int(p[1]))
            res = 'ok'
        elif p[0] == 'f':
            h.flush()
            res = 'ok'
    except nbd.Error as e:
        res = 'error: ' + e.string
    out['ops'].append([op, res])
h.shutdown()
print(json.dumps(out))
`;

interface ClientResult {
  connect_error?: string;
  protocol: string;
  handshake_flags: number;
  structured: boolean;
  size: number;
  export_name: string | null;
  can: Record<string, boolean>;
  ops: Array<[string, string]>;
}

const FIXED_NEWSTYLE = 1;
const NO_ZEROES = 2;

async function libnbd(tt: Test, python: string, uri: string, flags: 'default' | number, ops: string[], srv: ServerProcess): Promise<ClientResult | null> {
  const r = await run(python, ['-c', CLIENT, uri, String(flags), ...ops], { timeoutMs: 30_000 });
  tt.equal(r.code, 0, `libnbd client (handshake flags ${flags}) ran`, r.code === 0 ? {} : { run: describe(r), server: srv.logTail() });
  try {
    return JSON.parse(r.stdout) as ClientResult;
  } catch {
    tt.fail('libnbd client printed JSON', { run: describe(r) });
    return null;
  }
}

function allOk(tt: Test, res: ClientResult | null, what: string): void {
  tt.ok(res !== null && res.connect_error === undefined, `${what}: connected`, { res });
  const bad = (res?.ops ?? []).filter(([, r]) => r !== 'ok');
  tt.same(bad, [], `${what}: every operation succeeded and verified`);
}

/** The server's own log says which options it handled (debug level). */
function optionsSeen(srv: ServerProcess): string[] {
  return [...srv.logs().matchAll(/"option":"([A-Z_]+)"/g)].map((m) => m[1]!);
}

/** Wait until the server has logged NBD_OPT_<name> at least `times` times (its log lags the client). */
function sawOption(srv: ServerProcess, name: string, times = 1): Promise<boolean> {
  return srv.waitForLog(() => optionsSeen(srv).filter((o) => o === name).length >= times);
}

function ran(tt: Test, r: RunResult, what: string, srv: ServerProcess): void {
  tt.equal(r.code, 0, what, r.code === 0 ? {} : { run: describe(r), server: srv.logTail() });
}

/** libnbd in option mode: walk the fixed-newstyle options one by one. */
const OPT_SCRIPT = String.raw`
import json, sys
import nbd
h = nbd.NBD()
h.set_opt_mode(True)
h.set_full_info(True)
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(sys.argv[1])
out = {'list': [], 'contexts': []}
h.opt_list(lambda name, desc: out['list'].append([name, desc]) or 0)
h.opt_list_meta_context(lambda name: out['contexts'].append(name) or 0)
h.set_export_name('db')
h.opt_info()
out['info'] = {'size': h.get_size(), 'base_allocation': h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)}
h.set_export_name('disk0')
h.opt_go()
out['go'] = {'size': h.get_size(), 'base_allocation': h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), 'name': h.get_canonical_export_name()}
h.pwrite(b'a' * 4096, 0)
h.block_status(h.get_size(), 0, lambda ctx, off, ents, err: out.__setitem__('extents', list(ents)) or 0)
h.shutdown()
print(json.dumps(out))
`;

const ARGS = ['--export', 'disk0=64M', '--export', 'db=32M', '--log-level', 'debug'];

const python = pythonWithNbd();
if (requireThat(t, python !== null, 'handshake-go-and-export-name: no python3 can import nbd (install python3-libnbd)')) {
  const py = python!;
  t.test('handshake-go-and-export-name: the same data through both paths (libnbd)', async (tt) => {
    const srv = await startServer(tt, { args: ARGS });
    const uri = srv.uri('disk0');

    // NBD_OPT_GO: libnbd's default handshake.
    const go = await libnbd(tt, py, uri, 'default', ['w:1048576:65536:1', 'r:1048576:65536:1', 'w:4095:3:2', 'f'], srv);
    allOk(tt, go, 'GO');
    tt.equal(go?.protocol, 'newstyle-fixed', 'GO: fixed newstyle');
    tt.equal(go?.structured, true, 'GO: structured replies');
    tt.equal(go?.size, 64 * MiB);
    tt.equal(go?.export_name, 'disk0');
    tt.ok(await sawOption(srv, 'GO'), 'server saw NBD_OPT_GO');
    tt.notOk(optionsSeen(srv).includes('EXPORT_NAME'), 'and no NBD_OPT_EXPORT_NAME yet');

    // NBD_OPT_EXPORT_NAME: without FIXED_NEWSTYLE libnbd may only use EXPORT_NAME.
    const en = await libnbd(tt, py, uri, 0, ['r:1048576:65536:1', 'r:4095:3:2', 'w:2097152:131072:3', 'r:2097152:131072:3', 'z:2100000:5000', 't:8388608:65536', 'f'], srv);
    allOk(tt, en, 'EXPORT_NAME');
    tt.equal(en?.protocol, 'newstyle', 'EXPORT_NAME: plain newstyle');
    tt.equal(en?.handshake_flags, 0, 'no handshake flags agreed');
    tt.equal(en?.structured, false, 'EXPORT_NAME: simple replies only');
    tt.equal(en?.size, 64 * MiB, 'size from the EXPORT_NAME reply');
    tt.same(en?.can, { flush: true, fua: true, trim: true, zero: true, cache: true, multi_conn: true }, 'transmission flags from the EXPORT_NAME reply');
    tt.ok(await sawOption(srv, 'EXPORT_NAME'), 'server saw NBD_OPT_EXPORT_NAME');

    // EXPORT_NAME with NO_ZEROES: the reply must omit the 124 zero bytes, or the client misreads everything after.
    const nz = await libnbd(tt, py, uri, NO_ZEROES, ['r:2097152:2800:3', 'w:3145728:4096:4', 'r:3145728:4096:4'], srv);
    allOk(tt, nz, 'EXPORT_NAME + NO_ZEROES');
    tt.equal(nz?.handshake_flags, NO_ZEROES, 'NO_ZEROES agreed');

    // Back over GO: what the EXPORT_NAME connections wrote is there.
    const back = await libnbd(tt, py, uri, FIXED_NEWSTYLE | NO_ZEROES, ['r:2097152:2800:3', 'Z:2100000:5000', 'r:3145728:4096:4', 'r:1048576:65536:1'], srv);
    allOk(tt, back, 'GO again');
    tt.equal(back?.protocol, 'newstyle-fixed');

    // The default export "" and an unknown name, through EXPORT_NAME.
    const dflt = await libnbd(tt, py, srv.uri(), 0, ['r:3145728:4096:4'], srv);
    allOk(tt, dflt, 'EXPORT_NAME "" (default export)');
    tt.equal(dflt?.size, 64 * MiB, 'default export is disk0');
    const db = await libnbd(tt, py, srv.uri('db'), 0, [], srv);
    tt.equal(db?.size, 32 * MiB, 'EXPORT_NAME "db" selects db');
    const unknown = await libnbd(tt, py, srv.uri('nosuch'), 0, [], srv);
    tt.type(unknown?.connect_error, 'string', 'EXPORT_NAME with an unknown name: the server closes, the client fails', { unknown });
    const unknownGo = await libnbd(tt, py, srv.uri('nosuch'), 'default', [], srv);
    tt.match(unknownGo?.connect_error ?? '', /nosuch|unknown|not (found|exist)|NBD_REP_ERR_UNKNOWN/i, 'GO with an unknown name: an error reply the client can report', { unknownGo });
    tt.notOk(srv.exited, 'server still running');
  });

  t.test('handshake-opt-mode: LIST, LIST_META_CONTEXT, INFO on one export, then GO on another (libnbd)', async (tt) => {
    const srv = await startServer(tt, { args: ARGS });
    const r = await run(py, ['-c', OPT_SCRIPT, srv.uri('db')], { timeoutMs: 30_000 });
    tt.equal(r.code, 0, 'opt-mode script ran', r.code === 0 ? {} : { run: describe(r), server: srv.logTail() });
    let res: Record<string, unknown> = {};
    try {
      res = JSON.parse(r.stdout) as Record<string, unknown>;
    } catch {
      tt.fail('opt-mode script printed JSON', { run: describe(r) });
    }
    tt.same(res.list, [['disk0', 'nbdmirror export disk0'], ['db', 'nbdmirror export db']], 'NBD_OPT_LIST: both exports');
    tt.same(res.contexts, ['base:allocation'], 'NBD_OPT_LIST_META_CONTEXT: base:allocation');
    tt.same(res.info, { size: 32 * MiB, base_allocation: true }, 'NBD_OPT_INFO on db');
    tt.same(res.go, { size: 64 * MiB, base_allocation: true, name: 'disk0' }, 'NBD_OPT_GO on disk0 after INFO on db: its own size and context');
    tt.same(res.extents, [4096, 0, 64 * MiB - 4096, 3], 'block status on disk0 after one 4 KiB write: data, then hole+zero');
    for (const o of ['LIST', 'LIST_META_CONTEXT', 'SET_META_CONTEXT', 'INFO', 'GO']) tt.ok(await sawOption(srv, o), `server saw NBD_OPT_${o}`);
  });
}

if (requireTool(t, 'nbd-client')) {
  t.test('handshake-nbd-client: Linux nbd-client lists exports and negotiates up to the device step', async (tt) => {
    const srv = await startServer(tt, { args: ARGS });
    const port = String(srv.nbdPort);

    const list = await run('nbd-client', ['-l', '127.0.0.1', port], { timeoutMs: 20_000 });
    ran(tt, list, 'nbd-client -l', srv);
    tt.match(list.stdout, /^disk0: nbdmirror export disk0$/m, 'lists disk0 with its description');
    tt.match(list.stdout, /^db: nbdmirror export db$/m, 'lists db');
    tt.ok(await sawOption(srv, 'LIST'), 'via NBD_OPT_LIST');

    // Not a /dev/nbdN path: netlink mode negotiates first, then cannot map the target to a device index, so
    // nothing is ever attached, whatever the kernel supports. (-nonetlink would open the device before
    // negotiating.)
    const device = path.join(freshDir(tt, 'nodev'), 'not-an-nbd-device');
    const nego = await run('nbd-client', ['-N', 'db', '127.0.0.1', port, device], { timeoutMs: 20_000 });
    tt.not(nego.code, 0, 'nbd-client cannot attach a device here', { run: describe(nego) });
    tt.match(nego.stdout + nego.stderr, /size = 32MB/, 'but it negotiated: it learned the export size (32 MiB)', { run: describe(nego) });
    tt.match(nego.stderr, /Invalid nbd device target/, 'and failed only at the device step', { run: describe(nego) });
    tt.ok(await sawOption(srv, 'GO'), 'nbd-client used NBD_OPT_GO');
    tt.ok(await srv.waitForLog(/"msg":"transmission started"/), 'the server entered transmission for it');

    const bad = await run('nbd-client', ['-N', 'nosuch', '127.0.0.1', port, device], { timeoutMs: 20_000 });
    tt.not(bad.code, 0, 'unknown export: nbd-client fails');
    tt.match(bad.stderr, /Server said: unknown export "nosuch"/, 'with the server\'s error message', { run: describe(bad) });
    tt.notOk(srv.exited, 'server still running');
  });
}

if (requireTool(t, 'qemu-io')) {
  t.test('handshake-qemu-legacy-syntax: qemu\'s nbd:HOST:PORT:exportname= form', async (tt) => {
    const srv = await startServer(tt, { args: ARGS });
    const target = `nbd:127.0.0.1:${srv.nbdPort}:exportname=db`;
    const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 1M 64k', '-c', 'read -P 0x3c 1M 64k', target], { timeoutMs: 30_000 });
    ran(tt, w, 'qemu-io write + read through nbd:…:exportname=db', srv);
    tt.notMatch(w.stdout, /Pattern verification failed/);
    const r = await run('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x3c 1M 64k', '-c', 'read -P 0 0 1M', srv.uri('db')], { timeoutMs: 30_000 });
    ran(tt, r, 'read back through the nbd:// URI', srv);
    tt.notMatch(r.stdout, /Pattern verification failed/);
    tt.ok(await sawOption(srv, 'GO', 2), 'qemu used NBD_OPT_GO');
  });
}
