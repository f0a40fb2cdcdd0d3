/**
 * Images in and out, through sharp (libvips):
 *   encodePng   RGB uint8 [H, W, 3] row-major -> PNG bytes with the A1111 `parameters` chunk after IHDR
 *   decodeImage PNG/JPEG/WebP bytes -> RGB uint8 [H, W, 3] stretched to width x height (the web UI's
 *               "just resize") after EXIF orientation; transparent pixels are composited onto white.
 *               A PNG's text chunks are dropped before libvips sees them (stripPngMetadata), and
 *               `maxPixels` is sharp's limitInputPixels. Uploads to the server go through ./upload.ts first.
 * The same pixels and text always give the same bytes: sharp writes no timestamps and the chunk is ours.
 */
import sharp from 'sharp';
import { insertTextChunk, readTextChunk, stripPngMetadata } from './png-chunks.js';
import { formatParameters, type ImageParameters } from './parameters.js';

/** An input image that cannot be used, or an output that cannot be written: the message says which and why. */
export class ImageError extends Error {
  override name = 'ImageError';
  /** The request field the image came in, when it came in one (the server answers 400 naming it). */
  constructor(
    message: string,
    readonly field?: string,
  ) {
    super(message);
  }
}

const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

export interface DecodeOptions {
  /** Largest width x height the decoder accepts (sharp's limitInputPixels); default sharp's, 16383^2. */
  readonly maxPixels?: number;
}

export interface RgbImage {
  /** Row-major RGB, width*height*3 bytes. */
  readonly rgb: Uint8Array;
  readonly width: number;
  readonly height: number;
}

/** The keyword A1111 stores its generation parameters under. */
export const PARAMETERS_KEYWORD = 'parameters';

export async function encodePng(image: RgbImage, params?: ImageParameters): Promise<Buffer> {
  const { rgb, width, height } = image;
  if (rgb.length !== width * height * 3) {
    throw new ImageError(`encodePng: ${rgb.length} bytes is not ${width}x${height} RGB (${width * height * 3} bytes)`);
  }
  const png = await sharp(rgb, { raw: { width, height, channels: 3 } })
    .png({ compressionLevel: 9, adaptiveFiltering: true })
    .toBuffer();
  return params === undefined ? png : insertTextChunk(png, PARAMETERS_KEYWORD, formatParameters(params));
}

/** The A1111 `parameters` text of a PNG, or null when it has none. Throws ImageError for a broken PNG. */
export function readPngParameters(png: Uint8Array): string | null {
  try {
    return readTextChunk(png, PARAMETERS_KEYWORD);
  } catch (e) {
    throw new ImageError(`not a readable PNG: ${e instanceof Error ? e.message : String(e)}`);
  }
}

export async function decodeImage(bytes: Uint8Array, width: number, height: number, name = 'image', o: DecodeOptions = {}): Promise<RgbImage> {
  try {
    const input = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const clean = input.subarray(0, 8).equals(PNG_SIGNATURE) ? stripPngMetadata(input) : input;
    const rgb = await sharp(clean, { failOn: 'error', limitInputPixels: o.maxPixels ?? true })
      .rotate() // EXIF orientation, as a photo viewer shows it
      .flatten({ background: '#ffffff' })
      .toColourspace('srgb')
      .resize(width, height, { fit: 'fill' })
      .removeAlpha()
      .raw()
      .toBuffer();
    if (rgb.length !== width * height * 3) throw new Error(`decoded to ${rgb.length} bytes, not ${width}x${height} RGB`);
    return { rgb: new Uint8Array(rgb.buffer, rgb.byteOffset, rgb.length), width, height };
  } catch (e) {
    const why = e instanceof Error ? e.message : String(e);
    throw new ImageError(`${name}: cannot decode as PNG, JPEG or WebP (${why}): pass an image file`);
  }
}
