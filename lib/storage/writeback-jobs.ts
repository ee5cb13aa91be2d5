// The messages between the event loop and the writeback thread (writeback-io.ts, writeback-worker.ts): a
// module of its own, as the worker's module starts the thread's loop when loaded.

/** One backing write: the pages of `slots`, back to back, to fd at offset; `length` may cut the last page. */
export interface WriteJob {
  fd: number;
  offset: number;
  length: number;
  slots: ArrayLike<number>;
}

/**
 * A batch as it crosses to the thread: its jobs packed into one Float64Array (transferred, not copied), per
 * job fd, offset, length, the slot count and the slots. An array of job objects went through V8's structured
 * clone property by property, on both threads, for every job of every batch.
 */
export interface WriteBatch {
  id: number;
  jobs: Float64Array;
  /** Writers are waiting for pages: run at normal priority for this batch (else nice 19). */
  urgent: boolean;
}

/** The jobs that failed (by their index in the batch), with the error's code and message; none: all written. */
export interface WriteBatchResult {
  id: number;
  failures: Array<{ job: number; code: string; message: string }>;
}

/** Pack jobs for a WriteBatch. */
export function packJobs(jobs: readonly WriteJob[]): Float64Array {
  let size = 0;
  for (const j of jobs) size += 4 + j.slots.length;
  const out = new Float64Array(size);
  let at = 0;
  for (const j of jobs) {
    out[at++] = j.fd;
    out[at++] = j.offset;
    out[at++] = j.length;
    out[at++] = j.slots.length;
    for (let i = 0; i < j.slots.length; i++) out[at++] = j.slots[i]!;
  }
  return out;
}

/** The jobs of a packed batch, in order (views into it: no slot is copied). */
export function* unpackJobs(packed: Float64Array): Generator<WriteJob> {
  for (let at = 0; at < packed.length; ) {
    const n = packed[at + 3]!;
    yield { fd: packed[at]!, offset: packed[at + 1]!, length: packed[at + 2]!, slots: packed.subarray(at + 4, at + 4 + n) };
    at += 4 + n;
  }
}
