// The simulated persistent-memory region: one file per node (under /dev/shm by default) mapped into the
// process with mmap, so a write is a memcpy that survives a process crash the moment it returns.
//
// File layout (version 1; bump REGION_VERSION on any change):
//   [0, 16 KiB)        header: magic "NBDMPMEM", version, page size, page count, node uuid, export table
//   [16 KiB, T)        page table: one 32-byte entry per slot (T rounded up to 4 KiB)
//   [T, T + N×4 KiB)   the pages
// Entry: seq (u64 as hi/lo, 0 = free) | export id u32 | block (u64 as hi/lo) | crc32 u32 | 8 bytes reserved.
// crc32 covers the entry fields and the page, so a page torn by a crash mid-copy (or an entry half
// written) fails its check and is ignored at recovery: it was never acknowledged.
//
// This module owns the bytes and the per-slot bookkeeping; pmem-layer.ts decides what goes where.

import { promises as fsp, constants as fsc, existsSync } from 'node:fs';
import * as path from 'node:path';
import { crc32 } from '@node-rs/crc32';
import * as fsext from 'fs-ext';
import mmap from '@riaskov/mmap-io';
import { crc32Short } from './crc32-short';
import { mapPages, PageViews, type RegionGeometry } from './region-map';
import { CorruptStateError, LockedError, UsageError } from '../errors';

export const PAGE_SIZE = 4096;
const MAGIC = Buffer.from('NBDMPMEM');
const REGION_VERSION = 1;
const HEADER_SIZE = 16 * 1024;
const ENTRY_SIZE = 32;
const EXPORT_TABLE_OFFSET = 64;
const EXPORT_ENTRY_SIZE = 80; // u16 name length + up to 78 bytes of name
/** Exports one region can serve (the header's export table). */
export const MAX_REGION_EXPORTS = Math.floor((HEADER_SIZE - EXPORT_TABLE_OFFSET) / EXPORT_ENTRY_SIZE);
/** Smallest region we accept: room for a few maximum-size (32 MiB) writes to stream through. */
export const MIN_REGION_PAGES = 256;
/**
 * Largest region: its file must stay below 2 GiB, because mmap-io takes mapping offsets and lengths as
 * 32-bit ints (it fails with EOVERFLOW/ENOMEM past them).
 */
export const MAX_REGION_PAGES = maxPages(2 ** 31 - PAGE_SIZE);

export const SLOT_FREE = 0;
export const SLOT_DIRTY = 1;
export const SLOT_CLEAN = 2;

export interface RecoveredPage {
  exportName: string;
  block: number;
  seq: number;
  data: Buffer;
}

export interface RecoveryReport {
  pages: RecoveredPage[];
  /** Entries whose checksum failed (torn by a crash): ignored. */
  torn: number;
  /** Older versions of a block superseded by a newer entry: ignored. */
  superseded: number;
}

/** The most pages whose region file fits in fileBytes. */
function maxPages(fileBytes: number): number {
  let p = Math.floor((fileBytes - HEADER_SIZE) / (PAGE_SIZE + ENTRY_SIZE));
  while (layout(p).fileSize > fileBytes) p--;
  return p;
}

function layout(pageCount: number): { tableOffset: number; pagesOffset: number; fileSize: number } {
  const tableBytes = Math.ceil((pageCount * ENTRY_SIZE) / PAGE_SIZE) * PAGE_SIZE;
  const pagesOffset = HEADER_SIZE + tableBytes;
  return { tableOffset: HEADER_SIZE, pagesOffset, fileSize: pagesOffset + pageCount * PAGE_SIZE };
}

export class PmemRegion {
  readonly pageCount: number;
  /** Header and page table (the pages are mapped separately, in chunks: see region-map.ts). */
  private readonly map: Buffer;
  private readonly table: Buffer;
  private readonly views: PageViews;
  readonly geometry: RegionGeometry;
  private readonly exportIds = new Map<string, number>();
  private readonly exportNames: string[] = [];

  // Per-slot bookkeeping (in memory only; rebuilt from the table at open).
  readonly slotState: Uint8Array;
  readonly slotExport: Int32Array;
  readonly slotBlock: Float64Array;
  readonly slotSeq: Float64Array;
  /** When the slot became dirty (ms since epoch), for the writeback age limit. */
  readonly slotDirtySince: Float64Array;
  /** Writebacks reading this slot right now; a pinned slot is never reused. */
  readonly slotPins: Uint16Array;
  private nextSeq = 1;

