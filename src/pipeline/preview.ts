/**
 * Previews of an image being made, computed where the tensors are (the engine; nothing but bytes leaves it).
 *
 *   approx  "Approx cheap" (A1111's sd_samplers_common, after a Hugging Face forum post): each latent pixel's 4 (SD 1.x,
 *           SDXL) channels times a fixed 4x3 matrix gives RGB in about [-1, 1]; then x / 2 + 0.5, clamped. Left at
 *           latent size (1/8 of the image per side: 64x64 for 512x512); a viewer scales it up.
 *   vae     the full VAE decode of the latent, at image size (a whole decoder pass: costs about one step or more).
 *
 * What is previewed is the step's predicted x0 (../scheduler/x0.ts), as A1111's live previews show by default: the
 * noisy latent itself would show mostly noise until the last steps.
 */
import * as tf from '../backend/tf.js';
import type { ModelFamily } from './families.js';

/** RGB = latent [.., 4] x factors [4, 3], per model family (the latents A1111 computed them on: scaled by scale_factor). */
export const LATENT_RGB_FACTORS: Readonly<Record<ModelFamily, readonly (readonly [number, number, number])[]>> = Object.freeze({
  sd1: Object.freeze([
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
  ] as const),
  sdxl: Object.freeze([
    [0.3448, 0.4168, 0.4395],
    [-0.1953, -0.029, 0.025],
    [0.1074, 0.0886, -0.0163],
    [-0.373, -0.2499, -0.2088],
  ] as const),
});

/** latent [1, h, w, 4] -> [1, h, w, 3] in [0, 1] through the family's factors. */
export function approxRgb(latent: tf.Tensor4D, family: ModelFamily): tf.Tensor4D {
  const f = LATENT_RGB_FACTORS[family];
  const [b, h, w, c] = latent.shape;
  if (c !== f.length) throw new Error(`approxRgb: the latent has ${c} channels, the ${family} factors are for ${f.length}`);
  return tf.tidy(() => {
    const rgb = tf.matMul(tf.reshape(latent, [b * h * w, c]), tf.tensor2d(f.map((r) => [...r]), [c, 3])); // [b*h*w, 3]
    return tf.reshape(tf.clipByValue(tf.add(tf.mul(rgb, 0.5), 0.5), 0, 1), [b, h, w, 3]);
  });
}

/** [1, H, W, 3] in [0, 1] -> RGB bytes, round(255 x). */
export async function rgbBytes(image: tf.Tensor4D): Promise<Uint8Array> {
  const values = await image.data();
  const rgb = new Uint8Array(values.length);
  for (let i = 0; i < values.length; i++) rgb[i] = Math.round(values[i] * 255);
  return rgb;
}
