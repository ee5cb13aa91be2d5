// Small durable-file helpers shared by the versioned metadata files (NAME.oos, NAME.al, NAME.meta.json):
// whole-buffer positional reads and writes, directory fsync after a rename, and I/O errors naming the file.

import { promises as fsp, constants as fsc } from 'node:fs';
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
