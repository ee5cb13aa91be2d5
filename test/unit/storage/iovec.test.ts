// lib/storage/iovec.ts: what is left of a buffer list after a short vectored write, at every split point.

import t from 'tap';
import { remaining } from '../../../lib/storage/iovec';

t.test('remaining: every skip over three buffers leaves exactly the rest of the bytes', async (t) => {
  const bufs = [Buffer.from('abc'), Buffer.from(''), Buffer.from('defg'), Buffer.from('h')];
  const all = Buffer.concat(bufs).toString();
  for (let skip = 0; skip <= all.length; skip++) {
    t.equal(Buffer.concat(remaining(bufs, skip)).toString(), all.slice(skip), `skip ${skip}`);
  }
  t.same(remaining(bufs, 3).map((b) => b.toString()), ['defg', 'h'], 'whole buffers are passed on as they are (empty ones dropped)');
  t.equal(remaining(bufs, 4)[0]!.buffer, bufs[2]!.buffer, 'a cut buffer is a view, not a copy');
});
