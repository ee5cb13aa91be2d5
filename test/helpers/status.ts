// GET /v1/status of a server under test, parsed (the shape is the test's to declare).

import * as http from 'node:http';

export function getStatus<T = Record<string, any>>(port: number): Promise<T> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port, path: '/v1/status', timeout: 5000 }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (body += d));
      res.on('end', () => {
        try {
          if (res.statusCode !== 200) throw new Error(`GET /v1/status: HTTP ${res.statusCode}: ${body}`);
          resolve(JSON.parse(body) as T);
        } catch (err) {
          reject(err as Error);
        }
      });
    });
    req.on('timeout', () => req.destroy(new Error('GET /v1/status timed out')));
    req.on('error', reject);
  });
}
