// startNode: one nbdmirror node built from a Config — data dir lock, node identity, backing files, pmem
// region (with crash recovery before anything is served), writeback, read cache, the NBD listener and HTTP.
// server.ts and the tests both use it; nothing here reads process-global state.

import { randomUUID } from 'node:crypto';
import { hostname } from 'node:os';
import { promises as fsp } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import * as path from 'node:path';
import { type Address, type Config, formatAddress } from './config';
import { HttpControl, sendJson } from './control/http';
import { addReplicationRoutes } from './control/replication-routes';
import { CorruptStateError, UsageError } from './errors';
import type { Logger } from './log';
import { createNodeMetrics, type MetricsSnapshot } from './metrics/prometheus';
import { NodeRequestStats } from './metrics/request-stats';
import { ExportRegistry, type ExportHandle } from './server/exports';
import { BusyPoll } from './server/busy-poll';
import { NbdServer } from './server/listener';
import type { PeerLinkOptions } from './replication/peer-link';
import { LINK_PREFIX, Replica, type ReplicaStatus } from './replication/replica';
import { BackingFile, checkCapacity, lockDataDir } from './storage/backing-file';
import type { BlockIndex } from './storage/block-index';
import { PmemLayer } from './storage/pmem-layer';
import { PAGE_SIZE, PmemRegion, type RecoveryReport } from './storage/pmem-region';
import { PmemStore } from './storage/pmem-store';
import { ReadCache } from './storage/read-cache';
import { Writeback } from './storage/writeback';
import { WritebackIo } from './storage/writeback-io';
import { packageVersion } from './version';

export interface NodeAddresses {
  nbd: Address;
  http: Address;
}

export interface RecoveryFigures {
  pages: number;
  bytes: number;
  torn: number;
  superseded: number;
  ms: number;
}

/** What the engine looks like from outside (status, metrics). */
export interface NodeStatus {
  node: { uuid: string; durability: string; regionFile: string };
  region: ReturnType<PmemStore['stats']>;
  writeback: { bytesWritten: number; bypassBytes: number };
  cache: { maxBytes: number; bytes: number; hits: number; misses: number };
  recovery: RecoveryFigures;
  exports: Array<{ name: string; size: number; residentPages: number }>;
  replication: { nodeId: string; peer: string | null; exports: ReplicaStatus[] };
}

export interface NbdmirrorNode {
  readonly addresses: NodeAddresses;
  status(): NodeStatus;
  /** Stop accepting, finish in-flight requests, write everything back, close every export, unlock. */
  stop(): Promise<void>;
}

// DATA_DIR/node.json. Bump NODE_FILE_VERSION on any change of its fields.
const NODE_FILE_VERSION = 1;
/**
 * The replication link's payload budget per connection (see Connection.MAX_IN_FLIGHT_BYTES): one link carries
 * the mirrored writes of every client connection of the primary, and resync's, so it gets the room of several.
 */
const LINK_PAYLOAD_BUDGET = 64 * 1024 * 1024;

/** The node's identity, created on first start and kept in the data dir. */
async function loadNodeUuid(dataDir: string): Promise<string> {
  const file = path.join(dataDir, 'node.json');
  try {
    const j = JSON.parse(await fsp.readFile(file, 'utf8')) as { version?: number; uuid?: string };
    if (j.version !== NODE_FILE_VERSION || typeof j.uuid !== 'string' || !/^[0-9a-f-]{36}$/.test(j.uuid)) {
      throw new CorruptStateError(`${file} is not a valid node file (version ${NODE_FILE_VERSION} with a uuid)`);
    }
    return j.uuid;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
      if (err instanceof CorruptStateError) throw err;
      throw new CorruptStateError(`cannot read ${file}: ${(err as Error).message}`);
    }
  }
  const uuid = randomUUID();
  const tmp = `${file}.tmp`;
  await fsp.writeFile(tmp, `${JSON.stringify({ version: NODE_FILE_VERSION, uuid })}\n`, { mode: 0o600 });
  await fsp.rename(tmp, file);
  return uuid;
}

