/**
 * safetensors (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
 * N bytes of JSON `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__"?: {string: string}}`,
 * then the tensor bytes, offsets relative to the end of the header.
 *
 * The reader validates everything before trusting it (lengths, JSON, dtypes, shape vs byte count, offsets in
 * range and not overlapping) and reads each tensor by offset, so multi-GB files never become one Buffer. The
 * header is parsed strictly (safetensors-header.ts: no key twice, bounded nesting), never with JSON.parse.
 */
import { closeSync, constants, fstatSync, openSync, renameSync, rmSync } from 'node:fs';
import { DTYPE_BYTES, decodeToFloat32, isDType, isFloatDType, type DType } from './dtypes.js';
import { checkInto, checkTensorBytes, openOwned, readFully, writeFully } from './files.js';
import { parseHeaderText, type RawEntry } from './safetensors-header.js';
import { WeightsError, WeightsLimitError, count, type TensorInfo, type TensorSource } from './types.js';
import { pageCached, readAhead, readDirect } from '../backend/kernels.js';

/**
 * The most header bytes read or written: 16 MiB. SD 1.x and SDXL headers are 50-300 KB (~110 bytes a tensor);
 * a kohya LoRA's `__metadata__` (its training settings and `ss_tag_frequency`, the tag counts of its dataset)
 * reaches a few MB for datasets of tens of thousands of images. 16 MiB holds ~150,000 tensor entries, or several
 * times the metadata of a large LoRA, and parsing it builds ~110 MB at most. The reference reader allows
 * 100,000,000 bytes; only trainings on hundreds of thousands of images write such metadata
 * (kohya-ss/sd-scripts#1380), and such files are refused here.
 */
export const MAX_HEADER_BYTES = 16 * 2 ** 20;

interface Entry extends TensorInfo {
  readonly begin: number;
  readonly end: number;
}

/** How far past what has been read the system is asked to read the file (see readAheadOf). */
const READ_AHEAD = 128 * 2 ** 20;

/**
 * Tensors of at least this many bytes that are not in the page cache are read past it (kernels.readDirect): a
 * Linear's or a conv's weight. Smaller ones (norms, biases) read through the cache, where one read costs less than
 * the disk's own latency.
 */
const DIRECT_MIN_BYTES = 256 * 2 ** 10;

export class SafetensorsFile implements TensorSource {
  private fd: number | null;
  /** Reused for the raw bytes of tensors decoded to float32 (fp16, bf16): one fresh array per tensor, not two. */
  private scratch: Uint8Array | null = null;
  /** The part of the file the system has been asked to read ahead: [aheadFrom, ahead). */
  private aheadFrom: number;
  private ahead: number;
  /** False once the system said it takes no such advice (or the kernels that ask are not built). */
  private advising = true;
  /** The file opened again with O_DIRECT, for reads past the page cache (readDirectly); null where that cannot be. */
  private direct: number | null = null;

  private constructor(
    readonly path: string,
    fd: number,
    private readonly entries: ReadonlyMap<string, Entry>,
    private readonly dataStart: number,
    /** `__metadata__`, in the order of the file. */
    readonly metadata: ReadonlyMap<string, string>,
    /** Bytes of the file. */
    private readonly size: number,
  ) {
    this.fd = fd;
    this.aheadFrom = this.ahead = dataStart;
  }

  /**
   * Before reading [begin, begin + bytes) of the file: keeps the system reading READ_AHEAD bytes past it in the
   * background (kernels.readAhead, where the native kernels are built), so that the disk works while the tensors
   * before are decoded and packed. A read outside the part asked for (a model reads its tensors in its own order,
   * not always the file's) starts asking again from there.
   */
  private readAheadOf(begin: number, bytes: number): void {
    if (this.fd === null || !this.advising || this.direct !== null) return;
    if (begin < this.aheadFrom || begin > this.ahead) this.aheadFrom = this.ahead = begin;
    const want = Math.min(begin + bytes + READ_AHEAD, this.size);
    if (want <= this.ahead || (want - this.ahead < READ_AHEAD / 4 && want < this.size)) return; // a quarter at a time, or the rest
    if (!readAhead(this.fd, this.ahead, want - this.ahead)) this.advising = false;
    else this.ahead = want;
  }

