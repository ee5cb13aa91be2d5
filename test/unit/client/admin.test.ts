// lib/client/admin.ts: the text `nbdmirror status | promote | demote | resync` print for sample replication
// states (standalone primary, syncing primary, attached secondary, split brain, refused link), the decision
// "is the resync done / has it failed", the CLI-side rate meter, the --http parser, and AdminClient's error
// mapping against a scripted HTTP stub on 127.0.0.1.

import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import t from 'tap';
import type { Test } from 'tap';
import {
  AdminClient,
  type ReplicaView,
  type ReplicationView,
  RateMeter,
  discardCommand,
  formatDuration,
  formatExport,
  formatProgress,
  formatRate,
  formatStatus,
  formatSynced,
  parseHttpBase,
  resyncProgress,
  splitBrainLines,
  summaryLine,
  syncBaseline,
  syncPhase,
  withMeasuredRate,
} from '../../../lib/client/admin';
import { ConflictError, IoError, UsageError } from '../../../lib/errors';

const NOW = 1_700_000_000_000;
const MiB = 1024 * 1024;
const GEN = { current: '1111111111111111', bitmap: '', history: [] };

function replica(over: Partial<ReplicaView> = {}): ReplicaView {
  return {
    name: 'disk0',
    uuid: 'u-1',
    role: 'primary',
    epoch: 3,
    disk: 'UpToDate',
    gen: GEN,
    peerNode: null,
    outOfSync: { blocks: 0, bytes: 0 },
    activityLog: { hotExtents: 0, transactions: 0 },
    splitBrain: null,
    link: null,
    session: null,
    ...over,
  };
}

function link(over: Partial<NonNullable<ReplicaView['link']>> = {}): NonNullable<ReplicaView['link']> {
  return { state: 'connected', peer: 'nbd://127.0.0.1:10810', reason: null, verdict: 'in-sync', since: NOW - 65_000, resync: null, connects: 1, lastResync: null, ...over };
}

const syncing = (): ReplicaView =>
  replica({
    outOfSync: { blocks: 3000, bytes: 3000 * 4096 },
    link: link({
      state: 'syncing',
      verdict: 'bitmap',
      resync: { totalBlocks: 4000, doneBlocks: 1000, bytesSent: 1000 * 4096, bytesZeroed: 0, startedAt: NOW - 10_000, rate: 2 * MiB, remainingBlocks: 3000, etaSeconds: 6 },
    }),
  });

const splitBrain = (): ReplicaView =>
  replica({
    role: 'secondary',
    splitBrain: { detectedAt: '2024-05-01T10:00:00.000Z', local: GEN, peer: { ...GEN, current: '2222222222222222' }, peerNode: 'node-b-uuid' },
  });

t.test('parseHttpBase', async (t) => {
  t.equal(parseHttpBase('http://127.0.0.1:9810'), 'http://127.0.0.1:9810');
  t.equal(parseHttpBase('127.0.0.1:9810'), 'http://127.0.0.1:9810', 'HOST:PORT as the server flag takes it');
  t.equal(parseHttpBase('http://localhost:1234/'), 'http://localhost:1234', 'trailing slash dropped');
  t.equal(parseHttpBase('[::1]:9810'), 'http://[::1]:9810');
  for (const bad of ['', 'ftp://x', 'http://[::1', 'http://h:1/?a=b']) t.throws(() => parseHttpBase(bad), UsageError, JSON.stringify(bad));
});

t.test('durations and rates', async (t) => {
  const cases: [number, string][] = [
    [0, '0s'],
    [1.25, '1.3s'],
    [42, '42s'],
    [125, '2m 05s'],
    [3725, '1h 02m'],
    [93_600, '1d 02h'],
    [-1, '?'],
    [Number.NaN, '?'],
  ];
  for (const [s, text] of cases) t.equal(formatDuration(s), text, `${s}`);
  t.equal(formatRate(85.5 * MiB), '85.5 MiB/s');
  t.equal(formatRate(0), '0 bytes/s');
});

