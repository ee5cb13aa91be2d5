// Start an nbdmirror node inside the test process (port 0, temp data dir), stopped in t.teardown.

import * as path from 'node:path';
import { loadConfig } from '../../lib/config';
import { silentLogger } from '../../lib/log';
import { type NbdmirrorNode, startNode } from '../../lib/node';

interface TapLike {
  testdir(): string;
  teardown(fn: () => unknown): void;
}

export async function startTestNode(
  t: TapLike,
  opts: { exports?: string[]; readOnly?: boolean; dataDir?: string } = {},
): Promise<NbdmirrorNode & { port: number; dataDir: string }> {
  const dataDir = opts.dataDir ?? path.join(t.testdir(), 'data');
  const argv = ['--listen', '127.0.0.1:0', '--http', '127.0.0.1:0', '--data-dir', dataDir, '--pmem-dir', path.join(dataDir, 'pmem'), '--pmem-size', '16M'];
  for (const e of opts.exports ?? ['disk0=64M']) argv.push('--export', e);
  if (opts.readOnly) argv.push('--read-only');
  const loaded = loadConfig(argv, {});
  if (loaded.kind !== 'config') throw new Error('unexpected help');
  const node = await startNode(loaded.config, silentLogger());
  t.teardown(() => node.stop());
  return Object.assign(node, { port: node.addresses.nbd.port, dataDir });
}
