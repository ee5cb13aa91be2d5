// File-backed BlockDevice: one sparse backing file per export (NAME.img) plus its allocation map (NAME.alloc).
// The image is locked with flock so that two servers never open it. Deallocation (TRIM, WRITE_ZEROES without
// NO_HOLE) clears bits in the allocation map; deallocated blocks read as zeros and report as holes.
//
// Crash-consistency rules for the map (its writes reach the OS page cache before a request is acknowledged,
// and are fsync'ed with the image on flush):
// - a block becomes allocated only after its data is written; a write into a deallocated block first pads
//   the rest of that block with zeros, so stale bytes of a trimmed block can never reappear;
// - a block becomes deallocated by clearing its bit, which is written out before the request is acknowledged.

import { promises as fsp, constants as fsc, read as fsRead, readv as fsReadv, readSync, statfsSync, writeSync, writevSync } from 'node:fs';
import * as path from 'node:path';
import * as fsext from 'fs-ext';
import { AllocMap } from './alloc-map';
import { BlockBitmap } from './block-bitmap';
import { fullCapabilities, type BlockDevice, type Capabilities, type DirectWrite, type Extent, type WriteFlags, type ZeroFlags } from './block-device';
import { remaining } from './iovec';
import { Mutex } from './mutex';
import { LockedError, NotSupportedError, UsageError } from '../errors';
import type { Logger } from '../log';

/** Allocation granularity (bytes): the page size, which is also the preferred block size we advertise. */
export const ALLOC_BLOCK_SIZE = 4096;
/** Zeroing writes go out in pieces of this many bytes (a shared buffer of zeros). */
const ZERO_CHUNK = 1 << 20;
/** preadCb merges adjacent reads into one preadv of at most this many bytes and buffers (see flushReads). */
const MERGE_MAX_BYTES = 4 << 20;
const MERGE_MAX_BUFFERS = 64;
/** CACHE prefetches at most this much per request; beyond that it is only a hint. */
const CACHE_PREFETCH_MAX = 32 << 20;

// NAME.alloc format. Bump ALLOC_VERSION on any layout change.
const ALLOC_MAGIC = Buffer.from('NBDMALOC');
const ALLOC_VERSION = 1;
/** magic(8) version(4) blockSize(4) size(8) reserved(8), then the bitmap. */
const ALLOC_HEADER = 32;

const SEEK_DATA = 3;
const SEEK_HOLE = 4;

export interface BackingFileOptions {
  dir: string;
  name: string;
  size: number;
  readOnly: boolean;
  log: Logger;
}

interface QueuedRead {
  buf: Buffer;
  offset: number;
  done: (err: Error | null) => void;
}

export class BackingFile implements BlockDevice {
  readonly caps: Capabilities;
  private readonly zeros = Buffer.alloc(ZERO_CHUNK);
  /** Serialises writes that allocate blocks (their zero padding must not race with other writes). */
  private readonly allocLock = new Mutex();
  /** Something was written since the last completed sync. */
  private dirty = false;
  private syncing: Promise<void> | null = null;
  private closed = false;
  /** preadCb reads in flight on the image's descriptor: close() waits for them (the number could be reused). */
  private cbReads = 0;
  private cbReadsDrained: (() => void) | null = null;
  /** The image lives in memory (tmpfs, ramfs): reading it never waits for a device (see preadNow). */
  readonly inMemory: boolean;

  private constructor(
    readonly name: string,
    readonly size: number,
    private readonly img: fsp.FileHandle,
    private readonly mapFile: fsp.FileHandle,
    private readonly map: AllocMap,
    /**
     * Deallocated blocks that still hold bytes in the image (trimmed, not holes): a write into one must not
     * mark it allocated before its new bytes are synced (see writeRange). Kept here rather than asked of the
     * file with SEEK_DATA per write: an lseek per fresh write, which throws (ENXIO, with a stack trace) past
     * the last data, was 1–5% of the event loop's samples while a copy filled a fresh export.
     */
    private readonly stale: BlockBitmap,
    readOnly: boolean,
    imgPath: string,
  ) {
    this.caps = fullCapabilities(readOnly);
    this.inMemory = onMemoryFilesystem(imgPath);
    const handle = img;
    this.allocatedWrite = {
      get fd(): number {
        return handle.fd; // read at each use: -1 once closed, never a number reused by another file
      },
      done: this.markDirty,
    };
  }

