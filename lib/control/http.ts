// The node's HTTP endpoint. For now: GET /healthz (process up). Later issues add /metrics, /readyz, /v1/….

import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Address } from '../config';
import type { Logger } from '../log';

export type Route = (req: http.IncomingMessage, res: http.ServerResponse) => void | Promise<void>;

export class HttpControl {
  private readonly server: http.Server;
  private readonly routes = new Map<string, Route>();

  constructor(private readonly log: Logger) {
    this.routes.set('GET /healthz', (_req, res) => sendJson(res, 200, { status: 'ok' }));
    this.server = http.createServer((req, res) => void this.handle(req, res));
    this.server.keepAliveTimeout = 5000;
  }

  /** Register a handler for "METHOD /path". */
  addRoute(key: string, route: Route): void {
    this.routes.set(key, route);
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://localhost');
    const method = req.method === 'HEAD' ? 'GET' : req.method;
    const route = this.routes.get(`${method} ${url.pathname}`);
    if (route === undefined) {
      const known = [...this.routes.keys()].some((k) => k.endsWith(` ${url.pathname}`));
      return sendJson(res, known ? 405 : 404, { error: known ? 'method not allowed' : 'not found' });
    }
    try {
      await route(req, res);
    } catch (err) {
      this.log.error({ err, path: url.pathname }, 'HTTP handler failed');
      if (!res.headersSent) sendJson(res, 500, { error: 'internal error' });
    }
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
