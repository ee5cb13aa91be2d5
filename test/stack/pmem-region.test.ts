// lib/storage/pmem-region.ts on real files in t.testdir(): the region file survives a close without clearing
// and the next open hands the newest valid version of every block to writeBack in sequence order; torn pages
// and entries (bytes changed in the file after the commit) are counted and never returned; superseded versions
// are counted; a damaged header (magic, version, geometry, another node's uuid, truncation) is refused with a
// CorruptStateError that names the file and says to move it away, leaving the file as it was; a second open is
// refused with LockedError; sizes below the minimum are refused; a geometry change recovers with the old
// geometry and then recreates; clearAll and close(remove); export names persist in the header; a writeBack
// that throws leaves the file intact so that the next open recovers again.

import t from 'tap';
import type { Test } from 'tap';
import * as path from 'node:path';
import { randomUUID } from 'node:crypto';
import { existsSync, openSync, closeSync, readSync, writeSync, statSync, ftruncateSync, readFileSync } from 'node:fs';
import { MAX_REGION_EXPORTS, MAX_REGION_PAGES, MIN_REGION_PAGES, PAGE_SIZE, PmemRegion, type RecoveryReport } from '../../lib/storage/pmem-region';
import { CorruptStateError, LockedError, UsageError } from '../../lib/errors';

const PS = 4096;
const HEADER = 16 * 1024;
const ENTRY = 32;
const MIN_SIZE = 256 * PS;

/** Offsets in the file, written out from the documented layout (not taken from the module). */
function layoutOf(pages: number): { table: number; pagesAt: number; fileSize: number } {
  const tableBytes = Math.ceil((pages * ENTRY) / PS) * PS;
  return { table: HEADER, pagesAt: HEADER + tableBytes, fileSize: HEADER + tableBytes + pages * PS };
}

interface Opened {
  region: PmemRegion;
  recovery: RecoveryReport;
  created: boolean;
  /** What writeBack was handed (null if it was not called). */
  handed: RecoveryReport | null;
}

async function open(t: Test, file: string, uuid: string, size = MIN_SIZE, writeBack?: (r: RecoveryReport) => Promise<void>): Promise<Opened> {
  let handed: RecoveryReport | null = null;
  const o = await PmemRegion.open({
    file,
    nodeUuid: uuid,
    size,
    writeBack: async (r) => {
      handed = r;
      if (writeBack) await writeBack(r);
    },
  });
  let closed = false;
  const close = o.region.close.bind(o.region);
  o.region.close = async (remove?: boolean) => {
    closed = true;
    await close(remove);
  };
  t.teardown(async () => {
    if (!closed) await close();
  });
  return { ...o, handed };
}

/** Put bytes in a slot's page and commit it; returns the sequence number. */
function put(r: PmemRegion, slot: number, exportId: number, block: number, fill: number | Buffer): number {
  const page = r.page(slot);
  if (typeof fill === 'number') page.fill(fill);
  else fill.copy(page);
  return r.commit(slot, exportId, block);
}

function pattern(seed: number): Buffer {
  const b = Buffer.alloc(PS);
  for (let i = 0; i < PS; i++) b[i] = (i * 13 + seed * 101 + 7) & 0xff;
  return b;
}

/** Overwrite bytes of the file (as a crash or a stray writer would). */
function poke(file: string, offset: number, bytes: Buffer): void {
  const fd = openSync(file, 'r+');
  try {
    writeSync(fd, bytes, 0, bytes.length, offset);
  } finally {
    closeSync(fd);
  }
}

function peek(file: string, offset: number, length: number): Buffer {
  const fd = openSync(file, 'r');
  try {
    const b = Buffer.alloc(length);
    readSync(fd, b, 0, length, offset);
    return b;
  } finally {
    closeSync(fd);
  }
}

function flipByte(file: string, offset: number): void {
  const b = peek(file, offset, 1);
  poke(file, offset, Buffer.from([b[0]! ^ 0x5a]));
}

const summary = (r: RecoveryReport): Array<[string, number, number]> => r.pages.map((p) => [p.exportName, p.block, p.seq]);

