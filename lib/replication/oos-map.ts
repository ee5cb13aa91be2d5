// Out-of-sync bitmap of one export (NAME.oos), as in DRBD: one bit per 4 KiB block, set = the peer may hold
// different bytes in that block, so resync must copy it. It must never under-report: bits are set in memory
// before a write the peer may miss (mark), cleared only for blocks known to be in sync (clear), and persisted
// by the caller where durability matters (persist, e.g. before the activity log lets an extent go cold).
//
// The in-memory truth is a BlockBitmap. The file holds the same words, so persist() writes only the 4 KiB
// pages of the bit array that changed since they were last written (a small dirty-page bitmap), then
// fdatasyncs. Concurrent persist() calls coalesce: a call made while one runs waits for the next one, which
// starts after the running one ends and covers every change made until it starts.
//
// File format (version 1), NAME.oos:
//   [0, 4096)  header, integers big-endian like NAME.alloc: magic "NBDMOOSB"(8), version u32 @8,
//              block size u32 @12, export size u64 @16, bits offset u32 @24 (= 4096), crc32 of [0, 28) u32
//              @28, zeros to 4096
//   [4096, …)  ceil(blocks/32) little-endian u32 words, bit b%32 of word b/32 = block b (BlockBitmap.words);
//              bits past the last block are zero. The file is exactly 4096 + 4*ceil(blocks/32) bytes.
// A new file is written as NAME.oos.tmp and renamed into place, so a crash never leaves a half-made file.

import { promises as fsp, constants as fsc } from 'node:fs';
import * as path from 'node:path';
import { crc32 } from '@node-rs/crc32';
import { BlockBitmap } from '../storage/block-bitmap';
import { CorruptStateError, IoError, ShutdownError } from '../errors';
import { ioError, readCheckedHeader, readFully, syncDir, writeFully } from '../storage/file-io';

export const OOS_BLOCK_SIZE = 4096;

const OOS_MAGIC = Buffer.from('NBDMOOSB');
const OOS_VERSION = 1;
/** Header bytes; the bit array starts page aligned after it. */
const HEADER_SIZE = 4096;
/** Unit of dirty tracking and of the writes persist() makes: 4 KiB of the bit array. */
const PAGE_SIZE = 4096;
const BLOCKS_PER_PAGE = PAGE_SIZE * 8;
/** BlockBitmap indexes bits with 32-bit int arithmetic. */
const MAX_BLOCKS = 2 ** 31 - 32;
const LITTLE_ENDIAN = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

export interface OosMapOptions {
  dir: string;
  name: string;
  /** Export size in bytes. */
  size: number;
}

export class OosMap {
  readonly blocks: number;
  readonly bits: BlockBitmap;
  /** One bit per PAGE_SIZE of the bit array: changed since it was last written. */
  private readonly dirty: BlockBitmap;
  /** The bit array as bytes (a view of bits.words). */
  private readonly bytesView: Buffer;
  private running: Promise<void> | null = null;
  private queued: Promise<void> | null = null;
  private closed = false;
  private closing: Promise<void> | null = null;

  private constructor(
    readonly file: string,
    readonly size: number,
    bits: BlockBitmap,
    private readonly fh: fsp.FileHandle,
  ) {
    this.blocks = bits.size;
    this.bits = bits;
    this.bytesView = Buffer.from(bits.words.buffer, bits.words.byteOffset, bits.words.byteLength);
    this.dirty = new BlockBitmap(Math.ceil(this.bytesView.length / PAGE_SIZE));
  }

  /**
   * Open DIR/NAME.oos, creating it (all clear) when absent; `created` says it was absent. A file whose header
   * does not match (magic, version, block size, export size) or whose length is wrong → CorruptStateError.
   */
  static async open(opts: OosMapOptions): Promise<{ map: OosMap; created: boolean }> {
    const { size } = opts;
    if (!Number.isSafeInteger(size) || size < 0) throw new RangeError(`out-of-sync map: bad export size ${size}`);
    const blocks = Math.ceil(size / OOS_BLOCK_SIZE);
    if (blocks > MAX_BLOCKS) throw new RangeError(`out-of-sync map: export of ${size} bytes is too large`);
    if (!LITTLE_ENDIAN) throw new Error('out-of-sync map: big-endian hosts are not supported');
    const file = path.join(opts.dir, `${opts.name}.oos`);
    const bits = new BlockBitmap(blocks);
    const fileLength = HEADER_SIZE + bits.words.byteLength;

    let created = false;
    let fh = await openExisting(file);
    if (fh === null) {
      await createFile(opts.dir, file, encodeHeader(size), fileLength);
      created = true;
      fh = await openExisting(file);
      if (fh === null) throw new IoError(`${file}: vanished right after it was created`);
    }
    try {
      if (!created) await load(fh, file, size, bits, fileLength);
    } catch (err) {
      await fh.close().catch(() => undefined);
      throw err;
    }
    return { map: new OosMap(file, size, bits, fh), created };
  }

