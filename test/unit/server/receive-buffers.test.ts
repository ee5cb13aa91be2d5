// lib/server/receive-buffers.ts: a read buffer is handed out again only while nothing pins it.

import t from 'tap';
import { RECEIVE_BUFFER_SIZE, ReceiveBuffers } from '../../../lib/server/receive-buffers';

t.test('the same buffer serves read after read while unpinned', async (t) => {
  const rx = new ReceiveBuffers();
  const a = rx.next();
  t.equal(a.length, RECEIVE_BUFFER_SIZE);
  t.equal(rx.next(), a);
  t.equal(rx.next(), a);
  t.equal(rx.allocated, 0);
});

t.test('a pinned buffer is not read into until released', async (t) => {
  const rx = new ReceiveBuffers();
  const a = rx.next();
  const pin = rx.hold(a.subarray(100, 4196));
  t.ok(pin !== null, 'a view into the current buffer pins it');
  const b = rx.next();
  t.not(b, a, 'the next read goes elsewhere');
  t.equal(rx.allocated, 1);
  t.equal(rx.next(), b, 'and stays there while b is free');
  rx.release(pin!);
  // a is a spare now: when b gets pinned, a is taken again instead of a new buffer.
  const pinB = rx.hold(b.subarray(0, 10));
  t.equal(rx.next(), a, 'the released buffer is reused');
  t.equal(rx.allocated, 1);
  rx.release(pinB!);
});

t.test('several pins on one buffer: free only after the last release', async (t) => {
  const rx = new ReceiveBuffers();
  const a = rx.next();
  const p1 = rx.hold(a.subarray(0, 4096))!;
  const p2 = rx.hold(a.subarray(4096, 8192))!;
  t.equal(p1, p2);
  const b = rx.next();
  rx.release(p1);
  rx.hold(b.subarray(0, 1)); // b pinned for good (a failed write never releases)
  const c = rx.next();
  t.not(c, a, 'a still has a pin');
  t.not(c, b);
  rx.release(p2);
  rx.hold(c.subarray(0, 1));
  t.equal(rx.next(), a, 'a is back once both pins are gone');
});

t.test('views that are not in the current buffer are not pinned', async (t) => {
  const rx = new ReceiveBuffers();
  const a = rx.next();
  t.equal(rx.hold(Buffer.alloc(4096)), null, 'a copy');
  t.equal(rx.hold(Buffer.from(a.subarray(0, 16))), null, 'a copy of its bytes');
  t.equal(rx.next(), a);
});

t.test('spares are bounded', async (t) => {
  const rx = new ReceiveBuffers();
  const pins = [];
  for (let i = 0; i < 10; i++) pins.push(rx.hold(rx.next().subarray(0, 1))!);
  t.equal(rx.allocated, 9, 'one new buffer per pinned one');
  for (const p of pins) rx.release(p);
  // The last one pinned is the current buffer; of the 9 others, at most 4 are kept.
  const seen = new Set<Buffer>();
  for (let i = 0; i < 10; i++) {
    const b = rx.next();
    seen.add(b);
    rx.hold(b.subarray(0, 1));
  }
  t.equal(rx.allocated, 9 + 10 - 1 - 4, 'after the current buffer and 4 spares, new ones are allocated');
  t.equal(seen.size, 10);
});
