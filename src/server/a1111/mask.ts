/**
 * img2img's inpainting fields as A1111 reads them (modules/processing.py StableDiffusionProcessingImg2Img.init):
 *
 *   mask                    base64; white = repaint. An RGBA mask whose alpha is not all opaque is read by its alpha
 *                           (create_binary_mask), any other by its luma; then binarised at > 128 (mask_round)
 *   inpainting_mask_invert  1: repaint the black part instead
 *   mask_blur               sets mask_blur_x and mask_blur_y (default 4): a Gaussian blur of the binary mask, along x
 *                           then y, kernel 2*int(2.5*blur + 0.5) + 1 and sigma = blur, as cv2.GaussianBlur (edges
 *                           reflected, BORDER_REFLECT_101); the engine binarises the result again at 0.5, as A1111's
 *                           latent mask is rounded, so the blur rounds corners and drops strokes thinner than it
 *   inpainting_fill         0 fill, 1 original, 2 latent noise, 3 latent nothing: all run as 1 (the masked area starts
 *                           from the original image, noised to denoising_strength); info.warnings says so for 0, 2, 3
 *   inpaint_full_res        "Only masked" (crop to the mask, upscale, paste back) is not done: true answers 422;
 *                           absent or false is the whole picture (NB: A1111's API default is true)
 *   mask_round false, latent_mask: 422 (a soft latent mask, a second mask)
 * A1111 pastes the original back over the unmasked area of its output; this server does not (the reference
 * pipelines it matches do not), so unmasked pixels come out of the VAE.
 */
import sharp from 'sharp';
import { bool, checkNumber, invalid, num, type Body } from './fields.js';

export interface A1111Mask {
  /** base64 as sent. */
  readonly mask: string;
  readonly invert: boolean;
  readonly blurX: number;
  readonly blurY: number;
  readonly fill: number;
}

/** A1111's `inpainting_fill` names. */
const FILLS = ['fill', 'original', 'latent noise', 'latent nothing'];
/** The largest blur (A1111's UI slider goes to 64) and blur work (pixels x kernel taps) one mask may ask for. */
const MAX_BLUR = 64;
const MAX_BLUR_TAPS = 400_000_000;

/** The inpainting fields of an img2img body; null when it has no mask. */
export function parseMask(b: Body): A1111Mask | null {
  const m = b.mask;
  if (m === undefined || m === null || m === '') return null;
  if (typeof m !== 'string') throw invalid('mask', 'must be a base64 image');
  if (bool(b, 'inpaint_full_res', false)) {
    throw invalid('inpaint_full_res', '"Only masked" inpainting (crop to the mask and paste back) is not supported by this server; send inpaint_full_res: false (whole picture)');
  }
  if (!bool(b, 'mask_round', true)) throw invalid('mask_round', 'a soft (unrounded) latent mask is not supported: the mask is binarised; send mask_round: true');
  if (b.latent_mask !== undefined && b.latent_mask !== null && b.latent_mask !== '') throw invalid('latent_mask', 'a separate latent mask is not supported by this server');
  const blur = b.mask_blur;
  const both = blur === undefined || blur === null ? null : checkNumber('mask_blur', blur, { min: 0, max: MAX_BLUR, integer: true });
  return {
    mask: m,
    invert: num(b, 'inpainting_mask_invert', 0, { integer: true, min: 0, max: 1 }) === 1,
    blurX: both ?? num(b, 'mask_blur_x', 4, { integer: true, min: 0, max: MAX_BLUR }),
    blurY: both ?? num(b, 'mask_blur_y', 4, { integer: true, min: 0, max: MAX_BLUR }),
    fill: num(b, 'inpainting_fill', 0, { integer: true, min: 0, max: 3 }),
  };
}

/** What info.warnings says about a mask's fields that run otherwise than A1111 would run them; null if nothing. */
export function maskNote(m: A1111Mask): string | null {
  return m.fill === 1 ? null : `inpainting_fill ${m.fill} (${FILLS[m.fill]}) runs as 1 (original) on this server`;
}