  private constructor(
    readonly file: string,
    private readonly fh: fsp.FileHandle,
    map: Buffer,
    pageChunks: Buffer[],
    pageCount: number,
  ) {
    this.map = map;
    this.pageCount = pageCount;
    const l = layout(pageCount);
    this.geometry = { pagesOffset: l.pagesOffset, pageCount };
    this.table = map.subarray(l.tableOffset, l.tableOffset + pageCount * ENTRY_SIZE);
    this.views = new PageViews(pageChunks);
    this.slotState = new Uint8Array(pageCount);
    this.slotExport = new Int32Array(pageCount).fill(-1);
    this.slotBlock = new Float64Array(pageCount);
    this.slotSeq = new Float64Array(pageCount);
    this.slotDirtySince = new Float64Array(pageCount);
    this.slotPins = new Uint16Array(pageCount);
  }

  /** The region file for a node: DIR/nbdmirror-UUID.pmem. */
  static fileFor(dir: string, nodeUuid: string): string {
    return path.join(dir, `nbdmirror-${nodeUuid}.pmem`);
  }

  /**
   * Open (or create) and lock the region file and scan it. Every valid page it holds (the newest version
   * of each block, in sequence order) is handed to writeBack, which must make them durable in the backing
   * files; only then is the region emptied and recreated at the configured size, so a crash during
   * recovery simply recovers again. A region file with a damaged header is refused with a UsageError
   * that says what to do.
   */
  static async open(opts: {
    file: string;
    nodeUuid: string;
    size: number;
    writeBack: (report: RecoveryReport) => Promise<void>;
  }): Promise<{ region: PmemRegion; recovery: RecoveryReport; created: boolean }> {
    const pageCount = Math.floor(opts.size / PAGE_SIZE);
    if (pageCount < MIN_REGION_PAGES) {
      throw new UsageError(`--pmem-size ${opts.size} is too small: at least ${MIN_REGION_PAGES * PAGE_SIZE} bytes`);
    }
    if (pageCount > MAX_REGION_PAGES) {
      throw new UsageError(`--pmem-size ${opts.size} is too large: at most ${MAX_REGION_PAGES * PAGE_SIZE} bytes (the region file must stay below 2 GiB)`);
    }
    await fsp.mkdir(path.dirname(opts.file), { recursive: true });
    const existed = existsSync(opts.file);
    const fh = await fsp.open(opts.file, fsc.O_RDWR | fsc.O_CREAT, 0o600);
    /** Set once the old contents are written back: from then on the file holds nothing anyone needs. */
    let emptied = false;
    try {
      try {
        fsext.flockSync(fh.fd, 'exnb');
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === 'EAGAIN' || code === 'EWOULDBLOCK') throw new LockedError(`pmem region ${opts.file} is in use by another process`);
        throw err;
      }
      let recovery: RecoveryReport = { pages: [], torn: 0, superseded: 0 };
      const st = await fh.stat();
      if (existed && st.size > 0) {
        recovery = await PmemRegion.scanExisting(fh, opts.file, opts.nodeUuid, st.size);
      }
      await opts.writeBack(recovery);
      // Recovered pages are copies (not views), so the file can be recreated at the configured size.
      await fh.truncate(0);
      emptied = true;
      const l = layout(pageCount);
      await fh.truncate(l.fileSize);
      await preallocate(fh, l.fileSize, opts.file);
      const map = mmap.map(l.pagesOffset, 3 /* PROT_READ | PROT_WRITE */, mmap.MAP_SHARED, fh.fd, 0);
      const region = new PmemRegion(opts.file, fh, map, mapPages(fh.fd, { pagesOffset: l.pagesOffset, pageCount }, true), pageCount);
      region.writeHeader(opts.nodeUuid);
      region.freeList = Array.from({ length: pageCount }, (_, i) => pageCount - 1 - i);
      return { region, recovery, created: !existed };
    } catch (err) {
      // A region that failed to come up after its old contents were written back must not be left without
      // a header: the next start would refuse it as damaged. Empty, it simply starts afresh.
      if (emptied) await fh.truncate(0).catch(() => undefined);
      await unlockAndClose(fh);
      throw err;
    }
  }

  /** Read an existing region file (any geometry) and collect its valid pages. */
  private static async scanExisting(fh: fsp.FileHandle, file: string, nodeUuid: string, fileSize: number): Promise<RecoveryReport> {
    const hint = `move ${file} away to start with an empty region (writes not yet flushed to the backing files would be lost)`;
    if (fileSize < HEADER_SIZE) throw new CorruptStateError(`pmem region ${file} is truncated (${fileSize} bytes): ${hint}`);
    const header = Buffer.alloc(HEADER_SIZE);
    await fh.read(header, 0, HEADER_SIZE, 0);
    if (!header.subarray(0, 8).equals(MAGIC)) throw new CorruptStateError(`pmem region ${file} has no valid header (bad magic): ${hint}`);
    const version = header.readUInt32BE(8);
    if (version !== REGION_VERSION) throw new CorruptStateError(`pmem region ${file} has layout version ${version}, this server reads ${REGION_VERSION}: ${hint}`);
    const pageSize = header.readUInt32BE(12);
    const pageCount = header.readUInt32BE(16);
    const uuid = header.subarray(24, 40).toString('hex');
    if (pageSize !== PAGE_SIZE || pageCount === 0) throw new CorruptStateError(`pmem region ${file} has an invalid geometry: ${hint}`);
    if (uuid !== nodeUuid.replace(/-/g, '')) throw new CorruptStateError(`pmem region ${file} belongs to another node (${uuid}): ${hint}`);
    const l = layout(pageCount);
    if (fileSize < l.fileSize) throw new CorruptStateError(`pmem region ${file} is truncated (${fileSize} of ${l.fileSize} bytes): ${hint}`);
    const names = readExportTable(header);
    const map = mmap.map(l.pagesOffset, mmap.PROT_READ, mmap.MAP_SHARED, fh.fd, 0);
    const table = map.subarray(l.tableOffset, l.tableOffset + pageCount * ENTRY_SIZE);
    const views = new PageViews(mapPages(fh.fd, { pagesOffset: l.pagesOffset, pageCount }, false));
    const newest = new Map<string, { seq: number; slot: number; exportName: string; block: number }>();
    let torn = 0;
    let superseded = 0;
    for (let slot = 0; slot < pageCount; slot++) {
      const e = slot * ENTRY_SIZE;
      const seq = table.readUInt32BE(e) * 0x1_0000_0000 + table.readUInt32BE(e + 4);
      if (seq === 0) continue;
      const exportId = table.readUInt32BE(e + 8);
      const block = table.readUInt32BE(e + 12) * 0x1_0000_0000 + table.readUInt32BE(e + 16);
      const page = views.page(slot);
      const exportName = names[exportId];
      if (table.readUInt32BE(e + 20) !== pageCrc(table, e, page) || exportName === undefined) {
        torn++;
        continue;
      }
      const key = `${exportId}:${block}`;
      const prev = newest.get(key);
      if (prev === undefined || prev.seq < seq) {
        if (prev !== undefined) superseded++;
        newest.set(key, { seq, slot, exportName, block });
      } else {
        superseded++;
      }
    }
    const pages = [...newest.values()]
      .sort((a, b) => a.seq - b.seq)
      .map((p) => ({
        exportName: p.exportName,
        block: p.block,
        seq: p.seq,
        data: Buffer.from(views.page(p.slot)),
      }));
    return { pages, torn, superseded };
  }

  private freeList: number[] = [];

  private writeHeader(nodeUuid: string): void {
    const h = this.map.subarray(0, HEADER_SIZE);
    h.fill(0);
    MAGIC.copy(h, 0);
    h.writeUInt32BE(REGION_VERSION, 8);
    h.writeUInt32BE(PAGE_SIZE, 12);
    h.writeUInt32BE(this.pageCount, 16);
    Buffer.from(nodeUuid.replace(/-/g, ''), 'hex').copy(h, 24);
  }

  /** The id under which an export's pages are recorded (registered in the header on first use). */
  exportId(name: string): number {
    let id = this.exportIds.get(name);
    if (id !== undefined) return id;
    id = this.exportNames.length;
    if (id >= MAX_REGION_EXPORTS) throw new UsageError(`a node serves at most ${MAX_REGION_EXPORTS} exports`);
    const body = Buffer.from(name, 'utf8');
    const off = EXPORT_TABLE_OFFSET + id * EXPORT_ENTRY_SIZE;
    body.copy(this.map, off + 2);
    this.map.writeUInt16BE(body.length, off);
    this.exportIds.set(name, id);
    this.exportNames.push(name);
    return id;
  }

  /** The page of a slot, as a view into the mapping. */
  page(slot: number): Buffer {
    return this.views.page(slot);
  }

  get freeCount(): number {
    return this.freeList.length;
  }

  /** Take a free slot, or -1 when none is free. */
  takeFree(): number {
    return this.freeList.pop() ?? -1;
  }

  /**
   * Record in the page table that slot holds (exportId, block) at a new sequence number. Call after the
   * page bytes are in place: the entry (with its checksum) is what makes the page count at recovery.
   */
  commit(slot: number, exportId: number, block: number): number {
    const seq = this.nextSeq++;
    const e = slot * ENTRY_SIZE;
    const t = this.table;
    t.writeUInt32BE(Math.floor(seq / 0x1_0000_0000), e);
    t.writeUInt32BE(seq >>> 0, e + 4);
    t.writeUInt32BE(exportId, e + 8);
    t.writeUInt32BE(Math.floor(block / 0x1_0000_0000), e + 12);
    t.writeUInt32BE(block >>> 0, e + 16);
    t.writeUInt32BE(pageCrc(t, e, this.page(slot)), e + 20);
    this.slotExport[slot] = exportId;
    this.slotBlock[slot] = block;
    this.slotSeq[slot] = seq;
    return seq;
  }

  /** Forget a slot's contents (page table entry cleared) and return it to the free list. */
  release(slot: number): void {
    this.clearEntry(slot);
    this.freeList.push(slot);
  }

  /** Clear a slot's page table entry (recovery will ignore it) without freeing the slot. */
  clearEntry(slot: number): void {
    this.table.fill(0, slot * ENTRY_SIZE, slot * ENTRY_SIZE + 8);
    this.slotState[slot] = SLOT_FREE;
    this.slotExport[slot] = -1;
    this.slotSeq[slot] = 0;
  }

  /** Make region writes durable on a real PMEM/DAX mapping (msync; nearly free on tmpfs). */
  sync(): void {
    for (const c of this.views.chunks) mmap.sync(c, 0, c.length, true, false);
    mmap.sync(this.map, 0, this.map.length, true, false);
  }

  /** Forget every page (after a clean stop wrote them all back): the next start has nothing to recover. */
  clearAll(): void {
    this.table.fill(0);
    for (let slot = 0; slot < this.pageCount; slot++) {
      if (this.slotState[slot] !== SLOT_FREE) this.release(slot);
    }
  }

  /** Close; with remove, also delete the file (a clean stop: nothing in it is needed any more). */
  async close(remove = false): Promise<void> {
    if (remove) await fsp.rm(this.file, { force: true });
    await unlockAndClose(this.fh);
  }
}

