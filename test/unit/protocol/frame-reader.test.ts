// lib/protocol/frame-reader.ts: cursor operations over a queue of chunks. Checked against a plain Buffer model,
// with streams cut at every offset into two and three pieces.

import t from 'tap';
import { FrameReader } from '../../../lib/protocol/frame-reader';
import { bytes, prng, splits2, splits3 } from '../../helpers/bytes';

function seq(n: number, start = 0): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (start + i) & 0xff;
  return b;
}

t.test('empty reader', async (t) => {
  const r = new FrameReader();
  t.equal(r.length, 0);
  const z = r.peek(0);
  t.ok(z !== null && z.length === 0, 'peek(0) is an empty buffer');
  t.equal(r.peek(1), null, 'peek(1) needs more');
  t.equal(r.take(1), null, 'take(1) needs more');
  t.same(r.take(0), Buffer.alloc(0), 'take(0) is empty');
  t.equal(r.readInto(Buffer.alloc(4), 0, 4), 0, 'readInto moves nothing');
  t.equal(r.skip(10), 0, 'skip discards nothing');
  t.doesNotThrow(() => r.consume(0), 'consume(0) is allowed');
  t.throws(() => r.consume(1), RangeError, 'consume past the end throws');
  t.equal(r.length, 0);
});

t.test('empty chunks are ignored', async (t) => {
  const r = new FrameReader();
  r.push(Buffer.alloc(0));
  t.equal(r.length, 0);
  r.push(Buffer.from([1, 2]));
  r.push(Buffer.alloc(0));
  r.push(Buffer.from([3]));
  t.equal(r.length, 3);
  t.same(r.take(3), Buffer.from([1, 2, 3]));
  t.equal(r.length, 0);
});

t.test('peek does not consume; within one chunk it is a view', async (t) => {
  const r = new FrameReader();
  const chunk = seq(10);
  r.push(chunk);
  const p = r.peek(4);
  t.same(p, seq(4));
  t.equal(p!.buffer, chunk.buffer, 'same memory as the pushed chunk');
  t.equal(p!.byteOffset, chunk.byteOffset, 'at the start of the chunk');
  t.equal(r.length, 10, 'nothing consumed');
  r.consume(3);
  const q = r.peek(7);
  t.same(q, seq(7, 3));
  t.equal(q!.byteOffset, chunk.byteOffset + 3, 'view after a partial consume');
  t.equal(r.peek(8), null, 'one more than buffered needs more');
});

t.test('peek across chunks copies exactly n bytes', async (t) => {
  const r = new FrameReader();
  r.push(seq(3, 0));
  r.push(seq(1, 3));
  r.push(seq(5, 4));
  t.equal(r.length, 9);
  const p = r.peek(6);
  t.same(p, seq(6));
  t.equal(p!.length, 6);
  t.same(r.peek(9), seq(9), 'all of it');
  r.consume(2);
  t.same(r.peek(7), seq(7, 2), 'from the middle of the first chunk');
  t.equal(r.length, 7);
});

t.test('take and consume across chunk boundaries', async (t) => {
  const r = new FrameReader();
  for (let i = 0; i < 20; i++) r.push(Buffer.from([i])); // 20 one-byte chunks
  t.same(r.take(5), seq(5));
  r.consume(5);
  t.same(r.take(1), seq(1, 10));
  t.equal(r.length, 9);
  t.same(r.take(9), seq(9, 11));
  t.equal(r.length, 0);
  t.equal(r.take(1), null);
});

t.test('consume exactly a chunk, then more than one chunk', async (t) => {
  const r = new FrameReader();
  r.push(seq(4, 0));
  r.push(seq(4, 4));
  r.push(seq(4, 8));
  r.consume(4);
  t.same(r.peek(1), seq(1, 4));
  r.consume(6);
  t.same(r.peek(2), seq(2, 10));
  t.throws(() => r.consume(3), RangeError);
  t.equal(r.length, 2, 'a refused consume leaves the buffer alone');
  t.same(r.take(2), seq(2, 10));
});

