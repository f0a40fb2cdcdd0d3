/**
 * Inpainting inside generate(): the request's mask bytes -> the mask tensor, which UNet does what (inpaint.ts has the
 * rules and formulas), and the blend an ordinary model runs after every step with any sampler.
 *
 *   mask bytes  --decode, width x height, luma (Pillow's convert('L'))--> [1, H, W, 1] in [0, 1], 1 = repaint
 *   9-channel UNet (SD 1.5 inpainting)  eps of cat([x, mask_latent, masked_latent]) (inpaintingEps); nothing blended.
 *                                       Without a mask (txt2img, img2img) it gets a mask of ones and a zero image,
 *                                       as A1111 conditions an inpainting model then.
 *   4-channel UNet with a mask          blend after every step: kept = the init latent noised to the level the step
 *                                       landed on, with the start noise (diffusers' StableDiffusionInpaintPipeline):
 *                                       timestep samplers (DDIM, DDPM) through blendKept, exactly as the fixture;
 *                                       sigma samplers with their next sigma (init + sigma * noise, over
 *                                       sqrt(sigma^2 + 1) in the variance-preserving form), clean after the last.
 * The unmasked pixels are not pasted back after decoding (diffusers does not).
 */
import * as tf from '../backend/tf.js';
import { decodeImage, type DecodeOptions } from '../image/codec.js';
import { SigmaSampler } from '../scheduler/k-diffusion.js';
import { A1111_CONVENTIONS, type Sampler, type SamplerConfig } from '../scheduler/index.js';
import { SD1_PREFIXES } from '../weights/layout.js';
import type { TensorSource } from '../weights/types.js';
import { blendKept } from './inpaint.js';
import type { PipelineConfig } from './config.js';

/** The latent channels an inpainting UNet reads besides the latent: the mask (1) and the masked image's latent (4). */
export const INPAINT_EXTRA_CHANNELS = 5;

/**
 * An SD 1.x checkpoint whose UNet takes latent + mask + masked latent (9 input channels) runs with that config: a
 * config that says 4 (SD 1.5's default) is widened, so `sd-v1-5-inpainting.ckpt` loads without a --config.
 */
export function withCheckpointInChannels(src: TensorSource, cfg: PipelineConfig): PipelineConfig {
  const key = `${SD1_PREFIXES.unet}.input_blocks.0.0.weight`;
  if (!src.has(key)) return cfg;
  const inChannels = src.info(key).shape[1];
  const want = cfg.unet.outChannels + INPAINT_EXTRA_CHANNELS;
  if (cfg.unet.inChannels !== cfg.unet.outChannels || inChannels !== want) return cfg;
  return Object.freeze({ ...cfg, unet: Object.freeze({ ...cfg.unet, inChannels }) });
}

/** Whether a UNet of this input width is an inpainting UNet. */
export const isInpaintingUNet = (cfg: { readonly inChannels: number; readonly outChannels: number }): boolean =>
  cfg.inChannels === cfg.outChannels + INPAINT_EXTRA_CHANNELS;

/**
 * A mask image -> NHWC [1, height, width, 1] in [0, 1], stretched to the output size like the init image; its luma
 * as Pillow's convert('L') computes it (ITU-R 601-2: (19595 R + 38470 G + 7471 B + 2^15) >> 16), transparency
 * composited onto white (decodeImage) so a transparent area is repainted.
 */
export async function decodeMask(bytes: Uint8Array, width: number, height: number, o: DecodeOptions = {}): Promise<tf.Tensor4D> {
  const { rgb } = await decodeImage(bytes, width, height, 'mask', o);
  const gray = new Float32Array(width * height);
  for (let i = 0; i < gray.length; i++) {
    const l = (19595 * rgb[3 * i] + 38470 * rgb[3 * i + 1] + 7471 * rgb[3 * i + 2] + 0x8000) >> 16;
    gray[i] = l / 255;
  }
  return tf.tensor4d(gray, [1, height, width, 1]);
}

/** The mask of a 9-channel UNet run without one: repaint everything, [1, H, W, 1] of ones. */
export function fullMask(height: number, width: number): tf.Tensor4D {
  return tf.ones([1, height, width, 1]);
}

/**
 * The blend after step i of `sampler` (built from `cfg`): kept area = initLatent noised to the level the step landed
 * on with `noise` (the start noise), repaint area = the sampler's latent. Returns a new tensor.
 */
export function keptBlend(
  sampler: Sampler,
  cfg: SamplerConfig,
  maskLatent: tf.Tensor4D,
  initLatent: tf.Tensor4D,
  noise: tf.Tensor4D,
): (i: number, latent: tf.Tensor4D) => tf.Tensor4D {
  const conventions = cfg.conventions ?? A1111_CONVENTIONS;
  if (!(sampler instanceof SigmaSampler)) {
    return (i, latent) => blendKept(latent, maskLatent, initLatent, noise, sampler.timesteps, i, conventions);
  }
  const rules = cfg.name === 'dpmpp_2m' ? conventions.dpmSolver : conventions.sigma;
  const vp = rules.startScale === 'variance-preserving';
  return (i, latent) =>
    tf.tidy(() => {
      const sigma = sampler.sigmas[i + 1] ?? 0;
      const a = vp ? 1 / Math.sqrt(sigma * sigma + 1) : 1;
      const kept = sigma === 0 ? initLatent : tf.mul(tf.add(initLatent, tf.mul(noise, sigma)), a);
      return tf.add(tf.mul(kept, tf.sub(1, maskLatent)), tf.mul(latent, maskLatent)) as tf.Tensor4D;
    });
}