/**
 * Release the flock explicitly, then close. A mapping of the file holds a reference to the open file
 * description, and mmap-io only unmaps when the Buffer is garbage-collected, so closing the fd alone would
 * leave the region locked (a reopen in the same process got LockedError) until some later GC.
 */
async function unlockAndClose(fh: fsp.FileHandle): Promise<void> {
  try {
    fsext.flockSync(fh.fd, 'un');
  } catch {
    // Not locked (the open failed at the lock) or already closed: nothing to release.
  }
  await fh.close();
}

/**
 * Write the whole file once. A store into a mapped page that the filesystem cannot back (tmpfs full) kills
 * the process with SIGBUS, so every page is allocated now, where a full filesystem is a clear error.
 */
async function preallocate(fh: fsp.FileHandle, size: number, file: string): Promise<void> {
  const chunk = Buffer.alloc(1 << 20);
  try {
    for (let pos = 0; pos < size; pos += chunk.length) {
      const n = Math.min(chunk.length, size - pos);
      let done = 0;
      while (done < n) done += (await fh.write(chunk, done, n - done, pos + done)).bytesWritten;
    }
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOSPC' || code === 'EDQUOT') {
      await fh.truncate(0);
      throw new UsageError(`not enough space for the pmem region ${file} (${size} bytes): lower --pmem-size or choose another --pmem-dir`);
    }
    throw err;
  }
}

/** The crc32 of an entry's first 20 bytes followed by its page (one native call: the entry's bytes are few). */
function pageCrc(table: Buffer, e: number, page: Buffer): number {
  return crc32(page, crc32Short(table, e, e + 20));
}

function readExportTable(header: Buffer): string[] {
  const names: string[] = [];
  for (let id = 0; id < MAX_REGION_EXPORTS; id++) {
    const off = EXPORT_TABLE_OFFSET + id * EXPORT_ENTRY_SIZE;
    const len = header.readUInt16BE(off);
    if (len === 0 || len > EXPORT_ENTRY_SIZE - 2) break;
    names.push(header.toString('utf8', off + 2, off + 2 + len));
  }
  return names;
}