  /** Open (creating at `size` if absent) and lock NAME.img in dir. */
  static async open(opts: BackingFileOptions): Promise<BackingFile> {
    const imgPath = path.join(opts.dir, `${opts.name}.img`);
    const mapPath = path.join(opts.dir, `${opts.name}.alloc`);
    const img = await fsp.open(imgPath, fsc.O_RDWR | fsc.O_CREAT, 0o600);
    let mapFile: fsp.FileHandle | undefined;
    try {
      lockExclusive(img.fd, imgPath);
      const st = await img.stat();
      let created = false;
      if (st.size === 0) {
        await img.truncate(opts.size);
        created = true;
      } else if (st.size !== opts.size) {
        throw new UsageError(
          `export ${opts.name}: ${imgPath} holds ${st.size} bytes but the export is configured as ${opts.size}; ` +
            'resizing is not supported',
        );
      }
      mapFile = await fsp.open(mapPath, fsc.O_RDWR | fsc.O_CREAT, 0o600);
      const map = await loadOrBuildMap(mapFile, img.fd, opts.size, created, opts.log);
      const stale = findStaleBlocks(map, img.fd);
      opts.log.info({ export: opts.name, path: imgPath, size: opts.size, created, staleBlocks: stale.count }, 'backing file open');
      return new BackingFile(opts.name, opts.size, img, mapFile, map, stale, opts.readOnly, imgPath);
    } catch (err) {
      await mapFile?.close();
      await img.close();
      throw err;
    }
  }

  async pread(buf: Buffer, offset: number): Promise<void> {
    const extents = this.map.extents(offset, buf.length, Number.MAX_SAFE_INTEGER);
    let pos = 0;
    for (const e of extents) {
      if (e.flags === 0) await readFully(this.img, buf, pos, e.length, offset + pos);
      else buf.fill(0, pos, pos + e.length);
      pos += e.length;
    }
  }

  /**
   * pread with a callback (see BlockDevice.preadCb), no promises. Reads of allocated blocks wait for the end
   * of the current tick, where reads of adjacent ranges go to the thread pool as one preadv (see flushReads).
   */
  preadCb(buf: Buffer, offset: number, done: (err: Error | null) => void): void {
    const length = buf.length;
    const first = Math.floor(offset / ALLOC_BLOCK_SIZE);
    const last = Math.floor((offset + length - 1) / ALLOC_BLOCK_SIZE);
    // Once closing, the FileHandle's own read gives the error (the descriptor may be gone).
    if (length === 0 || this.closed || !this.map.allSet(first, last)) {
      this.pread(buf, offset).then(() => done(null), done);
      return;
    }
    this.cbReads++;
    this.queuedReads.push({ buf, offset, done });
    if (this.queuedReads.length === 1) process.nextTick(this.flushReads);
  }

  /** preadCb's reads of this tick, in the order they came. */
  private queuedReads: QueuedRead[] = [];

  /**
   * Issue the tick's reads: each run of reads that follow one another in the file (a sequential reader's
   * requests, which arrive in order: nbdcopy's 256 KiB reads, fio's 1 MiB ones) as one preadv of all
   * their buffers, up to MERGE_MAX_BYTES and MERGE_MAX_BUFFERS. One thread-pool job and one completion
   * instead of one per request: every job costs the event loop a hand-off and a wake-up of a pool thread.
   */
  private readonly flushReads = (): void => {
    const q = this.queuedReads;
    this.queuedReads = [];
    const fd = this.img.fd;
    let i = 0;
    while (i < q.length) {
      const head = q[i]!;
      let end = head.offset + head.buf.length;
      let j = i + 1;
      while (j < q.length && j - i < MERGE_MAX_BUFFERS && q[j]!.offset === end && end - head.offset + q[j]!.buf.length <= MERGE_MAX_BYTES) {
        end += q[j]!.buf.length;
        j++;
      }
      if (j === i + 1) this.readOne(fd, head, 0);
      else this.readRun(fd, q.slice(i, j), end - head.offset);
      i = j;
    }
  };

