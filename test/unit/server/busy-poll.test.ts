// lib/server/busy-poll.ts: after touch() the event loop does not sleep in its poll phase for the window, the
// window restarts with each touch, polling stops by itself once the window has passed, the time spent is
// counted, and a window of 0 never polls.

import t from 'tap';
import { performance } from 'node:perf_hooks';
import { BusyPoll } from '../../../lib/server/busy-poll';

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
