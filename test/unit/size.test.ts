// lib/size.ts: parseSize accepts bytes and binary suffixes (K M G T P, optional "iB"/"B", any case, blanks
// around) and refuses anything else with a UsageError naming the text; formatSize prints for humans.

import t from 'tap';
import { formatSize, parseSize } from '../../lib/size';
import { UsageError } from '../../lib/errors';

const K = 1024;

t.test('parseSize accepts', async (t) => {
  const cases: [string, number][] = [
    ['0', 0],
    ['1', 1],
    ['512', 512],
    ['1073741824', 2 ** 30],
    ['1K', K],
    ['1k', K],
    ['1KB', K],
    ['1KiB', K],
    ['1kib', K],
    ['4096B', 4096],
    ['512M', 512 * K * K],
    ['512MiB', 512 * K * K],
    ['1G', 2 ** 30],
    ['1g', 2 ** 30],
    ['2T', 2 * 2 ** 40],
    ['2TiB', 2 * 2 ** 40],
    ['1P', 2 ** 50],
    ['7P', 7 * 2 ** 50],
    ['  64M  ', 64 * K * K],
    ['1 G', 2 ** 30],
    ['0G', 0],
    ['007K', 7 * K],
    [String(2 ** 53 - 1), 2 ** 53 - 1],
  ];
  for (const [text, want] of cases) t.equal(parseSize(text), want, JSON.stringify(text));
});

t.test('parseSize refuses, with the text and what it was for in the message', async (t) => {
  const bad = ['', ' ', 'abc', 'G', '1.5G', '-1', '+1', '1X', '1GG', '1E', '0x10', '1e6', '1 0', '1,5M', '1MiBs', '12 34'];
  for (const text of bad) {
    t.throws(() => parseSize(text, 'size of export disk0'), UsageError, JSON.stringify(text));
    try {
      parseSize(text, 'size of export disk0');
    } catch (err) {
      t.match((err as Error).message, `invalid size of export disk0 "${text}"`, `${JSON.stringify(text)}: message`);
    }
  }
  t.throws(() => parseSize('x'), { message: /^invalid size "x": use bytes or a binary suffix/ }, 'default label');
});

t.test('parseSize refuses values past 2^53', async (t) => {
  for (const text of ['8P', '9007199254740992', '8192T', '99999999999P']) {
    t.throws(() => parseSize(text), { message: /too large/ }, text);
    t.throws(() => parseSize(text), UsageError);
  }
});

t.test('formatSize', async (t) => {
  const cases: [number, string][] = [
    [0, '0 B'],
    [1, '1 B'],
    [1023, '1023 B'],
    [1024, '1 KiB'],
    [1536, '1.50 KiB'],
    [1025, '1.00 KiB'],
    [4096, '4 KiB'],
    [512 * K * K, '512 MiB'],
    [2 ** 30, '1 GiB'],
    [2 ** 30 + 2 ** 29, '1.50 GiB'],
    [2 ** 40, '1 TiB'],
    [2 ** 50, '1 PiB'],
    [2 ** 60, '1024 PiB'],
  ];
  for (const [n, want] of cases) t.equal(formatSize(n), want, String(n));
});

t.test('formatSize output of whole units parses back', async (t) => {
  for (const n of [1, 4096, 2 ** 20, 3 * 2 ** 30, 5 * 2 ** 40, 2 ** 50]) {
    t.equal(parseSize(formatSize(n)), n, formatSize(n));
  }
});