t.test('resync progress', async (t) => {
  t.equal(resyncProgress(replica()), null, 'no link, no progress');
  t.equal(resyncProgress(replica({ link: link() })), null, 'connected, no resync');
  const p = resyncProgress(syncing())!;
  t.match(p, { percent: 25, doneBlocks: 1000, totalBlocks: 4000, remainingBytes: 3000 * 4096, totalBytes: 4000 * 4096, rate: 2 * MiB, etaSeconds: 6 });
  t.equal(formatProgress(p), '25.0% (11.7 MiB of 15.6 MiB left), 2 MiB/s, ETA 6s');

  // Blocks written meanwhile: the total grows with them, the percentage never passes 100.
  const grown = syncing();
  grown.link!.resync!.remainingBlocks = 5000;
  t.equal(resyncProgress(grown)!.totalBlocks, 6000);
  t.equal(resyncProgress(grown)!.percent, 16.6);

  const slow = syncing();
  slow.link!.resync!.rate = 0;
  slow.link!.resync!.etaSeconds = null;
  t.equal(resyncProgress(slow)!.etaSeconds, null);
  t.match(formatProgress(resyncProgress(slow)!), /, rate not known yet$/);

  // Older servers without remainingBlocks / etaSeconds: derived.
  const old = syncing();
  delete old.link!.resync!.remainingBlocks;
  delete old.link!.resync!.etaSeconds;
  t.match(resyncProgress(old), { percent: 25, etaSeconds: Math.ceil((3000 * 4096) / (2 * MiB)) });
});

t.test('status text: standalone primary', async (t) => {
  const rep: ReplicationView = { nodeId: 'node-a', peer: null, exports: [replica()] };
  const text = formatStatus(rep, NOW);
  t.equal(
    text,
    [
      'node:    node-a',
      'peer:    none (standalone)',
      '',
      'export disk0',
      '  role:          primary (epoch 3)',
      '  disk:          UpToDate',
      '  link:          none (this node runs without --peer: writes are not mirrored)',
      '  out of sync:   0 bytes',
    ].join('\n'),
  );
  t.equal(formatStatus({ nodeId: 'n', peer: null, exports: [] }, NOW), 'node:    n\npeer:    none (standalone)\n\nno exports');
});

t.test('status text: connected primary with a finished resync', async (t) => {
  const r = replica({ peerNode: 'b-uuid', link: link({ lastResync: { bytesSent: 3 * MiB, bytesZeroed: MiB, blocks: 1024, ms: 2500 } }) });
  const text = formatExport(r, NOW);
  t.match(text, /^ {2}link: {10}connected to nbd:\/\/127\.0\.0\.1:10810 \(for 1m 05s\)$/m);
  t.match(text, /^ {2}peer node: {5}b-uuid$/m);
  t.match(text, /^ {2}last resync: {3}4 MiB \(1024 blocks\) in 2\.5s$/m);
  t.notMatch(text, /SPLIT BRAIN/);
  t.equal(formatSynced(r), 'disk0: in sync (primary, UpToDate, epoch 3, peer nbd://127.0.0.1:10810; last resync 4 MiB in 2.5s)');
});

t.test('status text: syncing primary', async (t) => {
  const text = formatExport(syncing(), NOW);
  t.match(text, /^ {2}link: {10}syncing to nbd:\/\/127\.0\.0\.1:10810 \(bitmap resync\)$/m);
  t.match(text, /^ {2}resync: {8}25\.0% \(11\.7 MiB of 15\.6 MiB left\), 2 MiB\/s, ETA 6s$/m);
  t.match(text, /^ {2}out of sync: {3}11\.7 MiB \(3000 blocks\)$/m);
});

t.test('status text: degraded and refused links', async (t) => {
  const degraded = formatExport(replica({ outOfSync: { blocks: 1, bytes: 4096 }, link: link({ state: 'connecting', reason: 'connect ECONNREFUSED' }) }), NOW);
  t.match(degraded, /link: +connecting to nbd:\/\/127\.0\.0\.1:10810, last error: connect ECONNREFUSED \(degraded: writes are not mirrored\)/);
  t.match(degraded, /out of sync: +4 KiB \(1 block\)$/m);
  const refused = formatExport(replica({ link: link({ state: 'refused', reason: 'peer-primary', since: NOW - 5000 }) }), NOW);
  t.match(refused, /link: +REFUSED by nbd:\/\/127\.0\.0\.1:10810: the peer is primary too \(for 5s\)/);
});