  /** One queued read from byte `at` of its buffer on, re-issued until done (short reads happen only at EOF). */
  private readOne(fd: number, r: QueuedRead, at: number): void {
    const length = r.buf.length;
    fsRead(fd, r.buf, at, length - at, r.offset + at, (err, n) => {
      if (err !== null) return this.finishRead(r, err);
      if (n === 0) r.buf.fill(0, at); // past EOF, as in readFully
      else if (at + n < length) return this.readOne(fd, r, at + n);
      this.finishRead(r, null);
    });
  }

  /** Adjacent queued reads in one preadv; a failed or short one is retried read by read, for each its own error. */
  private readRun(fd: number, run: QueuedRead[], total: number): void {
    fsReadv(fd, run.map((r) => r.buf), run[0]!.offset, (err, n) => {
      if (err === null && n === total) {
        for (const r of run) this.finishRead(r, null);
        return;
      }
      let pos = err === null ? n : 0;
      for (const r of run) {
        const len = r.buf.length;
        if (pos >= len) this.finishRead(r, null);
        else this.readOne(fd, r, Math.max(pos, 0));
        pos -= len;
      }
    });
  }

  private finishRead(r: QueuedRead, err: Error | null): void {
    if (--this.cbReads === 0 && this.cbReadsDrained !== null) {
      const f = this.cbReadsDrained;
      this.cbReadsDrained = null;
      f();
    }
    r.done(err);
  }

  /**
   * The read, synchronously, when the image is in memory: a pread from tmpfs is a copy in the kernel (about
   * 1–2 µs for 4 KiB), where an async read costs the event loop a thread-pool hand-off (a futex wake of a
   * sleeping worker, an IPI on a VM, and a completion callback: about 16 µs per read in a profile of 4 KiB
   * random reads). An image on a device may have to wait for the device, so it answers false (use pread).
   * Holes read as zeros without I/O.
   */
  preadNow(buf: Buffer, offset: number): boolean {
    if (!this.inMemory) return false;
    const length = buf.length;
    if (length === 0) return true;
    const fd = this.img.fd;
    const first = Math.floor(offset / ALLOC_BLOCK_SIZE);
    const last = Math.floor((offset + length - 1) / ALLOC_BLOCK_SIZE);
    if (this.map.allSet(first, last)) {
      readSyncFully(fd, buf, 0, length, offset); // the common case, one allocated run: no extent list
      return true;
    }
    let pos = 0;
    for (const e of this.map.extents(offset, length, Number.MAX_SAFE_INTEGER)) {
      if (e.flags === 0) readSyncFully(fd, buf, pos, e.length, offset + pos);
      else buf.fill(0, pos, pos + e.length);
      pos += e.length;
    }
    return true;
  }

  async pwrite(buf: Buffer, offset: number, flags: WriteFlags = {}): Promise<void> {
    await this.writeRange(buf, offset);
    if (flags.fua) await this.flush();
  }

  /**
   * Synchronous buffered write (a copy into the page cache): into allocated blocks, or whole blocks over
   * holes of the file; anything else (padding, stale trimmed bytes) is left to the async path.
   */
  pwriteNow(bufs: readonly Buffer[], offset: number): boolean {
    let length = 0;
    for (const b of bufs) length += b.length;
    if (length === 0) return true;
    const dw = this.directWrite(offset, length);
    if (dw === null) return false;
    let done = 0;
    let parts = bufs;
    while (done < length) {
      const n = writevSync(this.img.fd, parts as Buffer[], offset + done);
      done += n;
      if (done < length) parts = remaining(bufs, done);
    }
    dw.done();
    return true;
  }

