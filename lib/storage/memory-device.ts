// In-memory BlockDevice: a sparse array of fixed-size blocks plus an AllocMap, with the same observable
// semantics as the file layer (deallocated blocks read as zeros and report HOLE|ZERO; TRIM is advisory and
// only drops whole blocks). For tests, benchmarks and any layer that wants a device without a disk.
//
// Data lives only in this process, so flush() and FUA have nothing to make durable and resolve at once.

import { AllocMap } from './alloc-map';
import { fullCapabilities, type BlockDevice, type Capabilities, type Extent, type WriteFlags, type ZeroFlags } from './block-device';
import { OutOfRangeError, ReadOnlyError, ShutdownError } from '../errors';

/** Default allocation granularity (bytes): the same as the file layer, so extents look alike. */
export const MEMORY_BLOCK_SIZE = 4096;

export interface MemoryDeviceOptions {
  /** Export size in bytes: a safe non-negative integer (need not be a multiple of blockSize). */
  size: number;
  readOnly?: boolean;
  /** Allocation granularity in bytes (a power of two, at least 512). */
  blockSize?: number;
}

export class MemoryDevice implements BlockDevice {
  readonly size: number;
  readonly blockSize: number;
  readonly caps: Capabilities;
  private readonly map: AllocMap;
  /** Allocated blocks by index; each holds blockSize bytes (the tail block's bytes past size stay zero). */
  private readonly blocks = new Map<number, Buffer>();
  private closed = false;

  constructor(opts: MemoryDeviceOptions) {
    const blockSize = opts.blockSize ?? MEMORY_BLOCK_SIZE;
    if (!Number.isSafeInteger(opts.size) || opts.size < 0) throw new RangeError(`invalid size ${opts.size}`);
    if (!Number.isInteger(blockSize) || blockSize < 512 || (blockSize & (blockSize - 1)) !== 0) {
      throw new RangeError(`invalid block size ${blockSize}: use a power of two, at least 512`);
    }
    this.size = opts.size;
    this.blockSize = blockSize;
    this.map = new AllocMap(opts.size, blockSize);
    const readOnly = opts.readOnly ?? false;
    // Zeroing memory is always cheap, so fastZero never has to fail.
    this.caps = fullCapabilities(readOnly);
  }

  /** Bytes held in allocated blocks (whole blocks, including the unused end of the tail block). */
  get allocatedBytes(): number {
    return this.blocks.size * this.blockSize;
  }

  async pread(buf: Buffer, offset: number): Promise<void> {
    this.preadNow(buf, offset);
  }

  /** Memory never needs waiting for: always synchronous. */
  preadNow(buf: Buffer, offset: number): boolean {
    this.check(offset, buf.length, false);
    this.forEachBlock(offset, buf.length, (block, inBlock, pos, n) => {
      const data = this.blocks.get(block);
      if (data === undefined) buf.fill(0, pos, pos + n);
      else data.copy(buf, pos, inBlock, inBlock + n);
    });
    return true;
  }

  async pwrite(buf: Buffer, offset: number, _flags: WriteFlags = {}): Promise<void> {
    this.pwriteNow([buf], offset);
  }

  /** Memory never needs waiting for: always synchronous. */
  pwriteNow(bufs: readonly Buffer[], offset: number): boolean {
    let at = offset;
    for (const buf of bufs) {
      this.check(at, buf.length, true);
      this.forEachBlock(at, buf.length, (block, inBlock, pos, n) => {
        buf.copy(this.allocate(block), inBlock, pos, pos + n);
      });
      at += buf.length;
    }
    return true;
  }

  async flush(): Promise<void> {
    this.check(0, 0, false);
  }

  async trim(offset: number, length: number, _flags: WriteFlags = {}): Promise<void> {
    this.check(offset, length, true);
    // Advisory: only whole blocks are dropped; partial edge blocks keep their data.
    const [first, end] = this.wholeBlocks(offset, length);
    this.deallocate(first, end);
  }

  async zero(offset: number, length: number, flags: ZeroFlags = {}): Promise<void> {
    this.check(offset, length, true);
    if (!flags.mayTrim) {
      // NO_HOLE: the range must end up allocated, holding zeros.
      this.forEachBlock(offset, length, (block, inBlock, _pos, n) => {
        this.allocate(block).fill(0, inBlock, inBlock + n);
      });
      return;
    }
    const [first, end] = this.wholeBlocks(offset, length);
    const stop = offset + length;
    if (end > first) {
      this.deallocate(first, end);
      this.zeroAllocated(offset, Math.min(first * this.blockSize, stop));
      this.zeroAllocated(Math.max(end * this.blockSize, offset), stop);
    } else {
      this.zeroAllocated(offset, stop); // no whole block inside: at most two partial blocks
    }
  }

  async cache(offset: number, length: number): Promise<void> {
    this.check(offset, length, false);
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    return this.extentsNow(offset, length);
  }

  extentsNow(offset: number, length: number): Extent[] {
    this.check(offset, length, false);
    return this.map.extents(offset, length);
  }

  async close(): Promise<void> {
    this.closed = true;
    this.blocks.clear();
  }

  // -------------------------------------------------------------------------------------------------------

  /** Entry assertions: the device is open, the range lies inside the export, writes need a writable device. */
  private check(offset: number, length: number, write: boolean): void {
    if (this.closed) throw new ShutdownError('memory device is closed');
    if (write && this.caps.readOnly) throw new ReadOnlyError('memory device is read-only');
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new OutOfRangeError(`range ${offset}+${length} is outside the device (${this.size} bytes)`);
    }
  }

  /** Calls fn for each block piece of [offset, offset+length): block index, offset in block, offset in range, bytes. */
  private forEachBlock(offset: number, length: number, fn: (block: number, inBlock: number, pos: number, n: number) => void): void {
    let pos = 0;
    while (pos < length) {
      const abs = offset + pos;
      const block = Math.floor(abs / this.blockSize);
      const inBlock = abs - block * this.blockSize;
      const n = Math.min(this.blockSize - inBlock, length - pos);
      fn(block, inBlock, pos, n);
      pos += n;
    }
  }

  /** [first, end) of the blocks wholly inside the range; the export's short tail block counts as whole. */
  private wholeBlocks(offset: number, length: number): [number, number] {
    const first = Math.ceil(offset / this.blockSize);
    const stop = offset + length;
    const end = stop >= this.size ? this.map.blocks : Math.floor(stop / this.blockSize);
    return [first, end];
  }

  /** Zero [start, stop) in the blocks that are allocated; holes already read as zeros. Empty when stop ≤ start. */
  private zeroAllocated(start: number, stop: number): void {
    if (stop <= start) return;
    this.forEachBlock(start, stop - start, (block, inBlock, _pos, n) => {
      this.blocks.get(block)?.fill(0, inBlock, inBlock + n);
    });
  }

  private allocate(block: number): Buffer {
    let data = this.blocks.get(block);
    if (data === undefined) {
      data = Buffer.alloc(this.blockSize);
      this.blocks.set(block, data);
      this.map.setRange(block, block, true);
    }
    return data;
  }

  private deallocate(first: number, end: number): void {
    if (end <= first) return;
    // Walk whichever is smaller: the range, or the allocated blocks (a trim of a huge sparse device).
    if (end - first <= this.blocks.size) {
      for (let b = first; b < end; b++) this.blocks.delete(b);
    } else {
      for (const b of this.blocks.keys()) if (b >= first && b < end) this.blocks.delete(b);
    }
    this.map.setRange(first, end - 1, false);
  }
}
