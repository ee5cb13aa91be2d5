// Black box: libnbd's nbdinfo (a client nobody here wrote) against dist/server.js. Proves what a client
// sees in the handshake (size, flags, block sizes, meta contexts, the export list) and that base:allocation
// tracks writes, trims and unmapping zero-writes made by qemu-io; and that --read-only is advertised and
// enforced against qemu-io.

import t from 'tap';
import type { Test } from 'tap';
import { requireTool } from '../helpers/requires';
import { describe, run, type RunResult } from '../helpers/run';
import { type ServerProcess, startServer } from '../helpers/spawn-server';

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;

interface Extent {
  offset: number;
  length: number;
  type: number;
  description: string;
}

function ok(tt: Test, r: RunResult, what: string, srv?: ServerProcess): boolean {
  return tt.equal(r.code, 0, what, r.code === 0 ? {} : { run: describe(r), server: srv?.logTail() ?? '' });
}

async function nbdinfoJson(tt: Test, args: string[], srv: ServerProcess): Promise<Record<string, unknown>> {
  const r = await run('nbdinfo', ['--json', ...args], { timeoutMs: 20_000 });
  ok(tt, r, `nbdinfo --json ${args.join(' ')}`, srv);
  return JSON.parse(r.stdout) as Record<string, unknown>;
}

async function mapJson(tt: Test, uri: string, srv: ServerProcess): Promise<Extent[]> {
  const r = await run('nbdinfo', ['--map', '--json', uri], { timeoutMs: 20_000 });
  ok(tt, r, 'nbdinfo --map --json', srv);
  return JSON.parse(r.stdout) as Extent[];
}

async function mapText(tt: Test, uri: string, srv: ServerProcess): Promise<Extent[]> {
  const r = await run('nbdinfo', ['--map', uri], { timeoutMs: 20_000 });
  ok(tt, r, 'nbdinfo --map', srv);
  const out: Extent[] = [];
  for (const line of r.stdout.split('\n')) {
    if (line.trim() === '') continue;
    const m = /^\s*(\d+)\s+(\d+)\s+(\d+)\s+(.*)$/.exec(line);
    tt.ok(m, `map line parses: ${JSON.stringify(line)}`);
    if (m) out.push({ offset: Number(m[1]), length: Number(m[2]), type: Number(m[3]), description: m[4]!.trim() });
  }
  return out;
}

/** The extents tile [0, size) with no gap or overlap. */
function checkTiling(tt: Test, map: Extent[], size: number, label: string): void {
  let pos = 0;
  let okTiling = true;
  for (const e of map) {
    if (e.offset !== pos || e.length <= 0) okTiling = false;
    pos = e.offset + e.length;
  }
  tt.ok(okTiling && pos === size, `${label}: extents tile [0, ${size})`, { map });
}

/** Every extent overlapping [off, off+len) has this type. */
function typeOver(map: Extent[], off: number, len: number): number[] {
  return [...new Set(map.filter((e) => e.offset < off + len && e.offset + e.length > off).map((e) => e.type))];
}

async function qemuIo(tt: Test, uri: string, cmds: string[], srv: ServerProcess): Promise<RunResult> {
  const args = ['-f', 'raw'];
  for (const c of cmds) args.push('-c', c);
  args.push(uri);
  const r = await run('qemu-io', args, { timeoutMs: 30_000 });
  ok(tt, r, `qemu-io ${cmds.join(' ; ')}`, srv);
  tt.notMatch(r.stdout + r.stderr, /Pattern verification failed|error|failed/i, 'qemu-io reports no failure', { run: describe(r) });
  return r;
}

