#!/usr/bin/env -S node --max-semi-space-size=4
// nbdmirror-server: parse the config, start the node, stop gracefully on SIGTERM/SIGINT.
// Exit codes: 0 clean stop, 1 failure at start or run time, 2 bad usage (flags, sizes, config file).

import { loadConfig } from './lib/config';
import { NbdmirrorError, UsageError } from './lib/errors';
import { createLogger } from './lib/log';
import { startNode } from './lib/node';

/** A stop that takes longer than this (stuck I/O) ends the process with exit 1. */
const STOP_TIMEOUT_MS = 60_000;

async function main(): Promise<number> {
  let loaded;
  try {
    loaded = loadConfig(process.argv.slice(2), process.env);
  } catch (err) {
    if (err instanceof UsageError) {
      process.stderr.write(`nbdmirror-server: ${err.message} (see --help)\n`);
      return 2;
    }
    throw err;
  }
  if (loaded.kind === 'help') {
    process.stdout.write(loaded.text);
    return 0;
  }
  const config = loaded.config;
  const log = createLogger(config.logLevel);
  let node;
  try {
    node = await startNode(config, log);
  } catch (err) {
    const usage = err instanceof UsageError;
    const message = err instanceof NbdmirrorError || (err as NodeJS.ErrnoException).code ? (err as Error).message : String(err);
    log.fatal({ err }, 'cannot start');
    process.stderr.write(`nbdmirror-server: ${message}\n`);
    return usage ? 2 : 1;
  }
  const running = node;
  return new Promise<number>((resolve) => {
    let signalled = false;
    const onSignal = (signal: NodeJS.Signals): void => {
      if (signalled) {
        log.warn({ signal }, 'second signal: exiting without waiting');
        resolve(1);
        return;
      }
      signalled = true;
      log.info({ signal }, 'stopping: finishing in-flight requests and flushing');
      const timer = setTimeout(() => {
        log.error('stop timed out');
        resolve(1);
      }, STOP_TIMEOUT_MS);
      timer.unref();
      running.stop().then(
        () => {
          log.info('stopped');
          resolve(0);
        },
        (err: unknown) => {
          log.error({ err }, 'stop failed');
          resolve(1);
        },
      );
    };
    process.on('SIGTERM', onSignal);
    process.on('SIGINT', onSignal);
  });
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(`nbdmirror-server: internal error: ${(err as Error)?.stack ?? String(err)}\n`);
    process.exit(1);
  },
);
