// `nbdmirror info URI`: what a server says about one export, as data (for --json) and as text.

import { NBD_REP_ERR_UNSUP } from '../protocol/constants';
import { type BlockSizes, type ExportEntry, type ExportInfo, NbdClient, OptionError, type TransmissionFlags } from './nbd-client';
import { formatNbdUri, parseNbdUri } from './uri';

export interface InfoResult {
  uri: string;
  exportName: string;
  description: string | null;
  size: number;
  flags: TransmissionFlags;
  blockSizes: BlockSizes | null;
  metaContexts: string[];
  /** Present when asked for (--list): NBD_OPT_LIST. */
  exports?: ExportEntry[];
}

export interface GetInfoOptions {
  /** Also list the server's exports. */
  list?: boolean;
  connectTimeoutMs?: number;
}

/**
 * Query an export with NBD_OPT_INFO (not opening it). Servers without NBD_OPT_INFO get a full connect and a
 * soft disconnect instead. Throws UsageError for a bad URI; IoError / OptionError / ProtocolError otherwise.
 */
export async function getInfo(uri: string, opts: GetInfoOptions = {}): Promise<InfoResult> {
  const parsed = parseNbdUri(uri);
  const hs = opts.connectTimeoutMs === undefined ? {} : { connectTimeoutMs: opts.connectTimeoutMs };
  let info: ExportInfo;
  try {
    info = await NbdClient.info(parsed.target, parsed.exportName, hs);
  } catch (err) {
    if (!(err instanceof OptionError && err.reply === NBD_REP_ERR_UNSUP)) throw err;
    const c = await NbdClient.connect(parsed.target, { ...hs, exportName: parsed.exportName });
    info = {
      exportName: c.exportName,
      description: c.description,
      size: c.size,
      flags: c.flags,
      blockSizes: c.blockSizes,
      metaContexts: [...c.metaContexts.keys()],
    };
    await c.disconnect();
  }
  const result: InfoResult = {
    uri: formatNbdUri(parsed),
    exportName: info.exportName,
    description: info.description ?? null,
    size: info.size,
    flags: info.flags,
    blockSizes: info.blockSizes ?? null,
    metaContexts: info.metaContexts,
  };
  if (opts.list === true) result.exports = await NbdClient.list(parsed.target, hs);
  return result;
}

const UNITS = ['KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];

/** 67108864 → "64 MiB", 1536 → "1.5 KiB", 100 → "100 bytes". */
export function humanSize(bytes: number): string {
  if (bytes < 1024) return `${bytes} bytes`;
  let v = bytes;
  let i = -1;
  while (v >= 1024 && i < UNITS.length - 1) {
    v /= 1024;
    i++;
  }
  const text = Number.isInteger(v) ? String(v) : v.toFixed(v < 10 ? 2 : 1).replace(/\.?0+$/, '');
  return `${text} ${UNITS[i]!}`;
}

const FLAG_LABELS: [keyof TransmissionFlags, string][] = [
  ['readOnly', 'read-only'],
  ['canFlush', 'flush'],
  ['canFua', 'fua'],
  ['canTrim', 'trim'],
  ['canZero', 'zero'],
  ['canFastZero', 'fast-zero'],
  ['canDf', 'df'],
  ['canCache', 'cache'],
  ['canMultiConn', 'multi-conn'],
  ['canResize', 'resize'],
  ['rotational', 'rotational'],
];

/** The human-readable form printed by `nbdmirror info` without --json. */
export function formatInfo(r: InfoResult): string {
  const on = FLAG_LABELS.filter(([k]) => r.flags[k] === true).map(([, label]) => label);
  const hex = `0x${r.flags.raw.toString(16).padStart(4, '0')}`;
  const lines = [
    `uri:            ${r.uri}`,
    `export:         ${JSON.stringify(r.exportName)}`,
    `description:    ${r.description ?? '-'}`,
    `size:           ${r.size} bytes (${humanSize(r.size)})`,
    `read-only:      ${r.flags.readOnly ? 'yes' : 'no'}`,
    `flags:          ${on.length > 0 ? on.join(' ') : '-'} (${hex})`,
    `block sizes:    ${
      r.blockSizes === null
        ? 'not advertised'
        : `minimum ${r.blockSizes.minimum}, preferred ${r.blockSizes.preferred}, maximum ${r.blockSizes.maximum}`
    }`,
    `meta contexts:  ${r.metaContexts.length > 0 ? r.metaContexts.join(', ') : '-'}`,
  ];
  if (r.exports !== undefined) {
    lines.push(`exports:        ${r.exports.length}`);
    for (const e of r.exports) lines.push(`  ${JSON.stringify(e.name)}${e.description !== '' ? `  ${e.description}` : ''}`);
  }
  return lines.join('\n');
}
