// Mapping the pages of a pmem region file. mmap-io cannot map 2 GiB or more in one call (its length is a
// 32-bit int), so the pages are mapped in chunks of PAGES_PER_MAP pages; page(slot) hides the chunking.

import mmap from '@riaskov/mmap-io';

export const PAGE_SIZE = 4096;
/** Pages per mapping: 1 GiB. */
export const PAGES_PER_MAP = 1 << 18;

/** Where the pages start in the file (page-aligned) and how many there are. */
export interface RegionGeometry {
  pagesOffset: number;
  pageCount: number;
}

/** Map the pages of the region file open as fd: one Buffer per chunk of PAGES_PER_MAP pages. */
export function mapPages(fd: number, g: RegionGeometry, writable: boolean): Buffer[] {
  const prot = writable ? 3 /* PROT_READ | PROT_WRITE */ : mmap.PROT_READ;
  const chunks: Buffer[] = [];
  for (let first = 0; first < g.pageCount; first += PAGES_PER_MAP) {
    const pages = Math.min(PAGES_PER_MAP, g.pageCount - first);
    chunks.push(mmap.map(pages * PAGE_SIZE, prot, mmap.MAP_SHARED, fd, g.pagesOffset + first * PAGE_SIZE));
  }
  return chunks;
}

/** Views of single pages over chunked mappings, made once per slot (the hot path would allocate otherwise). */
export class PageViews {
  private readonly views: Array<Buffer | undefined> = [];

  constructor(readonly chunks: readonly Buffer[]) {}

  page(slot: number): Buffer {
    let v = this.views[slot];
    if (v === undefined) {
      const c = this.chunks[Math.floor(slot / PAGES_PER_MAP)]!;
      const at = (slot % PAGES_PER_MAP) * PAGE_SIZE;
      v = c.subarray(at, at + PAGE_SIZE);
      this.views[slot] = v;
    }
    return v;
  }
}