t.test('status text: secondary', async (t) => {
  const alone = formatExport(replica({ role: 'secondary', disk: 'Outdated', link: link({ state: 'idle' }) }), NOW);
  t.match(alone, /^ {2}role: {10}secondary \(epoch 3\)$/m);
  t.match(alone, /^ {2}disk: {10}Outdated$/m);
  t.match(alone, /^ {2}primary: {7}none attached$/m);
  t.notMatch(alone, /link:/, 'an idle link of a secondary is not shown');
  const attached = formatExport(replica({ role: 'secondary', session: { node: 'a-uuid', nodeId: 'node-a', epoch: 3, since: NOW - 302_000 } }), NOW);
  t.match(attached, /^ {2}primary: {7}node-a \(epoch 3, attached for 5m 02s\)$/m);
});

t.test('split brain is loud and says what to do', async (t) => {
  const r = splitBrain();
  const lines = splitBrainLines(r);
  t.match(lines[0], /^SPLIT BRAIN: export disk0: both nodes wrote to it while apart \(detected 2024-05-01T10:00:00\.000Z, peer node node-b-uuid\)/);
  t.match(lines.join('\n'), /run on THAT node: +nbdmirror resync disk0 --discard-my-data/);
  t.equal(discardCommand('disk0'), 'nbdmirror resync disk0 --discard-my-data');
  const text = formatStatus({ nodeId: 'node-b', peer: 'nbd://127.0.0.1:10809', exports: [r] }, NOW);
  t.match(text, /^SPLIT BRAIN: /m, 'a line starting SPLIT BRAIN:');
  t.match(summaryLine(r), /SPLIT BRAIN: run `nbdmirror resync disk0 --discard-my-data` on the node whose changes are to be dropped$/);
  // A primary whose link the peer refused for split brain says so even before it recorded the details.
  const refused = replica({ link: link({ state: 'refused', reason: 'split-brain' }) });
  t.match(splitBrainLines(refused)[0], /^SPLIT BRAIN: export disk0: both nodes wrote to it while apart\. /);
  t.same(splitBrainLines(replica()), []);
});

t.test('summary lines (status --watch) change only when the state does', async (t) => {
  t.equal(summaryLine(replica()), 'disk0: primary UpToDate epoch 3, out of sync 0 bytes');
  const connected = replica({ link: link() });
  t.equal(summaryLine(connected), 'disk0: primary UpToDate epoch 3, link connected, out of sync 0 bytes');
  const later = replica({ link: link({ since: NOW - 1 }) });
  t.equal(summaryLine(later), summaryLine(connected), 'no clock in the line');
  t.equal(summaryLine(syncing()), 'disk0: primary UpToDate epoch 3, link syncing, resync 25.0% (11.7 MiB of 15.6 MiB left), 2 MiB/s, ETA 6s');
  t.equal(summaryLine(syncing(), { progress: false }), 'disk0: primary UpToDate epoch 3, link syncing, resyncing', 'the bar shows the numbers');
  t.equal(
    summaryLine(replica({ link: link({ state: 'connecting', reason: 'peer HTTP …: fetch failed' }), outOfSync: { blocks: 256, bytes: MiB } })),
    'disk0: primary UpToDate epoch 3, link connecting (peer HTTP …: fetch failed), out of sync 1 MiB',
  );
  t.equal(summaryLine(replica({ role: 'secondary' })), 'disk0: secondary UpToDate epoch 3, no primary attached, out of sync 0 bytes');
  t.equal(
    summaryLine(replica({ role: 'secondary', session: { node: 'a', nodeId: 'node-a', epoch: 3, since: NOW } })),
    'disk0: secondary UpToDate epoch 3, primary node-a attached, out of sync 0 bytes',
  );
});

