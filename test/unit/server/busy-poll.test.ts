// lib/server/busy-poll.ts: after touch() the event loop does not sleep in its poll phase for the window, the
// window restarts with each touch, polling stops by itself once the window has passed, the time spent is
// counted, and a window of 0 never polls. The window doubles (up to GROWTH_LIMIT times --busy-poll) when a
// request arrives within one window of polling giving up, and drops back after a longer sleep.

import t from 'tap';
import { performance } from 'node:perf_hooks';
import { BusyPoll, GROWTH_LIMIT } from '../../../lib/server/busy-poll';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

t.test('polls for the window after each touch, then stops and counts the time', async (t) => {
  // Generous times, so that a late timer on a loaded machine does not end a window early.
  const poll = new BusyPoll(300);
  t.equal(poll.active, false, 'idle before any request');
  t.equal(poll.polledSeconds, 0);
  poll.touch();
  t.equal(poll.active, true, 'polling right after a touch');
  await sleep(100);
  t.equal(poll.active, true, 'still polling within the window');
  poll.touch(); // the window restarts here: 300 ms from now
  await sleep(150);
  t.equal(poll.active, true, 'a touch restarts the window');
  // Bounded wait for the end: the window is 300 ms; allow a loaded machine 3 s.
  const deadline = performance.now() + 3000;
  while (poll.active && performance.now() < deadline) await sleep(5);
  t.equal(poll.active, false, 'stops by itself once the window has passed');
  const polled = poll.polledSeconds;
  // One window from the first touch to 300 ms after the second: at least 100 + 300 ms.
  t.ok(polled >= 0.39, `the polling time is counted (${polled.toFixed(3)} s)`);
  await sleep(10);
  t.equal(poll.polledSeconds, polled, 'nothing counted while idle');
});

t.test('while polling the loop does not sleep in epoll; without, it does', async (t) => {
  // eventLoopUtilization counts the time the loop spends outside its poll phase's wait as used: near 1 while
  // it polls with a zero timeout, near 0 while it sleeps until a timer.
  const busyFor = async (poll: BusyPoll): Promise<number> => {
    const before = performance.eventLoopUtilization();
    poll.touch();
    await sleep(30);
    return performance.eventLoopUtilization(before).utilization;
  };
  const sleeping = await busyFor(new BusyPoll(0)); // first: the other one polls on for its whole window
  const polling = await busyFor(new BusyPoll(40));
  t.ok(polling > 0.5, `polling: the loop was busy ${(polling * 100).toFixed(0)}% of 30 ms`);
  t.ok(sleeping < 0.5, `not polling: busy ${(sleeping * 100).toFixed(0)}%`);
});

t.test('a window of 0 never polls', async (t) => {
  const poll = new BusyPoll(0);
  poll.touch();
  t.equal(poll.active, false);
  await sleep(5);
  t.equal(poll.polledSeconds, 0);
});

t.test('the window grows when requests come just after it ended, up to the limit, and resets after a long sleep', async (t) => {
  // Windows of 100 ms and more, and gaps of about 20 ms after one ends, so that a late timer on a loaded
  // machine cannot turn a short gap into a long one. Every wait is bounded.
  const BASE = 100;
  const poll = new BusyPoll(BASE);
  const untilIdle = async (): Promise<void> => {
    const deadline = performance.now() + 5000;
    while (poll.active && performance.now() < deadline) await sleep(2);
    if (poll.active) throw new Error('the window did not end within 5 s');
  };
  t.equal(poll.currentWindowMs, BASE, 'starts at --busy-poll');
  poll.touch();
  t.equal(poll.currentWindowMs, BASE, 'the first request ever does not grow it');
  const seen: number[] = [];
  for (let i = 0; i < 4; i++) {
    await untilIdle();
    await sleep(20); // well within the window that just ended: a longer one would have caught this request
    poll.touch();
    seen.push(poll.currentWindowMs);
  }
  t.same(seen, [2 * BASE, 4 * BASE, GROWTH_LIMIT * BASE, GROWTH_LIMIT * BASE], `doubles up to ${GROWTH_LIMIT} x --busy-poll: ${seen.join(', ')} ms`);
  await untilIdle();
  poll.touch(); // straight after the end: stays at the limit
  t.equal(poll.currentWindowMs, GROWTH_LIMIT * BASE, 'capped');
  await untilIdle();
  await sleep(GROWTH_LIMIT * BASE + 50); // idle longer than the largest window
  poll.touch();
  t.equal(poll.currentWindowMs, BASE, 'back to --busy-poll after a long sleep');
  await untilIdle();
});

t.test('a request that arrives while polling, or after a gap between one window and the largest, keeps the window', async (t) => {
  const BASE = 40;
  const poll = new BusyPoll(BASE);
  poll.touch();
  await sleep(10);
  poll.touch(); // still polling: no change
  t.equal(poll.currentWindowMs, BASE);
  const deadline = performance.now() + 5000;
  while (poll.active && performance.now() < deadline) await sleep(2);
  await sleep(2 * BASE); // more than the window (40), less than the largest (160) unless the machine stalls
  poll.touch();
  // On a stalled machine the sleep may run past the largest window, which resets it: to the same value.
  t.equal(poll.currentWindowMs, BASE, 'unchanged');
  while (poll.active && performance.now() < deadline + 5000) await sleep(2);
});