t.test('constants', async (t) => {
  t.equal(PAGE_SIZE, PS);
  t.equal(MIN_REGION_PAGES, 256);
  t.equal(MAX_REGION_EXPORTS, Math.floor((HEADER - 64) / 80));
});

t.test('a new region: created, empty recovery, file laid out as documented', async (t) => {
  const dir = t.testdir();
  const file = path.join(dir, 'sub', 'r.pmem'); // the directory is created
  const uuid = randomUUID();
  const o = await open(t, file, uuid);
  t.equal(o.created, true);
  t.same(o.recovery, { pages: [], torn: 0, superseded: 0 });
  t.same(o.handed, { pages: [], torn: 0, superseded: 0 }, 'writeBack is called even with nothing to recover');
  t.equal(o.region.pageCount, 256);
  t.equal(o.region.freeCount, 256);
  t.equal(o.region.file, file);
  t.equal(statSync(file).size, layoutOf(256).fileSize);
  t.equal(statSync(file).mode & 0o777, 0o600, 'only the owner may read it');
  const h = peek(file, 0, 40);
  t.equal(h.subarray(0, 8).toString(), 'NBDMPMEM');
  t.equal(h.readUInt32BE(8), 1, 'version');
  t.equal(h.readUInt32BE(12), PS, 'page size');
  t.equal(h.readUInt32BE(16), 256, 'page count');
  t.equal(h.subarray(24, 40).toString('hex'), uuid.replace(/-/g, ''), 'node uuid');
  t.equal(PmemRegion.fileFor('/x/y', uuid), `/x/y/nbdmirror-${uuid}.pmem`);
  // A size that is not a whole number of pages rounds down.
  const o2 = await open(t, path.join(dir, 'r2.pmem'), uuid, MIN_SIZE + PS - 1);
  t.equal(o2.region.pageCount, 256);
});

t.test('free slots: takeFree hands out every slot once, then -1; release returns one', async (t) => {
  const o = await open(t, path.join(t.testdir(), 'r.pmem'), randomUUID());
  const r = o.region;
  const seen = new Set<number>();
  for (let i = 0; i < 256; i++) seen.add(r.takeFree());
  t.equal(seen.size, 256);
  t.ok([...seen].every((s) => s >= 0 && s < 256));
  t.equal(r.takeFree(), -1, 'empty');
  t.equal(r.freeCount, 0);
  r.release(17);
  t.equal(r.freeCount, 1);
  t.equal(r.takeFree(), 17);
});

t.test('close without clearing, reopen: writeBack gets the newest version of each block in sequence order', async (t) => {
  const dir = t.testdir();
  const file = path.join(dir, 'r.pmem');
  const uuid = randomUUID();
  const a = await open(t, file, uuid);
  const r = a.region;
  const disk = r.exportId('disk');
  const other = r.exportId('other');
  t.equal(disk, 0);
  t.equal(other, 1);
  t.equal(r.exportId('disk'), 0, 'registering again gives the same id');
  const big = 2 ** 33 + 5; // a block number above 2^32 (hi/lo halves)
  const s1 = put(r, 3, disk, 7, pattern(1)); // block 7, old version
  const s2 = put(r, 0, disk, 2, pattern(2));
  const s3 = put(r, 5, other, 7, pattern(3)); // the same block number in another export
  const s4 = put(r, 1, disk, 7, pattern(4)); // block 7, new version (lower slot than the old one)
  const s5 = put(r, 9, disk, big, pattern(5));
  const s6 = put(r, 200, disk, 2, pattern(6)); // block 2, new version (higher slot)
  t.same([s1, s2, s3, s4, s5, s6], [1, 2, 3, 4, 5, 6], 'sequence numbers count up from 1');
  t.equal(r.slotSeq[1], 4);
  t.equal(r.slotBlock[9], big);
  t.equal(r.slotExport[5], other);
  await r.close(); // no clearAll: a crash as far as the file is concerned
  t.ok(existsSync(file));

  const b = await open(t, file, uuid);
  t.equal(b.created, false);
  t.same(summary(b.recovery), [
    ['other', 7, 3],
    ['disk', 7, 4],
    ['disk', big, 5],
    ['disk', 2, 6],
  ], 'newest version of each (export, block), in sequence order');
  t.ok(b.recovery.pages[0]!.data.equals(pattern(3)));
  t.ok(b.recovery.pages[1]!.data.equals(pattern(4)));
  t.ok(b.recovery.pages[2]!.data.equals(pattern(5)));
  t.ok(b.recovery.pages[3]!.data.equals(pattern(6)));
  t.equal(b.recovery.superseded, 2, 'two older versions');
  t.equal(b.recovery.torn, 0);
  t.equal(b.handed, b.recovery, 'writeBack was handed the same report');
  // The region was recreated empty; the recovered data are copies that outlive the old mapping.
  t.equal(b.region.freeCount, 256);
  t.equal(statSync(file).size, layoutOf(256).fileSize);
  t.ok(peek(file, layoutOf(256).table, 256 * ENTRY).every((x) => x === 0), 'the page table is empty');
  t.ok(b.recovery.pages[0]!.data.equals(pattern(3)), 'recovered data still readable after the file was recreated');
  await b.region.close();
  const c = await open(t, file, uuid);
  t.same(c.recovery, { pages: [], torn: 0, superseded: 0 }, 'after a recovery there is nothing left to recover');
});

