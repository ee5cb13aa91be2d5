// The node's HTTP endpoint: GET /healthz (process up) plus the routes the node adds (/readyz, /metrics,
// /v1/status, the admin POSTs). Every POST needs `Authorization: Bearer <--admin-token>` when a token is set.

import { createHash, timingSafeEqual } from 'node:crypto';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Address } from '../config';
import type { Logger } from '../log';

export type Route = (req: http.IncomingMessage, res: http.ServerResponse) => void | Promise<void>;

export class HttpControl {
  private readonly server: http.Server;
  private readonly routes = new Map<string, Route>();

  /** sha256 of the admin token (compared in constant time), or null when POSTs need none. */
  private readonly tokenHash: Buffer | null;

  constructor(
    private readonly log: Logger,
    adminToken: string | null = null,
  ) {
    this.tokenHash = adminToken === null ? null : sha256(adminToken);
    this.routes.set('GET /healthz', (_req, res) => sendJson(res, 200, { status: 'ok' }));
    this.server = http.createServer((req, res) => void this.handle(req, res));
    this.server.keepAliveTimeout = 5000;
  }

  /** While true, a request for a path without a route gets 503 (the node is starting), not 404. */
  starting = true;

  /** Register a handler for "METHOD /path". */
  addRoute(key: string, route: Route): void {
    this.routes.set(key, route);
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://localhost');
    const method = req.method === 'HEAD' ? 'GET' : req.method;
    const route = this.routes.get(`${method} ${url.pathname}`);
    if (route === undefined && this.starting) {
      // The routes of the exports are added once they are open: until then, "try again" rather than 404.
      return sendJson(res, 503, { error: 'starting: exports not open yet' });
    }
    if (route === undefined) {
      const known = [...this.routes.keys()].some((k) => k.endsWith(` ${url.pathname}`));
      return sendJson(res, known ? 405 : 404, { error: known ? 'method not allowed' : 'not found' });
    }
    if (req.method === 'POST' && !this.authorized(req)) {
      this.log.warn({ path: url.pathname, remote: req.socket.remoteAddress }, 'admin request without a valid token refused');
      res.setHeader('www-authenticate', 'Bearer realm="nbdmirror"');
      return sendJson(res, 401, { error: 'this endpoint needs the admin token: Authorization: Bearer <--admin-token>' });
    }
    try {
      await route(req, res);
    } catch (err) {
      this.log.error({ err, path: url.pathname }, 'HTTP handler failed');
      if (!res.headersSent) sendJson(res, 500, { error: 'internal error' });
    }
  }

  private authorized(req: http.IncomingMessage): boolean {
    if (this.tokenHash === null) return true;
    const m = /^Bearer\s+(\S+)\s*$/i.exec(req.headers.authorization ?? '');
    return m !== null && timingSafeEqual(sha256(m[1]!), this.tokenHash);
  }

  listen(addr: Address): Promise<Address> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen({ host: addr.host, port: addr.port }, () => {
        this.server.off('error', reject);
        const a = this.server.address() as AddressInfo;
        resolve({ host: a.address, port: a.port });
      });
    });
  }

  close(): Promise<void> {
    return new Promise((resolve) => {
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
  }
}

export function sendJson(res: http.ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

function sha256(s: string): Buffer {
  return createHash('sha256').update(s).digest();
}