t.test('readInto fills a target at an offset and consumes', async (t) => {
  const r = new FrameReader();
  r.push(seq(3, 0));
  r.push(seq(3, 3));
  const target = Buffer.alloc(10, 0xee);
  t.equal(r.readInto(target, 2, 4), 4, 'moves max when enough is buffered');
  t.same(target, bytes().fill(2, 0xee).raw([0, 1, 2, 3]).fill(4, 0xee).buf());
  t.equal(r.length, 2);
  t.equal(r.readInto(target, 6, 100), 2, 'moves what is buffered when max is larger');
  t.same(target, bytes().fill(2, 0xee).raw([0, 1, 2, 3, 4, 5]).fill(2, 0xee).buf());
  t.equal(r.length, 0);
  t.equal(r.readInto(target, 0, 5), 0, 'nothing left');
});

t.test('skip discards up to max', async (t) => {
  const r = new FrameReader();
  r.push(seq(5, 0));
  r.push(seq(5, 5));
  t.equal(r.skip(7), 7);
  t.same(r.peek(3), seq(3, 7));
  t.equal(r.skip(100), 3);
  t.equal(r.length, 0);
});

t.test('a taken view survives later pushes and consumes', async (t) => {
  const r = new FrameReader();
  r.push(seq(8));
  const a = r.take(4);
  r.push(seq(8, 8));
  r.consume(6);
  t.same(a, seq(4), 'contents unchanged');
  t.same(r.take(6), seq(6, 10));
});

/**
 * The operations a connection does on one stream: a 5-byte header whose last 4 bytes are a payload length,
 * then the payload read with readInto, and every third frame's payload skipped instead (a refused write).
 */
type Frame = { tag: number; payload: Buffer | 'skipped' };

function frameStream(frames: { tag: number; payload: Buffer }[]): Buffer {
  const b = bytes();
  for (const f of frames) b.u8(f.tag).u32(f.payload.length).raw(f.payload);
  return b.buf();
}

function decodeFrames(r: FrameReader, state: { cur?: { tag: number; buf: Buffer; got: number; skip: boolean }; n: number }, out: Frame[]): void {
  for (;;) {
    if (state.cur === undefined) {
      const h = r.peek(5);
      if (h === null) return;
      const tag = h[0]!;
      const len = h.readUInt32BE(1);
      r.consume(5);
      const skip = state.n++ % 3 === 2;
      state.cur = { tag, buf: Buffer.alloc(skip ? 0 : len), got: 0, skip };
      if (skip) state.cur.got = -len; // negative: bytes still to skip
    }
    const cur = state.cur;
    if (cur.skip) {
      cur.got += r.skip(-cur.got);
      if (cur.got < 0) return;
      out.push({ tag: cur.tag, payload: 'skipped' });
    } else {
      cur.got += r.readInto(cur.buf, cur.got, cur.buf.length - cur.got);
      if (cur.got < cur.buf.length) return;
      out.push({ tag: cur.tag, payload: cur.buf });
    }
    delete state.cur;
  }
}