  static open(path: string): SafetensorsFile {
    return openOwned(path, (fd) => {
      const { entries, dataStart, metadata } = parseHeader(path, fd);
      const file = new SafetensorsFile(path, fd, entries, dataStart, metadata, fstatSync(fd).size);
      file.direct = openDirect(path);
      file.readAheadOf(dataStart, 0); // the disk starts on the first tensors while the caller is still setting up
      return file;
    });
  }

  keys(): string[] {
    return [...this.entries.keys()];
  }

  has(key: string): boolean {
    return this.entries.has(key);
  }

  info(key: string): TensorInfo {
    const e = this.entry(key);
    return { dtype: e.dtype, shape: e.shape };
  }

  bytes(key: string): Uint8Array {
    const e = this.entry(key);
    checkTensorBytes(this.path, key, e.end - e.begin);
    const out = new Uint8Array(e.end - e.begin);
    this.bytesInto(key, out);
    return out;
  }

  bytesInto(key: string, out: Uint8Array): void {
    const e = this.entry(key);
    if (this.fd === null) throw new WeightsError(`${this.path}: read after close`);
    checkInto(this.path, key, e.end - e.begin, out);
    if (this.readDirectly(this.dataStart + e.begin, out)) return;
    this.readAheadOf(this.dataStart + e.begin, out.byteLength);
    readAt(this.fd, out, this.dataStart + e.begin, this.path);
  }

  /**
   * Reads a large tensor that is not in the page cache past it, from the O_DIRECT descriptor: a cold load then costs
   * the system no cache pages to fill and copy from (kernels.readDirect says what that saves). False where it did not,
   * and the caller reads through the cache; the first refusal ends direct reads for this file.
   */
  private readDirectly(position: number, out: Uint8Array): boolean {
    if (this.direct === null || this.fd === null || out.byteLength < DIRECT_MIN_BYTES) return false;
    if (pageCached(this.fd, position, out.byteLength)) return false;
    if (readDirect(this.direct, position, out)) return true;
    closeSync(this.direct);
    this.direct = null;
    return false;
  }

  float32(key: string): Float32Array {
    const e = this.entry(key);
    if (!isFloatDType(e.dtype)) throw new WeightsError(`${this.path}: tensor ${key} is ${e.dtype}, not floating point`);
    checkTensorBytes(this.path, key, e.end - e.begin);
    checkTensorBytes(this.path, key, ((e.end - e.begin) / DTYPE_BYTES[e.dtype]) * 4, ' as float32');
    if (this.fd === null) throw new WeightsError(`${this.path}: read after close`);
    if (e.dtype === 'F32') {
      // Read straight into the result: no intermediate copy, so loading runs at the speed of the reads.
      const out = new Float32Array((e.end - e.begin) / 4);
      this.bytesInto(key, new Uint8Array(out.buffer));
      return out;
    }
    const n = e.end - e.begin;
    if (this.scratch === null || this.scratch.byteLength < n) this.scratch = new Uint8Array(n);
    const raw = this.scratch.subarray(0, n);
    this.bytesInto(key, raw);
    return decodeToFloat32(raw, e.dtype);
  }

  close(): void {
    if (this.fd !== null) closeSync(this.fd);
    if (this.direct !== null) closeSync(this.direct);
    this.fd = this.direct = null;
    this.scratch = null;
  }

  private entry(key: string): Entry {
    const e = this.entries.get(key);
    if (e === undefined) throw new WeightsError(`${this.path}: no tensor named ${key}`);
    return e;
  }
}

/**
 * The file opened for direct reads (O_DIRECT, Linux), or null where the system or the file system refuses, or
 * SD_DIRECT_READS=0 says to read everything through the page cache.
 */