  /**
   * A write that may be done with a plain pwrite, here or by another thread (see BlockDevice.directWrite):
   * into allocated blocks, or whole blocks over holes of the file. A partial block over a hole needs zero
   * padding, and a trimmed block that still holds old bytes the fdatasync ordering of the async path.
   */
  directWrite(offset: number, length: number): DirectWrite | null {
    const first = Math.floor(offset / ALLOC_BLOCK_SIZE);
    const last = Math.floor((offset + length - 1) / ALLOC_BLOCK_SIZE);
    const end = offset + length;
    // Dirty from now on: even a write that fails half way has changed the file.
    if (this.map.allSet(first, last)) {
      this.dirty = true;
      return this.allocatedWrite;
    }
    if (offset % ALLOC_BLOCK_SIZE !== 0 || (end % ALLOC_BLOCK_SIZE !== 0 && end !== this.size)) return null;
    if (this.holdsStaleBytes(first, last)) return null;
    this.dirty = true;
    return {
      fd: this.img.fd,
      done: () => {
        // After the data, as in writeRange: a block is marked allocated only once its bytes are written.
        this.dirty = true;
        const range = this.allocate(first, last);
        if (range === null) return;
        const bytes = Buffer.from(this.map.bits.buffer, this.map.bits.byteOffset + range.start, range.end - range.start);
        let w = 0;
        while (w < bytes.length) w += writeSync(this.mapFile.fd, bytes, w, bytes.length - w, ALLOC_HEADER + range.start + w);
      },
    };
  }

  /**
   * directWrite's answer for allocated blocks, one object for every call: the writeback keeps one per run
   * until its batch is written, long enough for a fresh object to reach V8's old generation.
   */
  private readonly allocatedWrite: DirectWrite;

  private readonly markDirty = (): void => {
    this.dirty = true;
  };

  async trim(offset: number, length: number, flags: WriteFlags = {}): Promise<void> {
    // Only whole blocks can be deallocated; a trim is advisory, so partial blocks are left alone.
    const first = Math.ceil(offset / ALLOC_BLOCK_SIZE);
    const endBlock = this.wholeBlockEnd(offset + length);
    if (endBlock > first) await this.deallocate(first, endBlock - 1);
    if (flags.fua) await this.flush();
  }

  async zero(offset: number, length: number, flags: ZeroFlags = {}): Promise<void> {
    if (!flags.mayTrim) {
      // NO_HOLE: the zeros must be written as data, which is never fast.
      if (flags.fastZero) throw new NotSupportedError('zeroing without deallocation is not fast');
      await this.writeZeros(offset, length);
    } else {
      const first = Math.ceil(offset / ALLOC_BLOCK_SIZE);
      const endBlock = this.wholeBlockEnd(offset + length);
      if (endBlock > first) {
        await this.deallocate(first, endBlock - 1);
        await this.zeroPartial(offset, first * ALLOC_BLOCK_SIZE - offset);
        const tail = endBlock * ALLOC_BLOCK_SIZE;
        await this.zeroPartial(tail, offset + length - tail);
      } else {
        await this.zeroPartial(offset, length);
      }
    }
    if (flags.fua) await this.flush();
  }

  async cache(offset: number, length: number): Promise<void> {
    // Pull the start of the range into the OS page cache; past CACHE_PREFETCH_MAX the hint is ignored.
    const n = Math.min(length, CACHE_PREFETCH_MAX);
    const scratch = Buffer.allocUnsafe(Math.min(n, ZERO_CHUNK));
    for (let pos = 0; pos < n; pos += scratch.length) {
      await this.pread(scratch.subarray(0, Math.min(scratch.length, n - pos)), offset + pos);
    }
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    return this.map.extents(offset, length);
  }

  extentsNow(offset: number, length: number): Extent[] {
    return this.map.extents(offset, length);
  }

