// Black box: --admin-token. With a token, every POST (operator commands and the peer's link calls) needs
// `Authorization: Bearer TOKEN` — a wrong or missing token gets 401 and changes nothing — while GET
// /v1/status, /metrics, /healthz and /readyz stay open. A pair sharing the token links and mirrors; a pair
// with different tokens is refused ("unauthorized"), never linked. The CLI passes the token from --token or
// NBDMIRROR_ADMIN_TOKEN and says clearly when it is missing.

import t from 'tap';
import * as path from 'node:path';
import { describe, run } from '../helpers/run';
import { makePair, postJson, waitInSync, waitRep } from '../helpers/two-nodes';

const CLIENT_JS = path.resolve(__dirname, '..', '..', 'dist', 'client.js');
const TOKEN = 'test-token-0123456789';

async function post(port: number, p: string, token?: string): Promise<number> {
  const headers: Record<string, string> = { 'content-type': 'application/json' };
  if (token !== undefined) headers['authorization'] = `Bearer ${token}`;
  const res = await fetch(`http://127.0.0.1:${port}${p}`, { method: 'POST', headers, body: '{}', signal: AbortSignal.timeout(10_000) });
  await res.text();
  return res.status;
}

function cli(args: readonly string[], env: NodeJS.ProcessEnv = {}) {
  const e = { ...process.env, ...env };
  if (env.NBDMIRROR_ADMIN_TOKEN === undefined) delete e.NBDMIRROR_ADMIN_TOKEN;
  return run(process.execPath, [CLIENT_JS, ...args], { timeoutMs: 20_000, env: e });
}

t.test('a pair sharing the token: linked; POSTs need it, GETs do not; the CLI passes it', async (t) => {
  const { a, b } = await makePair(t, { args: ['--admin-token', TOKEN] });
  await b.start(['--role', 'secondary']);
  await a.start(['--role', 'primary']);
  await waitInSync(a, b);
  t.pass('the link handshake carried the token');

  for (const p of ['/healthz', '/readyz', '/v1/status', '/metrics']) {
    const res = await fetch(`http://127.0.0.1:${a.httpPort}${p}`, { signal: AbortSignal.timeout(10_000) });
    await res.text();
    t.equal(res.status, 200, `GET ${p} needs no token`);
  }
  t.equal(await post(b.httpPort, '/v1/exports/disk0/promote'), 401, 'promote without a token: 401');
  t.equal(await post(b.httpPort, '/v1/exports/disk0/promote', 'wrong-token-000'), 401, 'promote with a wrong token: 401');
  t.equal(await post(a.httpPort, '/v1/exports/disk0/demote', 'x'), 401, 'demote with a wrong token: 401');
  t.equal(await post(a.httpPort, '/v1/exports/disk0/link'), 401, 'the link endpoint too');
  t.equal((await a.rep()).role, 'primary', 'the refused demote changed nothing');
  const unauthorized = await postJson(a.httpPort, '/v1/exports/disk0/demote');
  t.match(unauthorized.body.error, /admin token/, 'the 401 says what is missing');

  const noToken = await cli(['demote', 'disk0', '--http', `http://127.0.0.1:${a.httpPort}`]);
  t.equal(noToken.code, 1, 'CLI without a token fails', { run: describe(noToken) });
  t.match(noToken.stderr, /requires its admin token: pass --token or set NBDMIRROR_ADMIN_TOKEN/);
  const viaEnv = await cli(['demote', 'disk0', '--http', `http://127.0.0.1:${a.httpPort}`], { NBDMIRROR_ADMIN_TOKEN: TOKEN });
  t.equal(viaEnv.code, 0, 'CLI demote with NBDMIRROR_ADMIN_TOKEN', { run: describe(viaEnv) });
  t.equal((await a.rep()).role, 'secondary');
  const viaFlag = await cli(['promote', 'disk0', '--http', `http://127.0.0.1:${a.httpPort}`, '--token', TOKEN]);
  t.equal(viaFlag.code, 0, 'CLI promote with --token', { run: describe(viaFlag) });
  await waitInSync(a, b);
});

t.test('different tokens: the link is refused as unauthorized', async (t) => {
  const { a, b } = await makePair(t);
  await b.start(['--role', 'secondary', '--admin-token', 'token-of-node-b']);
  await a.start(['--role', 'primary', '--admin-token', 'token-of-node-a']);
  const r = await waitRep(a, (x) => x.link?.state === 'refused');
  t.equal(r.link.reason, 'unauthorized', 'refused: unauthorized');
  t.equal((await b.rep()).session, null, 'the secondary granted no session');
});
