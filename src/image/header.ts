/**
 * What an image file is and how big it decodes, read from its first bytes without decoding anything:
 *   sniffFormat      the format from the magic bytes (PNG, JPEG, WebP, and the names of common others)
 *   readImageHeader  width, height, bands and bytes per sample of a PNG (IHDR), JPEG (SOFn) or WebP
 *                    (VP8 / VP8L / VP8X) file
 * Specs: PNG ISO/IEC 15948 §11.2.2; JPEG ITU T.81 §B.2.2; WebP RFC 9649 §2.5-2.7.
 */

/** The formats an uploaded image may be in; anything else is refused before it reaches a decoder. */
export const ACCEPTED_FORMATS = ['PNG', 'JPEG', 'WebP'] as const;
export type AcceptedFormat = (typeof ACCEPTED_FORMATS)[number];

export interface ImageHeader {
  readonly format: AcceptedFormat;
  readonly width: number;
  readonly height: number;
  /** Bands a decoder may produce (alpha counted when the file can carry it). */
  readonly bands: number;
  /** 2 for 16-bit PNG and 12-bit JPEG, else 1. */
  readonly bytesPerSample: number;
}

/** The header could not be read: the message says what was expected. */
export class HeaderError extends Error {
  override name = 'HeaderError';
}

const startsWith = (b: Uint8Array, sig: readonly number[], at = 0): boolean =>
  b.length >= at + sig.length && sig.every((v, i) => b[at + i] === v);
const ascii = (b: Uint8Array, from: number, to: number): string => String.fromCharCode(...b.subarray(from, to));

const view = (b: Uint8Array): Buffer => Buffer.from(b.buffer, b.byteOffset, b.byteLength);
const u16be = (b: Uint8Array, at: number): number => view(b).readUInt16BE(at);
const u16le = (b: Uint8Array, at: number): number => view(b).readUInt16LE(at);
const u24le = (b: Uint8Array, at: number): number => view(b).readUIntLE(at, 3);
const u32be = (b: Uint8Array, at: number): number => view(b).readUInt32BE(at);

const PNG = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
const JPEG = [0xff, 0xd8, 0xff];

/** Formats we refuse, named in the answer so the client knows what it sent. */
const OTHERS: readonly (readonly [string, (b: Uint8Array) => boolean])[] = [
  ['GIF', (b) => ascii(b, 0, 6) === 'GIF87a' || ascii(b, 0, 6) === 'GIF89a'],
  ['TIFF', (b) => startsWith(b, [0x49, 0x49, 0x2a, 0x00]) || startsWith(b, [0x4d, 0x4d, 0x00, 0x2a])],
  ['BMP', (b) => ascii(b, 0, 2) === 'BM'],
  ['ICO', (b) => startsWith(b, [0x00, 0x00, 0x01, 0x00])],
  ['PDF', (b) => ascii(b, 0, 5) === '%PDF-'],
  ['gzip (an SVGZ?)', (b) => startsWith(b, [0x1f, 0x8b])],
  ['HEIF/AVIF', (b) => ascii(b, 4, 8) === 'ftyp'],
  ['JPEG XL', (b) => startsWith(b, [0xff, 0x0a]) || startsWith(b, [0, 0, 0, 0x0c, 0x4a, 0x58, 0x4c, 0x20])],
  // SVG and other XML: text whose first non-blank character (after a UTF-8 BOM) is '<'.
  ['SVG/XML', (b) => /^(\uFEFF)?\s*</.test(view(b.subarray(0, 256)).toString('utf8'))],
];

/** The format of `bytes`: one we accept, or the name of another ('unknown' when none matches). */
export function sniffFormat(bytes: Uint8Array): { accepted: AcceptedFormat } | { other: string } {
  if (startsWith(bytes, PNG)) return { accepted: 'PNG' };
  if (startsWith(bytes, JPEG)) return { accepted: 'JPEG' };
  if (bytes.length >= 12 && ascii(bytes, 0, 4) === 'RIFF' && ascii(bytes, 8, 12) === 'WEBP') return { accepted: 'WebP' };
  return { other: OTHERS.find(([, is]) => is(bytes))?.[0] ?? 'unknown' };
}

function need(b: Uint8Array, n: number, what: string): void {
  if (b.length < n) throw new HeaderError(`${what}: truncated header (${b.length} bytes)`);
}

