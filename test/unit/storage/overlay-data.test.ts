// overlayData (lib/storage/pmem-layer.ts): the extents of a pmem-layered export are the backing device's
// extents with every page resident in the region reported as data. Checked with hand-written cases (unaligned
// offsets, resident pages at the range's edges and across extent boundaries, backing extents that end before
// the range does) and against a naive per-byte model under seeded random inputs.

import t from 'tap';
import { overlayData } from '../../../lib/storage/pmem-layer';
import type { Extent } from '../../../lib/storage/block-device';
import { prng } from '../../helpers/bytes';

const PS = 4096;
// base:allocation flags written out (NBD protocol), not imported.
const DATA = 0;
const HOLE_ZERO = 3;
const ZERO = 2;

const ext = (length: number, flags: number): Extent => ({ length, flags });

/** The naive model: one flag per byte, resident pages forced to data, run-length encoded. */
function model(backing: Extent[], offset: number, resident: number[]): Extent[] {
  const total = backing.reduce((s, e) => s + e.length, 0);
  const flags = new Uint8Array(total);
  let p = 0;
  for (const e of backing) {
    flags.fill(e.flags, p, p + e.length);
    p += e.length;
  }
  for (const b of resident) {
    const from = Math.max(b * PS - offset, 0);
    const to = Math.min((b + 1) * PS - offset, total);
    if (to > from) flags.fill(DATA, from, to);
  }
  const out: Extent[] = [];
  for (let i = 0; i < total; ) {
    let j = i + 1;
    while (j < total && flags[j] === flags[i]) j++;
    out.push(ext(j - i, flags[i]!));
    i = j;
  }
  return out;
}

interface Case {
  name: string;
  backing: Extent[];
  offset: number;
  resident: number[];
  want: Extent[];
}

const cases: Case[] = [
  { name: 'no resident pages: merged backing extents', backing: [ext(PS, HOLE_ZERO), ext(PS, HOLE_ZERO)], offset: 0, resident: [], want: [ext(2 * PS, HOLE_ZERO)] },
  { name: 'a resident page inside a hole splits it', backing: [ext(4 * PS, HOLE_ZERO)], offset: 0, resident: [1], want: [ext(PS, HOLE_ZERO), ext(PS, DATA), ext(2 * PS, HOLE_ZERO)] },
  { name: 'resident first page', backing: [ext(4 * PS, HOLE_ZERO)], offset: 0, resident: [0], want: [ext(PS, DATA), ext(3 * PS, HOLE_ZERO)] },
  { name: 'resident last page', backing: [ext(4 * PS, HOLE_ZERO)], offset: 0, resident: [3], want: [ext(3 * PS, HOLE_ZERO), ext(PS, DATA)] },
  { name: 'adjacent resident pages merge into one data extent', backing: [ext(4 * PS, HOLE_ZERO)], offset: 0, resident: [1, 2], want: [ext(PS, HOLE_ZERO), ext(2 * PS, DATA), ext(PS, HOLE_ZERO)] },
  { name: 'every page resident', backing: [ext(3 * PS, HOLE_ZERO)], offset: 0, resident: [0, 1, 2], want: [ext(3 * PS, DATA)] },
  { name: 'resident page next to backing data merges with it', backing: [ext(PS, DATA), ext(3 * PS, HOLE_ZERO)], offset: 0, resident: [1], want: [ext(2 * PS, DATA), ext(2 * PS, HOLE_ZERO)] },
  { name: 'resident page inside backing data changes nothing', backing: [ext(2 * PS, DATA), ext(PS, HOLE_ZERO)], offset: 0, resident: [0], want: [ext(2 * PS, DATA), ext(PS, HOLE_ZERO)] },
  {
    name: 'unaligned offset: the first resident page starts before the range',
    backing: [ext(3 * PS - 100, HOLE_ZERO)],
    offset: 100,
    resident: [0],
    want: [ext(PS - 100, DATA), ext(2 * PS, HOLE_ZERO)],
  },
  {
    name: 'unaligned offset and end: resident pages at both edges',
    backing: [ext(2 * PS, HOLE_ZERO)],
    offset: 1000,
    resident: [0, 2],
    want: [ext(PS - 1000, DATA), ext(PS, HOLE_ZERO), ext(1000, DATA)],
  },
  {
    name: 'a resident page straddles a hole/hole extent boundary',
    backing: [ext(PS + 2048, HOLE_ZERO), ext(PS + 2048, ZERO)],
    offset: 0,
    resident: [1],
    want: [ext(PS, HOLE_ZERO), ext(PS, DATA), ext(PS, ZERO)],
  },
  {
    name: 'a resident page straddles a data/hole boundary',
    backing: [ext(PS + 2048, DATA), ext(PS + 2048, HOLE_ZERO)],
    offset: 0,
    resident: [1],
    want: [ext(2 * PS, DATA), ext(PS, HOLE_ZERO)],
  },
  {
    name: 'backing extents end early: resident pages past them are not reported',
    backing: [ext(2 * PS, HOLE_ZERO)],
    offset: 0,
    resident: [1, 2, 3],
    want: [ext(PS, HOLE_ZERO), ext(PS, DATA)],
  },
  {
    name: 'backing ends inside a resident page',
    backing: [ext(PS + 500, HOLE_ZERO)],
    offset: 0,
    resident: [1],
    want: [ext(PS, HOLE_ZERO), ext(500, DATA)],
  },
  {
    name: 'a sub-page range inside one resident page',
    backing: [ext(10, HOLE_ZERO)],
    offset: 5 * PS + 7,
    resident: [5],
    want: [ext(10, DATA)],
  },
  {
    name: 'many small extents, some resident',
    backing: [ext(PS, HOLE_ZERO), ext(PS, DATA), ext(PS, HOLE_ZERO), ext(PS, HOLE_ZERO), ext(PS, ZERO)],
    offset: 10 * PS,
    resident: [10, 12, 14],
    want: [ext(3 * PS, DATA), ext(PS, HOLE_ZERO), ext(PS, DATA)],
  },
];