export async function startNode(config: Config, log: Logger): Promise<NbdmirrorNode> {
  const lock = await lockDataDir(config.dataDir);
  const backings = new Map<string, BackingFile>();
  let region: PmemRegion | null = null;
  let writeback: Writeback | null = null;
  let io: WritebackIo | null = null;
  let nbd: NbdServer | null = null;
  const replicas: Replica[] = [];
  const http = new HttpControl(log.child({ component: 'http' }), config.adminToken);
  // HTTP comes up first, so /healthz answers during a long recovery while /readyz says 503 until serving.
  let ready = false;
  http.addRoute('GET /readyz', (_req, res) => sendJson(res, ready ? 200 : 503, { status: ready ? 'ready' : 'starting' }));
  try {
    const httpAddress = await http.listen(config.http);
    const uuid = await loadNodeUuid(config.dataDir);
    for (const e of config.exports) {
      checkCapacity(config.dataDir, e.size, e.name, log);
      backings.set(e.name, await BackingFile.open({ dir: config.dataDir, name: e.name, size: e.size, readOnly: config.readOnly, log }));
    }
    const regionFile = PmemRegion.fileFor(config.pmemDir, uuid);
    const started = Date.now();
    let figures: RecoveryFigures = { pages: 0, bytes: 0, torn: 0, superseded: 0, ms: 0 };
    const opened = await PmemRegion.open({
      file: regionFile,
      nodeUuid: uuid,
      size: config.pmemSize,
      writeBack: async (report) => {
        figures = await recover(report, backings, log);
      },
    });
    region = opened.region;
    figures.ms = Date.now() - started;
    log.info({ regionFile, pages: region.pageCount, created: opened.created, recovery: figures }, 'pmem region ready');

    const cache = new ReadCache(config.cacheSize);
    const store = new PmemStore(region, cache);
    io = new WritebackIo(region.file, region.geometry);
    writeback = new Writeback(
      store,
      {
        highPages: Math.floor(region.pageCount * config.writeback.high),
        lowPages: Math.floor(region.pageCount * config.writeback.low),
        maxAgeMs: config.writeback.maxAgeMs,
        // In pmem durability the region is the only copy until the backing file is synced.
        syncBeforeClean: config.durability === 'pmem',
        io,
      },
      log.child({ component: 'writeback' }),
    );
    const layers: Array<{ name: string; layer: PmemLayer; index: BlockIndex }> = [];
    const handles: ExportHandle[] = [];
    const nodeId = config.nodeId ?? hostname();
    // One busy polling for the node's event loop: client requests and the replication link's replies touch it.
    const busyPoll = new BusyPoll(config.busyPollMs);
    const peer: PeerLinkOptions | null =
      config.peer === null
        ? null
        : {
            nbd: config.peer.nbd,
            http: config.peer.http,
            timeoutMs: config.peerTimeoutMs,
            resyncRate: config.resyncRate,
            adminToken: config.adminToken,
            // A mirrored write waits on the loop for the peer's reply: polling from the request's arrival alone
            // would end before it came (the secondary's round trip is about a window long), and the primary would
            // then pay a wake-up for the reply and another for the client's next request.
            onRead: () => busyPoll.touch(),
          };
    const requests = new NodeRequestStats();
    for (const e of config.exports) {
      const se = store.addExport(e.name, backings.get(e.name)!);
      const layer = new PmemLayer(store, se, writeback, config.durability, config.writeBypass === 0 ? Infinity : config.writeBypass);
      layers.push({ name: e.name, layer, index: se.index });
      const replica = await Replica.open({
        name: e.name,
        size: e.size,
        dataDir: config.dataDir,
        lower: layer,
        nodeUuid: uuid,
        nodeId,
        role: config.role,
        peer,
        log: log.child({ export: e.name }),
      });
      replicas.push(replica);
      handles.push({ name: e.name, description: `nbdmirror export ${e.name}`, device: replica.clientDevice, stats: requests.for(e.name, 'client') });
    }
    // The link export is LINK_PREFIX + NAME/TOKEN, valid only for the session the handshake granted.
    const linkExport = (name: string): ExportHandle | undefined => {
      if (!name.startsWith(LINK_PREFIX)) return undefined;
      const rest = name.slice(LINK_PREFIX.length);
      const slash = rest.lastIndexOf('/');
      const r = replicas.find((x) => x.name === rest.slice(0, slash));
      const device = r?.linkDevice(rest.slice(slash + 1));
      return device === undefined ? undefined : { name, description: 'nbdmirror replication link', device, stats: requests.for(r!.name, 'peer'), answerAtOnce: true, payloadBudget: LINK_PAYLOAD_BUDGET };
    };

    const status = (): NodeStatus => ({
      node: { uuid, durability: config.durability, regionFile },
      region: store.stats(),
      writeback: { bytesWritten: writeback!.bytesWritten, bypassBytes: store.bypassBytes },
      cache: { maxBytes: cache.maxBytes, bytes: cache.bytes, hits: cache.hits, misses: cache.misses },
      recovery: figures,
      exports: layers.map((l) => ({ name: l.name, size: backings.get(l.name)!.size, residentPages: l.index.size })),
      replication: {
        nodeId,
        peer: config.peer === null ? null : `nbd://${formatAddress(config.peer.nbd)}`,
        exports: replicas.map((r) => r.status()),
      },
    });
    const snapshot = (): MetricsSnapshot => {
      const st = store.stats();
      return {
        region: {
          capacityPages: st.capacityPages,
          usedPages: st.capacityPages - st.freePages,
          dirtyPages: st.dirtyPages,
          pageSize: PAGE_SIZE,
          backpressureWaits: st.backpressureWaits,
          oldestDirtySeconds: st.oldestDirtyMs === null ? null : st.oldestDirtyMs / 1000,
        },
        writebackBytes: writeback!.bytesWritten,
        bypassBytes: store.bypassBytes,
        cache: { hits: cache.hits, misses: cache.misses, bytes: cache.bytes, maxBytes: cache.maxBytes },
        replication: replicas.map((r) => {
          const s = r.status();
          const rs = s.link?.resync ?? null;
          return {
            export: s.name,
            role: s.role,
            disk: s.disk,
            linkState: s.link?.state ?? null,
            epoch: s.epoch,
            outOfSyncBytes: s.outOfSync.bytes,
            splitBrain: s.splitBrain !== null,
            resync:
              rs === null
                ? null
                : { doneBytes: rs.bytesSent + rs.bytesZeroed, totalBytes: rs.totalBlocks * PAGE_SIZE, rate: rs.rate, etaSeconds: rs.etaSeconds },
            resyncSentBytes: r.link?.resyncSentBytes ?? 0,
            peerWrites: r.link?.peerWrites ?? null,
          };
        }),
      };
    };
    const metrics = createNodeMetrics({ requests, snapshot, busyPoll }, { version: packageVersion(), nodeId });
    http.addRoute('GET /v1/status', (_req, res) => sendJson(res, 200, status()));
    http.addRoute('GET /metrics', async (_req, res) => {
      const text = await metrics.text();
      res.writeHead(200, { 'content-type': metrics.contentType, 'content-length': Buffer.byteLength(text) });
      res.end(text);
    });
    addReplicationRoutes(http, replicas);

    nbd = new NbdServer(new ExportRegistry(handles, linkExport), log.child({ component: 'nbd' }), requests, {}, busyPoll);
    const addresses = { nbd: await nbd.listen(config.listen), http: httpAddress };
    log.info(
      { nbd: formatAddress(addresses.nbd), http: formatAddress(addresses.http), exports: config.exports.map((e) => e.name), dataDir: config.dataDir, durability: config.durability },
      'listening',
    );
    for (const r of replicas) r.start();
    ready = true;
    http.starting = false;
    const server = nbd;
    const wb = writeback;
    const threadIo = io;
    const reg = region;
    let stopping: Promise<void> | null = null;
    return {
      addresses,
      status,
      stop: () =>
        (stopping ??= (async () => {
          ready = false;
          await server.stop();
          // Links stop after the clients' requests finished, so every acknowledged write reached both nodes.
          for (const r of replicas) {
            await r.close().catch((err: unknown) => log.error({ err, export: r.name }, 'closing the replication state failed'));
          }
          await http.close();
          // Everything in the region goes to the backing files, so a clean stop leaves nothing to recover.
          for (const l of layers) {
            try {
              await l.layer.close();
            } catch (err) {
              log.error({ err, export: l.name }, 'writing back the region failed; it will be recovered at the next start');
            }
          }
          await wb.stop();
          await threadIo.close();
          // A region with nothing dirty left is deleted: it would only hold tmpfs memory until the next start.
          await reg.close(store.dirtyCount === 0);
          await closeAll(backings, lock, log);
        })()),
    };
  } catch (err) {
    await nbd?.stop();
    for (const r of replicas) await r.close().catch(() => undefined);
    await http.close().catch(() => undefined);
    await writeback?.stop();
    await io?.close();
    await region?.close();
    await closeAll(backings, lock, log);
    throw err;
  }
}

