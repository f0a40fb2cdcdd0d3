/**
 * A minimal zip reader for Python wheels: lists members from the central directory (zip64 too) and extracts
 * chosen members by streaming (stored or deflated), checking each member's CRC-32 and size, so a truncated
 * or corrupt wheel is refused instead of yielding a half-written library. Nothing else of zip is supported.
 */
import { createReadStream, createWriteStream } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { Readable, Transform, Writable, type TransformCallback } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createInflateRaw, crc32 } from 'node:zlib';
import { SetupError } from './errors.js';

export interface ZipEntry {
  readonly name: string;
  readonly method: number; // 0 stored, 8 deflate
  readonly crc: number;
  readonly compressedSize: number;
  readonly size: number;
  readonly localHeaderOffset: number;
}

const EOCD_SIG = 0x06054b50;
const ZIP64_LOCATOR_SIG = 0x07064b50;
const ZIP64_EOCD_SIG = 0x06064b50;
const CENTRAL_SIG = 0x02014b50;
const LOCAL_SIG = 0x04034b50;
const MAX_EOCD_SEARCH = 22 + 0xffff;

async function readAt(fh: FileHandle, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  const { bytesRead } = await fh.read(buf, 0, length, offset);
  return buf.subarray(0, bytesRead);
}

/** Where the central directory lies, from the end-of-central-directory record (and its zip64 variant). */
async function centralDirectory(fh: FileHandle, file: string, size: number): Promise<{ offset: number; length: number; count: number }> {
  const tailStart = Math.max(0, size - MAX_EOCD_SEARCH);
  const tail = await readAt(fh, tailStart, size - tailStart);
  let at = -1;
  for (let i = tail.length - 22; i >= 0; i--) {
    if (tail.readUInt32LE(i) === EOCD_SIG) {
      at = i;
      break;
    }
  }
  if (at < 0) throw new SetupError(`${file} is not a zip/wheel file (no end-of-central-directory record; truncated download?)`);
  let count = tail.readUInt16LE(at + 10);
  let length = tail.readUInt32LE(at + 12);
  let offset = tail.readUInt32LE(at + 16);
  if ((count === 0xffff || length === 0xffffffff || offset === 0xffffffff) && at >= 20 && tail.readUInt32LE(at - 20) === ZIP64_LOCATOR_SIG) {
    const eocd64 = await readAt(fh, Number(tail.readBigUInt64LE(at - 20 + 8)), 56);
    if (eocd64.length < 56 || eocd64.readUInt32LE(0) !== ZIP64_EOCD_SIG) throw new SetupError(`${file}: bad zip64 end record`);
    count = Number(eocd64.readBigUInt64LE(32));
    length = Number(eocd64.readBigUInt64LE(40));
    offset = Number(eocd64.readBigUInt64LE(48));
  }
  if (offset + length > size) throw new SetupError(`${file}: central directory lies past the end of the file (truncated?)`);
  return { offset, length, count };
}

/** Zip64 extended information (extra field 0x0001) replaces the 32-bit fields that are 0xffffffff, in this order. */
function applyZip64(extra: Buffer, sizes: { size: number; compressedSize: number; localHeaderOffset: number }): void {
  for (let p = 0; p + 4 <= extra.length; ) {
    const id = extra.readUInt16LE(p);
    const len = extra.readUInt16LE(p + 2);
    if (id === 0x0001) {
      let q = p + 4;
      for (const key of ['size', 'compressedSize', 'localHeaderOffset'] as const) {
        if (sizes[key] === 0xffffffff && q + 8 <= p + 4 + len) {
          sizes[key] = Number(extra.readBigUInt64LE(q));
          q += 8;
        }
      }
      return;
    }
    p += 4 + len;
  }
}

