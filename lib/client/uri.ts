// NBD URIs (the NBD project's doc/uri.md, as libnbd and nbdinfo accept them), restricted to what this client
// speaks: plain TCP `nbd://HOST[:PORT][/EXPORT]` and Unix sockets `nbd+unix:///EXPORT?socket=PATH`.
// TLS schemes (nbds://, nbds+unix://) are refused rather than silently downgraded.

import { UsageError } from '../errors';

/** IANA port for NBD. */
export const NBD_DEFAULT_PORT = 10809;

export type ConnectTarget = { host: string; port: number } | { path: string };

export interface NbdUri {
  /** Where to connect: host/port for TCP, path for a Unix socket. */
  target: ConnectTarget;
  /** Export name, percent-decoded; "" selects the server's default export. */
  exportName: string;
}

// nbd://HOST[:PORT][/PATH][?QUERY]; HOST is a bracketed IPv6 literal or a name/IPv4 without : / ? # [ ].
const TCP_RE = /^nbd:\/\/(\[[^\]/?#]*\]|[^:/?#[\]@]*)(?::([^/?#]*))?(\/[^?#]*)?(?:\?([^#]*))?$/i;
// nbd+unix://[/PATH]?QUERY: the authority must be empty.
const UNIX_RE = /^nbd\+unix:\/\/(\/[^?#]*)?(?:\?([^#]*))?$/i;

function bad(uri: string, why: string): UsageError {
  return new UsageError(`invalid NBD URI "${uri}": ${why}`);
}

function decode(uri: string, part: string, what: string): string {
  try {
    return decodeURIComponent(part);
  } catch {
    throw bad(uri, `malformed percent-encoding in ${what}`);
  }
}

/** The export is the path without its first "/" (so nbd://h//x names export "/x"). */
function exportFromPath(uri: string, path: string | undefined): string {
  if (path === undefined || path === '') return '';
  const name = decode(uri, path.slice(1), 'export name');
  if (Buffer.byteLength(name, 'utf8') > 4096) throw bad(uri, 'export name longer than 4096 bytes');
  if (name.includes('\0')) throw bad(uri, 'export name contains NUL');
  return name;
}

function parseQuery(uri: string, query: string | undefined): Map<string, string> {
  const params = new Map<string, string>();
  if (query === undefined || query === '') return params;
  for (const pair of query.split('&')) {
    if (pair === '') continue;
    const eq = pair.indexOf('=');
    const key = decode(uri, eq < 0 ? pair : pair.slice(0, eq), 'query');
    const value = decode(uri, eq < 0 ? '' : pair.slice(eq + 1), 'query');
    if (params.has(key)) throw bad(uri, `query parameter "${key}" given twice`);
    params.set(key, value);
  }
  return params;
}

/**
 * Parse an NBD URI. Throws UsageError (exit code 2 in the CLI) for anything this client cannot connect to.
 */
export function parseNbdUri(uri: string): NbdUri {
  if (/^nbds(\+unix)?:/i.test(uri)) throw bad(uri, 'TLS (nbds://) is not supported');
  if (/^nbd\+(?!unix:)/i.test(uri)) throw bad(uri, 'unsupported transport (use nbd:// or nbd+unix://)');
  if (uri.includes('#')) throw bad(uri, 'a fragment (#) is not allowed');

  const unix = UNIX_RE.exec(uri);
  if (unix !== null) {
    const params = parseQuery(uri, unix[2]);
    const path = params.get('socket');
    params.delete('socket');
    if (path === undefined || path === '') throw bad(uri, 'nbd+unix:// needs ?socket=PATH');
    const extra = [...params.keys()];
    if (extra.length > 0) throw bad(uri, `unsupported query parameter "${extra[0]}"`);
    return { target: { path }, exportName: exportFromPath(uri, unix[1]) };
  }
  if (/^nbd\+unix:/i.test(uri)) throw bad(uri, 'nbd+unix:// takes no host (nbd+unix:///EXPORT?socket=PATH)');

  const tcp = TCP_RE.exec(uri);
  if (tcp === null) {
    if (!/^nbd:\/\//i.test(uri)) throw bad(uri, 'expected nbd://HOST[:PORT][/EXPORT] or nbd+unix:///EXPORT?socket=PATH');
    throw bad(uri, 'malformed authority (expected HOST, HOST:PORT or [IPv6]:PORT)');
  }
  let host = tcp[1] ?? '';
  if (host.startsWith('[')) {
    host = host.slice(1, -1);
    if (!/^[0-9a-f:.]+$/i.test(host) || !host.includes(':')) throw bad(uri, 'malformed IPv6 address');
  } else {
    host = decode(uri, host, 'host');
  }
  if (host === '') throw bad(uri, 'missing host');

  let port = NBD_DEFAULT_PORT;
  const portText = tcp[2];
  if (portText !== undefined && portText !== '') {
    if (!/^\d{1,5}$/.test(portText)) throw bad(uri, `bad port "${portText}"`);
    port = Number(portText);
    if (port < 1 || port > 65535) throw bad(uri, `port ${port} out of range 1-65535`);
  }
  const params = parseQuery(uri, tcp[4]);
  const first = params.keys().next();
  if (first.done !== true) throw bad(uri, `unsupported query parameter "${first.value}"`);
  return { target: { host, port }, exportName: exportFromPath(uri, tcp[3]) };
}

/** A canonical URI for display (export percent-encoded, IPv6 bracketed). */
export function formatNbdUri(u: NbdUri): string {
  const exp = u.exportName === '' ? '' : encodeURIComponent(u.exportName).replace(/%2F/g, '/');
  if ('path' in u.target) return `nbd+unix:///${exp}?socket=${encodeURIComponent(u.target.path).replace(/%2F/g, '/')}`;
  const host = u.target.host.includes(':') ? `[${u.target.host}]` : u.target.host;
  return `nbd://${host}:${u.target.port}/${exp}`;
}