/** IHDR is the first chunk: width, height (u32 BE), bit depth, colour type. */
function pngHeader(b: Uint8Array): ImageHeader {
  need(b, 33, 'PNG');
  if (ascii(b, 12, 16) !== 'IHDR') throw new HeaderError('PNG: the first chunk is not IHDR');
  const bitDepth = b[24]!;
  // Grey and RGB gain an alpha band from tRNS; palette images decode to RGB(A).
  const bands = ({ 0: 2, 2: 4, 3: 4, 4: 2, 6: 4 } as Record<number, number>)[b[25]!];
  if (bands === undefined) throw new HeaderError(`PNG: unknown colour type ${b[25]}`);
  return { format: 'PNG', width: u32be(b, 16), height: u32be(b, 20), bands, bytesPerSample: bitDepth > 8 ? 2 : 1 };
}

/** Start-of-frame markers (T.81 Table B.1): C0-CF except DHT (C4), JPG (C8) and DAC (CC). */
const isSof = (m: number): boolean => m >= 0xc0 && m <= 0xcf && m !== 0xc4 && m !== 0xc8 && m !== 0xcc;

/** Walks the marker segments from SOI to the first SOFn: precision, height, width, components. */
function jpegHeader(b: Uint8Array): ImageHeader {
  let at = 2;
  for (;;) {
    while (at < b.length && b[at] !== 0xff) at++; // stray bytes between segments, as libjpeg tolerates
    while (at < b.length && b[at] === 0xff) at++; // fill bytes
    need(b, at + 1, 'JPEG');
    const marker = b[at]!;
    at += 1;
    if (marker === 0xd8 || marker === 0x01 || (marker >= 0xd0 && marker <= 0xd7)) continue; // no length
    if (marker === 0xda || marker === 0xd9) throw new HeaderError('JPEG: no frame header (SOFn) before the scan');
    need(b, at + 2, 'JPEG');
    const length = u16be(b, at);
    if (isSof(marker)) {
      need(b, at + 8, 'JPEG');
      const height = u16be(b, at + 3);
      if (height === 0) throw new HeaderError('JPEG: height 0 (defined later by DNL), not supported');
      return { format: 'JPEG', width: u16be(b, at + 5), height, bands: b[at + 7]!, bytesPerSample: b[at + 2]! > 8 ? 2 : 1 };
    }
    if (length < 2) throw new HeaderError(`JPEG: segment ${marker.toString(16)} has length ${length}`);
    at += length;
  }
}

/** The first chunk after `RIFF size WEBP`: VP8 (lossy), VP8L (lossless) or VP8X (extended, canvas size). */
function webpHeader(b: Uint8Array): ImageHeader {
  need(b, 30, 'WebP');
  const chunk = ascii(b, 12, 16);
  const at = 20;
  let width: number;
  let height: number;
  if (chunk === 'VP8 ') {
    if (!startsWith(b, [0x9d, 0x01, 0x2a], at + 3)) throw new HeaderError('WebP: VP8 frame without its start code');
    width = u16le(b, at + 6) & 0x3fff;
    height = u16le(b, at + 8) & 0x3fff;
  } else if (chunk === 'VP8L') {
    if (b[at] !== 0x2f) throw new HeaderError('WebP: VP8L without its signature byte');
    const bits = view(b).readUInt32LE(at + 1);
    width = (bits & 0x3fff) + 1;
    height = ((bits >>> 14) & 0x3fff) + 1;
  } else if (chunk === 'VP8X') {
    width = u24le(b, at + 4) + 1;
    height = u24le(b, at + 7) + 1;
  } else {
    throw new HeaderError(`WebP: unknown first chunk ${JSON.stringify(chunk)}`);
  }
  return { format: 'WebP', width, height, bands: 4, bytesPerSample: 1 };
}

/** The size of a PNG, JPEG or WebP file from its header; HeaderError when it is another format or broken. */
export function readImageHeader(bytes: Uint8Array): ImageHeader {
  const f = sniffFormat(bytes);
  if (!('accepted' in f)) throw new HeaderError(`not PNG, JPEG or WebP (looks like ${f.other})`);
  const h = f.accepted === 'PNG' ? pngHeader(bytes) : f.accepted === 'JPEG' ? jpegHeader(bytes) : webpHeader(bytes);
  if (h.width === 0 || h.height === 0) throw new HeaderError(`${h.format}: size ${h.width}x${h.height}`);
  return h;
}
