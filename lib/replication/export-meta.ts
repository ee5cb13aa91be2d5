// DATA_DIR/NAME.meta.json: what an export's replication state must remember across restarts — its uuid (the
// same on both nodes once they have synced), size, role, the highest epoch seen, the generation ids and
// whether the local copy is known to be up to date. Written atomically (temp file, fsync, rename, fsync of
// the directory) before anything that depends on it is acknowledged.

import { randomUUID } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { CorruptStateError } from '../errors';
import { syncDir } from '../storage/file-io';
import { type Generations, initialGenerations, isGenerations } from './generations';

export const META_VERSION = 1;

export type Role = 'primary' | 'secondary';

/**
 * DRBD's disk states, reduced: `UpToDate` — nothing is known to be missing; `Outdated` — the peer wrote
 * what this copy lacks (told so by the peer, or found at the link handshake); `Inconsistent` — a resync into
 * this copy is under way, so it is a mix of old and new blocks.
 */
export type DiskState = 'UpToDate' | 'Outdated' | 'Inconsistent';

export interface ExportMeta {
  version: number;
  uuid: string;
  size: number;
  role: Role;
  /** The highest epoch this node has seen for the export (its own promotions and its primaries'). */
  epoch: number;
  gen: Generations;
  disk: DiskState;
  /** Node uuid of the peer last linked with, or null. */
  peer: string | null;
}

export function metaFile(dir: string, name: string): string {
  return path.join(dir, `${name}.meta.json`);
}

export function newMeta(size: number, role: Role): ExportMeta {
  return { version: META_VERSION, uuid: randomUUID(), size, role, epoch: 0, gen: initialGenerations(), disk: 'UpToDate', peer: null };
}

const ROLES: readonly string[] = ['primary', 'secondary'];
const DISK_STATES: readonly string[] = ['UpToDate', 'Outdated', 'Inconsistent'];

function validate(file: string, j: unknown): ExportMeta {
  const bad = (why: string): never => {
    throw new CorruptStateError(`${file}: ${why}`);
  };
  if (typeof j !== 'object' || j === null) return bad('not a JSON object');
  const m = j as Record<string, unknown>;
  if (m.version !== META_VERSION) bad(`version ${String(m.version)}, expected ${META_VERSION}`);
  if (typeof m.uuid !== 'string' || !/^[0-9a-f-]{36}$/.test(m.uuid)) bad('missing or invalid uuid');
  if (typeof m.size !== 'number' || !Number.isSafeInteger(m.size) || m.size < 0) bad('invalid size');
  if (typeof m.role !== 'string' || !ROLES.includes(m.role)) bad('invalid role');
  if (typeof m.epoch !== 'number' || !Number.isSafeInteger(m.epoch) || m.epoch < 0) bad('invalid epoch');
  if (!isGenerations(m.gen)) bad('invalid generation ids');
  if (typeof m.disk !== 'string' || !DISK_STATES.includes(m.disk)) bad('invalid disk state');
  if (m.peer !== null && typeof m.peer !== 'string') bad('invalid peer');
  return m as unknown as ExportMeta;
}

/** Load NAME.meta.json; null when it does not exist. A damaged file is a CorruptStateError, never ignored. */
export async function loadMeta(dir: string, name: string): Promise<ExportMeta | null> {
  const file = metaFile(dir, name);
  let text: string;
  try {
    text = await fsp.readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new CorruptStateError(`cannot read ${file}: ${(err as Error).message}`);
  }
  let j: unknown;
  try {
    j = JSON.parse(text);
  } catch {
    throw new CorruptStateError(`${file} is not valid JSON`);
  }
  return validate(file, j);
}

/** Replace NAME.meta.json atomically and durably. */
export async function saveMeta(dir: string, name: string, meta: ExportMeta): Promise<void> {
  const file = metaFile(dir, name);
  const tmp = `${file}.tmp`;
  const fh = await fsp.open(tmp, 'w', 0o600);
  try {
    await fh.writeFile(`${JSON.stringify(meta, null, 2)}\n`);
    await fh.datasync();
  } finally {
    await fh.close();
  }
  await fsp.rename(tmp, file);
  await syncDir(dir);
}

/**
 * The export's meta state, with updates serialised: callers change a copy and `commit` persists it before the
 * in-memory state moves, so what others read is always what is on disk.
 */
export class MetaStore {
  private chain: Promise<void> = Promise.resolve();

  private constructor(
    private readonly dir: string,
    readonly name: string,
    private state: ExportMeta,
  ) {}

  /** Load or create the meta state of an export of `size` bytes; `initialRole` applies to a new one. */
  static async open(dir: string, name: string, size: number, initialRole: Role): Promise<{ store: MetaStore; created: boolean }> {
    const m = await loadMeta(dir, name);
    if (m !== null) {
      if (m.size !== size) {
        throw new CorruptStateError(`${metaFile(dir, name)} is for an export of ${m.size} bytes, but it is configured with ${size}`);
      }
      return { store: new MetaStore(dir, name, m), created: false };
    }
    const fresh = newMeta(size, initialRole);
    await saveMeta(dir, name, fresh);
    return { store: new MetaStore(dir, name, fresh), created: true };
  }

  get meta(): Readonly<ExportMeta> {
    return this.state;
  }

  /** Apply `change` to a copy, persist it, then make it current. Updates run one at a time, in call order. */
  update(change: (m: ExportMeta) => void): Promise<Readonly<ExportMeta>> {
    const run = this.chain.then(async () => {
      const next: ExportMeta = { ...this.state, gen: { ...this.state.gen, history: [...this.state.gen.history] } };
      change(next);
      await saveMeta(this.dir, this.name, next);
      this.state = next;
      return next;
    });
    this.chain = run.then(
      () => undefined,
      () => undefined,
    );
    return run;
  }
}
