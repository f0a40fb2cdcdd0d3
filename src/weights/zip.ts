/**
 * A read-only zip archive reader, shared by the PyTorch checkpoint reader (ckpt.ts) and `sd setup-native`
 * (src/setup/source.ts, reading a TensorFlow wheel): the End Of Central Directory record (zip64 too, since real
 * checkpoints and libtensorflow are 4+ GB or near it), the central directory, then entries read by offset with
 * fs.readSync, so the archive never becomes one Buffer. Every offset and size is checked against the file size
 * before it is used, and every whole entry read is checked against its CRC-32 and size.
 *
 *   read(name, offset?, length?)  bytes of a stored (method 0) entry by offset: what torch.save writes, and what
 *                                 tensor reads need
 *   readEntry(name)               a whole stored or deflated (method 8) entry in memory, its size capped
 *   extract(name, dest)           a whole stored or deflated entry streamed to a file, memory bounded
 *
 * Layout (APPNOTE.TXT 4.3): [local header + data]* central directory [zip64 EOCD record, zip64 locator] EOCD.
 */
import { closeSync, createReadStream, createWriteStream, fstatSync } from 'node:fs';
import { Readable, Transform, type TransformCallback } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { crc32, createInflateRaw, inflateRawSync } from 'node:zlib';
import { MAX_TENSOR_BYTES, openOwned, readFully } from './files.js';
import { WeightsError, WeightsLimitError, count } from './types.js';

const SIG_LOCAL = 0x04034b50;
const SIG_CENTRAL = 0x02014b50;
const SIG_EOCD = 0x06054b50;
const SIG_ZIP64_EOCD = 0x06064b50;
const SIG_ZIP64_LOCATOR = 0x07064b50;
const EOCD_BYTES = 22;
const ZIP64_LOCATOR_BYTES = 20;
const ZIP64_EOCD_BYTES = 56;
const CENTRAL_BYTES = 46;
const LOCAL_BYTES = 30;
const MAX_COMMENT = 0xffff;
/** Field values meaning "the real value is in the zip64 record / extra field". */
const U16_MAX = 0xffff;
const U32_MAX = 0xffffffff;
const METHOD_STORED = 0;
const METHOD_DEFLATE = 8;
/** readEntry's default cap on an entry's size: larger ones are streamed with extract() instead. */
const MAX_ENTRY_BYTES = 256 * 1024 * 1024;
/** How much of an entry checkCrc reads at a time. */
const CRC_CHUNK = 16 * 1024 * 1024;
/**
 * The largest central directory read: 64 MiB, ~600,000 entries. An SD checkpoint's lists ~1,200 entries in
 * ~120 KB, a TensorFlow wheel's ~20,000 in a few MB.
 */
const MAX_DIRECTORY_BYTES = 64 * 1024 * 1024;

export interface ZipEntry {
  readonly name: string;
  /** 0 = stored, 8 = deflate; read() takes only stored entries, readEntry() and extract() both. */
  readonly method: number;
  /** Uncompressed size. */
  readonly size: number;
  readonly compressedSize: number;
  readonly crc32: number;
  /** Where the entry's bytes start in the file (after its local header). */
  readonly dataOffset: number;
}

export class ZipArchive {
  private fd: number | null;

  private constructor(
    readonly path: string,
    fd: number,
    readonly entries: ReadonlyMap<string, ZipEntry>,
  ) {
    this.fd = fd;
  }

  static open(path: string): ZipArchive {
    return openOwned(path, (fd) => new ZipArchive(path, fd, readDirectory(new Reader(path, fd))));
  }

  names(): string[] {
    return [...this.entries.keys()];
  }

  entry(name: string): ZipEntry {
    const e = this.entries.get(name);
    if (e === undefined) throw new WeightsError(`${this.path}: zip archive has no entry ${name}`);
    return e;
  }

