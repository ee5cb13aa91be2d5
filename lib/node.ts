// createNode: one nbdmirror node built from a Config — data dir lock, export stacks, NBD listener, HTTP.
// server.ts and the tests both use it; nothing here reads process-global state.

import type { FileHandle } from 'node:fs/promises';
import { type Address, type Config, formatAddress } from './config';
import { HttpControl } from './control/http';
import type { Logger } from './log';
import { ExportRegistry, type ExportHandle } from './server/exports';
import { NbdServer } from './server/listener';
import { BackingFile, checkCapacity, lockDataDir } from './storage/backing-file';

export interface NodeAddresses {
  nbd: Address;
  http: Address;
}

export interface NbdmirrorNode {
  readonly addresses: NodeAddresses;
  /** Stop accepting, finish in-flight requests, flush and close every export, release the data dir. */
  stop(): Promise<void>;
}

export async function startNode(config: Config, log: Logger): Promise<NbdmirrorNode> {
  const lock = await lockDataDir(config.dataDir);
  const opened: ExportHandle[] = [];
  let nbd: NbdServer | null = null;
  const http = new HttpControl(log.child({ component: 'http' }));
  try {
    for (const e of config.exports) {
      checkCapacity(config.dataDir, e.size, e.name, log);
      const device = await BackingFile.open({ dir: config.dataDir, name: e.name, size: e.size, readOnly: config.readOnly, log });
      opened.push({ name: e.name, description: `nbdmirror export ${e.name}`, device });
    }
    nbd = new NbdServer(new ExportRegistry(opened), log.child({ component: 'nbd' }));
    const addresses = { nbd: await nbd.listen(config.listen), http: await http.listen(config.http) };
    log.info(
      { nbd: formatAddress(addresses.nbd), http: formatAddress(addresses.http), exports: config.exports.map((e) => e.name), dataDir: config.dataDir },
      'listening',
    );
    const server = nbd;
    let stopping: Promise<void> | null = null;
    return {
      addresses,
      stop: () =>
        (stopping ??= (async () => {
          await server.stop();
          await http.close();
          await closeAll(opened, lock, log);
        })()),
    };
  } catch (err) {
    await nbd?.stop();
    await http.close().catch(() => undefined);
    await closeAll(opened, lock, log);
    throw err;
  }
}

async function closeAll(exports: ExportHandle[], lock: FileHandle, log: Logger): Promise<void> {
  for (const e of exports) {
    try {
      await e.device.close();
    } catch (err) {
      log.error({ err, export: e.name }, 'closing export failed');
    }
  }
  await lock.close();
}