t.test('writes through the mapping are in the file at once (MAP_SHARED), entries as documented', async (t) => {
  const file = path.join(t.testdir(), 'r.pmem');
  const o = await open(t, file, randomUUID());
  const r = o.region;
  const id = r.exportId('disk');
  put(r, 4, id, 2 ** 32 + 3, pattern(9));
  const l = layoutOf(256);
  t.ok(peek(file, l.pagesAt + 4 * PS, PS).equals(pattern(9)), 'page bytes');
  const e = peek(file, l.table + 4 * ENTRY, ENTRY);
  t.equal(e.readUInt32BE(0) * 2 ** 32 + e.readUInt32BE(4), 1, 'seq');
  t.equal(e.readUInt32BE(8), id, 'export id');
  t.equal(e.readUInt32BE(12), 1, 'block hi');
  t.equal(e.readUInt32BE(16), 3, 'block lo');
  t.not(e.readUInt32BE(20), 0, 'checksum');
  const name = peek(file, 64, 80);
  t.equal(name.readUInt16BE(0), 4);
  t.equal(name.toString('utf8', 2, 6), 'disk', 'export table entry');
  r.sync();
  t.pass('msync of the header, the page table and every page mapping');
});

t.test('torn pages and entries are counted and not returned', async (t) => {
  const dir = t.testdir();
  const file = path.join(dir, 'r.pmem');
  const uuid = randomUUID();
  const a = await open(t, file, uuid);
  const r = a.region;
  const id = r.exportId('disk');
  for (let slot = 0; slot < 8; slot++) put(r, slot, id, 100 + slot, pattern(slot));
  const l = layoutOf(256);
  flipByte(file, l.pagesAt + 1 * PS + 1234); // page of slot 1
  flipByte(file, l.pagesAt + 2 * PS + PS - 1); // last byte of slot 2's page
  flipByte(file, l.table + 3 * ENTRY + 17); // block field of slot 3's entry
  flipByte(file, l.table + 4 * ENTRY + 21); // checksum of slot 4
  flipByte(file, l.table + 5 * ENTRY + 9); // export id of slot 5
  flipByte(file, l.table + 6 * ENTRY + 2); // a high byte of slot 6's sequence number
  await r.close();
  const b = await open(t, file, uuid);
  t.equal(b.recovery.torn, 6, 'six damaged slots');
  t.same(summary(b.recovery), [
    ['disk', 100, 1],
    ['disk', 107, 8],
  ], 'only the intact slots come back');
  t.ok(b.recovery.pages[1]!.data.equals(pattern(7)));
  t.equal(b.recovery.superseded, 0);
});