  /** Number of set bits (blocks out of sync). */
  get count(): number {
    return this.bits.count;
  }

  /** Bytes out of sync: a partial last block counts by its real length. */
  get bytes(): number {
    let n = this.bits.count * OOS_BLOCK_SIZE;
    const tail = this.size % OOS_BLOCK_SIZE;
    if (tail !== 0 && this.bits.get(this.blocks - 1)) n -= OOS_BLOCK_SIZE - tail;
    return n;
  }

  /** Set the bits of every block touching [offset, offset+length). In memory only: cheap, called per write. */
  mark(offset: number, length: number): void {
    this.checkRange(offset, length);
    if (length === 0) return;
    this.setBlocks(Math.floor(offset / OOS_BLOCK_SIZE), Math.floor((offset + length - 1) / OOS_BLOCK_SIZE) + 1, true);
  }

  /** Clear the bits of every block fully or partly inside the range: the caller knows those blocks are in sync. */
  clear(offset: number, length: number): void {
    this.checkRange(offset, length);
    if (length === 0) return;
    this.setBlocks(Math.floor(offset / OOS_BLOCK_SIZE), Math.floor((offset + length - 1) / OOS_BLOCK_SIZE) + 1, false);
  }

  markAll(): void {
    this.setBlocks(0, this.blocks, true);
  }

  clearAll(): void {
    this.setBlocks(0, this.blocks, false);
  }

  /** The next set block at or after `block`, or -1. */
  nextSet(block: number): number {
    return this.bits.nextSet(block);
  }

  /** Runs of set blocks as [firstBlock, count], ascending. */
  ranges(): Array<[number, number]> {
    const out: Array<[number, number]> = [];
    for (let b = this.bits.nextSet(0); b >= 0; ) {
      const end = this.bits.nextClear(b);
      out.push([b, end - b]);
      b = end < this.blocks ? this.bits.nextSet(end) : -1;
    }
    return out;
  }

  /** Set the blocks of such runs (a union with what is set). Any run outside the map → RangeError, nothing set. */
  markRanges(ranges: ReadonlyArray<readonly [number, number]>): void {
    for (const r of ranges) {
      const [first, count] = r;
      if (!(Number.isInteger(first) && Number.isInteger(count) && first >= 0 && count >= 0 && first + count <= this.blocks)) {
        throw new RangeError(`out-of-sync range [${String(first)}, +${String(count)}) outside [0, ${this.blocks})`);
      }
    }
    for (const [first, count] of ranges) if (count > 0) this.setBlocks(first, first + count, true);
  }

  /** Bytes of the file that persist() would write now. */
  get pendingBytes(): number {
    const pages = this.dirty.count;
    if (pages === 0) return 0;
    const lastPage = this.dirty.size - 1;
    const lastLen = this.bytesView.length - lastPage * PAGE_SIZE;
    return pages * PAGE_SIZE - (this.dirty.get(lastPage) ? PAGE_SIZE - lastLen : 0);
  }

  /**
   * Write every page of the bit array that changed since it was last written, then fdatasync. Resolves once
   * every change made before the call is durable. A call made while a persist runs shares the next one.
   */
  persist(): Promise<void> {
    if (this.closed) return Promise.reject(new ShutdownError(`${this.file}: out-of-sync map is closed`));
    if (this.queued !== null) return this.queued;
    if (this.running !== null) {
      const after = this.running.then(
        () => undefined,
        () => undefined,
      );
      const queued = after.then(() => {
        this.queued = null;
        return this.start();
      });
      this.queued = queued;
      return queued;
    }
    return this.start();
  }

