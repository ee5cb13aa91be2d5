#!/usr/bin/env node
// nbdmirror: the operator CLI. Commander wiring only; each command's work is a function in lib/ that returns
// data, printed as text or as JSON with --json. Exit codes: 0 ok, 1 failed, 2 bad usage.

import { Command, CommanderError, InvalidArgumentError } from 'commander';
import { formatInfo, getInfo } from './lib/client/info';
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

  return program;
}

function parseTimeout(value: string): number {
  const n = Number(value);
  if (!/^\d+$/.test(value) || !Number.isSafeInteger(n)) throw new InvalidArgumentError('expected a whole number of milliseconds');
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