t.test('table cases', async (t) => {
  for (const c of cases) {
    const got = overlayData(c.backing.map((e) => ({ ...e })), c.offset, c.resident);
    t.same(got, c.want, c.name);
    t.same(model(c.backing, c.offset, c.resident), c.want, `${c.name} (the model agrees)`);
  }
});

t.test('overlayData does not modify the backing extents it is given', async (t) => {
  const backing = [ext(PS, HOLE_ZERO), ext(PS, HOLE_ZERO), ext(PS, DATA)];
  const copy = backing.map((e) => ({ ...e }));
  overlayData(backing, 0, [1]);
  t.same(backing, copy);
});

t.test('seeded random comparison with the per-byte model', async (t) => {
  const rnd = prng(0x5eed);
  const int = (n: number): number => Math.floor(rnd() * n);
  const FLAGS = [DATA, HOLE_ZERO, HOLE_ZERO, ZERO];
  let failures = 0;
  let firstFailure = '';
  const ROUNDS = 3000;
  for (let round = 0; round < ROUNDS; round++) {
    // The request: an offset that is often unaligned, a length of up to ~12 pages.
    const offset = int(8) * PS + (rnd() < 0.6 ? int(PS) : 0);
    const length = 1 + int(12 * PS);
    // Backing extents from offset: random pieces (some page-aligned), which may stop before the range ends.
    const backing: Extent[] = [];
    let covered = 0;
    const stopAt = rnd() < 0.3 ? 1 + int(length) : length;
    while (covered < stopAt) {
      const piece = rnd() < 0.5 ? 1 + int(2 * PS) : PS * (1 + int(3));
      const n = Math.min(piece, stopAt - covered);
      backing.push(ext(n, FLAGS[int(FLAGS.length)]!));
      covered += n;
    }
    // Resident pages: any subset of the pages the request touches (as the layer passes them), sorted.
    const first = Math.floor(offset / PS);
    const last = Math.floor((offset + length - 1) / PS);
    const resident: number[] = [];
    const density = rnd();
    for (let b = first; b <= last; b++) if (rnd() < density) resident.push(b);
    const got = overlayData(backing.map((e) => ({ ...e })), offset, resident);
    const want = model(backing, offset, resident);
    if (JSON.stringify(got) !== JSON.stringify(want)) {
      failures++;
      if (firstFailure === '') firstFailure = JSON.stringify({ offset, length, backing, resident, got, want });
    }
  }
  t.equal(failures, 0, `all ${ROUNDS} rounds match the model${firstFailure ? `; first failure: ${firstFailure}` : ''}`);
});
