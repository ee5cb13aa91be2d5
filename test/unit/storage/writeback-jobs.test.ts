import t from 'tap';
import { packJobs, unpackJobs, type WriteJob } from '../../../lib/storage/writeback-jobs';

const plain = (jobs: Iterable<WriteJob>): Array<{ fd: number; offset: number; length: number; slots: number[] }> =>
  [...jobs].map((j) => ({ fd: j.fd, offset: j.offset, length: j.length, slots: Array.from(j.slots) }));

t.test('jobs come out of a packed batch as they went in, in order', async (t) => {
  const jobs: WriteJob[] = [
    { fd: 17, offset: 0, length: 4096, slots: [5] },
    { fd: 17, offset: 2 ** 40 - 4096, length: 3 * 4096 - 100, slots: Int32Array.from([9, 10, 2]) },
    { fd: 23, offset: 8192, length: 0, slots: [] },
    { fd: 23, offset: 1 << 20, length: 32 * 4096, slots: Array.from({ length: 32 }, (_, i) => 65535 - i) },
  ];
  const packed = packJobs(jobs);
  t.equal(packed.length, 4 * 4 + 1 + 3 + 0 + 32, 'four numbers per job and one per slot');
  t.same(plain(unpackJobs(packed)), plain(jobs));
});

t.test('an empty batch packs to nothing and unpacks to no jobs', async (t) => {
  const packed = packJobs([]);
  t.equal(packed.length, 0);
  t.same([...unpackJobs(packed)], []);
});
