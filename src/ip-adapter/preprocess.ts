/**
 * CLIPImageProcessor (transformers, PIL backend) as the IP-Adapter code calls it: a photo -> the CLIP vision
 * encoder's pixel values.
 *
 *   RGB uint8 HWC -> shorter side to `size` (new_long = int(size * long / short)), Pillow BICUBIC (resize.ts)
 *   -> center crop size x size at top = (h - size) // 2, left = (w - size) // 2
 *   -> x * (1/255) -> (x - mean) / std per channel (CLIP's mean/std)          NHWC [1, size, size, 3] float32
 * Decoding (sharp) keeps the file's pixels as Pillow's convert('RGB') does: no EXIF rotation, alpha dropped.
 */
import sharp from 'sharp';
import * as tf from '../backend/tf.js';
import { ImageError } from '../image/codec.js';
import { resizeBicubicPillow } from './resize.js';

/** OpenAI CLIP's normalization (transformers OPENAI_CLIP_MEAN / OPENAI_CLIP_STD). */
export const CLIP_MEAN = Object.freeze([0.48145466, 0.4578275, 0.40821073]);
export const CLIP_STD = Object.freeze([0.26862954, 0.26130258, 0.27577711]);

export interface Photo {
  readonly rgb: Uint8Array; // row-major HWC
  readonly width: number;
  readonly height: number;
}

/** A PNG, JPEG or WebP at its own size, as RGB bytes. `maxPixels` bounds width x height before decoding. */
export async function decodePhoto(bytes: Uint8Array, { name = 'ip image', maxPixels }: { name?: string; maxPixels?: number } = {}): Promise<Photo> {
  try {
    const { data, info } = await sharp(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength), { failOn: 'error', limitInputPixels: maxPixels ?? true })
      .toColourspace('srgb')
      .removeAlpha()
      .raw()
      .toBuffer({ resolveWithObject: true });
    if (info.channels !== 3) throw new Error(`decoded to ${info.channels} channels, not RGB`);
    return { rgb: new Uint8Array(data.buffer, data.byteOffset, data.length), width: info.width, height: info.height };
  } catch (e) {
    throw new ImageError(`${name}: cannot decode as PNG, JPEG or WebP (${e instanceof Error ? e.message : String(e)}): pass an image file`);
  }
}

/** [height, width] after the shorter side goes to `size` (transformers get_resize_output_image_size). */
export function shortestSideSize(height: number, width: number, size: number): [number, number] {
  const short = Math.min(height, width);
  const long = Math.max(height, width);
  const newLong = Math.trunc((size * long) / short);
  return height <= width ? [size, newLong] : [newLong, size];
}

export interface Preprocessed {
  /** The whole resized image (before the crop), HWC uint8. */
  readonly resized: Photo;
  /** Normalized pixel values NHWC [1, size, size, 3]. */
  readonly pixels: tf.Tensor4D;
}

/** The photo -> the encoder's pixel values (and the resized image, which the fixtures check on its own). */
export function preprocessClipImage(photo: Photo, size: number): Preprocessed {
  const { rgb, width, height } = photo;
  if (rgb.length !== width * height * 3) throw new ImageError(`preprocess: ${rgb.length} bytes is not ${width}x${height} RGB`);
  const [rh, rw] = shortestSideSize(height, width, size);
  const resized = resizeBicubicPillow(rgb, height, width, 3, rh, rw);
  const top = Math.floor((rh - size) / 2);
  const left = Math.floor((rw - size) / 2);
  const out = new Float32Array(size * size * 3);
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      for (let c = 0; c < 3; c++) {
        const v = Math.fround(resized[((top + y) * rw + left + x) * 3 + c] * (1 / 255));
        out[(y * size + x) * 3 + c] = (v - CLIP_MEAN[c]) / CLIP_STD[c];
      }
    }
  }
  return { resized: { rgb: resized, width: rw, height: rh }, pixels: tf.tensor4d(out, [1, size, size, 3]) };
}