/** Write the region's surviving pages back in sequence order and make them durable. */
async function recover(report: RecoveryReport, backings: Map<string, BackingFile>, log: Logger): Promise<RecoveryFigures> {
  const missing = new Set(report.pages.map((p) => p.exportName).filter((n) => !backings.has(n)));
  if (missing.size > 0) {
    throw new UsageError(
      `the pmem region holds unwritten data of export(s) ${[...missing].join(', ')} that are not configured: ` +
        'start with those --export NAME=SIZE flags to recover them',
    );
  }
  let bytes = 0;
  const touched = new Set<BackingFile>();
  if (report.pages.length > 0) log.warn({ pages: report.pages.length, torn: report.torn }, 'recovering the pmem region after an unclean stop: writing its pages back');
  let lastLog = Date.now();
  for (let i = 0; i < report.pages.length; i++) {
    const p = report.pages[i]!;
    if (Date.now() - lastLog >= 5000) {
      lastLog = Date.now();
      log.info({ done: i, pages: report.pages.length, bytes }, 'recovery progress');
    }
    const b = backings.get(p.exportName)!;
    const off = p.block * PAGE_SIZE;
    if (off >= b.size) continue;
    const len = Math.min(PAGE_SIZE, b.size - off);
    await b.pwrite(p.data.subarray(0, len), off);
    bytes += len;
    touched.add(b);
  }
  for (const b of touched) await b.flush();
  if (report.pages.length > 0 || report.torn > 0) {
    log.warn({ pages: report.pages.length, bytes, torn: report.torn, superseded: report.superseded }, 'recovered the pmem region after an unclean stop');
  }
  return { pages: report.pages.length, bytes, torn: report.torn, superseded: report.superseded, ms: 0 };
}

async function closeAll(backings: Map<string, BackingFile>, lock: FileHandle, log: Logger): Promise<void> {
  for (const [name, b] of backings) {
    try {
      await b.close();
    } catch (err) {
      log.error({ err, export: name }, 'closing export failed');
    }
  }
  await lock.close();
}