  /**
   * `length` bytes of a stored entry from `offset` within it. When the whole entry is read its CRC-32 is
   * checked, so a corrupted archive is refused instead of yielding wrong numbers.
   */
  read(name: string, offset = 0, length?: number): Uint8Array {
    const e = this.stored(name);
    const n = length ?? e.size - offset;
    if (offset < 0 || n < 0 || offset + n > e.size) {
      throw new WeightsError(`${this.path}: bytes [${offset}, ${offset + n}) are outside zip entry ${name} (${e.size} bytes)`);
    }
    if (n > MAX_TENSOR_BYTES) {
      throw new WeightsLimitError(
        `${this.path}: zip entry ${name}: ${count(n)} bytes are more than the ${count(MAX_TENSOR_BYTES)} read into memory at once`,
        'tensorBytes',
        MAX_TENSOR_BYTES,
      );
    }
    const out = new Uint8Array(n);
    this.reader().readInto(out, e.dataOffset + offset);
    if (offset === 0 && n === e.size) this.verify(e, crc32(out), n);
    return out;
  }

  /** Checks a whole stored entry against its CRC-32, reading it in chunks: an entry of any size, in bounded memory. */
  checkCrc(name: string): void {
    const e = this.stored(name);
    const chunk = new Uint8Array(Math.min(e.size, CRC_CHUNK));
    let crc = 0;
    for (let done = 0; done < e.size; done += chunk.byteLength) {
      const part = chunk.subarray(0, Math.min(chunk.byteLength, e.size - done));
      this.reader().readInto(part, e.dataOffset + done);
      crc = crc32(part, crc);
    }
    this.verify(e, crc, e.size);
  }

  /** A whole stored or deflated entry, CRC- and size-checked; refused past `maxBytes` (a zip bomb cannot get past it). */
  readEntry(name: string, maxBytes = MAX_ENTRY_BYTES): Uint8Array {
    const e = this.decodable(name);
    if (e.method === METHOD_STORED) return this.read(name);
    if (e.size > maxBytes) {
      throw new WeightsError(`${this.path}: zip entry ${name} is ${e.size} bytes, more than the ${maxBytes} read into memory: extract it to a file instead`);
    }
    const packed = new Uint8Array(e.compressedSize);
    this.reader().readInto(packed, e.dataOffset);
    let out: Uint8Array;
    try {
      out = inflateRawSync(packed, { maxOutputLength: e.size + 1 }); // one byte past the size: a lie shows as a mismatch
    } catch (err) {
      throw this.corrupt(e, `cannot be inflated: ${err instanceof Error ? err.message : String(err)}`);
    }
    this.verify(e, crc32(out), out.byteLength);
    return out;
  }

  /** Streams a whole stored or deflated entry to `dest`, checking CRC-32 and size; never holds more than a chunk. */
  async extract(name: string, dest: string): Promise<void> {
    const e = this.decodable(name);
    const check = new Checksum(() => this.corrupt(e, `gives more than its ${e.size} bytes`), e.size);
    const chunks = (): Readable =>
      e.compressedSize === 0
        ? Readable.from([])
        : createReadStream(this.path, { start: e.dataOffset, end: e.dataOffset + e.compressedSize - 1, highWaterMark: 1 << 20 });
    try {
      if (e.method === METHOD_DEFLATE) await pipeline(chunks(), createInflateRaw(), check, createWriteStream(dest));
      else await pipeline(chunks(), check, createWriteStream(dest));
    } catch (err) {
      if (err instanceof WeightsError) throw err;
      throw new WeightsError(`${this.path}: cannot extract zip entry ${name} to ${dest}: ${err instanceof Error ? err.message : String(err)}`);
    }
    this.verify(e, check.crc, check.bytes);
  }

  close(): void {
    if (this.fd !== null) closeSync(this.fd);
    this.fd = null;
  }

  private reader(): Reader {
    if (this.fd === null) throw new WeightsError(`${this.path}: read after close`);
    return new Reader(this.path, this.fd);
  }

