// Helpers for vectored writes (writevSync) that may write less than asked.

/** The buffers' bytes from byte `skip` on (what is left after a short writev). */
export function remaining(bufs: readonly Buffer[], skip: number): Buffer[] {
  const out: Buffer[] = [];
  for (const b of bufs) {
    if (skip >= b.length) {
      skip -= b.length;
      continue;
    }
    out.push(skip > 0 ? b.subarray(skip) : b);
    skip = 0;
  }
  return out;
}