/** cv2.getGaussianKernel(2*int(2.5*sigma + 0.5) + 1, sigma). */
export function gaussianKernel(sigma: number): Float64Array {
  const size = 2 * Math.floor(2.5 * sigma + 0.5) + 1;
  const k = new Float64Array(size);
  const c = (size - 1) / 2;
  let sum = 0;
  for (let i = 0; i < size; i++) sum += k[i] = Math.exp(-((i - c) ** 2) / (2 * sigma * sigma));
  for (let i = 0; i < size; i++) k[i] /= sum;
  return k;
}

/** BORDER_REFLECT_101: ... 2 1 | 0 1 2 ... n-1 | n-2 n-3 ... */
function reflect101(i: number, n: number): number {
  if (n === 1) return 0;
  let j = i;
  while (j < 0 || j >= n) j = j < 0 ? -j : 2 * (n - 1) - j;
  return j;
}

/** One pass of a 1-D kernel over an 8-bit plane, along x (dx = 1) or y; rounded back to 8 bits. */
function blurPass(src: Uint8Array, w: number, h: number, k: Float64Array, alongX: boolean): Uint8Array {
  const out = new Uint8Array(src.length);
  const r = (k.length - 1) / 2;
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      let acc = 0;
      for (let t = -r; t <= r; t++) {
        const v = alongX ? src[y * w + reflect101(x + t, w)] : src[reflect101(y + t, h) * w + x];
        acc += k[t + r] * v;
      }
      out[y * w + x] = Math.min(255, Math.max(0, Math.round(acc)));
    }
  }
  return out;
}

/** `gray` (one byte per pixel) blurred along x by sigma `bx`, then along y by `by` (0: that pass skipped). */
export function blurMask(gray: Uint8Array, w: number, h: number, bx: number, by: number): Uint8Array {
  let plane = gray;
  if (bx > 0) plane = blurPass(plane, w, h, gaussianKernel(bx), true);
  if (by > 0) plane = blurPass(plane, w, h, gaussianKernel(by), false);
  return plane;
}

/**
 * The mask the engine takes (a one-channel PNG, white = repaint): A1111's binary mask of the checked upload,
 * inverted and blurred as the request asks.
 */
export async function prepareMask(bytes: Uint8Array, m: A1111Mask): Promise<Uint8Array> {
  const { data, info } = await sharp(bytes).ensureAlpha().raw().toBuffer({ resolveWithObject: true });
  const { width: w, height: h } = info;
  const taps = w * h * (gaussianKernel(m.blurX).length * (m.blurX > 0 ? 1 : 0) + gaussianKernel(m.blurY).length * (m.blurY > 0 ? 1 : 0));
  if (taps > MAX_BLUR_TAPS) throw invalid('mask_blur', `blurring a ${w}x${h} mask by ${Math.max(m.blurX, m.blurY)} is more work than this server does for one request: send a smaller mask or a smaller mask_blur`);
  let translucent = false;
  for (let i = 3; i < data.length; i += 4) if (data[i] !== 255) translucent = true;
  const gray = new Uint8Array(w * h);
  for (let p = 0; p < w * h; p++) {
    // PIL's convert('L'): L = R * 299/1000 + G * 587/1000 + B * 114/1000 (ITU-R 601-2 luma), in its fixed point
    const v = translucent ? data[p * 4 + 3] : (data[p * 4] * 19595 + data[p * 4 + 1] * 38470 + data[p * 4 + 2] * 7471 + 0x8000) >> 16;
    const on = v > 128;
    gray[p] = on !== m.invert ? 255 : 0;
  }
  const blurred = blurMask(gray, w, h, m.blurX, m.blurY);
  return new Uint8Array(await sharp(Buffer.from(blurred.buffer, blurred.byteOffset, blurred.length), { raw: { width: w, height: h, channels: 1 } }).png().toBuffer());
}
