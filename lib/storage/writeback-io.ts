// The main thread's side of the writeback thread (writeback-worker.ts): hands it batches of page runs to write
// and resolves with one result per run. Pages stay pinned by the caller until the batch's promise settles,
// so the thread reads them while nothing can change them.

import * as path from 'node:path';
import { Worker } from 'node:worker_threads';
import type { RegionGeometry } from './region-map';
import { packJobs, type WriteBatch, type WriteBatchResult, type WriteJob } from './writeback-jobs';
import type { WorkerInit } from './writeback-worker';

export type { WriteJob };

/** A failed job's error, shaped like a Node system error so toNbdErrno maps it (ENOSPC, EIO, ...). */
export class WriteJobError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = 'WriteJobError';
  }
}

export class WritebackIo {
  private readonly worker: Worker;
  private nextId = 1;
  private readonly pending = new Map<number, { jobs: number; resolve: (errors: Array<Error | null>) => void; reject: (err: Error) => void }>();
  private failed: Error | null = null;
  private closed = false;

  constructor(regionFile: string, geometry: RegionGeometry) {
    // Compiled, this runs as dist/lib/storage/writeback-io.js next to writeback-worker.js; under the test
    // runner it runs from the .ts sources, whose loader the worker inherits through execArgv.
    const file = path.join(__dirname, `writeback-worker${path.extname(__filename)}`);
    this.worker = new Worker(file, { workerData: { regionFile, geometry } satisfies WorkerInit });
    this.worker.unref();
    this.worker.on('message', (r: WriteBatchResult) => {
      const p = this.pending.get(r.id);
      if (p === undefined) return;
      this.pending.delete(r.id);
      const errors = new Array<Error | null>(p.jobs).fill(null);
      for (const f of r.failures) errors[f.job] = new WriteJobError(f.code, f.message);
      p.resolve(errors);
    });
    this.worker.on('error', (err) => this.fail(err));
    this.worker.on('exit', (code) => {
      if (!this.closed) this.fail(new Error(`writeback thread exited with code ${code}`));
    });
  }

  /** False once the thread died or was closed: callers write on the event loop instead. */
  get usable(): boolean {
    return this.failed === null && !this.closed;
  }

  /**
   * Write the jobs in the thread; resolves with null (written) or the error, per job. urgent: writers are
   * waiting for pages, so the thread runs this batch at normal CPU priority instead of nice 19.
   */
  write(jobs: WriteJob[], urgent = false): Promise<Array<Error | null>> {
    if (!this.usable) return Promise.reject(this.failed ?? new Error('writeback thread is closed'));
    const id = this.nextId++;
    const packed = packJobs(jobs);
    return new Promise((resolve, reject) => {
      this.pending.set(id, { jobs: jobs.length, resolve, reject });
      this.worker.postMessage({ id, jobs: packed, urgent } satisfies WriteBatch, [packed.buffer as ArrayBuffer]);
    });
  }

  private fail(err: Error): void {
    this.failed ??= err;
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const p of pending) p.reject(err);
  }

  /** Stop the thread; batches still pending are rejected. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.fail(new Error('writeback thread is closed'));
    await this.worker.terminate();
  }
}