function parseEntries(cd: Buffer, file: string, count: number): ZipEntry[] {
  const entries: ZipEntry[] = [];
  let p = 0;
  for (let i = 0; i < count; i++) {
    if (p + 46 > cd.length || cd.readUInt32LE(p) !== CENTRAL_SIG) throw new SetupError(`${file}: corrupt central directory at entry ${i}`);
    const nameLen = cd.readUInt16LE(p + 28);
    const extraLen = cd.readUInt16LE(p + 30);
    const commentLen = cd.readUInt16LE(p + 32);
    const sizes = { size: cd.readUInt32LE(p + 24), compressedSize: cd.readUInt32LE(p + 20), localHeaderOffset: cd.readUInt32LE(p + 42) };
    applyZip64(cd.subarray(p + 46 + nameLen, p + 46 + nameLen + extraLen), sizes);
    entries.push({
      name: cd.toString('utf8', p + 46, p + 46 + nameLen),
      method: cd.readUInt16LE(p + 10),
      crc: cd.readUInt32LE(p + 16),
      ...sizes,
    });
    p += 46 + nameLen + extraLen + commentLen;
  }
  return entries;
}

/** Passes bytes through while computing their CRC-32 and count. */
class Checksum extends Transform {
  crc = 0;
  bytes = 0;
  override _transform(chunk: Buffer, _enc: BufferEncoding, done: TransformCallback): void {
    this.crc = crc32(chunk, this.crc);
    this.bytes += chunk.length;
    done(null, chunk);
  }
}

export class ZipFile {
  private constructor(
    readonly path: string,
    readonly size: number,
    private readonly entries: ReadonlyMap<string, ZipEntry>,
  ) {}

  static async open(path: string): Promise<ZipFile> {
    const fh = await open(path, 'r');
    try {
      const { size } = await fh.stat();
      const cd = await centralDirectory(fh, path, size);
      const entries = parseEntries(await readAt(fh, cd.offset, cd.length), path, cd.count);
      return new ZipFile(path, size, new Map(entries.map((e) => [e.name, e])));
    } finally {
      await fh.close();
    }
  }

  names(): string[] {
    return [...this.entries.keys()];
  }

  entry(name: string): ZipEntry | undefined {
    return this.entries.get(name);
  }

  /** Small members (headers) into memory. */
  async read(name: string): Promise<Buffer> {
    const chunks: Buffer[] = [];
    const sink = new Writable({ write: (c: Buffer, _e, done) => (chunks.push(c), done()) });
    await this.pipeTo(name, sink);
    return Buffer.concat(chunks);
  }

  /** Stream one member to a file; throws SetupError when its CRC or size disagree with the directory. */
  async extract(name: string, dest: string): Promise<void> {
    await this.pipeTo(name, createWriteStream(dest));
  }

  private async pipeTo(name: string, sink: NodeJS.WritableStream): Promise<void> {
    const e = this.entries.get(name);
    if (e === undefined) throw new SetupError(`${this.path} has no member ${name}`);
    if (e.method !== 0 && e.method !== 8) throw new SetupError(`${this.path}: ${name} uses zip method ${e.method}; only stored and deflate are supported`);
    const start = await this.dataOffset(e);
    if (start + e.compressedSize > this.size) throw new SetupError(`${this.path}: ${name} runs past the end of the file (truncated download?)`);
    const check = new Checksum();
    const raw = () => createReadStream(this.path, { start, end: start + e.compressedSize - 1, highWaterMark: 1 << 20 });
    try {
      if (e.compressedSize === 0) await pipeline(Readable.from([]), check, sink);
      else if (e.method === 8) await pipeline(raw(), createInflateRaw(), check, sink);
      else await pipeline(raw(), check, sink);
    } catch (err) {
      throw new SetupError(`${this.path}: cannot extract ${name}: ${err instanceof Error ? err.message : String(err)}`);
    }
    if (check.bytes !== e.size || (check.crc >>> 0) !== e.crc) {
      throw new SetupError(`${this.path}: ${name} is corrupt (CRC/size mismatch); delete the file and run again`);
    }
  }

  private async dataOffset(e: ZipEntry): Promise<number> {
    const fh = await open(this.path, 'r');
    try {
      const h = await readAt(fh, e.localHeaderOffset, 30);
      if (h.length < 30 || h.readUInt32LE(0) !== LOCAL_SIG) throw new SetupError(`${this.path}: bad local header for ${e.name}`);
      return e.localHeaderOffset + 30 + h.readUInt16LE(26) + h.readUInt16LE(28);
    } finally {
      await fh.close();
    }
  }
}