  /** The entry, when it is stored (method 0): what read() and checkCrc() take. */
  private stored(name: string): ZipEntry {
    const e = this.entry(name);
    if (e.method !== METHOD_STORED) {
      throw new WeightsError(
        `${this.path}: zip entry ${name} is compressed (method ${e.method}); only stored entries are supported, as torch.save writes them: re-save the checkpoint with torch.save or convert it to safetensors`,
      );
    }
    return e;
  }

  /** The entry, when its method is one readEntry and extract can decode. */
  private decodable(name: string): ZipEntry {
    const e = this.entry(name);
    if (e.method !== METHOD_STORED && e.method !== METHOD_DEFLATE) {
      throw new WeightsError(`${this.path}: zip entry ${name} uses compression method ${e.method}; only stored (0) and deflate (8) are supported`);
    }
    return e;
  }

  private verify(e: ZipEntry, crc: number, bytes: number): void {
    if (bytes !== e.size || crc >>> 0 !== e.crc32) throw this.corrupt(e, `gives ${bytes} bytes with CRC-32 ${hex(crc)}, the directory says ${e.size} with ${hex(e.crc32)}`);
  }

  private corrupt(e: ZipEntry, detail: string): WeightsError {
    return new WeightsError(`${this.path}: zip entry ${e.name} is corrupt (CRC/size mismatch): it ${detail}; the file is damaged, download or copy it again`);
  }
}

const hex = (x: number): string => `0x${(x >>> 0).toString(16).padStart(8, '0')}`;

/** Passes bytes through while computing their CRC-32 and count; fails as soon as they exceed `limit`. */
class Checksum extends Transform {
  crc = 0;
  bytes = 0;

  constructor(
    private readonly tooLong: () => WeightsError,
    private readonly limit: number,
  ) {
    super();
  }

  override _transform(chunk: Buffer, _encoding: BufferEncoding, done: TransformCallback): void {
    this.bytes += chunk.byteLength;
    if (this.bytes > this.limit) return done(this.tooLong());
    this.crc = crc32(chunk, this.crc);
    done(null, chunk);
  }
}

/** Bounded reads from an open file; every request past the end says the archive is truncated. */
class Reader {
  readonly size: number;

  constructor(
    readonly path: string,
    private readonly fd: number,
  ) {
    this.size = fstatSync(fd).size;
  }

  readInto(into: Uint8Array, position: number): void {
    const ended = (): never => this.truncated(`${into.byteLength} bytes at offset ${position}`);
    if (position < 0 || position + into.byteLength > this.size) ended();
    readFully(this.fd, into, position, ended);
  }

  view(position: number, length: number): DataView {
    const buf = new Uint8Array(length);
    this.readInto(buf, position);
    return new DataView(buf.buffer);
  }

  truncated(what: string): never {
    throw new WeightsError(`${this.path}: zip archive is truncated or corrupted (needs ${what}, file is ${this.size} bytes)`);
  }
}

interface Directory {
  readonly offset: number;
  readonly size: number;
  readonly count: number;
}

function readDirectory(r: Reader): Map<string, ZipEntry> {
  const dir = findCentralDirectory(r);
  if (dir.offset + dir.size > r.size) r.truncated(`a ${dir.size}-byte central directory at offset ${dir.offset}`);
  if (dir.size > MAX_DIRECTORY_BYTES) {
    throw new WeightsLimitError(
      `${r.path}: zip central directory of ${count(dir.size)} bytes is more than the ${count(MAX_DIRECTORY_BYTES)} read (a checkpoint's is ~120 KB)`,
      'zip.directoryBytes',
      MAX_DIRECTORY_BYTES,
    );
  }
  const cd = r.view(dir.offset, dir.size);
  const entries = new Map<string, ZipEntry>();
  let pos = 0;
  for (let i = 0; i < dir.count; i++) {
    const { entry, next } = readCentralEntry(r, cd, pos);
    if (entries.has(entry.name)) throw new WeightsError(`${r.path}: zip archive lists entry ${entry.name} twice`);
    entries.set(entry.name, entry);
    pos = next;
  }
  return entries;
}