t.test('syncPhase: primary', async (t) => {
  const base0 = syncBaseline(replica());
  t.match(syncPhase(replica(), base0), { kind: 'failed', message: /without --peer/ }, 'no peer: nothing to wait for');
  t.match(syncPhase(replica({ link: link() }), base0), { kind: 'in-sync' });
  t.match(syncPhase(replica({ link: link(), outOfSync: { blocks: 2, bytes: 8192 } }), base0), { kind: 'waiting', progress: null }, 'connected but blocks left');
  t.match(syncPhase(syncing(), base0), { kind: 'waiting', message: 'disk0: resync 25.0% (11.7 MiB of 15.6 MiB left), 2 MiB/s, ETA 6s', progress: { percent: 25 } });
  t.match(syncPhase(replica({ link: link({ state: 'connecting', reason: 'x' }) }), base0), { kind: 'waiting', message: /link connecting \(x\)/ });

  // A refusal found at the start is waited out once (the peer may just have discarded its data) ...
  const refused = replica({ link: link({ state: 'refused', reason: 'split-brain', since: NOW }) });
  const base = syncBaseline(refused);
  t.match(syncPhase(refused, base), { kind: 'waiting', message: /refused \(split brain: both nodes wrote while apart\); waiting for the next attempt/ });
  // ... a new one fails, with what to do.
  const again = replica({ link: link({ state: 'refused', reason: 'split-brain', since: NOW + 5000 }) });
  t.match(syncPhase(again, base), {
    kind: 'failed',
    message: /^disk0: the peer nbd:\/\/127\.0\.0\.1:10810 refused the replication link: split brain: both nodes wrote while apart; resolve it with `nbdmirror resync disk0 --discard-my-data`/,
  });
  t.match(syncPhase(again, base0), { kind: 'failed' }, 'refused after a start without a refusal');
});

t.test('syncPhase: secondary', async (t) => {
  const session = { node: 'a', nodeId: 'node-a', epoch: 3, since: NOW };
  const outdated = replica({ role: 'secondary', disk: 'Outdated' });
  const base = syncBaseline(outdated);
  t.match(syncPhase(outdated, base), { kind: 'waiting', message: /waiting for the primary to connect/ });
  t.match(syncPhase(replica({ role: 'secondary', disk: 'Inconsistent', session }), base), { kind: 'waiting', message: /primary node-a attached, resync in progress/ });
  t.match(syncPhase(replica({ role: 'secondary', session }), base), { kind: 'in-sync', message: 'disk0: up to date, primary node-a attached' });
  t.match(syncPhase(replica({ role: 'secondary' }), base), { kind: 'waiting' }, 'UpToDate but no primary attached');
  const sb = splitBrain();
  t.match(syncPhase(sb, base), { kind: 'failed', message: /split brain with node-b-uuid.*--discard-my-data/ }, 'split brain noted after the start');
  t.match(syncPhase(sb, syncBaseline(sb)), { kind: 'waiting' }, 'the split brain it started with is waited out');
  t.equal(formatSynced(replica({ role: 'secondary', session })), 'disk0: in sync (secondary, UpToDate, epoch 3, primary node-a)');
});

t.test('RateMeter and withMeasuredRate', async (t) => {
  const m = new RateMeter(5000);
  t.equal(m.add(0, 0), 0, 'one sample: unknown');
  t.equal(m.add(1000, MiB), MiB);
  t.equal(m.add(2000, 3 * MiB), 1.5 * MiB);
  // Old samples leave the window.
  m.add(7000, 8 * MiB);
  t.equal(m.add(8000, 10 * MiB), (7 * MiB * 1000) / 6000);
  t.equal(m.add(9000, 0), 0, 'a smaller total restarts the meter');

  const r = syncing();
  r.link!.resync!.rate = 0;
  r.link!.resync!.etaSeconds = null;
  const meter = new RateMeter();
  t.equal(withMeasuredRate(r, meter, NOW), r, 'first sample: nothing to add');
  const next = syncing();
  next.link!.resync!.rate = 0;
  next.link!.resync!.doneBlocks = 1256; // +1 MiB in one second
  next.link!.resync!.remainingBlocks = 2744;
  const filled = withMeasuredRate(next, meter, NOW + 1000);
  t.equal(filled.link!.resync!.rate, MiB);
  t.equal(filled.link!.resync!.etaSeconds, Math.ceil((2744 * 4096) / MiB));
  t.equal(next.link!.resync!.rate, 0, 'the input is not changed');
  const serverRate = syncing();
  t.equal(withMeasuredRate(serverRate, meter, NOW + 2000), serverRate, "the server's own rate wins");
  t.equal(withMeasuredRate(replica(), meter, NOW + 3000).link, null, 'no resync: unchanged');
});

// ---------------------------------------------------------------------------------------------------------
// AdminClient against a scripted stub.

type Handler = (req: http.IncomingMessage, body: string) => { status: number; body: unknown; raw?: string } | null;

