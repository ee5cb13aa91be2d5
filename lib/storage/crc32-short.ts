// CRC-32 (IEEE 802.3, as zlib and @node-rs/crc32 compute it) of a few bytes, in JavaScript. For a handful of
// bytes a call into the native crc32 costs more than the bytes do (about 180 ns a call on the bench machine,
// against 440 ns for a whole 4 KiB page): the region's page table entries are 20 bytes, checksummed on every
// write before the page itself.

const TABLE = makeTable();

function makeTable(): Int32Array {
  const t = new Int32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c;
  }
  return t;
}

/**
 * The CRC-32 of buf[start, end), continuing from `initial` (the CRC of the bytes before them, 0 for none):
 * crc32Short(b, 0, n, crc32(a)) equals crc32 of a followed by b[0, n). Meant for short ranges.
 */
export function crc32Short(buf: Uint8Array, start: number, end: number, initial = 0): number {
  let c = ~initial;
  for (let i = start; i < end; i++) c = TABLE[(c ^ buf[i]!) & 0xff]! ^ (c >>> 8);
  return ~c >>> 0;
}
