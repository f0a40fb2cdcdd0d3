/**
 * Images uploaded to the server: `init_image` now, and every image field to come (masks, control images,
 * IP-Adapter photos) through the same decodeUploadedImage. What decoding an upload may cost is bounded
 * before a decoder sees it:
 *   1. the format, from the magic bytes: PNG, JPEG or WebP; SVG, GIF, TIFF and the rest are refused;
 *   2. the size, from the header: at most `maxPixels`, and its decoded size counted against the request's
 *      DecodeBudget (the sum over all the images of one request);
 *   3. a PNG is rebuilt without its text chunks, which are never inflated (stripPngMetadata);
 *   4. a trial decode by sharp under limitInputPixels, so a broken file is a 400 now, not a failed job later.
 */
import { ImageError, decodeImage } from './codec.js';
import { ACCEPTED_FORMATS, HeaderError, readImageHeader, sniffFormat, type AcceptedFormat } from './header.js';
import { stripPngMetadata } from './png-chunks.js';

export interface UploadLimits {
  /** Largest width x height of one uploaded image, read from its header. */
  readonly maxPixels: number;
  /** Largest decoded size in bytes (width * height * bands * bytes per sample) of all images of one request. */
  readonly maxDecodeBytes: number;
}

/** 50 MP takes a 48 MP phone photo; 512 MiB is two such photos as 8-bit RGBA, one as 16-bit. */
export const DEFAULT_UPLOAD_LIMITS: UploadLimits = Object.freeze({ maxPixels: 50_000_000, maxDecodeBytes: 512 * 2 ** 20 });

const ACCEPTED = `accepted formats are ${ACCEPTED_FORMATS.slice(0, -1).join(', ')} and ${ACCEPTED_FORMATS.at(-1)}`;
const MIB = 2 ** 20;

/** The decoded bytes one request's images may take together; each image takes its share before it is decoded. */
export class DecodeBudget {
  private used = 0;
  constructor(readonly limit: number) {}

  take(bytes: number, field: string): void {
    if (this.used + bytes > this.limit) {
      const prior = this.used > 0 ? ` (with ${(this.used / MIB).toFixed(1)} MiB for the request's other images)` : '';
      throw new ImageError(
        `${field}: decodes to ${(bytes / MIB).toFixed(1)} MiB${prior}, over this server's limit of ${(this.limit / MIB).toFixed(0)} MiB ` +
          'of decoded images per request (--max-decode-mib): send smaller images',
        field,
      );
    }
    this.used += bytes;
  }
}

export interface UploadedImage {
  readonly format: AcceptedFormat;
  readonly width: number;
  readonly height: number;
  /** What the header says it decodes to, counted against the budget. */
  readonly decodedBytes: number;
  /** The bytes to decode from now on: the upload, a PNG without its metadata chunks. */
  readonly bytes: Uint8Array;
}

/**
 * Checks an uploaded image (see the header of this file) and returns the bytes to decode it from.
 * Every refusal is an ImageError naming `field`, which the server answers with 400.
 */
export async function decodeUploadedImage(
  bytes: Uint8Array,
  field: string,
  limits: UploadLimits,
  budget = new DecodeBudget(limits.maxDecodeBytes),
): Promise<UploadedImage> {
  const sniffed = sniffFormat(bytes);
  if ('other' in sniffed) {
    const what = sniffed.other === 'unknown' ? 'not an image file this server knows' : `a ${sniffed.other} file`;
    throw new ImageError(`${field}: ${what}; ${ACCEPTED}`, field);
  }
  let header;
  try {
    header = readImageHeader(bytes);
  } catch (e) {
    if (!(e instanceof HeaderError)) throw e;
    throw new ImageError(`${field}: ${e.message}`, field);
  }
  const { format, width, height } = header;
  if (width * height > limits.maxPixels) {
    throw new ImageError(
      `${field}: ${width}x${height} is ${width * height} pixels, over this server's limit of ${limits.maxPixels} per image (--max-image-pixels)`,
      field,
    );
  }
  const decodedBytes = width * height * header.bands * header.bytesPerSample;
  budget.take(decodedBytes, field);
  let clean: Uint8Array = bytes;
  try {
    if (format === 'PNG') clean = stripPngMetadata(bytes);
    await decodeImage(clean, 8, 8, field, { maxPixels: limits.maxPixels });
  } catch (e) {
    const why = e instanceof ImageError ? e.message.replace(`${field}: `, '') : `not a readable PNG (${e instanceof Error ? e.message : String(e)})`;
    throw new ImageError(`${field}: ${why}`, field);
  }
  return { format, width, height, decodedBytes, bytes: clean };
}
