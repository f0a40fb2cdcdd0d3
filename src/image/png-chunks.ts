/**
 * PNG chunks, read and written byte by byte (PNG spec, ISO/IEC 15948 §11.3.4): a chunk is
 * length (u32 BE) | type (4 ASCII) | data | CRC-32 of type+data (ISO 3309, node:zlib's crc32).
 * sharp writes the pixels; this file adds the generation parameters as a `tEXt` chunk right after IHDR (or `iTXt` when the text is not Latin-1, as PIL and
 * so A1111 do), and finds them again. stripPngMetadata rebuilds an uploaded PNG from the chunks a decoder
 * needs, so that libpng never inflates text chunks (a 785 KB file of 8 MiB zTXt chunks cost libvips 4.7 GB).
 */
import { crc32, inflateSync } from 'node:zlib';

const SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

export interface PngChunk {
  readonly type: string;
  readonly data: Buffer;
  /** Byte offset of the chunk's length field in the file. */
  readonly offset: number;
}

/** Each chunk's type and byte range in file order, up to IEND; throws on a bad signature or a truncated chunk. */
function* walkChunks(buf: Buffer): Generator<{ type: string; offset: number; end: number }> {
  if (buf.length < 8 || !buf.subarray(0, 8).equals(SIGNATURE)) throw new Error('not a PNG (bad signature)');
  let at = 8;
  while (at < buf.length) {
    if (at + 12 > buf.length) throw new Error(`truncated chunk header at byte ${at}`);
    const end = at + 12 + buf.readUInt32BE(at);
    if (end > buf.length) throw new Error(`truncated chunk at byte ${at}`);
    const type = buf.toString('latin1', at + 4, at + 8);
    yield { type, offset: at, end };
    at = end;
    if (type === 'IEND') return;
  }
}

/** Every chunk of a PNG in file order; throws on a bad signature, a truncated chunk or a bad CRC. */
export function readChunks(png: Uint8Array): PngChunk[] {
  const buf = Buffer.from(png.buffer, png.byteOffset, png.byteLength);
  const chunks: PngChunk[] = [];
  for (const { type, offset, end } of walkChunks(buf)) {
    if (crc32(buf.subarray(offset + 4, end - 4)) !== buf.readUInt32BE(end - 4)) throw new Error(`${type} chunk at byte ${offset}: bad CRC`);
    chunks.push({ type, data: buf.subarray(offset + 8, end - 4), offset });
  }
  return chunks;
}

/** What stripPngMetadata keeps besides the critical chunks. */
export const PNG_METADATA_CAPS = Object.freeze({
  /** An ICC profile (iCCP) is kept when it inflates to at most this; larger ones are dropped (pixels read as sRGB). */
  iccBytes: 2 ** 20,
  /** EXIF (eXIf, uncompressed; it carries the orientation) is kept up to JPEG's own APP1 limit. */
  exifBytes: 2 ** 16,
});

/**
 * Ancillary chunks that change how the pixels look and are small by definition (PNG spec §11.3): transparency,
 * gamma, chromaticities, sRGB intent, significant bits, background, pixel size, coding-independent code points,
 * HDR mastering metadata. Everything else ancillary (tEXt, zTXt, iTXt, tIME, sPLT, hIST, APNG frames, private
 * chunks) is dropped; iCCP and eXIf are kept under PNG_METADATA_CAPS.
 */
const KEPT_ANCILLARY = new Set(['tRNS', 'gAMA', 'cHRM', 'sRGB', 'sBIT', 'bKGD', 'pHYs', 'cICP', 'mDCV', 'cLLI']);

/** iCCP: profile name NUL, compression method (0), zlib stream; whether that stream inflates to at most `cap` bytes. */
function iccInflatesWithin(data: Buffer, cap: number): boolean {
  const nul = data.indexOf(0);
  if (nul < 0 || nul > 79 || data[nul + 1] !== 0) return false;
  try {
    inflateSync(data.subarray(nul + 2), { maxOutputLength: cap }); // stops (throws) once past the cap
    return true;
  } catch {
    return false;
  }
}