function openDirect(path: string): number | null {
  if (constants.O_DIRECT === undefined || process.env.SD_DIRECT_READS === '0') return null;
  try {
    return openSync(path, constants.O_RDONLY | constants.O_DIRECT);
  } catch {
    return null;
  }
}

function readAt(fd: number, into: Uint8Array, position: number, path: string): void {
  readFully(fd, into, position, () => {
    throw new WeightsError(`${path}: file ended early (wanted ${into.byteLength} bytes at ${position})`);
  });
}

function parseHeader(path: string, fd: number) {
  const size = fstatSync(fd).size;
  if (size < 8) throw new WeightsError(`${path}: ${size}-byte file is too short to be safetensors (needs an 8-byte header length)`);
  const lenBuf = new Uint8Array(8);
  readAt(fd, lenBuf, 0, path);
  const headerLen = new DataView(lenBuf.buffer).getBigUint64(0, true);
  if (headerLen > BigInt(size - 8)) {
    throw new WeightsError(`${path}: header length ${headerLen} is larger than the file (${size} bytes): not safetensors, or truncated`);
  }
  if (headerLen > BigInt(MAX_HEADER_BYTES)) throw headerTooLarge(path, headerLen);
  const n = Number(headerLen);
  const headerBytes = new Uint8Array(n);
  readAt(fd, headerBytes, 8, path);
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(headerBytes);
  } catch {
    throw new WeightsError(`${path}: header is not JSON (not UTF-8)`);
  }
  const dataStart = 8 + n;
  const dataSize = size - dataStart;
  const { entries, metadata } = parseHeaderText(text, path, (name, raw) => parseEntry(path, name, raw, dataSize));
  checkNoOverlap(path, entries);
  return { entries, dataStart, metadata };
}

function headerTooLarge(path: string, bytes: number | bigint): WeightsLimitError {
  return new WeightsLimitError(
    `${path}: header of ${count(bytes)} bytes is more than the ${count(MAX_HEADER_BYTES)} a safetensors header may have (real ones are under a few MB)`,
    'safetensors.headerBytes',
    MAX_HEADER_BYTES,
  );
}

function parseEntry(path: string, name: string, raw: RawEntry, dataSize: number): Entry {
  const where = `${path}: tensor ${name}`;
  const { dtype, shape, offsets } = raw;
  if (!isDType(dtype)) throw new WeightsError(`${where}: unknown dtype ${JSON.stringify(dtype)}`);
  if (shape === undefined || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
    throw new WeightsError(`${where}: shape ${JSON.stringify(shape)} is not a list of non-negative integers`);
  }
  if (offsets === undefined || offsets.length !== 2 || !offsets.every((o) => Number.isSafeInteger(o) && o >= 0)) {
    throw new WeightsError(`${where}: data_offsets ${JSON.stringify(offsets)} is not [begin, end]`);
  }
  const [begin, end] = offsets;
  if (begin > end || end > dataSize) {
    throw new WeightsError(`${where}: data_offsets [${begin}, ${end}] out of range (data section is ${dataSize} bytes)`);
  }
  // A product past 2^53 rounds to at least 2^53, more than any data section: it cannot match by accident.
  const want = shape.reduce((a, d) => a * d, 1) * DTYPE_BYTES[dtype];
  if (want !== end - begin) {
    throw new WeightsError(`${where}: shape [${shape.join(', ')}] of ${dtype} needs ${want} bytes, data_offsets give ${end - begin}`);
  }
  return { dtype, shape: Object.freeze(shape), begin, end };
}

function checkNoOverlap(path: string, entries: ReadonlyMap<string, Entry>): void {
  const sorted = [...entries].filter(([, e]) => e.end > e.begin).sort((a, b) => a[1].begin - b[1].begin);
  for (let i = 1; i < sorted.length; i++) {
    const [prevName, prev] = sorted[i - 1];
    const [name, cur] = sorted[i];
    if (cur.begin < prev.end) throw new WeightsError(`${path}: tensors ${prevName} and ${name} overlap in the file`);
  }
}