  /** fdatasync the image and the map. Waits for a sync already under way when nothing new was written. */
  async flush(): Promise<void> {
    while (this.dirty || this.syncing) {
      if (this.syncing) {
        await this.syncing;
        continue;
      }
      this.dirty = false;
      this.syncing = Promise.all([this.img.datasync(), this.mapFile.datasync()]).then(() => undefined);
      try {
        await this.syncing;
      } catch (err) {
        this.dirty = true;
        throw err;
      } finally {
        this.syncing = null;
      }
      return;
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      await this.flush();
    } finally {
      if (this.cbReads > 0) await new Promise<void>((r) => (this.cbReadsDrained = r));
      await this.mapFile.close();
      await this.img.close(); // closing the fd releases the flock
    }
  }

  // -------------------------------------------------------------------------------------------------------

  /** One past the last whole block ending at or before end (the export's tail block counts as whole). */
  private wholeBlockEnd(end: number): number {
    return end >= this.size ? this.map.blocks : Math.floor(end / ALLOC_BLOCK_SIZE);
  }

  /** Zero a range inside one or two edge blocks; a deallocated block already reads as zeros. */
  private async zeroPartial(offset: number, length: number): Promise<void> {
    if (length <= 0) return;
    const first = Math.floor(offset / ALLOC_BLOCK_SIZE);
    const last = Math.floor((offset + length - 1) / ALLOC_BLOCK_SIZE);
    for (let b = first; b <= last; b++) {
      if (!this.map.get(b)) continue;
      const start = Math.max(offset, b * ALLOC_BLOCK_SIZE);
      const end = Math.min(offset + length, (b + 1) * ALLOC_BLOCK_SIZE);
      await this.writeRange(this.zeros.subarray(0, end - start), start);
    }
  }

  private async writeZeros(offset: number, length: number): Promise<void> {
    for (let pos = 0; pos < length; pos += ZERO_CHUNK) {
      const n = Math.min(ZERO_CHUNK, length - pos);
      await this.writeRange(this.zeros.subarray(0, n), offset + pos);
    }
  }

  private async writeRange(buf: Buffer, offset: number): Promise<void> {
    if (buf.length === 0) return;
    const first = Math.floor(offset / ALLOC_BLOCK_SIZE);
    const last = Math.floor((offset + buf.length - 1) / ALLOC_BLOCK_SIZE);
    this.dirty = true;
    if (this.map.allSet(first, last)) {
      await writeFully(this.img, buf, offset);
      this.dirty = true;
      return;
    }
    await this.allocLock.run(async () => {
      // Re-check under the lock: another write may have allocated these blocks meanwhile.
      let start = offset;
      let end = offset + buf.length;
      if (!this.map.get(first)) start = first * ALLOC_BLOCK_SIZE;
      if (!this.map.get(last)) end = Math.min((last + 1) * ALLOC_BLOCK_SIZE, this.size);
      // Decided before our data lands: afterwards every block in the range holds data.
      const stale = this.holdsStaleBytes(first, last);
      if (start === offset && end === offset + buf.length) {
        await writeFully(this.img, buf, offset);
      } else {
        // Pad the deallocated edge blocks with zeros so no stale bytes of a trimmed block survive.
        const padded = Buffer.alloc(end - start);
        buf.copy(padded, offset - start);
        await writeFully(this.img, padded, start);
      }
      this.dirty = true;
      // A deallocated block that still holds old bytes must not be marked allocated on disk before its new
      // contents are: after a power loss the old bytes would reappear where zeros were flushed. Blocks that
      // are holes in the file read as zeros either way and need no such ordering.
      if (stale) await this.img.datasync();
      await this.persistMap(this.allocate(first, last));
    });
  }

  /** True if some deallocated block in [first, last] still has bytes in the image (it was trimmed, not a hole). */
  private holdsStaleBytes(first: number, last: number): boolean {
    if (this.stale.count === 0) return false;
    const b = this.stale.nextSet(first);
    return b >= 0 && b <= last;
  }

