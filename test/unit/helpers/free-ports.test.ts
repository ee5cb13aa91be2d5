// The test helpers' port choice (test/helpers/two-nodes.ts): distinct ports under the ephemeral range, each
// claimed for the test process's lifetime so that test files running in parallel never draw the same one.

import t from 'tap';
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { claimPort, freePorts } from '../../helpers/two-nodes';

const CLAIMS = path.join(os.tmpdir(), 'nbdmirror-test-ports');

t.test('freePorts: distinct, under the ephemeral range, claimed by this process', async (t) => {
  const ports = await freePorts(6);
  t.equal(new Set(ports).size, 6, 'six distinct ports');
  for (const p of ports) {
    t.ok(p >= 20000 && p < 32768, `${p} under the ephemeral range`);
    t.equal(readFileSync(path.join(CLAIMS, String(p)), 'utf8'), String(process.pid), `${p} claimed by this process`);
    t.notOk(claimPort(p), `${p} is not handed out again`);
  }
});

t.test('claimPort: a live process keeps its claim, a dead one loses it', async (t) => {
  const [port] = await freePorts(1);
  const file = path.join(CLAIMS, String(port));
  // The tap runner (our parent) is alive for the whole test.
  writeFileSync(file, String(process.ppid));
  t.notOk(claimPort(port!), 'claimed by a live process: refused');
  const child = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], { encoding: 'utf8' });
  writeFileSync(file, child.stdout); // a process that has exited
  t.ok(claimPort(port!), 'claimed by a process that is gone: taken over');
  t.equal(readFileSync(file, 'utf8'), String(process.pid), 'now ours');
});