t.test('a torn newer version does not hide the older intact one; a cleared entry is ignored', async (t) => {
  const dir = t.testdir();
  const file = path.join(dir, 'r.pmem');
  const uuid = randomUUID();
  const a = await open(t, file, uuid);
  const r = a.region;
  const id = r.exportId('disk');
  put(r, 0, id, 5, pattern(1)); // seq 1
  put(r, 1, id, 5, pattern(2)); // seq 2, will be torn
  put(r, 2, id, 6, pattern(3)); // seq 3, will be cleared
  r.clearEntry(2);
  t.equal(r.slotSeq[2], 0);
  t.equal(r.slotExport[2], -1);
  flipByte(file, layoutOf(256).pagesAt + 1 * PS);
  await r.close();
  const b = await open(t, file, uuid);
  t.same(summary(b.recovery), [['disk', 5, 1]], 'the intact older version is what the backing file needs');
  t.ok(b.recovery.pages[0]!.data.equals(pattern(1)));
  t.equal(b.recovery.torn, 1);
  t.equal(b.recovery.superseded, 0);
});

t.test('a page whose export id is not in the export table counts as torn', async (t) => {
  const file = path.join(t.testdir(), 'r.pmem');
  const uuid = randomUUID();
  const a = await open(t, file, uuid);
  a.region.exportId('disk');
  put(a.region, 0, 0, 1, 1);
  put(a.region, 1, 7, 1, 1); // id 7 was never registered
  await a.region.close();
  const b = await open(t, file, uuid);
  t.same(summary(b.recovery), [['disk', 1, 1]]);
  t.equal(b.recovery.torn, 1);
});

t.test('export names persist in the header; recovery reports them', async (t) => {
  const file = path.join(t.testdir(), 'r.pmem');
  const uuid = randomUUID();
  const a = await open(t, file, uuid);
  const r = a.region;
  const names = ['disk0', 'vm-images.2', 'x'.repeat(64), 'ünïcode'];
  const ids = names.map((n) => r.exportId(n));
  t.same(ids, [0, 1, 2, 3]);
  ids.forEach((id, i) => put(r, i, id, i * 10, pattern(i)));
  await r.close();
  const b = await open(t, file, uuid);
  t.same(summary(b.recovery), names.map((n, i) => [n, i * 10, i + 1]));
  // The new region starts with an empty export table: ids are given out afresh.
  t.equal(b.region.exportId('vm-images.2'), 0);
});

t.test('the export table holds MAX_REGION_EXPORTS names', async (t) => {
  const file = path.join(t.testdir(), 'r.pmem');
  const uuid = randomUUID();
  const a = await open(t, file, uuid);
  const r = a.region;
  const ids: number[] = [];
  for (let i = 0; i < MAX_REGION_EXPORTS; i++) ids.push(r.exportId(`e${i}`));
  t.same(ids, Array.from({ length: MAX_REGION_EXPORTS }, (_, i) => i), 'ids 0, 1, 2, … in registration order');
  t.throws(() => r.exportId('one-too-many'), UsageError, 'one more is refused');
  put(r, 0, MAX_REGION_EXPORTS - 1, 3, 4);
  await r.close();
  const b = await open(t, file, uuid);
  t.same(summary(b.recovery), [[`e${MAX_REGION_EXPORTS - 1}`, 3, 1]], 'the last entry of the table is read back');
});

/** A region file with one committed page, closed; returns its uuid. */
async function regionWithData(t: Test, file: string): Promise<string> {
  const uuid = randomUUID();
  const a = await open(t, file, uuid);
  put(a.region, 0, a.region.exportId('disk'), 9, pattern(9));
  await a.region.close();
  return uuid;
}

async function refused(t: Test, file: string, uuid: string, what: RegExp, msg: string): Promise<void> {
  const before = readFileSync(file);
  let wbCalled = false;
  const err = await PmemRegion.open({ file, nodeUuid: uuid, size: MIN_SIZE, writeBack: async () => void (wbCalled = true) }).then(
    (o) => {
      void o.region.close();
      return null;
    },
    (e: unknown) => e,
  );
  t.type(err, CorruptStateError, `${msg}: CorruptStateError`);
  t.notOk(err instanceof UsageError, `${msg}: not a usage error (the server exits 1, not 2)`);
  const m = (err as Error | null)?.message ?? '';
  t.match(m, what, `${msg}: says what is wrong`);
  t.ok(m.includes(file), `${msg}: names the file`);
  t.match(m, /move .* away/, `${msg}: says to move it away`);
  t.notOk(wbCalled, `${msg}: writeBack not called`);
  t.ok(readFileSync(file).equals(before), `${msg}: the file is left as it was`);
}