  /** Mark [first, last] allocated (their bytes are written); returns the map bytes to persist. */
  private allocate(first: number, last: number): { start: number; end: number } | null {
    if (this.stale.count !== 0) this.stale.clearRange(first, last + 1);
    return this.map.setRange(first, last, true);
  }

  private async deallocate(first: number, last: number): Promise<void> {
    this.dirty = true;
    // The allocated blocks among them keep their bytes in the image (there is no hole punching).
    markRuns(this.map, first, last, true, this.stale);
    await this.persistMap(this.map.setRange(first, last, false));
  }

  private async persistMap(range: { start: number; end: number } | null): Promise<void> {
    if (range === null) return;
    // The live bitmap is written as it is when the syscall runs, which includes this change.
    await writeFully(this.mapFile, Buffer.from(this.map.bits.buffer, this.map.bits.byteOffset + range.start, range.end - range.start), ALLOC_HEADER + range.start);
    this.dirty = true;
  }
}

function lockExclusive(fd: number, what: string): void {
  try {
    fsext.flockSync(fd, 'exnb');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EAGAIN' || code === 'EWOULDBLOCK') {
      throw new LockedError(`${what} is locked by another process (is another nbdmirror-server using this data dir?)`);
    }
    throw err;
  }
}

/** Lock a data directory for this process: DIR/.lock, held until the process exits. */
export async function lockDataDir(dir: string): Promise<fsp.FileHandle> {
  await fsp.mkdir(dir, { recursive: true });
  const lockPath = path.join(dir, '.lock');
  const fh = await fsp.open(lockPath, fsc.O_RDWR | fsc.O_CREAT, 0o600);
  try {
    lockExclusive(fh.fd, `data dir ${dir}`);
  } catch (err) {
    await fh.close();
    throw err;
  }
  await fh.truncate(0);
  await fh.write(`${process.pid}\n`, 0);
  return fh;
}

/** Refuse an export that cannot fit on its filesystem at all; warn when free space is short of its size. */
export function checkCapacity(dir: string, size: number, name: string, log: Logger): void {
  const st = fsext.statVFS(dir) as { f_frsize: number; f_bsize: number; f_blocks: number; f_bavail: number };
  const unit = st.f_frsize || st.f_bsize;
  const total = st.f_blocks * unit;
  const avail = st.f_bavail * unit;
  if (size > total) {
    throw new UsageError(`export ${name}: ${size} bytes cannot fit on the filesystem of ${dir} (${total} bytes)`);
  }
  if (size > avail) log.warn({ export: name, size, available: avail }, 'export is larger than the free space in the data dir');
}

async function readFully(fh: fsp.FileHandle, buf: Buffer, off: number, len: number, pos: number): Promise<void> {
  while (len > 0) {
    const { bytesRead } = await fh.read(buf, off, len, pos);
    if (bytesRead === 0) {
      // Past EOF of a sparse file reads as zeros (cannot happen while the file keeps its size).
      buf.fill(0, off, off + len);
      return;
    }
    off += bytesRead;
    pos += bytesRead;
    len -= bytesRead;
  }
}

/** statfs(2) f_type of tmpfs and ramfs: filesystems whose files live in memory. */
const MEMORY_FS_TYPES = new Set([0x01021994, 0x858458f6]);

function onMemoryFilesystem(file: string): boolean {
  try {
    return MEMORY_FS_TYPES.has(statfsSync(file).type);
  } catch {
    return false;
  }
}

function readSyncFully(fd: number, buf: Buffer, off: number, len: number, pos: number): void {
  while (len > 0) {
    const n = readSync(fd, buf, off, len, pos);
    if (n === 0) {
      buf.fill(0, off, off + len); // past EOF, as in readFully
      return;
    }
    off += n;
    pos += n;
    len -= n;
  }
}

async function writeFully(fh: fsp.FileHandle, buf: Buffer, pos: number): Promise<void> {
  let off = 0;
  while (off < buf.length) {
    const { bytesWritten } = await fh.write(buf, off, buf.length - off, pos + off);
    off += bytesWritten;
  }
}

