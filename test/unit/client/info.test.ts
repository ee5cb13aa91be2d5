// lib/client/info.ts: the data `nbdmirror info` prints, its text form, and the fallback for servers without
// NBD_OPT_INFO (checked against the scripted fake server).

import t from 'tap';
import { UsageError } from '../../../lib/errors';
import { NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_OPT_INFO } from '../../../lib/protocol/constants';
import { decodeTransmissionFlags } from '../../../lib/client/nbd-client';
import { type InfoResult, formatInfo, getInfo, humanSize } from '../../../lib/client/info';
import { FAKE_FLAGS, FAKE_SIZE, startFake } from '../../helpers/fake-nbd-server';

t.test('humanSize', async (t) => {
  const cases: [number, string][] = [
    [0, '0 bytes'],
    [1023, '1023 bytes'],
    [1024, '1 KiB'],
    [1536, '1.5 KiB'],
    [64 * 1024 ** 2, '64 MiB'],
    [1024 ** 3 + 1, '1 GiB'],
    [1.25 * 1024 ** 4, '1.25 TiB'],
    [123.4 * 1024 ** 3, '123.4 GiB'],
    [2 ** 60, '1 EiB'],
  ];
  for (const [n, s] of cases) t.equal(humanSize(n), s, `${n}`);
});

t.test('formatInfo', async (t) => {
  const r: InfoResult = {
    uri: 'nbd://h:1/x',
    exportName: 'x',
    description: null,
    size: 3 * 1024 ** 3,
    flags: decodeTransmissionFlags(0b11),
    blockSizes: { minimum: 1, preferred: 4096, maximum: 33554432 },
    metaContexts: [],
    exports: [{ name: 'x', description: '' }, { name: 'y', description: 'why' }],
  };
  t.equal(
    formatInfo(r),
    [
      'uri:            nbd://h:1/x',
      'export:         "x"',
      'description:    -',
      'size:           3221225472 bytes (3 GiB)',
      'read-only:      yes',
      'flags:          read-only (0x0003)',
      'block sizes:    minimum 1, preferred 4096, maximum 33554432',
      'meta contexts:  -',
      'exports:        2',
      '  "x"',
      '  "y"  why',
    ].join('\n'),
  );
});

t.test('getInfo: bad URI is a UsageError', async (t) => {
  await t.rejects(getInfo('nbd://'), UsageError);
});

t.test('getInfo: server without NBD_OPT_INFO → connect (GO), then disconnect', async (t) => {
  const f = await startFake(); // the fake answers NBD_OPT_INFO with NBD_REP_ERR_UNSUP
  t.teardown(() => f.close());
  const r = await getInfo(`nbd://127.0.0.1:${(f.target as { port: number }).port}/`);
  t.match(r, { exportName: '', size: FAKE_SIZE, flags: { raw: FAKE_FLAGS, canFlush: true }, blockSizes: null, description: null });
  t.same(r.metaContexts, ['base:allocation']);
  t.ok(f.options().includes(NBD_OPT_INFO) && f.options().includes(NBD_OPT_GO), 'tried INFO, then GO');
  t.notOk(f.options().includes(NBD_OPT_EXPORT_NAME));
});
