// Sizes on the command line: bytes, or a number with a binary suffix (K, M, G, T, P; optional "iB"/"B").

import { UsageError } from './errors';

const UNITS: Record<string, number> = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40, P: 2 ** 50 };

/** Parse "1073741824", "512M", "1G", "2TiB". Throws UsageError with the offending text. */
export function parseSize(text: string, what = 'size'): number {
  const m = /^\s*(\d+)\s*([KMGTP]?)(?:i?B)?\s*$/i.exec(text);
  if (!m) throw new UsageError(`invalid ${what} "${text}": use bytes or a binary suffix such as 512M, 1G, 2T`);
  const value = Number(m[1]) * UNITS[m[2]!.toUpperCase()]!;
  if (!Number.isSafeInteger(value)) throw new UsageError(`invalid ${what} "${text}": too large`);
  return value;
}

/** "1 GiB", "512 MiB", "4096 B" — for humans. */
export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${bytes} B` : `${Number.isInteger(v) ? v : v.toFixed(2)} ${units[i]}`;
}