export interface TensorToWrite {
  readonly dtype: DType;
  readonly shape: readonly number[];
  /** Little-endian bytes, or a typed array whose element type matches dtype. */
  readonly data: ArrayBufferView;
}

/**
 * Write tensors as safetensors, in the given order, atomically (temp file, then rename). `dataOf` is asked
 * for one tensor's bytes at a time, so converting a large file never holds it whole. The header is written by
 * hand, not from an object (where a tensor named `__proto__` would vanish), and read back before the rename:
 * the file must list exactly the tensors given, or it is not written.
 */
export function writeSafetensors(
  path: string,
  infos: ReadonlyArray<readonly [string, TensorInfo]>,
  dataOf: (name: string) => ArrayBufferView,
  metadata?: Readonly<Record<string, string>>,
): void {
  const headerBytes = Buffer.from(headerJson(path, infos, metadata), 'utf-8');
  if (headerBytes.byteLength > MAX_HEADER_BYTES) throw headerTooLarge(path, headerBytes.byteLength);
  const tmp = `${path}.tmp-${process.pid}`;
  const fd = openSync(tmp, 'w');
  try {
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(headerBytes.byteLength));
    writeFully(fd, len);
    writeFully(fd, headerBytes);
    for (const [name, info] of infos) {
      const data = dataOf(name);
      const want = info.shape.reduce((a, d) => a * d, 1) * DTYPE_BYTES[info.dtype];
      if (data.byteLength !== want) {
        throw new WeightsError(`${name}: ${data.byteLength} bytes given, shape [${info.shape.join(', ')}] of ${info.dtype} needs ${want}`);
      }
      writeFully(fd, new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
    }
    closeSync(fd);
    checkWritten(path, tmp, infos);
    renameSync(tmp, path);
  } catch (e) {
    try {
      closeSync(fd);
    } catch {
      // already closed
    }
    rmSync(tmp, { force: true });
    throw e;
  }
}

/** `{"__metadata__": {...}, name: {dtype, shape, data_offsets}, ...}`, padded with spaces to a multiple of 8 bytes. */
function headerJson(path: string, infos: ReadonlyArray<readonly [string, TensorInfo]>, metadata?: Readonly<Record<string, string>>): string {
  const members: string[] = [];
  if (metadata !== undefined && Object.keys(metadata).length > 0) members.push(`"__metadata__":${JSON.stringify(metadata)}`);
  const names = new Set<string>();
  let offset = 0;
  for (const [name, info] of infos) {
    if (name === '__metadata__') throw new WeightsError(`${path}: cannot write a tensor named __metadata__`);
    if (names.has(name)) throw new WeightsError(`${path}: tensor ${name} is given twice`);
    names.add(name);
    const bytes = info.shape.reduce((a, d) => a * d, 1) * DTYPE_BYTES[info.dtype];
    members.push(`${JSON.stringify(name)}:{"dtype":"${info.dtype}","shape":${JSON.stringify(info.shape)},"data_offsets":[${offset},${offset + bytes}]}`);
    offset += bytes;
  }
  const json = `{${members.join(',')}}`;
  // Pad with spaces so the data section starts 8-byte aligned, as the reference writer does.
  return json + ' '.repeat((8 - (Buffer.byteLength(json) % 8)) % 8);
}

/** The written file lists every tensor given, and nothing else. */
function checkWritten(path: string, tmp: string, infos: ReadonlyArray<readonly [string, TensorInfo]>): void {
  const written = SafetensorsFile.open(tmp);
  try {
    const missing = infos.filter(([name]) => !written.has(name)).map(([name]) => name);
    if (missing.length > 0 || written.keys().length !== infos.length) {
      throw new WeightsError(
        `${path}: the file written lists ${written.keys().length} tensors, not the ${infos.length} given${missing.length > 0 ? ` (missing ${missing.slice(0, 3).join(', ')})` : ''}; nothing was written`,
      );
    }
  } finally {
    written.close();
  }
}
