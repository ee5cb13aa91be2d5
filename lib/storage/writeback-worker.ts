// The writeback thread (a worker_threads Worker started by writeback-io.ts): maps the pmem region read-only
// and writes runs of region pages to backing files with pwritev, so those syscalls run beside the event loop
// instead of on it. It holds no state of its own: the main thread decides what to write, pins the pages
// until the reply arrives, and does all bookkeeping.

import { readlinkSync, writevSync } from 'node:fs';
import { setPriority } from 'node:os';
import { parentPort, workerData } from 'node:worker_threads';
import { remaining } from './iovec';
import { mapRegionPages, type RegionGeometry } from './region-map';

/** One backing write: the pages of `slots`, back to back, to fd at offset; `length` may cut the last page. */
export interface WriteJob {
  fd: number;
  offset: number;
  length: number;
  slots: number[];
}

export interface WriteBatch {
  id: number;
  jobs: WriteJob[];
  /** Writers are waiting for pages: run at normal priority for this batch (else nice 19). */
  urgent: boolean;
}

/** Per job: null on success, else the error's code and message. */
export interface WriteBatchResult {
  id: number;
  errors: Array<{ code: string; message: string } | null>;
}

export interface WorkerInit {
  regionFile: string;
  geometry: RegionGeometry;
}

/**
 * This thread's id, for CPU priority changes that affect it alone (Linux: setpriority on a thread id), or
 * null where /proc/thread-self does not exist.
 */
function threadId(): number | null {
  try {
    const tid = Number(readlinkSync('/proc/thread-self').split('/').pop());
    return Number.isInteger(tid) && tid > 0 ? tid : null;
  } catch {
    return null;
  }
}

/** Set this thread's nice value; false when the system does not allow it. */
function nice(tid: number | null, value: number): void {
  if (tid === null) return;
  try {
    setPriority(tid, value);
  } catch {
    // Raising priority back needs CAP_SYS_NICE (or RLIMIT_NICE): then the thread stays low.
  }
}

function main(): void {
  const port = parentPort;
  if (port === null) throw new Error('writeback-worker must run as a worker thread');
  const tid = threadId();
  // Low priority by default: on a machine with fewer cores than busy threads, the event loop and the clients
  // must not wait for a writeback time slice. While writers wait for pages, the event loop has nothing to do
  // and writeback is what everyone waits for: then normal priority.
  let urgent = false;
  nice(tid, 19);
  const init = workerData as WorkerInit;
  const page = mapRegionPages(init.regionFile, init.geometry);
  port.on('message', (batch: WriteBatch) => {
    if (batch.urgent !== urgent) {
      urgent = batch.urgent;
      nice(tid, urgent ? 0 : 19);
    }
    const errors: WriteBatchResult['errors'] = [];
    for (const job of batch.jobs) {
      try {
        writeJob(job, page);
        errors.push(null);
      } catch (err) {
        const e = err as NodeJS.ErrnoException;
        errors.push({ code: e.code ?? 'EIO', message: e.message });
      }
    }
    port.postMessage({ id: batch.id, errors } satisfies WriteBatchResult);
  });
}

function writeJob(job: WriteJob, page: (slot: number) => Buffer): void {
  const bufs: Buffer[] = [];
  let left = job.length;
  for (const slot of job.slots) {
    const p = page(slot);
    bufs.push(left < p.length ? p.subarray(0, left) : p);
    left -= p.length;
    if (left <= 0) break;
  }
  let done = 0;
  let parts = bufs;
  while (done < job.length) {
    done += writevSync(job.fd, parts, job.offset + done);
    if (done < job.length) parts = remaining(bufs, done);
  }
}

main();