t.test('frames survive every 2- and 3-way split of the stream', async (t) => {
  const frames = [
    { tag: 1, payload: seq(7, 100) },
    { tag: 2, payload: Buffer.alloc(0) },
    { tag: 3, payload: seq(6, 50) },
    { tag: 4, payload: seq(9, 200) },
    { tag: 5, payload: seq(1, 9) },
  ];
  const stream = frameStream(frames);
  const expected: Frame[] = frames.map((f, i) => ({ tag: f.tag, payload: i % 3 === 2 ? 'skipped' : f.payload }));

  const run = (pieces: Buffer[]): Frame[] => {
    const r = new FrameReader();
    const out: Frame[] = [];
    const state = { n: 0 };
    for (const p of pieces) {
      r.push(p);
      decodeFrames(r, state, out);
    }
    return out;
  };

  let bad2 = 0;
  let n2 = 0;
  for (const pieces of splits2(stream)) {
    n2++;
    if (JSON.stringify(run(pieces)) !== JSON.stringify(expected)) bad2++;
  }
  t.equal(bad2, 0, `all ${n2} two-way splits decode the same frames`);

  let bad3 = 0;
  let n3 = 0;
  for (const pieces of splits3(stream)) {
    n3++;
    if (JSON.stringify(run(pieces)) !== JSON.stringify(expected)) bad3++;
  }
  t.equal(bad3, 0, `all ${n3} three-way splits decode the same frames`);
  t.same(run([stream]), expected, 'one piece');
  t.same(run([...stream].map((b) => Buffer.from([b]))), expected, 'one byte at a time');
});

t.test('random operations agree with a plain Buffer model', async (t) => {
  const rnd = prng(0x5eed);
  const int = (n: number): number => Math.floor(rnd() * n);
  let mismatches = 0;
  let ops = 0;
  for (let round = 0; round < 50; round++) {
    const r = new FrameReader();
    let model = Buffer.alloc(0);
    let next = 0;
    for (let step = 0; step < 60; step++) {
      ops++;
      const op = int(6);
      if (op === 0) {
        const chunk = seq(int(12), next);
        next += chunk.length;
        r.push(chunk);
        model = Buffer.concat([model, chunk]);
      } else if (op === 1) {
        const n = int(model.length + 3);
        const got = r.peek(n);
        const want = n <= model.length ? model.subarray(0, n) : null;
        if (JSON.stringify(got) !== JSON.stringify(want)) mismatches++;
      } else if (op === 2) {
        const n = int(model.length + 3);
        const got = r.take(n);
        const want = n <= model.length ? Buffer.from(model.subarray(0, n)) : null;
        if (want !== null) model = model.subarray(n);
        if (JSON.stringify(got) !== JSON.stringify(want)) mismatches++;
      } else if (op === 3) {
        const max = int(model.length + 3);
        const target = Buffer.alloc(max + 2);
        const moved = r.readInto(target, 2, max);
        const want = Math.min(max, model.length);
        if (moved !== want || !target.subarray(2, 2 + moved).equals(model.subarray(0, moved))) mismatches++;
        model = model.subarray(moved);
      } else if (op === 4) {
        const max = int(model.length + 3);
        const n = r.skip(max);
        if (n !== Math.min(max, model.length)) mismatches++;
        model = model.subarray(n);
      } else {
        const n = int(model.length + 1);
        r.consume(n);
        model = model.subarray(n);
      }
      if (r.length !== model.length) mismatches++;
    }
  }
  t.equal(mismatches, 0, `${ops} random operations match the model`);
});

t.test('detach: unread bytes survive their chunks being overwritten', async (t) => {
  for (const [cut, eaten] of [[10, 3], [10, 10], [1, 0], [7, 12]] as const) {
    const r = new FrameReader();
    const chunk = seq(20);
    r.push(chunk.subarray(0, cut));
    r.push(chunk.subarray(cut));
    r.consume(eaten);
    const want = Buffer.from(chunk.subarray(eaten));
    r.detach();
    chunk.fill(0xee); // the socket reads into the same buffer again
    t.equal(r.length, want.length, `cut ${cut}, consumed ${eaten}: length kept`);
    t.same(r.peek(r.length), want, `cut ${cut}, consumed ${eaten}: bytes kept`);
    r.push(seq(5, 100));
    t.same(r.take(want.length + 5), Buffer.concat([want, seq(5, 100)]), 'later input follows');
  }
  const empty = new FrameReader();
  empty.detach();
  t.equal(empty.length, 0);
  const all = new FrameReader();
  all.push(seq(8));
  all.consume(8);
  all.detach();
  t.equal(all.peek(1), null, 'nothing left after detaching a fully read chunk');
});