/** The EOCD record sits in the last 22 + 65535 bytes (it ends with a comment of up to 64 KiB). */
function findCentralDirectory(r: Reader): Directory {
  const tailLength = Math.min(r.size, EOCD_BYTES + MAX_COMMENT);
  const tailStart = r.size - tailLength;
  const tail = r.view(tailStart, tailLength);
  for (let i = tailLength - EOCD_BYTES; i >= 0; i--) {
    if (tail.getUint32(i, true) !== SIG_EOCD) continue;
    const commentLength = tail.getUint16(i + 20, true);
    if (i + EOCD_BYTES + commentLength > tailLength) continue; // a signature inside data, not the record
    const eocd: Directory = {
      count: tail.getUint16(i + 10, true),
      size: tail.getUint32(i + 12, true),
      offset: tail.getUint32(i + 16, true),
    };
    if (tail.getUint16(i + 4, true) !== 0 && tail.getUint16(i + 4, true) !== U16_MAX) {
      throw new WeightsError(`${r.path}: multi-disk (split) zip archives are not supported: join the parts into one file`);
    }
    return readZip64Directory(r, tailStart + i) ?? eocd;
  }
  if (r.size >= 4 && r.view(0, 4).getUint32(0, true) === SIG_LOCAL) {
    throw new WeightsError(`${r.path}: zip archive is truncated (no end of central directory record): the download or copy was cut short`);
  }
  throw new WeightsError(`${r.path}: not a zip archive (no end of central directory record)`);
}

/** The zip64 locator, when present, sits right before the EOCD and points at the zip64 EOCD record. */
function readZip64Directory(r: Reader, eocdAt: number): Directory | null {
  if (eocdAt < ZIP64_LOCATOR_BYTES) return null;
  const loc = r.view(eocdAt - ZIP64_LOCATOR_BYTES, ZIP64_LOCATOR_BYTES);
  if (loc.getUint32(0, true) !== SIG_ZIP64_LOCATOR) return null;
  const recordAt = u64(r, loc, 8, 'zip64 end of central directory offset');
  if (recordAt + ZIP64_EOCD_BYTES > eocdAt) r.truncated(`a zip64 end of central directory record at offset ${recordAt}`);
  const rec = r.view(recordAt, ZIP64_EOCD_BYTES);
  if (rec.getUint32(0, true) !== SIG_ZIP64_EOCD) {
    throw new WeightsError(`${r.path}: zip64 end of central directory record missing at offset ${recordAt}: the archive is corrupted`);
  }
  return {
    count: u64(r, rec, 32, 'zip64 entry count'),
    size: u64(r, rec, 40, 'zip64 central directory size'),
    offset: u64(r, rec, 48, 'zip64 central directory offset'),
  };
}

function u64(r: Reader, v: DataView, at: number, what: string): number {
  const x = v.getBigUint64(at, true);
  if (x > BigInt(r.size)) r.truncated(`${what} ${x}`);
  return Number(x);
}

