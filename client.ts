#!/usr/bin/env node
// nbdmirror: the operator CLI. Commander wiring only; each command's work is a function in lib/ that returns
// data, printed as text or as JSON with --json. Exit codes: 0 ok, 1 failed, 2 bad usage.

import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import { AdminClient, DEFAULT_HTTP, formatExport, formatStatus, formatSynced } from './lib/client/admin';
import { formatInfo, getInfo } from './lib/client/info';
import { waitForSync, watchStatus } from './lib/client/progress';
import { UsageError } from './lib/errors';

const EXIT_OK = 0;
const EXIT_FAILED = 1;
const EXIT_USAGE = 2;

function print(data: unknown, json: boolean, text: () => string): void {
  process.stdout.write(json ? `${JSON.stringify(data, null, 2)}\n` : `${text()}\n`);
}

function buildProgram(): Command {
  const program = new Command('nbdmirror')
    .description('Operator CLI for nbdmirror, a replicated NBD server')
    // Throw instead of exiting so main() alone maps outcomes to exit codes; subcommands inherit this.
    .exitOverride()
    .showSuggestionAfterError()
    .addHelpText('after', '\nExit codes: 0 ok, 1 failed, 2 bad usage.');

  program
    .command('info')
    .description('show what an NBD server reports about an export (size, flags, block sizes, meta contexts)')
    .argument('<uri>', 'nbd://HOST[:PORT][/EXPORT] or nbd+unix:///EXPORT?socket=PATH')
    .option('--json', 'print JSON instead of text')
    .option('--list', "also list the server's exports (NBD_OPT_LIST)")
    .option('--timeout <ms>', 'connect and handshake timeout in milliseconds', parseTimeout, 10_000)
    .action(async (uri: string, opts: { json?: boolean; list?: boolean; timeout: number }) => {
      const result = await getInfo(uri, { list: opts.list === true, connectTimeoutMs: opts.timeout });
      print(result, opts.json === true, () => formatInfo(result));
    });

  program
    .command('status')
    .description('show the replication state of every export: role, disk state, link, out-of-sync data, resync progress, split brain')
    .addOption(httpOption())
    .addOption(tokenOption())
    .option('--json', 'print the JSON of GET /v1/status instead of text (one line per change with --watch)')
    .option('--watch', 'keep refreshing until interrupted (Ctrl-C): progress bars on a TTY, one line per change otherwise')
    .option('--interval <ms>', 'refresh interval for --watch in milliseconds', parseInterval, 1000)
    .action(async (opts: { http: string; token?: string; json?: boolean; watch?: boolean; interval: number }) => {
      const client = new AdminClient(opts.http, { token: opts.token ?? null });
      if (opts.watch !== true) {
        const s = await client.status();
        print(s, opts.json === true, () => formatStatus(s.replication));
        return;
      }
      await untilInterrupted((signal) =>
        watchStatus(client, { intervalMs: opts.interval, json: opts.json === true, tty: process.stdout.isTTY === true, out: process.stdout, signal }),
      );
    });

  program
    .command('promote')
    .description('make this node primary for an export (refused unless its copy is UpToDate and no live primary is attached)')
    .argument('<export>', 'export name')
    .addOption(httpOption())
    .addOption(tokenOption())
    .option('--json', 'print the new replication state as JSON')
    .option('--force', 'promote even an outdated or inconsistent copy, or one a live primary is attached to')
    .action(async (name: string, opts: { http: string; token?: string; json?: boolean; force?: boolean }) => {
      const r = await new AdminClient(opts.http, { token: opts.token ?? null }).promote(name, opts.force === true);
      print(r, opts.json === true, () => `${name}: ${r.role === 'primary' ? `primary (epoch ${r.epoch})` : `still ${r.role}`}\n\n${formatExport(r)}`);
    });

  program
    .command('demote')
    .description('make this node secondary for an export (clients can no longer write it here)')
    .argument('<export>', 'export name')
    .addOption(httpOption())
    .addOption(tokenOption())
    .option('--json', 'print the new replication state as JSON')
    .action(async (name: string, opts: { http: string; token?: string; json?: boolean }) => {
      const r = await new AdminClient(opts.http, { token: opts.token ?? null }).demote(name);
      print(r, opts.json === true, () => `${name}: ${r.role}\n\n${formatExport(r)}`);
    });

  program
    .command('resync')
    .description('wait until an export is in sync on this node, showing progress; with --discard-my-data first throw away this node\'s changes (split-brain resolution)')
    .argument('<export>', 'export name')
    .addOption(httpOption())
    .addOption(tokenOption())
    .option('--json', 'print the final replication state as JSON')
    .option('--discard-my-data', "drop this node's changes to the export: it becomes secondary and is resynced from the peer")
    .option('--timeout <ms>', 'give up (exit 1) after this many milliseconds', parseTimeout, 600_000)
    .option('--interval <ms>', 'poll interval in milliseconds', parseInterval, 1000)
    .action(async (name: string, opts: { http: string; token?: string; json?: boolean; discardMyData?: boolean; timeout: number; interval: number }) => {
      const client = new AdminClient(opts.http, { token: opts.token ?? null });
      if (opts.discardMyData === true) {
        const d = await client.discardMyData(name);
        process.stderr.write(`${name}: local changes discarded; this node is ${d.role} (${d.disk}) and waits to be resynced from its peer\n`);
      }
      const r = await untilInterrupted((signal) =>
        waitForSync(client, name, { timeoutMs: opts.timeout, intervalMs: opts.interval, tty: process.stderr.isTTY === true, err: process.stderr, signal }),
      );
      print(r, opts.json === true, () => formatSynced(r));
    });

  return program;
}

/** --token, for the commands that call a node's admin endpoints. */
function tokenOption(): Option {
  return new Option('--token <token>', "the node's --admin-token (needed when it has one)").env('NBDMIRROR_ADMIN_TOKEN');
}

/** --http, shared by the commands that talk to a node's HTTP endpoint. */
function httpOption(): Option {
  return new Option('--http <url>', "the node's HTTP endpoint (http://HOST:PORT or HOST:PORT)").env('NBDMIRROR_HTTP').default(DEFAULT_HTTP);
}

/** Run fn with a signal that fires on SIGINT (Ctrl-C), so long waits end cleanly. */
async function untilInterrupted<T>(fn: (signal: AbortSignal) => Promise<T>): Promise<T> {
  const ac = new AbortController();
  const onSignal = (): void => ac.abort();
  process.once('SIGINT', onSignal);
  try {
    return await fn(ac.signal);
  } finally {
    process.off('SIGINT', onSignal);
  }
}

function parseTimeout(value: string): number {
  const n = Number(value);
  if (!/^\d+$/.test(value) || !Number.isSafeInteger(n)) throw new InvalidArgumentError('expected a whole number of milliseconds');
  return n;
}

function parseInterval(value: string): number {
  const n = parseTimeout(value);
  if (n < 100) throw new InvalidArgumentError('expected at least 100 milliseconds');
  return n;
}

async function main(argv: string[]): Promise<number> {
  try {
    await buildProgram().parseAsync(argv);
    return EXIT_OK;
  } catch (err) {
    // Commander has already printed its own message (or the help) to the right stream.
    if (err instanceof CommanderError) return err.exitCode === 0 ? EXIT_OK : EXIT_USAGE;
    const message = err instanceof Error ? err.message : String(err);
    process.stderr.write(`nbdmirror: ${message}\n`);
    return err instanceof UsageError ? EXIT_USAGE : EXIT_FAILED;
  }
}

void main(process.argv).then((code) => {
  process.exitCode = code;
});
