#!/usr/bin/env node
// The image's HEALTHCHECK: exit 0 when GET /healthz on this node's HTTP address answers 200, else 1.
// The address comes from NBDMIRROR_HTTP (the server's own variable), so the check follows a changed port;
// a wildcard host (0.0.0.0, ::) is reached on loopback. Usage: healthcheck.js [PATH] (default /healthz).
'use strict';
const http = require('node:http');

const addr = process.env.NBDMIRROR_HTTP || '127.0.0.1:9810';
const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:\s]+)):(\d{1,5})$/.exec(addr);
if (!m) {
  process.stderr.write(`healthcheck: cannot parse NBDMIRROR_HTTP "${addr}"\n`);
  process.exit(1);
}
let host = m[1] ?? m[2];
if (host === '0.0.0.0') host = '127.0.0.1';
else if (host === '::') host = '::1';
const path = process.argv[2] || '/healthz';

const req = http.get({ host, port: Number(m[3]), path, timeout: 2500 }, (res) => {
  res.resume();
  process.exit(res.statusCode === 200 ? 0 : 1);
});
req.on('timeout', () => req.destroy(new Error('timed out')));
req.on('error', (err) => {
  process.stderr.write(`healthcheck: GET ${path}: ${err.message}\n`);
  process.exit(1);
});