  /** Persist, then close the file. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      try {
        await this.persist();
      } finally {
        this.closed = true;
        await this.fh.close();
      }
    })();
    return this.closing;
  }

  // -------------------------------------------------------------------------------------------------------

  private start(): Promise<void> {
    const p = this.writeDirty().finally(() => {
      if (this.running === p) this.running = null;
    });
    this.running = p;
    return p;
  }

  private async writeDirty(): Promise<void> {
    if (this.dirty.count === 0) return;
    // Snapshot the dirty pages: the file gets the bits as they are now, and a page changed while the write
    // runs is dirty again for the next persist.
    const runs: number[] = [];
    let total = 0;
    for (let p = this.dirty.nextSet(0); p >= 0; ) {
      const q = this.dirty.nextClear(p);
      const end = Math.min(q * PAGE_SIZE, this.bytesView.length);
      runs.push(p, q);
      total += end - p * PAGE_SIZE;
      p = q < this.dirty.size ? this.dirty.nextSet(q) : -1;
    }
    const snap = Buffer.allocUnsafe(total);
    const writes: Array<Promise<void>> = [];
    let at = 0;
    for (let i = 0; i < runs.length; i += 2) {
      const start = runs[i]! * PAGE_SIZE;
      const end = Math.min(runs[i + 1]! * PAGE_SIZE, this.bytesView.length);
      this.bytesView.copy(snap, at, start, end);
      this.dirty.clearRange(runs[i]!, runs[i + 1]!);
      writes.push(writeFully(this.fh, snap.subarray(at, at + end - start), HEADER_SIZE + start));
      at += end - start;
    }
    try {
      await Promise.all(writes);
      await this.fh.datasync();
    } catch (err) {
      for (let i = 0; i < runs.length; i += 2) this.dirty.setRange(runs[i]!, runs[i + 1]!);
      throw new IoError(`${this.file}: writing the out-of-sync map failed: ${(err as Error).message}`, { cause: err });
    }
  }

  /** Set or clear blocks [first, end), one page of the bit array at a time so only changed pages are dirty. */
  private setBlocks(first: number, end: number, value: boolean): void {
    let b = first;
    while (b < end) {
      const page = Math.floor(b / BLOCKS_PER_PAGE);
      const stop = Math.min(end, (page + 1) * BLOCKS_PER_PAGE);
      const changed = value ? this.bits.setRange(b, stop) : this.bits.clearRange(b, stop);
      if (changed !== 0) this.dirty.set(page);
      b = stop;
    }
  }

  private checkRange(offset: number, length: number): void {
    if (!(offset >= 0 && length >= 0 && offset + length <= this.size)) {
      throw new RangeError(`range [${offset}, +${length}) outside the export (${this.size} bytes)`);
    }
  }
}

function encodeHeader(size: number): Buffer {
  const header = Buffer.alloc(HEADER_SIZE);
  OOS_MAGIC.copy(header, 0);
  header.writeUInt32BE(OOS_VERSION, 8);
  header.writeUInt32BE(OOS_BLOCK_SIZE, 12);
  header.writeBigUInt64BE(BigInt(size), 16);
  header.writeUInt32BE(HEADER_SIZE, 24);
  header.writeUInt32BE(crc32(header.subarray(0, 28)), 28);
  return header;
}

async function load(fh: fsp.FileHandle, file: string, size: number, bits: BlockBitmap, fileLength: number): Promise<void> {
  const corrupt = (what: string): CorruptStateError =>
    new CorruptStateError(`${file}: ${what}; move the file away to start with every block out of sync`);
  const { header, fileLength: actualLength } = await readCheckedHeader(fh, file, { size: HEADER_SIZE, magic: OOS_MAGIC, version: OOS_VERSION, crcAt: 28, kind: 'an out-of-sync map' }, corrupt);
  const blockSize = header.readUInt32BE(12);
  if (blockSize !== OOS_BLOCK_SIZE) throw corrupt(`block size ${blockSize}, expected ${OOS_BLOCK_SIZE}`);
  const fileSize = Number(header.readBigUInt64BE(16));
  if (fileSize !== size) throw corrupt(`made for an export of ${fileSize} bytes, the export has ${size}`);
  if (header.readUInt32BE(24) !== HEADER_SIZE) throw corrupt('bad bits offset');
  if (actualLength !== fileLength) throw corrupt(`${actualLength} bytes, expected ${fileLength}`);
  await readFully(fh, file, Buffer.from(bits.words.buffer, bits.words.byteOffset, bits.words.byteLength), HEADER_SIZE);
  const tail = bits.size & 31;
  if (tail !== 0 && bits.words[bits.words.length - 1]! >>> tail !== 0) throw corrupt('bits set past the last block');
  bits.recount();
}

/** The file opened read-write, or null if it does not exist. */
async function openExisting(file: string): Promise<fsp.FileHandle | null> {
  try {
    return await fsp.open(file, fsc.O_RDWR);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw ioError(file, err);
  }
}

/** Write header + zeros to FILE.tmp, fdatasync, rename it to FILE and sync the directory. */
async function createFile(dir: string, file: string, header: Buffer, length: number): Promise<void> {
  const tmp = `${file}.tmp`;
  try {
    const fh = await fsp.open(tmp, fsc.O_RDWR | fsc.O_CREAT | fsc.O_TRUNC, 0o600);
    try {
      await writeFully(fh, header, 0);
      await fh.truncate(length);
      await fh.datasync();
    } finally {
      await fh.close();
    }
    await fsp.rename(tmp, file);
    await syncDir(dir);
  } catch (err) {
    throw ioError(file, err);
  }
}