async function stub(t: Test, handler: Handler): Promise<string> {
  const server = http.createServer((req, res) => {
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (d: string) => (body += d));
    req.on('end', () => {
      const out = handler(req, body);
      if (out === null) return; // never answer
      const text = out.raw ?? JSON.stringify(out.body);
      res.writeHead(out.status, { 'content-type': 'application/json' });
      res.end(text);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.teardown(() => {
    server.closeAllConnections();
    return new Promise<void>((resolve) => server.close(() => resolve()));
  });
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
}

const STATUS = { node: { uuid: 'x' }, replication: { nodeId: 'node-a', peer: null, exports: [replica(), replica({ name: 'disk1' })] } };

t.test('AdminClient: status and actions', async (t) => {
  const seen: Array<{ method: string; url: string; body: string }> = [];
  const base = await stub(t, (req, body) => {
    seen.push({ method: req.method!, url: req.url!, body });
    if (req.method === 'GET' && req.url === '/v1/status') return { status: 200, body: STATUS };
    if (req.url === '/v1/exports/disk0/promote') return { status: 200, body: replica({ epoch: 4 }) };
    if (req.url === '/v1/exports/disk0/demote') return { status: 200, body: replica({ role: 'secondary' }) };
    if (req.url === '/v1/exports/disk1/promote') return { status: 409, body: { error: 'export disk1 is Outdated here: promoting it could serve stale data (use --force to override)', reason: 'not-up-to-date', disk: 'Outdated' } };
    if (req.url === '/v1/exports/disk1/discard-my-data') return { status: 500, body: { error: 'internal error' } };
    return { status: 404, body: { error: 'not found' } };
  });
  const c = new AdminClient(base);
  t.same((await c.status()).replication.exports.map((e) => e.name), ['disk0', 'disk1']);
  t.equal((await c.replica('disk1')).name, 'disk1');
  await t.rejects(c.replica('nope'), new IoError(`the server at ${base} has no export "nope" (exports: disk0, disk1)`));

  t.equal((await c.promote('disk0', true)).epoch, 4);
  t.match(seen.at(-1), { method: 'POST', url: '/v1/exports/disk0/promote', body: '{"force":true}' });
  await c.promote('disk0');
  t.equal(seen.at(-1)!.body, '{}');
  t.equal((await c.demote('disk0')).role, 'secondary');

  const conflict = await c.promote('disk1').catch((e: unknown) => e);
  t.type(conflict, ConflictError);
  t.match(conflict, { message: 'promote disk1: export disk1 is Outdated here: promoting it could serve stale data (use --force to override)', reason: 'not-up-to-date', details: { disk: 'Outdated' } });

  await t.rejects(c.demote('nope'), { message: `the server at ${base} has no export "nope" (exports: disk0, disk1)` });
  await t.rejects(c.demote('disk1'), { message: `demote disk1: the server at ${base} does not support demote (HTTP 404)` }, 'known export, unknown action');
  await t.rejects(c.discardMyData('disk1'), { message: 'discard-my-data disk1: HTTP 500: internal error' });
});

t.test('AdminClient: servers that are not nbdmirror, or not there', async (t) => {
  const base = await stub(t, (req) => {
    if (req.url === '/v1/status') return { status: 200, body: { status: 'ok' } };
    if (req.url === '/v1/exports/x/demote') return { status: 200, body: null, raw: '<html>' };
    if (req.url === '/v1/exports/slow/demote') return null;
    return { status: 404, body: {} };
  });
  const c = new AdminClient(base, { timeoutMs: 300 });
  await t.rejects(c.status(), { message: /has no replication status/ });
  await t.rejects(c.demote('x'), { message: /HTTP 200 with a body that is not JSON/ });
  await t.rejects(c.demote('slow'), { message: new RegExp(`^cannot reach the nbdmirror server at ${base} \\(no answer within 300 ms\\)`) });

  // A port nobody listens on.
  const probe = http.createServer();
  await new Promise<void>((resolve) => probe.listen(0, '127.0.0.1', resolve));
  const port = (probe.address() as AddressInfo).port;
  await new Promise<void>((resolve) => probe.close(() => resolve()));
  await t.rejects(new AdminClient(`127.0.0.1:${port}`).status(), {
    message: `cannot reach the nbdmirror server at http://127.0.0.1:${port} (connect ECONNREFUSED 127.0.0.1:${port}): is it running, and is --http (or NBDMIRROR_HTTP) its HTTP address?`,
  });
  t.throws(() => new AdminClient('ftp://x'), UsageError);
});