async function loadOrBuildMap(fh: fsp.FileHandle, imgFd: number, size: number, created: boolean, log: Logger): Promise<AllocMap> {
  const map = new AllocMap(size, ALLOC_BLOCK_SIZE);
  const expectLen = ALLOC_HEADER + map.bits.length;
  const st = await fh.stat();
  if (!created && st.size === expectLen) {
    const header = Buffer.alloc(ALLOC_HEADER);
    await fh.read(header, 0, ALLOC_HEADER, 0);
    if (
      header.subarray(0, 8).equals(ALLOC_MAGIC) &&
      header.readUInt32BE(8) === ALLOC_VERSION &&
      header.readUInt32BE(12) === ALLOC_BLOCK_SIZE &&
      Number(header.readBigUInt64BE(16)) === size
    ) {
      await fh.read(map.bits, 0, map.bits.length, ALLOC_HEADER);
      return map;
    }
  }
  if (!created) log.warn({ size }, 'allocation map missing or invalid: rebuilding it from the backing file');
  // Rebuild from the file's own holes (SEEK_DATA/SEEK_HOLE); what the file holds as data stays data.
  let pos = 0;
  while (pos < size) {
    let data: number;
    try {
      data = fsext.seekSync(imgFd, pos, SEEK_DATA);
    } catch {
      break; // ENXIO: no data past pos
    }
    if (data >= size) break;
    const hole = Math.min(fsext.seekSync(imgFd, data, SEEK_HOLE), size);
    map.setRange(Math.floor(data / ALLOC_BLOCK_SIZE), Math.floor((hole - 1) / ALLOC_BLOCK_SIZE), true);
    pos = hole;
  }
  const header = Buffer.alloc(ALLOC_HEADER);
  ALLOC_MAGIC.copy(header, 0);
  header.writeUInt32BE(ALLOC_VERSION, 8);
  header.writeUInt32BE(ALLOC_BLOCK_SIZE, 12);
  header.writeBigUInt64BE(BigInt(size), 16);
  await fh.truncate(0);
  await writeFully(fh, header, 0);
  await writeFully(fh, Buffer.from(map.bits.buffer, map.bits.byteOffset, map.bits.length), ALLOC_HEADER);
  await fh.datasync();
  return map;
}

/** Set in `out` the blocks of [first, last] whose bit in `map` is `allocated` (whole bitmap bytes skipped). */
function markRuns(map: AllocMap, first: number, last: number, allocated: boolean, out: BlockBitmap): void {
  const skip = allocated ? 0 : 0xff;
  for (let b = first; b <= last; ) {
    if ((b & 7) === 0 && b + 7 <= last && map.bits[b >>> 3] === skip) {
      b += 8;
      continue;
    }
    if (map.get(b) !== allocated) {
      b++;
      continue;
    }
    let end = b + 1;
    while (end <= last && map.get(end) === allocated) end++;
    out.setRange(b, end);
    b = end;
  }
}

/**
 * The deallocated blocks of an image that still hold bytes: those the map calls deallocated inside the image's
 * data (SEEK_DATA/SEEK_HOLE). Where the filesystem cannot tell, every byte counts as data.
 */
function findStaleBlocks(map: AllocMap, imgFd: number): BlockBitmap {
  const stale = new BlockBitmap(map.blocks);
  let pos = 0;
  while (pos < map.size) {
    let data: number;
    let hole: number;
    try {
      data = fsext.seekSync(imgFd, pos, SEEK_DATA);
      hole = Math.min(fsext.seekSync(imgFd, data, SEEK_HOLE), map.size);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENXIO') markRuns(map, Math.floor(pos / ALLOC_BLOCK_SIZE), map.blocks - 1, false, stale);
      break; // ENXIO: no data past pos
    }
    if (data >= map.size) break;
    markRuns(map, Math.floor(data / ALLOC_BLOCK_SIZE), Math.floor((hole - 1) / ALLOC_BLOCK_SIZE), false, stale);
    pos = hole;
  }
  return stale;
}
