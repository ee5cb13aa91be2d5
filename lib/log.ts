// Logging: pino underneath, passed down explicitly (no global logger). JSON lines by default; a readable
// form when stdout is a terminal.

import pino from 'pino';

export type Logger = pino.Logger;
export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

export function createLogger(level: LogLevel, opts: { pretty?: boolean; name?: string } = {}): Logger {
  const pretty = opts.pretty ?? process.stdout.isTTY === true;
  const base = { level, name: opts.name ?? 'nbdmirror-server' };
  if (pretty) {
    return pino({ ...base, transport: { target: 'pino-pretty', options: { colorize: true, translateTime: 'SYS:HH:MM:ss.l' } } });
  }
  // Synchronous destination so that the last lines before an exit are never lost.
  return pino(base, pino.destination({ fd: 1, sync: true }));
}

/** A logger that discards everything (tests, library use). */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