t.test('a damaged header is refused with a CorruptStateError that says to move the file away', async (t) => {
  const dir = t.testdir();
  {
    const file = path.join(dir, 'magic.pmem');
    const uuid = await regionWithData(t, file);
    poke(file, 0, Buffer.from('NOTPMEM!'));
    await refused(t, file, uuid, /bad magic/, 'bad magic');
  }
  {
    const file = path.join(dir, 'version.pmem');
    const uuid = await regionWithData(t, file);
    const v = Buffer.alloc(4);
    v.writeUInt32BE(2);
    poke(file, 8, v);
    await refused(t, file, uuid, /layout version 2/, 'version 2');
  }
  {
    const file = path.join(dir, 'pagesize.pmem');
    const uuid = await regionWithData(t, file);
    const v = Buffer.alloc(4);
    v.writeUInt32BE(8192);
    poke(file, 12, v);
    await refused(t, file, uuid, /invalid geometry/, 'page size 8192');
  }
  {
    const file = path.join(dir, 'pagecount.pmem');
    const uuid = await regionWithData(t, file);
    poke(file, 16, Buffer.alloc(4));
    await refused(t, file, uuid, /invalid geometry/, 'page count 0');
  }
  {
    const file = path.join(dir, 'uuid.pmem');
    const theirs = await regionWithData(t, file);
    await refused(t, file, randomUUID(), new RegExp(`another node \\(${theirs.replace(/-/g, '')}\\)`), "another node's region");
  }
  {
    const file = path.join(dir, 'short.pmem');
    const uuid = await regionWithData(t, file);
    const fd = openSync(file, 'r+');
    ftruncateSync(fd, 1000);
    closeSync(fd);
    await refused(t, file, uuid, /truncated \(1000 bytes\)/, 'shorter than the header');
  }
  {
    const file = path.join(dir, 'cut.pmem');
    const uuid = await regionWithData(t, file);
    const full = layoutOf(256).fileSize;
    const fd = openSync(file, 'r+');
    ftruncateSync(fd, full - 1);
    closeSync(fd);
    await refused(t, file, uuid, new RegExp(`truncated \\(${full - 1} of ${full} bytes\\)`), 'missing its last byte');
  }
  {
    // The refusal released the lock: once the damage is repaired, the same file opens and recovers.
    const file = path.join(dir, 'magic.pmem');
    poke(file, 0, Buffer.from('NBDMPMEM'));
    const uuid = peek(file, 24, 16).toString('hex');
    const o = await open(t, file, uuid);
    t.same(summary(o.recovery), [['disk', 9, 1]], 'repaired header: the data is recovered');
  }
});

t.test('an existing empty file is a fresh region; a missing file is created', async (t) => {
  const dir = t.testdir({ 'empty.pmem': '' });
  const o = await open(t, path.join(dir, 'empty.pmem'), randomUUID());
  t.equal(o.created, false, 'the file existed');
  t.same(o.recovery, { pages: [], torn: 0, superseded: 0 });
  t.equal(statSync(path.join(dir, 'empty.pmem')).size, layoutOf(256).fileSize);
});

t.test('a second open while open is refused with LockedError; the first keeps working', async (t) => {
  const file = path.join(t.testdir(), 'r.pmem');
  const uuid = randomUUID();
  const a = await open(t, file, uuid);
  put(a.region, 0, a.region.exportId('disk'), 1, 1);
  let wbCalled = false;
  await t.rejects(
    PmemRegion.open({ file, nodeUuid: uuid, size: MIN_SIZE, writeBack: async () => void (wbCalled = true) }),
    LockedError,
  );
  const err = await PmemRegion.open({ file, nodeUuid: uuid, size: MIN_SIZE, writeBack: async () => undefined }).catch((e: unknown) => e);
  t.type(err, LockedError, 'still locked: the failed open did not release the first one\'s lock');
  t.match((err as Error).message, file, 'the message names the file');
  t.notOk(wbCalled);
  t.equal(statSync(file).size, layoutOf(256).fileSize, 'the open file was not truncated');
  put(a.region, 1, 0, 2, 2);
  await a.region.close();
  const b = await open(t, file, uuid);
  t.same(summary(b.recovery), [['disk', 1, 1], ['disk', 2, 2]], 'after the first closes, the file opens and recovers');
});

