/**
 * safetensors (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
 * N bytes of JSON `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__"?: {string: string}}`,
 * then the tensor bytes, offsets relative to the end of the header.
 *
 * The reader validates everything before trusting it (lengths, JSON, dtypes, shape vs byte count, offsets in
 * range and not overlapping) and reads each tensor by offset, so multi-GB files never become one Buffer.
 */
import { closeSync, fstatSync, openSync, renameSync, rmSync, writeSync } from 'node:fs';
import { DTYPE_BYTES, decodeToFloat32, isDType, isFloatDType, type DType } from './dtypes.js';
import { openOwned, readFully } from './files.js';
import { WeightsError, type TensorInfo, type TensorSource } from './types.js';

/** Headers of real checkpoints are a few hundred KB; anything past this is not a weight file. */
const MAX_HEADER_BYTES = 100 * 1024 * 1024;

interface Entry extends TensorInfo {
  readonly begin: number;
  readonly end: number;
}

export class SafetensorsFile implements TensorSource {
  private fd: number | null;
  /** Reused for the raw bytes of tensors decoded to float32 (fp16, bf16): one fresh array per tensor, not two. */
  private scratch: Uint8Array | null = null;

  private constructor(
    readonly path: string,
    fd: number,
    private readonly entries: ReadonlyMap<string, Entry>,
    private readonly dataStart: number,
    readonly metadata: Readonly<Record<string, string>>,
  ) {
    this.fd = fd;
  }

