/**
 * The file handling every weight reader shares: opening a file for reading (a failure is a WeightsError naming
 * the file and the errno code), handing the descriptor to a parser that owns it from then on unless it throws,
 * reading and writing exact byte ranges by offset, so multi-GB files never become one Buffer, and the bound on
 * one tensor held in memory.
 */
import { closeSync, openSync, readSync, writeSync } from 'node:fs';
import { WeightsError, WeightsLimitError, count } from './types.js';

/**
 * The most bytes one tensor may have in memory, raw or decoded to float32: 4 GiB, the longest typed array Node 20
 * makes (V8 stops at 2^32 elements). The largest tensor of an SD or SDXL checkpoint, the text encoder's token
 * embedding (49,408 x 1,280 floats), is 253 MB.
 */
export const MAX_TENSOR_BYTES = 2 ** 32;

/** One read or write call moves at most this: Node refuses lengths of 2 GiB and more, Linux moves 0x7ffff000 at most. */
const IO_CHUNK = 2 ** 30;

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
    const n = readSync(fd, into, done, Math.min(IO_CHUNK, into.byteLength - done), position + done);
    if (n === 0) ended();
    done += n;
  }
}

/** Writes all of `data` at the file's current position, in calls of at most IO_CHUNK bytes. */
export function writeFully(fd: number, data: Uint8Array): void {
  let done = 0;
  while (done < data.byteLength) done += writeSync(fd, data, done, Math.min(IO_CHUNK, data.byteLength - done));
}

/** Refuses to bring a tensor of `bytes` bytes (`what`: raw, or as float32) into memory past MAX_TENSOR_BYTES. */
export function checkTensorBytes(path: string, name: string, bytes: number, what = ''): void {
  if (bytes <= MAX_TENSOR_BYTES) return;
  throw new WeightsLimitError(
    `${path}: tensor ${name} is ${count(bytes)} bytes${what}, more than the ${count(MAX_TENSOR_BYTES)} (4 GiB) one tensor may have in memory: Node makes no longer typed array, and no SD or SDXL tensor comes near it`,
    'tensorBytes',
    MAX_TENSOR_BYTES,
  );
}

/** A tensor of `bytes` bytes is read into `out` (TensorSource.bytesInto) only when `out` is exactly that long. */
export function checkInto(path: string, name: string, bytes: number, out: Uint8Array): void {
  if (out.byteLength !== bytes) throw new WeightsError(`${path}: tensor ${name} is ${bytes} bytes, not ${out.byteLength}`);
}

/** A tensor's `bytes`, already read, into `out` (TensorSource.bytesInto for a source that cannot read in place). */
export function copyInto(path: string, name: string, bytes: Uint8Array, out: Uint8Array): void {
  checkInto(path, name, bytes.byteLength, out);
  out.set(bytes);
}
