// Small durable-file helpers shared by the versioned metadata files (NAME.oos, NAME.al, NAME.meta.json):
// whole-buffer positional reads and writes, a checked binary header, directory fsync after a rename, and I/O
// errors naming the file.

import { promises as fsp, constants as fsc } from 'node:fs';
import { crc32 } from '@node-rs/crc32';
import { CorruptStateError, IoError } from '../errors';

export function ioError(file: string, err: unknown): IoError {
  return new IoError(`${file}: ${(err as Error).message}`, { cause: err });
}

/** fsync a directory so a rename in it is durable. */
export async function syncDir(dir: string): Promise<void> {
  const dh = await fsp.open(dir, fsc.O_RDONLY);
  try {
    await dh.sync();
  } catch {
    // Some filesystems refuse fsync on a directory; the rename is then as durable as they make it.
  } finally {
    await dh.close();
  }
}

/** Read exactly buf.length bytes at pos; a short file is a CorruptStateError, other failures IoError. */
export async function readFully(fh: fsp.FileHandle, file: string, buf: Buffer, pos: number): Promise<void> {
  let off = 0;
  try {
    while (off < buf.length) {
      const { bytesRead } = await fh.read(buf, off, buf.length - off, pos + off);
      if (bytesRead === 0) throw new CorruptStateError(`${file}: short file`);
      off += bytesRead;
    }
  } catch (err) {
    if (err instanceof CorruptStateError) throw err;
    throw ioError(file, err);
  }
}

export async function writeFully(fh: fsp.FileHandle, buf: Buffer, pos: number): Promise<void> {
  let off = 0;
  while (off < buf.length) {
    const { bytesWritten } = await fh.write(buf, off, buf.length - off, pos + off);
    off += bytesWritten;
  }
}

/**
 * Read a binary state file's header and check it: long enough, the magic (8 bytes at 0), the format version
 * (u32 at 8) and a crc32 (u32 at crcAt) of the bytes before it. Failures come from `corrupt(what)`. Also
 * returns the file's length, for the caller's own size check.
 */
export async function readCheckedHeader(
  fh: fsp.FileHandle,
  file: string,
  h: { size: number; magic: Buffer; version: number; crcAt: number; kind: string },
  corrupt: (what: string) => Error,
): Promise<{ header: Buffer; fileLength: number }> {
  let st;
  try {
    st = await fh.stat();
  } catch (err) {
    throw ioError(file, err);
  }
  if (st.size < h.size) throw corrupt(`short file (${st.size} bytes, the header alone is ${h.size})`);
  const header = Buffer.alloc(h.size);
  await readFully(fh, file, header, 0);
  if (!header.subarray(0, 8).equals(h.magic)) throw corrupt(`not ${h.kind} (bad magic)`);
  const version = header.readUInt32BE(8);
  if (version !== h.version) throw corrupt(`format version ${version}, this build reads ${h.version}`);
  if (header.readUInt32BE(h.crcAt) !== crc32(header.subarray(0, h.crcAt))) throw corrupt('header checksum mismatch');
  return { header, fileLength: st.size };
}