  static open(path: string): SafetensorsFile {
    return openOwned(path, (fd) => {
      const { entries, dataStart, metadata } = parseHeader(path, fd);
      return new SafetensorsFile(path, fd, entries, dataStart, metadata);
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
    if (this.fd === null) throw new WeightsError(`${this.path}: read after close`);
    const out = new Uint8Array(e.end - e.begin);
    readAt(this.fd, out, this.dataStart + e.begin, this.path);
    return out;
  }

  float32(key: string): Float32Array {
    const e = this.entry(key);
    if (!isFloatDType(e.dtype)) throw new WeightsError(`${this.path}: tensor ${key} is ${e.dtype}, not floating point`);
    if (e.dtype === 'F32') {
      // Read straight into the result: no intermediate copy, so loading runs at the speed of the reads.
      if (this.fd === null) throw new WeightsError(`${this.path}: read after close`);
      const out = new Float32Array((e.end - e.begin) / 4);
      readAt(this.fd, new Uint8Array(out.buffer), this.dataStart + e.begin, this.path);
      return out;
    }
    if (this.fd === null) throw new WeightsError(`${this.path}: read after close`);
    const n = e.end - e.begin;
    if (this.scratch === null || this.scratch.byteLength < n) this.scratch = new Uint8Array(n);
    const raw = this.scratch.subarray(0, n);
    readAt(this.fd, raw, this.dataStart + e.begin, this.path);
    return decodeToFloat32(raw, e.dtype);
  }

  close(): void {
    if (this.fd !== null) closeSync(this.fd);
    this.fd = null;
    this.scratch = null;
  }

  private entry(key: string): Entry {
    const e = this.entries.get(key);
    if (e === undefined) throw new WeightsError(`${this.path}: no tensor named ${key}`);
    return e;
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
  if (headerLen > BigInt(MAX_HEADER_BYTES)) throw new WeightsError(`${path}: header of ${headerLen} bytes is implausibly large`);
  const n = Number(headerLen);
  const headerBytes = new Uint8Array(n);
  readAt(fd, headerBytes, 8, path);
  let header: unknown;
  try {
    header = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(headerBytes));
  } catch (e) {
    throw new WeightsError(`${path}: header is not JSON (${e instanceof Error ? e.message : String(e)})`);
  }
  if (typeof header !== 'object' || header === null || Array.isArray(header)) {
    throw new WeightsError(`${path}: header is not a JSON object`);
  }
  const dataStart = 8 + n;
  const dataSize = size - dataStart;
  const entries = new Map<string, Entry>();
  let metadata: Record<string, string> = {};
  for (const [name, raw] of Object.entries(header as Record<string, unknown>)) {
    if (name === '__metadata__') {
      metadata = parseMetadata(path, raw);
      continue;
    }
    entries.set(name, parseEntry(path, name, raw, dataSize));
  }
  checkNoOverlap(path, entries);
  return { entries, dataStart, metadata };
}

function parseMetadata(path: string, raw: unknown): Record<string, string> {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw new WeightsError(`${path}: __metadata__ is not an object`);
  for (const [k, v] of Object.entries(raw)) {
    if (typeof v !== 'string') throw new WeightsError(`${path}: __metadata__.${k} is not a string`);
  }
  return raw as Record<string, string>;
}

function parseEntry(path: string, name: string, raw: unknown, dataSize: number): Entry {
  const where = `${path}: tensor ${name}`;
  if (typeof raw !== 'object' || raw === null) throw new WeightsError(`${where}: entry is not an object`);
  const { dtype, shape, data_offsets: offsets } = raw as Record<string, unknown>;
  if (!isDType(dtype)) throw new WeightsError(`${where}: unknown dtype ${JSON.stringify(dtype)}`);
  if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
    throw new WeightsError(`${where}: shape ${JSON.stringify(shape)} is not a list of non-negative integers`);
  }
  if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every((o) => Number.isSafeInteger(o) && o >= 0)) {
    throw new WeightsError(`${where}: data_offsets ${JSON.stringify(offsets)} is not [begin, end]`);
  }
  const [begin, end] = offsets as [number, number];
  if (begin > end || end > dataSize) {
    throw new WeightsError(`${where}: data_offsets [${begin}, ${end}] out of range (data section is ${dataSize} bytes)`);
  }
  const want = (shape as number[]).reduce((a, d) => a * d, 1) * DTYPE_BYTES[dtype];
  if (want !== end - begin) {
    throw new WeightsError(`${where}: shape [${shape.join(', ')}] of ${dtype} needs ${want} bytes, data_offsets give ${end - begin}`);
  }
  return { dtype, shape: Object.freeze([...(shape as number[])]), begin, end };
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
 * for one tensor's bytes at a time, so converting a large file never holds it whole.
 */
export function writeSafetensors(
  path: string,
  infos: ReadonlyArray<readonly [string, TensorInfo]>,
  dataOf: (name: string) => ArrayBufferView,
  metadata?: Readonly<Record<string, string>>,
): void {
  const header: Record<string, unknown> = {};
  if (metadata !== undefined && Object.keys(metadata).length > 0) header.__metadata__ = metadata;
  let offset = 0;
  for (const [name, info] of infos) {
    if (name === '__metadata__') throw new WeightsError(`cannot write a tensor named __metadata__`);
    const bytes = info.shape.reduce((a, d) => a * d, 1) * DTYPE_BYTES[info.dtype];
    header[name] = { dtype: info.dtype, shape: info.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  // Pad with spaces so the data section starts 8-byte aligned, as the reference writer does.
  json += ' '.repeat((8 - (Buffer.byteLength(json) % 8)) % 8);
  const headerBytes = Buffer.from(json, 'utf-8');
  const tmp = `${path}.tmp-${process.pid}`;
  const fd = openSync(tmp, 'w');
  try {
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(headerBytes.byteLength));
    writeSync(fd, len);
    writeSync(fd, headerBytes);
    for (const [name, info] of infos) {
      const data = dataOf(name);
      const want = info.shape.reduce((a, d) => a * d, 1) * DTYPE_BYTES[info.dtype];
      if (data.byteLength !== want) {
        throw new WeightsError(`${name}: ${data.byteLength} bytes given, shape [${info.shape.join(', ')}] of ${info.dtype} needs ${want}`);
      }
      writeSync(fd, new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
    }
    closeSync(fd);
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