/**
 * The PNG rebuilt from its critical chunks (IHDR, PLTE, IDAT, IEND, and any unknown critical chunk, so the
 * decoder still refuses what it cannot read) and the ancillary chunks in KEPT_ANCILLARY; text chunks are never
 * inflated. Chunks are copied as they are (CRCs included: the decoder checks them); bytes after IEND are dropped.
 */
export function stripPngMetadata(png: Uint8Array, caps = PNG_METADATA_CAPS): Buffer {
  const buf = Buffer.from(png.buffer, png.byteOffset, png.byteLength);
  const kept: Buffer[] = [];
  let run = { from: 0, to: 8 }; // consecutive kept bytes, copied as one piece
  for (const { type, offset, end } of walkChunks(buf)) {
    const critical = (buf[offset + 4]! & 0x20) === 0; // uppercase first letter (§5.4)
    const size = end - offset - 12;
    const keep =
      critical ||
      KEPT_ANCILLARY.has(type) ||
      (type === 'eXIf' && size <= caps.exifBytes) ||
      (type === 'iCCP' && size <= caps.iccBytes && iccInflatesWithin(buf.subarray(offset + 8, end - 4), caps.iccBytes));
    if (!keep) continue;
    if (offset !== run.to) {
      kept.push(buf.subarray(run.from, run.to));
      run = { from: offset, to: end };
    } else {
      run.to = end;
    }
  }
  kept.push(buf.subarray(run.from, run.to));
  return Buffer.concat(kept);
}

/** One PNG chunk: length, type, data, and the CRC-32 of type and data. */
export function pngChunk(type: string, data: Buffer): Buffer {
  const out = Buffer.alloc(12 + data.length);
  out.writeUInt32BE(data.length, 0);
  out.write(type, 4, 'latin1');
  data.copy(out, 8);
  out.writeUInt32BE(crc32(out.subarray(4, 8 + data.length)), 8 + data.length);
  return out;
}

const isLatin1 = (s: string): boolean => [...s].every((ch) => ch.codePointAt(0)! <= 0xff);

/** tEXt: keyword NUL text (Latin-1); iTXt: keyword NUL 0 0 "" NUL "" NUL text (UTF-8, uncompressed). */
function textChunk(keyword: string, text: string): Buffer {
  if (isLatin1(text)) return pngChunk('tEXt', Buffer.concat([Buffer.from(keyword, 'latin1'), Buffer.from([0]), Buffer.from(text, 'latin1')]));
  const head = Buffer.concat([Buffer.from(keyword, 'latin1'), Buffer.from([0, 0, 0, 0, 0])]);
  return pngChunk('iTXt', Buffer.concat([head, Buffer.from(text, 'utf8')]));
}

/** The PNG with a text chunk `keyword` inserted right after IHDR (readers that stop early still see it). */
export function insertTextChunk(png: Buffer, keyword: string, text: string): Buffer {
  const [ihdr] = readChunks(png);
  if (ihdr?.type !== 'IHDR') throw new Error('PNG does not start with IHDR');
  const afterIhdr = ihdr.offset + 12 + ihdr.data.length;
  return Buffer.concat([png.subarray(0, afterIhdr), textChunk(keyword, text), png.subarray(afterIhdr)]);
}

function decodeText(c: PngChunk): { keyword: string; text: string } | null {
  const nul = c.data.indexOf(0);
  if (nul < 0) return null;
  const keyword = c.data.toString('latin1', 0, nul);
  if (c.type === 'tEXt') return { keyword, text: c.data.toString('latin1', nul + 1) };
  // iTXt: compression flag, method, language tag NUL, translated keyword NUL, text. Compressed text is not ours.
  if (c.data[nul + 1] !== 0) return null;
  const lang = c.data.indexOf(0, nul + 3);
  const translated = lang < 0 ? -1 : c.data.indexOf(0, lang + 1);
  if (translated < 0) return null;
  return { keyword, text: c.data.toString('utf8', translated + 1) };
}

/** The text of the first tEXt/iTXt chunk named `keyword`, or null if there is none. */
export function readTextChunk(png: Uint8Array, keyword: string): string | null {
  for (const c of readChunks(png)) {
    if (c.type !== 'tEXt' && c.type !== 'iTXt') continue;
    const t = decodeText(c);
    if (t?.keyword === keyword) return t.text;
  }
  return null;
}
