// Data generation identifiers, after DRBD's: each node keeps, per export, a `current` id naming the data it
// holds, a `bitmap` id naming the data its out-of-sync bitmap is relative to (set when it starts writing
// without its peer; '' while it is not), and a short `history` of older ids. Comparing two nodes' ids tells
// whether they hold the same data, which one is ahead and whether a bitmap resync suffices — or whether both
// wrote while apart (split brain). Pure functions; the ids are persisted in NAME.meta.json by the caller.

import { randomBytes } from 'node:crypto';

export interface Generations {
  current: string;
  /** The current id at the moment this node started recording changes its peer misses; '' when none. */
  bitmap: string;
  /** Older ids, newest first (at most HISTORY_LENGTH). */
  history: string[];
}

/** The current id of an export that has never been written or synced. Two such copies are equal (all zeros). */
export const GEN_CREATED = '0000000000000004';
export const HISTORY_LENGTH = 2;

const GEN_ID = /^[0-9a-f]{16}$/;

export function newGenId(): string {
  for (;;) {
    const id = randomBytes(8).toString('hex');
    if (id !== GEN_CREATED && id !== '0000000000000000') return id;
  }
}

export function initialGenerations(): Generations {
  return { current: GEN_CREATED, bitmap: '', history: [] };
}

export function isGenerations(x: unknown): x is Generations {
  if (typeof x !== 'object' || x === null) return false;
  const g = x as Record<string, unknown>;
  return (
    typeof g.current === 'string' &&
    GEN_ID.test(g.current) &&
    typeof g.bitmap === 'string' &&
    (g.bitmap === '' || GEN_ID.test(g.bitmap)) &&
    Array.isArray(g.history) &&
    g.history.length <= HISTORY_LENGTH &&
    g.history.every((h) => typeof h === 'string' && GEN_ID.test(h))
  );
}

/**
 * How a would-be sync source (the primary) relates to a would-be target (the secondary):
 * - `in-sync`: same data apart from blocks either side has marked out of sync (crash extents, a discard);
 * - `bitmap`: the source wrote while apart and its bitmap covers what the target misses;
 * - `full`: the target is older than the source's bitmap reaches, or has never been synced: copy everything;
 * - `peer-newer`: the target holds data the source lacks: the roles are the wrong way round;
 * - `split-brain`: both wrote since they last agreed;
 * - `unrelated`: no common history (different disks).
 */
export type SyncVerdict = 'in-sync' | 'bitmap' | 'full' | 'peer-newer' | 'split-brain' | 'unrelated';

export function compareGenerations(source: Generations, target: Generations): SyncVerdict {
  if (source.current === target.current) return 'in-sync';
  // A side that rotated draws a fresh current id, so "the other's current is my bitmap id" means the other
  // has not written since: checked first, it also covers a source that diverged from a never-written copy.
  if (source.bitmap !== '' && target.current === source.bitmap) return 'bitmap';
  if (target.bitmap !== '' && source.current === target.bitmap) return 'peer-newer';
  if (source.bitmap !== '' && source.bitmap === target.bitmap) return 'split-brain';
  if (source.current === GEN_CREATED) return 'peer-newer';
  if (target.current === GEN_CREATED) return 'full';
  if (source.history.includes(target.current)) return target.bitmap === '' ? 'full' : 'split-brain';
  if (target.history.includes(source.current)) return source.bitmap === '' ? 'peer-newer' : 'split-brain';
  if (source.bitmap !== '' && target.history.includes(source.bitmap)) return 'split-brain';
  if (target.bitmap !== '' && source.history.includes(target.bitmap)) return 'split-brain';
  return 'unrelated';
}

/**
 * This node is about to write something its peer will miss. The first time (no bitmap id yet) the current id
 * becomes the bitmap id and a new current id is drawn; afterwards nothing changes. Returns null when
 * nothing changes, so the caller persists only real changes.
 */
export function startDiverging(g: Generations): Generations | null {
  if (g.bitmap !== '') return null;
  return { current: newGenId(), bitmap: g.current, history: g.history };
}

/** The source finished a resync: its bitmap id moves into the history. */
export function sourceSynced(g: Generations): Generations {
  if (g.bitmap === '') return g;
  return { current: g.current, bitmap: '', history: [g.bitmap, ...g.history.filter((h) => h !== g.bitmap)].slice(0, HISTORY_LENGTH) };
}

/** The target finished a resync from a source whose current id is `sourceCurrent`. */
export function targetSynced(g: Generations, sourceCurrent: string): Generations {
  if (g.current === sourceCurrent) return { current: g.current, bitmap: '', history: g.history };
  const history = [g.current, ...g.history].filter((h) => h !== sourceCurrent && h !== GEN_CREATED);
  return { current: sourceCurrent, bitmap: '', history: [...new Set(history)].slice(0, HISTORY_LENGTH) };
}

/**
 * Split-brain resolution on the node whose changes are thrown away: it goes back to the id its changes were
 * made on top of, so the peer (which holds that id as its bitmap id, or the same one) resyncs it by bitmap,
 * the victim's own out-of-sync blocks included. Without a bitmap id it is marked never-synced: full sync.
 */
export function discardLocalChanges(g: Generations): Generations {
  if (g.bitmap !== '') return { current: g.bitmap, bitmap: '', history: g.history };
  return { current: GEN_CREATED, bitmap: '', history: g.current === GEN_CREATED ? g.history : [g.current, ...g.history].slice(0, HISTORY_LENGTH) };
}
