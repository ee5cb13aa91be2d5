// A BlockDevice that forwards every call to an inner device: the base of test devices that record, hold or
// fail some calls and pass the rest through.

import type { BlockDevice, Capabilities, Extent, WriteFlags, ZeroFlags } from '../../lib/storage/block-device';

export class PassThroughDevice<D extends BlockDevice = BlockDevice> implements BlockDevice {
  readonly size: number;
  readonly caps: Capabilities;

  constructor(readonly inner: D) {
    this.size = inner.size;
    this.caps = inner.caps;
  }

  pread(buf: Buffer, offset: number): Promise<void> {
    return this.inner.pread(buf, offset);
  }
  pwrite(buf: Buffer, offset: number, flags?: WriteFlags): Promise<void> {
    return this.inner.pwrite(buf, offset, flags);
  }
  flush(): Promise<void> {
    return this.inner.flush();
  }
  trim(offset: number, length: number, flags?: WriteFlags): Promise<void> {
    return this.inner.trim(offset, length, flags);
  }
  zero(offset: number, length: number, flags?: ZeroFlags): Promise<void> {
    return this.inner.zero(offset, length, flags);
  }
  cache(offset: number, length: number): Promise<void> {
    return this.inner.cache(offset, length);
  }
  extents(offset: number, length: number): Promise<Extent[]> {
    return this.inner.extents(offset, length);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}
