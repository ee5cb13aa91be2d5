// lib/client/uri.ts: the NBD URI forms the CLI accepts, and the ones it must refuse with UsageError.

import t from 'tap';
import { UsageError } from '../../../lib/errors';
import { NBD_DEFAULT_PORT, type NbdUri, formatNbdUri, parseNbdUri } from '../../../lib/client/uri';

const good: [string, NbdUri][] = [
  ['nbd://localhost', { target: { host: 'localhost', port: NBD_DEFAULT_PORT }, exportName: '' }],
  ['nbd://localhost/', { target: { host: 'localhost', port: 10809 }, exportName: '' }],
  ['nbd://127.0.0.1:10810', { target: { host: '127.0.0.1', port: 10810 }, exportName: '' }],
  ['nbd://127.0.0.1:10810/disk0', { target: { host: '127.0.0.1', port: 10810 }, exportName: 'disk0' }],
  ['nbd://127.0.0.1:/disk0', { target: { host: '127.0.0.1', port: 10809 }, exportName: 'disk0' }],
  ['nbd://example.com/a%20b%2Fc', { target: { host: 'example.com', port: 10809 }, exportName: 'a b/c' }],
  ['nbd://h/dir/sub', { target: { host: 'h', port: 10809 }, exportName: 'dir/sub' }],
  ['nbd://h//abs', { target: { host: 'h', port: 10809 }, exportName: '/abs' }],
  ['nbd://h/%C3%A9t%C3%A9', { target: { host: 'h', port: 10809 }, exportName: 'été' }],
  ['nbd://[::1]', { target: { host: '::1', port: 10809 }, exportName: '' }],
  ['nbd://[::1]:10811/x', { target: { host: '::1', port: 10811 }, exportName: 'x' }],
  ['nbd://[fe80::1:2]/', { target: { host: 'fe80::1:2', port: 10809 }, exportName: '' }],
  ['NBD://HOST:65535/E', { target: { host: 'HOST', port: 65535 }, exportName: 'E' }],
  ['nbd+unix:///?socket=/tmp/nbd.sock', { target: { path: '/tmp/nbd.sock' }, exportName: '' }],
  ['nbd+unix://?socket=/tmp/nbd.sock', { target: { path: '/tmp/nbd.sock' }, exportName: '' }],
  ['nbd+unix:///disk0?socket=/run/n%20b.sock', { target: { path: '/run/n b.sock' }, exportName: 'disk0' }],
  ['nbd+unix:///my%2Fexport?socket=rel.sock', { target: { path: 'rel.sock' }, exportName: 'my/export' }],
];

t.test('valid URIs', async (t) => {
  for (const [uri, want] of good) t.same(parseNbdUri(uri), want, uri);
});

const bad: [string, RegExp][] = [
  ['', /expected nbd:\/\//],
  ['localhost:10809', /expected nbd:\/\//],
  ['http://localhost/', /expected nbd:\/\//],
  ['nbd:/localhost', /expected nbd:\/\//],
  ['nbd://', /missing host/],
  ['nbd:///export', /missing host/],
  ['nbd://:10809/', /missing host/],
  ['nbd://h:0/', /out of range/],
  ['nbd://h:65536/', /out of range/],
  ['nbd://h:99999999/', /bad port/],
  ['nbd://h:-1/', /bad port/],
  ['nbd://h:port/', /bad port/],
  ['nbd://h:10809:1/', /bad port/],
  ['nbd://[::1/', /malformed/],
  ['nbd://[zz::1]/', /malformed IPv6/],
  ['nbd://[]/', /malformed IPv6/],
  ['nbd://::1/', /missing host/],
  ['nbd://user@h/', /malformed/],
  ['nbd://h/%zz', /percent-encoding/],
  ['nbd://h/%00', /NUL/],
  ['nbd://h/x?tls=on', /unsupported query parameter "tls"/],
  ['nbd://h/x#frag', /fragment/],
  [`nbd://h/${'a'.repeat(4097)}`, /4096 bytes/],
  ['nbds://h/', /TLS/],
  ['nbds+unix:///?socket=/s', /TLS/],
  ['nbd+vsock:///?socket=/s', /unsupported transport/],
  ['nbd+unix:///', /socket=PATH/],
  ['nbd+unix:///x?socket=', /socket=PATH/],
  ['nbd+unix://host/x?socket=/s', /takes no host/],
  ['nbd+unix:///x?socket=/s&socket=/t', /given twice/],
  ['nbd+unix:///x?socket=/s&foo=1', /unsupported query parameter "foo"/],
];

t.test('invalid URIs throw UsageError naming the problem', async (t) => {
  for (const [uri, why] of bad) {
    t.throws(() => parseNbdUri(uri), UsageError, `rejects ${JSON.stringify(uri.slice(0, 40))}`);
    t.throws(() => parseNbdUri(uri), { message: why }, `reason for ${JSON.stringify(uri.slice(0, 40))}`);
  }
});

t.test('formatNbdUri is canonical and parses back to the same value', async (t) => {
  t.equal(formatNbdUri(parseNbdUri('nbd://h')), 'nbd://h:10809/');
  t.equal(formatNbdUri(parseNbdUri('nbd://[::1]:7/a%20b')), 'nbd://[::1]:7/a%20b');
  t.equal(formatNbdUri(parseNbdUri('nbd+unix:///e?socket=/tmp/s')), 'nbd+unix:///e?socket=/tmp/s');
  for (const [uri, want] of good) t.same(parseNbdUri(formatNbdUri(parseNbdUri(uri))), want, `round trip ${uri}`);
});
