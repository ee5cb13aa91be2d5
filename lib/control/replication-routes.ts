// HTTP endpoints of replication, per export under /v1/exports/NAME/:
//   peer-facing:     POST link (handshake → session token), synced (resync finished), outdate (primary went on
//                    without us), unlink (the primary stops cleanly: its session ends), peer-up (a secondary
//                    started: reconnect now);
//   operator-facing: POST promote [{"force":true}], demote, discard-my-data.
// Errors: a ConflictError is 409 with its reason, bad input 400; the body is always JSON.

import type * as http from 'node:http';
import { ConflictError, UsageError } from '../errors';
import type { LinkRequest, Replica } from '../replication/replica';
import { type HttpControl, sendJson } from './http';

const MAX_BODY = 1 << 20;

export async function readJson(req: http.IncomingMessage): Promise<Record<string, unknown>> {
  const chunks: Buffer[] = [];
  let n = 0;
  for await (const c of req) {
    n += (c as Buffer).length;
    if (n > MAX_BODY) throw new UsageError('request body too large');
    chunks.push(c as Buffer);
  }
  if (n === 0) return {};
  let j: unknown;
  try {
    j = JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch {
    throw new UsageError('request body is not valid JSON');
  }
  if (typeof j !== 'object' || j === null || Array.isArray(j)) throw new UsageError('request body must be a JSON object');
  return j as Record<string, unknown>;
}

function isLinkRequest(b: Record<string, unknown>): b is Record<string, unknown> & LinkRequest {
  return (
    typeof b.node === 'string' &&
    typeof b.nodeId === 'string' &&
    typeof b.exportUuid === 'string' &&
    typeof b.size === 'number' &&
    typeof b.epoch === 'number' &&
    typeof b.oosBlocks === 'number' &&
    typeof b.gen === 'object' &&
    b.gen !== null
  );
}

type Handler = (r: Replica, body: Record<string, unknown>, req: http.IncomingMessage) => Promise<unknown>;

const HANDLERS: Record<string, Handler> = {
  link: async (r, body) => {
    if (!isLinkRequest(body)) throw new UsageError('link: malformed request');
    return r.acceptLink(body);
  },
  synced: async (r, body) => {
    await r.synced(body);
    return { ok: true };
  },
  outdate: async (r, body) => {
    await r.outdate(body);
    return { ok: true };
  },
  'peer-up': async (r) => {
    r.peerUp();
    return { ok: true };
  },
  unlink: async (r, body) => {
    r.unlink(body);
    return { ok: true };
  },
  promote: async (r, body, req) => {
    const force = body.force === true || new URL(req.url ?? '/', 'http://x').searchParams.get('force') === 'true';
    await r.promote(force);
    return r.status();
  },
  demote: async (r) => {
    await r.demote();
    return r.status();
  },
  'discard-my-data': async (r) => {
    await r.discardMyData();
    return r.status();
  },
};

export function addReplicationRoutes(http: HttpControl, replicas: readonly Replica[]): void {
  for (const r of replicas) {
    for (const [action, handler] of Object.entries(HANDLERS)) {
      http.addRoute(`POST /v1/exports/${r.name}/${action}`, async (req, res) => {
        try {
          const body = await readJson(req);
          sendJson(res, 200, await handler(r, body, req));
        } catch (err) {
          if (err instanceof ConflictError) return sendJson(res, 409, { error: err.message, reason: err.reason, ...err.details });
          if (err instanceof UsageError) return sendJson(res, 400, { error: err.message });
          throw err;
        }
      });
    }
  }
}
