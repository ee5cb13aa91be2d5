import t from 'tap';
import { crc32 } from '@node-rs/crc32';
import { crc32Short } from '../../../lib/storage/crc32-short';
import { randomBytes } from 'node:crypto';

t.test('matches the native crc32 on known values', async (t) => {
  t.equal(crc32Short(Buffer.alloc(0), 0, 0), 0, 'no bytes');
  t.equal(crc32Short(Buffer.from('123456789'), 0, 9), 0xcbf43926, 'the standard check value');
  t.equal(crc32Short(Buffer.from('123456789'), 0, 9), crc32(Buffer.from('123456789')));
});

t.test('matches the native crc32 on random ranges, and continues from an initial value as it does', async (t) => {
  const buf = randomBytes(4096);
  let mismatches = 0;
  for (let i = 0; i < 2000; i++) {
    const start = (i * 37) % 4000;
    const end = start + (i % 64);
    const init = (i * 2654435761) >>> 0;
    if (crc32Short(buf, start, end) !== crc32(buf.subarray(start, end))) mismatches++;
    if (crc32Short(buf, start, end, init) !== crc32(buf.subarray(start, end), init)) mismatches++;
  }
  t.equal(mismatches, 0);
  // What the region computes: the entry's 20 bytes, then the page through the native call.
  const entry = buf.subarray(100, 120);
  const page = buf.subarray(0, 4096);
  t.equal(crc32(page, crc32Short(entry, 0, 20)), crc32(Buffer.concat([entry, page])));
});
