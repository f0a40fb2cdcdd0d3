/**
 * The file handling every weight reader shares: opening a file for reading (a failure is a WeightsError naming
 * the file and the errno code), handing the descriptor to a parser that owns it from then on unless it throws,
 * and reading an exact byte range by offset, so multi-GB files never become one Buffer.
 */
import { closeSync, openSync, readSync } from 'node:fs';
import { WeightsError } from './types.js';

/** "PATH: cannot open (ENOENT)", for a failed open or stat of a weight file or folder. */
export function cannotOpen(path: string, e: unknown): WeightsError {
  return new WeightsError(`${path}: cannot open (${(e as NodeJS.ErrnoException).code ?? String(e)})`);
}

/** A read-only file descriptor for `path`; the caller closes it. */
export function openForReading(path: string): number {
  try {
    return openSync(path, 'r');
  } catch (e) {
    throw cannotOpen(path, e);
  }
}

/**
 * Opens `path` and builds a reader on it: the reader keeps the descriptor (and closes it in its own close()),
 * except when `build` throws, when it is closed here before the error goes on.
 */
export function openOwned<T>(path: string, build: (fd: number) => T): T {
  const fd = openForReading(path);
  try {
    return build(fd);
  } catch (e) {
    closeSync(fd);
    throw e;
  }
}

/** Fills `into` from `position`; when the file ends first, `ended` throws the reader's own error. */
export function readFully(fd: number, into: Uint8Array, position: number, ended: () => never): void {
  let done = 0;
  while (done < into.byteLength) {
    const n = readSync(fd, into, done, into.byteLength - done, position + done);
    if (n === 0) ended();
    done += n;
  }
}