function readCentralEntry(r: Reader, cd: DataView, pos: number): { entry: ZipEntry; next: number } {
  if (pos + CENTRAL_BYTES > cd.byteLength || cd.getUint32(pos, true) !== SIG_CENTRAL) {
    throw new WeightsError(`${r.path}: zip central directory is corrupted (no entry header at byte ${pos} of it)`);
  }
  const flags = cd.getUint16(pos + 8, true);
  const nameLength = cd.getUint16(pos + 28, true);
  const extraLength = cd.getUint16(pos + 30, true);
  const commentLength = cd.getUint16(pos + 32, true);
  const next = pos + CENTRAL_BYTES + nameLength + extraLength + commentLength;
  if (next > cd.byteLength) throw new WeightsError(`${r.path}: zip central directory is corrupted (entry at byte ${pos} runs past its end)`);
  const nameBytes = new Uint8Array(cd.buffer, pos + CENTRAL_BYTES, nameLength);
  const name = decodeName(r, nameBytes);
  if (flags & 1) throw new WeightsError(`${r.path}: zip entry ${name} is encrypted: not supported`);
  const wide = {
    compressed: cd.getUint32(pos + 20, true),
    size: cd.getUint32(pos + 24, true),
    localOffset: cd.getUint32(pos + 42, true),
  };
  const extra = new DataView(cd.buffer, pos + CENTRAL_BYTES + nameLength, extraLength);
  const { compressed, size, localOffset } = applyZip64Extra(r, name, extra, wide);
  const method = cd.getUint16(pos + 10, true);
  if (method === METHOD_STORED && compressed !== size) {
    throw new WeightsError(`${r.path}: stored zip entry ${name} has compressed size ${compressed} != size ${size}: the archive is corrupted`);
  }
  const dataOffset = localDataOffset(r, name, nameBytes, localOffset);
  if (dataOffset + compressed > r.size) r.truncated(`${compressed} bytes of entry ${name} at offset ${dataOffset}`);
  return { entry: { name, method, size, compressedSize: compressed, crc32: cd.getUint32(pos + 16, true), dataOffset }, next };
}

function decodeName(r: Reader, bytes: Uint8Array): string {
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  } catch {
    throw new WeightsError(`${r.path}: zip entry name is not UTF-8: the archive is corrupted`);
  }
}

/** Zip64 extended information (header id 1): the 8-byte values of the fields whose 4-byte value is 0xFFFFFFFF, in order. */
function applyZip64Extra(
  r: Reader,
  name: string,
  extra: DataView,
  v: { compressed: number; size: number; localOffset: number },
): { compressed: number; size: number; localOffset: number } {
  const needs = v.size === U32_MAX || v.compressed === U32_MAX || v.localOffset === U32_MAX;
  for (let p = 0; p + 4 <= extra.byteLength; ) {
    const id = extra.getUint16(p, true);
    const length = extra.getUint16(p + 2, true);
    if (p + 4 + length > extra.byteLength) break;
    if (id === 1) {
      const field = new DataView(extra.buffer, extra.byteOffset + p + 4, length);
      let at = 0;
      const take = (old: number, what: string): number => {
        if (old !== U32_MAX) return old;
        if (at + 8 > length) throw new WeightsError(`${r.path}: zip64 extra field of entry ${name} lacks its ${what}`);
        const x = u64(r, field, at, `${what} of entry ${name}`);
        at += 8;
        return x;
      };
      const size = take(v.size, 'size');
      const compressed = take(v.compressed, 'compressed size');
      return { size, compressed, localOffset: take(v.localOffset, 'local header offset') };
    }
    p += 4 + length;
  }
  if (needs) throw new WeightsError(`${r.path}: zip entry ${name} needs a zip64 extra field and has none: the archive is corrupted`);
  return v;
}

/** The local header repeats the name and has its own extra field (torch pads it so data is 64-byte aligned). */
function localDataOffset(r: Reader, name: string, nameBytes: Uint8Array, localOffset: number): number {
  const h = r.view(localOffset, LOCAL_BYTES);
  if (h.getUint32(0, true) !== SIG_LOCAL) {
    throw new WeightsError(`${r.path}: no local header for zip entry ${name} at offset ${localOffset}: the archive is corrupted`);
  }
  const nameLength = h.getUint16(26, true);
  const extraLength = h.getUint16(28, true);
  const localName = new Uint8Array(nameLength);
  r.readInto(localName, localOffset + LOCAL_BYTES);
  if (nameLength !== nameBytes.byteLength || !localName.every((b, i) => b === nameBytes[i])) {
    throw new WeightsError(`${r.path}: local header at offset ${localOffset} does not name entry ${name}: the archive is corrupted`);
  }
  return localOffset + LOCAL_BYTES + nameLength + extraLength;
}