t.test('pmem size below the minimum is refused before the file is touched', async (t) => {
  const dir = t.testdir();
  const file = path.join(dir, 'r.pmem');
  for (const size of [0, PS, MIN_SIZE - PS, MIN_SIZE - 1]) {
    await t.rejects(
      PmemRegion.open({ file, nodeUuid: randomUUID(), size, writeBack: async () => undefined }),
      { name: 'UsageError', message: /too small: at least 1048576 bytes/ },
      `size ${size}`,
    );
  }
  t.notOk(existsSync(file), 'no file was created');
  const o = await open(t, file, randomUUID(), MIN_SIZE);
  t.equal(o.region.pageCount, MIN_REGION_PAGES, 'exactly the minimum is accepted');
});

t.test('geometry change: recover with the old geometry, then recreate at the new size', async (t) => {
  const file = path.join(t.testdir(), 'r.pmem');
  const uuid = randomUUID();
  const a = await open(t, file, uuid, 300 * PS);
  const id = a.region.exportId('disk');
  put(a.region, 299, id, 42, pattern(42)); // the last slot of the old geometry
  put(a.region, 0, id, 1, pattern(1));
  await a.region.close();
  // Bigger: the table grows (300 entries fit one table page; 1000 need eight).
  const b = await open(t, file, uuid, 1000 * PS);
  t.same(summary(b.recovery), [['disk', 42, 1], ['disk', 1, 2]], 'pages found where the old layout put them');
  t.ok(b.recovery.pages[0]!.data.equals(pattern(42)));
  t.equal(b.region.pageCount, 1000);
  t.equal(statSync(file).size, layoutOf(1000).fileSize);
  t.equal(peek(file, 16, 4).readUInt32BE(0), 1000, 'the header has the new page count');
  put(b.region, 999, b.region.exportId('disk'), 7, pattern(7));
  await b.region.close();
  // Smaller again: the page in slot 999 is beyond the new geometry but is still recovered.
  const c = await open(t, file, uuid, MIN_SIZE);
  t.same(summary(c.recovery), [['disk', 7, 1]]);
  t.ok(c.recovery.pages[0]!.data.equals(pattern(7)));
  t.equal(c.region.pageCount, 256);
  t.equal(statSync(file).size, layoutOf(256).fileSize);
});

t.test('the largest region (just under 2 GiB) spans two page mappings; pages on both sides of the edge recover', async (t) => {
  // mmap-io maps at most 2 GiB - 1 bytes at offsets below 2 GiB: the pages are mapped 1 GiB at a time
  // (region-map.ts) and the region stops short of 2 GiB.
  const dir = t.testdir();
  const file = path.join(dir, 'r.pmem');
  const uuid = randomUUID();
  const pages = MAX_REGION_PAGES;
  t.ok(layoutOf(pages).fileSize < 2 ** 31 && layoutOf(pages + 1).fileSize > 2 ** 31 - PS, `${pages} pages is the most that fit`);
  await t.rejects(PmemRegion.open({ file, nodeUuid: uuid, size: (pages + 1) * PS, writeBack: async () => undefined }), UsageError, 'one page more is refused as too large');
  const edge = 1 << 18; // first slot of the second mapping
  const a = await open(t, file, uuid, pages * PS);
  t.equal(a.region.pageCount, pages);
  const id = a.region.exportId('disk');
  const slots = [0, edge - 1, edge, pages - 1];
  for (const [i, slot] of slots.entries()) put(a.region, slot, id, 1000 + i, pattern(i));
  t.ok(peek(file, layoutOf(pages).pagesAt + (pages - 1) * PS, PS).equals(pattern(slots.length - 1)), 'the last page is in the file where the layout puts it');
  a.region.sync();
  await a.region.close();
  const b = await open(t, file, uuid, MIN_SIZE);
  t.same(
    summary(b.recovery),
    slots.map((_, i) => ['disk', 1000 + i, i + 1]),
    'every page recovered, in sequence order',
  );
  t.ok(b.recovery.pages.every((p, i) => p.data.equals(pattern(i))), 'with its bytes');
  await b.region.close();
});

