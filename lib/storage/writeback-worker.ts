// The writeback thread (a worker_threads Worker started by writeback-io.ts): reads runs of region pages from
// the region file and writes them to backing files, so those syscalls and copies run beside the event loop
// instead of on it. It holds no state of its own: the main thread decides what to write, pins the pages
// until the reply arrives, and does all bookkeeping.
//
// It reads the pages with pread rather than through a mapping of its own: a second mapping of the region in
// the same process counts every page it touches in the RSS a second time (the region was counted twice in
// the benchmark's peak RSS). The pread of a tmpfs page is a copy from the same page the event loop wrote.

import { closeSync, openSync, readSync, readlinkSync, writeSync } from 'node:fs';
import { setPriority } from 'node:os';
import { parentPort, workerData } from 'node:worker_threads';
import { PAGE_SIZE, type RegionGeometry } from './region-map';
import { unpackJobs, type WriteBatch, type WriteBatchResult, type WriteJob } from './writeback-jobs';

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
  const region = openSync(init.regionFile, 'r');
  port.once('close', () => closeSync(region));
  const src = { fd: region, pagesOffset: init.geometry.pagesOffset, staging: Buffer.allocUnsafeSlow(32 * PAGE_SIZE) };
  port.on('message', (batch: WriteBatch) => {
    if (batch.urgent !== urgent) {
      urgent = batch.urgent;
      nice(tid, urgent ? 0 : 19);
    }
    const failures: WriteBatchResult['failures'] = [];
    let i = 0;
    for (const job of unpackJobs(batch.jobs)) {
      try {
        writeJob(job, src);
      } catch (err) {
        const e = err as NodeJS.ErrnoException;
        failures.push({ job: i, code: e.code ?? 'EIO', message: e.message });
      }
      i++;
    }
    port.postMessage({ id: batch.id, failures } satisfies WriteBatchResult);
  });
}

interface RegionSource {
  fd: number;
  pagesOffset: number;
  /** Reused between jobs; grown for a longer one. */
  staging: Buffer;
}

/** Copy the job's pages (runs of consecutive slots in one read each) into staging, then write them out. */
function writeJob(job: WriteJob, src: RegionSource): void {
  if (src.staging.length < job.length) src.staging = Buffer.allocUnsafeSlow(Math.ceil(job.length / PAGE_SIZE) * PAGE_SIZE);
  const buf = src.staging;
  const slots = job.slots;
  let pos = 0;
  for (let i = 0; i < slots.length && pos < job.length; ) {
    let n = 1;
    while (i + n < slots.length && slots[i + n] === slots[i]! + n) n++;
    const want = Math.min(n * PAGE_SIZE, job.length - pos);
    readFully(src.fd, buf, pos, want, src.pagesOffset + slots[i]! * PAGE_SIZE);
    pos += want;
    i += n;
  }
  let done = 0;
  while (done < job.length) done += writeSync(job.fd, buf, done, job.length - done, job.offset + done);
}

function readFully(fd: number, buf: Buffer, at: number, length: number, position: number): void {
  let done = 0;
  while (done < length) {
    const n = readSync(fd, buf, at + done, length - done, position + done);
    if (n === 0) throw Object.assign(new Error('the pmem region file is shorter than its geometry'), { code: 'EIO' });
    done += n;
  }
}

main();
