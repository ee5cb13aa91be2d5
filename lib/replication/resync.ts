// The resync loop of a sync source: send every block its out-of-sync bitmap marks to the peer, in offset
// order, a few chunks at a time, while client writes go on. Each chunk holds the range lock while it reads
// the local copy and the peer takes it, so a client write to the same blocks lands entirely before or after
// it on both nodes: the newest data wins everywhere. Holes go as WRITE_ZEROES (which may trim), data as
// WRITE. A bit is cleared only after the peer acknowledged its block; the bitmap is persisted now and then,
// so an interrupted resync resumes where it stopped.

import type { NbdClient } from '../client/nbd-client';
import { NBD_STATE_HOLE, NBD_STATE_ZERO } from '../protocol/constants';
import type { BlockDevice } from '../storage/block-device';
import { BufferPool } from '../storage/buffer-pool';
import type { OosMap } from './oos-map';
import type { RangeLock } from './range-lock';

const BLOCK = 4096;
/** Blocks per chunk (256 KiB) and chunks in flight. */
export const CHUNK_BLOCKS = 64;
const PARALLEL = 4;
const PERSIST_EVERY_MS = 1000;

export interface ResyncProgress {
  /** Blocks marked when the resync started (plus any marked since). */
  totalBlocks: number;
  doneBlocks: number;
  /** Payload bytes sent as WRITEs, and bytes covered by WRITE_ZEROES. */
  bytesSent: number;
  bytesZeroed: number;
  startedAt: number;
  /** Bytes (sent and zeroed) per second over the last second or so. */
  rate: number;
}

export interface ResyncOptions {
  local: BlockDevice;
  oos: OosMap;
  lock: RangeLock;
  peer: NbdClient;
  /** Bytes per second, 0 = unlimited. */
  rateLimit: number;
  /** Returns true once the resync must stop (link lost, node stopping). */
  cancelled: () => boolean;
  /** Wrap a peer request for the link watchdog. */
  track: <T>(p: Promise<T>) => Promise<T>;
  onProgress?: (p: ResyncProgress) => void;
  /** A range the peer acknowledged: it holds it only in its region until its next FLUSH. */
  onSent?: (offset: number, length: number) => void;
  /** Before each chunk: a promise to wait for (too much sent that the peer has not flushed yet), or null. */
  throttle?: () => Promise<void> | null;
}

/** Run until the bitmap is empty (resolves) or the peer fails / the resync is cancelled (rejects). */
export async function runResync(o: ResyncOptions): Promise<ResyncProgress> {
  const progress: ResyncProgress = { totalBlocks: o.oos.count, doneBlocks: 0, bytesSent: 0, bytesZeroed: 0, startedAt: Date.now(), rate: 0 };
  let cursor = 0;
  let lastPersist = Date.now();
  let windowStart = Date.now();
  let windowBytes = 0;
  let failure: unknown = null;
  const inFlight = new Set<Promise<void>>();
  // Chunk buffers, reused once the peer has acknowledged them: a fresh 256 KiB buffer per chunk is external
  // memory, which V8 answers with mark-compacts (a tenth of the primary's time during a resync).
  const buffers = new BufferPool(PARALLEL * CHUNK_BLOCKS * BLOCK);

  const nextChunk = (): [number, number] | null => {
    let b = o.oos.nextSet(cursor);
    if (b < 0 && cursor > 0 && inFlight.size === 0) {
      cursor = 0; // bits set behind us meanwhile (a failed local write): go round again
      b = o.oos.nextSet(0);
    }
    if (b < 0) return null;
    let end = b + 1;
    while (end < o.oos.blocks && end - b < CHUNK_BLOCKS && o.oos.bits.get(end)) end++;
    cursor = end;
    return [b, end - b];
  };

  const sendChunk = async (first: number, count: number): Promise<void> => {
    const offset = first * BLOCK;
    const length = Math.min(count * BLOCK, o.oos.size - offset);
    const waited = o.lock.acquire(offset, length);
    if (waited) await waited;
    try {
      if (o.cancelled()) throw new Error('resync cancelled');
      let pos = offset;
      const end = offset + length;
      while (pos < end) {
        const extents = await o.local.extents(pos, end - pos);
        for (const e of extents) {
          const len = Math.min(e.length, end - pos);
          if ((e.flags & (NBD_STATE_HOLE | NBD_STATE_ZERO)) === (NBD_STATE_HOLE | NBD_STATE_ZERO)) {
            await o.track(o.peer.zero(pos, len));
            progress.bytesZeroed += len;
            windowBytes += len;
          } else {
            const buf = buffers.take(len);
            await o.local.pread(buf, pos);
            await o.track(o.peer.pwrite(buf, pos));
            buffers.give(buf); // written and acknowledged (after a failure it is simply dropped)
            progress.bytesSent += len;
            windowBytes += len;
          }
          pos += len;
          if (pos >= end) break;
        }
      }
      o.onSent?.(offset, length);
      o.oos.clear(offset, length);
      progress.doneBlocks += count;
    } finally {
      o.lock.release(offset, length);
    }
  };

  for (;;) {
    if (failure !== null) break;
    if (o.cancelled()) {
      failure = new Error('resync cancelled');
      break;
    }
    while (inFlight.size < PARALLEL) {
      const room = o.throttle?.() ?? null;
      if (room !== null) {
        await room.catch(() => undefined); // a failed FLUSH drops the link: cancelled() says so next round
        break;
      }
      const c = nextChunk();
      if (c === null) break;
      if (o.rateLimit > 0) {
        // Pace by what has been sent: wait until the sent bytes fit the allowed rate.
        const due = progress.startedAt + ((progress.bytesSent + progress.bytesZeroed) / o.rateLimit) * 1000;
        const wait = due - Date.now();
        if (wait > 0) await new Promise((r) => setTimeout(r, Math.min(wait, 1000)));
      }
      const p: Promise<void> = sendChunk(c[0], c[1]).then(
        () => {
          inFlight.delete(p);
        },
        (err: unknown) => {
          inFlight.delete(p);
          failure ??= err;
        },
      );
      inFlight.add(p);
    }
    if (inFlight.size === 0) {
      if (o.oos.nextSet(0) < 0) break;
      continue;
    }
    await Promise.race(inFlight);
    const now = Date.now();
    if (now - windowStart >= 1000) {
      progress.rate = (windowBytes * 1000) / (now - windowStart);
      windowStart = now;
      windowBytes = 0;
    }
    progress.totalBlocks = Math.max(progress.totalBlocks, progress.doneBlocks + o.oos.count);
    o.onProgress?.(progress);
    if (now - lastPersist >= PERSIST_EVERY_MS) {
      lastPersist = now;
      await o.oos.persist();
    }
  }
  await Promise.allSettled([...inFlight]);
  await o.oos.persist();
  if (failure !== null) throw failure;
  progress.totalBlocks = progress.doneBlocks;
  o.onProgress?.(progress);
  return progress;
}