t.test('clearAll forgets every page; close(true) removes the file', async (t) => {
  const dir = t.testdir();
  const file = path.join(dir, 'r.pmem');
  const uuid = randomUUID();
  const a = await open(t, file, uuid);
  const r = a.region;
  const id = r.exportId('disk');
  for (let i = 0; i < 5; i++) {
    const slot = r.takeFree();
    put(r, slot, id, i, pattern(i));
    r.slotState[slot] = 1; // the store's SLOT_DIRTY
  }
  t.equal(r.freeCount, 251);
  r.clearAll();
  t.equal(r.freeCount, 256, 'every used slot is free again');
  t.ok([...r.slotState].every((s) => s === 0), 'all slots free');
  await r.close();
  const b = await open(t, file, uuid);
  t.same(b.recovery, { pages: [], torn: 0, superseded: 0 }, 'nothing to recover after clearAll');
  put(b.region, 0, b.region.exportId('disk'), 1, 1);
  await b.region.close(true);
  t.notOk(existsSync(file), 'close(true) deleted the file');
  const c = await open(t, file, uuid);
  t.equal(c.created, true, 'the next open starts a new region');
  t.same(c.recovery, { pages: [], torn: 0, superseded: 0 });
});

t.test('a writeBack that throws leaves the file intact; the next open recovers again', async (t) => {
  const file = path.join(t.testdir(), 'r.pmem');
  const uuid = randomUUID();
  const a = await open(t, file, uuid);
  put(a.region, 0, a.region.exportId('disk'), 3, pattern(3));
  put(a.region, 1, a.region.exportId('disk'), 4, pattern(4));
  await a.region.close();
  const before = readFileSync(file);
  let calls = 0;
  await t.rejects(
    PmemRegion.open({
      file,
      nodeUuid: uuid,
      size: 512 * PS, // a new size too: the file must not be resized before writeBack succeeded
      writeBack: async () => {
        calls++;
        throw Object.assign(new Error('backing disk full'), { code: 'ENOSPC' });
      },
    }),
    { message: 'backing disk full' },
  );
  t.equal(calls, 1);
  t.ok(readFileSync(file).equals(before), 'the file is byte for byte as it was');
  const b = await open(t, file, uuid, 512 * PS);
  t.same(summary(b.recovery), [['disk', 3, 1], ['disk', 4, 2]], 'recovered on the next open (the lock was released)');
  t.ok(b.recovery.pages[1]!.data.equals(pattern(4)));
  t.equal(b.region.pageCount, 512);
});

t.test('the in-memory bookkeeping of a slot follows commit, clearEntry and release', async (t) => {
  const o = await open(t, path.join(t.testdir(), 'r.pmem'), randomUUID());
  const r = o.region;
  const id = r.exportId('disk');
  const slot = r.takeFree();
  const seq = put(r, slot, id, 77, 1);
  t.equal(r.slotExport[slot], id);
  t.equal(r.slotBlock[slot], 77);
  t.equal(r.slotSeq[slot], seq);
  r.slotState[slot] = 2;
  r.release(slot);
  t.equal(r.slotState[slot], 0);
  t.equal(r.slotExport[slot], -1);
  t.equal(r.slotSeq[slot], 0);
  t.equal(r.freeCount, 256);
  t.equal(put(r, r.takeFree(), id, 78, 1), seq + 1, 'sequence numbers keep counting');
});

t.test('close releases the lock at once, while the old mapping is still referenced (not yet unmapped)', async (t) => {
  const file = path.join(t.testdir(), 'r.pmem');
  const uuid = randomUUID();
  const a = await open(t, file, uuid);
  put(a.region, 0, a.region.exportId('disk'), 1, 1);
  const view = a.region.page(0); // keeps the mapping (and with it the open file description) alive
  await a.region.close();
  const b = await open(t, file, uuid); // was LockedError: the mapping still held the flock
  t.same(summary(b.recovery), [['disk', 1, 1]]);
  t.equal(view.length, PS, 'the old mapping is still referenced here (its bytes must not be touched: the file was recreated)');
});