if (requireTool(t, 'nbdinfo') && requireTool(t, 'qemu-io')) {
  t.test('nbdinfo-json: handshake facts of the default and a named export', async (tt) => {
    const srv = await startServer(tt, { args: ['--export', 'disk0=1G', '--export', 'db=256M'] });
    const info = await nbdinfoJson(tt, [srv.uri()], srv);
    tt.equal(info.protocol, 'newstyle-fixed');
    tt.equal(info.TLS, false);
    tt.equal(info.structured, true, 'structured replies negotiated');
    const exps = info.exports as Array<Record<string, unknown>>;
    tt.equal(exps.length, 1, 'one export described');
    const e = exps[0]!;
    tt.equal(e['export-name'], 'disk0', 'default export "" is the first export (server sent NBD_INFO_NAME)');
    tt.equal(e['export-size'], GiB);
    tt.equal(e.is_read_only, false);
    for (const flag of ['can_cache', 'can_df', 'can_fast_zero', 'can_flush', 'can_fua', 'can_multi_conn', 'can_trim', 'can_zero']) {
      tt.equal(e[flag], true, flag);
    }
    tt.equal(e.block_size_minimum, 1);
    tt.equal(e.block_size_preferred, 4096);
    tt.equal(e.block_size_maximum, 32 * MiB);
    tt.ok(Array.isArray(e.contexts) && (e.contexts as string[]).includes('base:allocation'), 'base:allocation offered', { contexts: e.contexts });

    const db = ((await nbdinfoJson(tt, [srv.uri('db')], srv)).exports as Array<Record<string, unknown>>)[0]!;
    tt.equal(db['export-name'], 'db');
    tt.equal(db['export-size'], 256 * MiB);

    const size = await run('nbdinfo', ['--size', srv.uri('db')], { timeoutMs: 20_000 });
    ok(tt, size, 'nbdinfo --size', srv);
    tt.equal(size.stdout.trim(), String(256 * MiB));
    const isRo = await run('nbdinfo', ['--is', 'read-only', srv.uri()], { timeoutMs: 20_000 });
    tt.equal(isRo.code, 2, 'nbdinfo --is read-only: false (exit 2) on a writable server', { run: describe(isRo) });
    const canTrim = await run('nbdinfo', ['--can', 'trim', srv.uri()], { timeoutMs: 20_000 });
    tt.equal(canTrim.code, 0, 'nbdinfo --can trim: true', { run: describe(canTrim) });

    const unknown = await run('nbdinfo', ['--json', srv.uri('nosuch')], { timeoutMs: 20_000 });
    tt.not(unknown.code, 0, 'an unknown export name fails the handshake');
    tt.match(unknown.stderr, /nosuch|unknown|not (found|exist)/i, 'and the client says why', { run: describe(unknown) });
  });

  t.test('nbdinfo-list: every configured export', async (tt) => {
    const srv = await startServer(tt, { args: ['--export', 'disk0=1G', '--export', 'db=256M'] });
    const list = await nbdinfoJson(tt, ['--list', srv.uri()], srv);
    const exps = list.exports as Array<Record<string, unknown>>;
    tt.same(
      exps.map((e) => [e['export-name'], e['export-size']]),
      [
        ['disk0', GiB],
        ['db', 256 * MiB],
      ],
      'both exports with their sizes, in configuration order',
    );
    for (const e of exps) {
      tt.equal(typeof e.description, 'string', `${String(e['export-name'])} has a description`);
      tt.ok((e.contexts as string[] | undefined)?.includes('base:allocation'), `${String(e['export-name'])} offers base:allocation`);
    }
  });

  t.test('nbdinfo-map: holes, data after a write, holes after trim and unmapping zero-write', async (tt) => {
    const size = 64 * MiB;
    const srv = await startServer(tt, { args: ['--export', `disk0=${size}`] });
    const uri = srv.uri('disk0');

    let map = await mapText(tt, uri, srv);
    checkTiling(tt, map, size, 'fresh (text)');
    tt.same(typeOver(map, 0, size), [3], 'fresh export is all hole,zero (text)');
    tt.ok(map.every((e) => e.description === 'hole,zero'), 'described as hole,zero');
    map = await mapJson(tt, uri, srv);
    checkTiling(tt, map, size, 'fresh (json)');
    tt.same(typeOver(map, 0, size), [3], 'fresh export is all hole,zero (json)');

    const off = MiB;
    const len = 64 * 1024;
    await qemuIo(tt, uri, [`write -P 0xab ${off} ${len}`], srv);
    for (const m of [await mapText(tt, uri, srv), await mapJson(tt, uri, srv)]) {
      checkTiling(tt, m, size, 'after write');
      tt.same(typeOver(m, off, len), [0], 'written range is data', { map: m });
      tt.same(typeOver(m, 0, 4096), [3], 'start of the export is still a hole');
      tt.same(typeOver(m, 8 * MiB, size - 8 * MiB), [3], 'far end is still a hole');
    }

    await qemuIo(tt, uri, [`discard ${off} ${len}`], srv);
    map = await mapJson(tt, uri, srv);
    checkTiling(tt, map, size, 'after discard');
    tt.same(typeOver(map, 0, size), [3], 'an aligned discard deallocates: all hole,zero again', { map });
    await qemuIo(tt, uri, [`read -P 0 ${off} ${len}`], srv);

    await qemuIo(tt, uri, [`write -P 0xcd ${off} ${len}`], srv);
    map = await mapJson(tt, uri, srv);
    tt.same(typeOver(map, off, len), [0], 'rewritten range is data again');
    await qemuIo(tt, uri, [`write -z -u ${off} ${len}`], srv);
    map = await mapJson(tt, uri, srv);
    checkTiling(tt, map, size, 'after write -z -u');
    tt.same(typeOver(map, 0, size), [3], 'write -z -u (WRITE_ZEROES without NO_HOLE) deallocates', { map });
    await qemuIo(tt, uri, [`read -P 0 ${off} ${len}`], srv);
  });

  t.test('nbdinfo-read-only: advertised and enforced', async (tt) => {
    const srv = await startServer(tt, { args: ['--export', 'disk0=64M', '--read-only'] });
    const e = ((await nbdinfoJson(tt, [srv.uri()], srv)).exports as Array<Record<string, unknown>>)[0]!;
    tt.equal(e.is_read_only, true, 'is_read_only');
    for (const flag of ['can_trim', 'can_zero', 'can_fast_zero', 'can_fua']) tt.equal(e[flag], false, `${flag} is false on a read-only export`);
    const isRo = await run('nbdinfo', ['--is', 'read-only', srv.uri()], { timeoutMs: 20_000 });
    tt.equal(isRo.code, 0, 'nbdinfo --is read-only: true', { run: describe(isRo) });

    const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x55 0 4096', srv.uri()], { timeoutMs: 30_000 });
    tt.not(w.code, 0, 'qemu-io write to a read-only export fails', { run: describe(w) });
    tt.notMatch(w.stdout, /wrote \d+/, 'and reports no bytes written');
    tt.match(w.stdout + w.stderr, /Permission denied|read-only|Operation not permitted/i, 'because the export is read-only');
    const r = await run('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0 0 4096', srv.uri()], { timeoutMs: 30_000 });
    ok(tt, r, 'read-only qemu-io can read', srv);
    tt.notMatch(r.stdout, /Pattern verification failed/, 'data is unchanged (still zeros)');
  });
}
