/**
 * Inpainting, as diffusers' StableDiffusionInpaintPipeline does it: repaint where the mask is 1, keep the rest.
 * NHWC throughout; H, W image sizes, h = H/f, w = W/f latent sizes (f the VAE's downsampling factor).
 *
 *   mask_binary  = mask >= 0.5                                   [1, H, W, 1] (VaeImageProcessor.binarize)
 *   masked_image = image * (mask_binary < 0.5)                   [1, H, W, 3] in [-1, 1]: the repaint area 0 (grey)
 *   mask_latent  = mask_binary[:, ::f, ::f]                      [1, h, w, 1] (F.interpolate 'nearest')
 *
 * An inpainting UNet (9 input channels: runwayml / CompVis LatentInpaintDiffusion) sees
 * cat([latent, mask_latent, masked_image_latent]) at every step, both CFG halves alike, and nothing is blended.
 * An ordinary 4-channel UNet inpaints by blending after every step:
 *   latent = (1 - mask_latent) * add_noise(init_latent, noise, t_next) + mask_latent * latent
 * with the same starting noise every step, and the clean init latent after the last step.
 * The unmasked pixels are not pasted back (diffusers does not; A1111 does, after decoding).
 */
import * as tf from '../backend/tf.js';
import { ShapeError } from '../nn/errors.js';
import { alphasCumprod, alphasCumprodFloat32, type EpsFn, type SamplerConventions } from '../scheduler/index.js';
import type { Conditioning, UNet } from '../unet/index.js';

export interface InpaintMasks {
  /** [1, H, W, 1]: 1 where the mask is at least 0.5. */
  readonly binary: tf.Tensor4D;
  /** [1, H, W, 3]: the image in [-1, 1] with the repaint area set to 0. */
  readonly maskedImage: tf.Tensor4D;
  /** [1, h, w, 1]: the binary mask at latent size, the top-left pixel of each f x f block. */
  readonly latent: tf.Tensor4D;
}

/** image [1, H, W, 3] in [-1, 1], mask [1, H, W, 1] in [0, 1] (1 = repaint), f the VAE's factor. */
export function inpaintMasks(image: tf.Tensor4D, mask: tf.Tensor4D, f: number): InpaintMasks {
  const [, h, w] = image.shape;
  if (mask.shape[1] !== h || mask.shape[2] !== w || mask.shape[3] !== 1) {
    throw new ShapeError(`inpaint: the mask must be [1, ${h}, ${w}, 1] like the image, got [${mask.shape}]`);
  }
  if (h % f !== 0 || w % f !== 0) throw new ShapeError(`inpaint: image sides ${h}x${w} must be multiples of ${f}`);
  return tf.tidy(() => {
    const binary = tf.cast(tf.greaterEqual(mask, 0.5), 'float32') as tf.Tensor4D;
    const maskedImage = tf.mul(image, tf.sub(1, binary)) as tf.Tensor4D;
    const latent = tf.stridedSlice(binary, [0, 0, 0, 0], [1, h, w, 1], [1, f, f, 1]) as tf.Tensor4D;
    return { binary, maskedImage, latent };
  });
}

export function disposeMasks(m: InpaintMasks): void {
  tf.dispose([m.binary, m.maskedImage, m.latent]);
}

/**
 * The guided noise predictor of an inpainting UNet: eps(cat([x, mask_latent, masked_latent])), with classifier-free
 * guidance over cond's batch of 2 (uncond, cond) when scale is a number. x [1, h, w, 4], mask_latent [1, h, w, 1],
 * masked_latent [1, h, w, 4] -> eps [1, h, w, 4].
 */
export function inpaintingEps(unet: UNet, cond: Conditioning, scale: number | null, maskLatent: tf.Tensor4D, maskedLatent: tf.Tensor4D): EpsFn {
  const extra = unet.config.inChannels - 4;
  if (extra !== maskLatent.shape[3] + maskedLatent.shape[3]) {
    throw new ShapeError(`inpaint: this UNet takes ${unet.config.inChannels} input channels, not 4 + ${maskLatent.shape[3]} + ${maskedLatent.shape[3]}`);
  }
  // [B, h, w, 4] -> [B, h, w, 9], the mask and masked latent repeated for each batch item (both CFG halves)
  const input = (x: tf.Tensor4D) => {
    const b = x.shape[0];
    const repeat = (t: tf.Tensor4D) => (b === 1 ? t : tf.tile(t, [b, 1, 1, 1]));
    return tf.concat([x, repeat(maskLatent), repeat(maskedLatent)], 3) as tf.Tensor4D;
  };
  if (scale === null) return (x, t) => tf.tidy(() => unet.forward(input(x), t, cond));
  return (x, t) =>
    tf.tidy(() => {
      const both = unet.forward(input(tf.concat([x, x]) as tf.Tensor4D), t, cond);
      const [epsUncond, epsCond] = tf.split(both, 2);
      return tf.add(epsUncond, tf.mul(tf.sub(epsCond, epsUncond), scale));
    });
}

/**
 * An ordinary UNet's inpainting step: after step i of a timestep sampler (its `timesteps`), the kept area is the
 * init latent noised to the next timestep (the clean init latent after the last step), the repaint area the
 * sampler's latent. Returns a new tensor.
 */
export function blendKept(
  latent: tf.Tensor4D,
  maskLatent: tf.Tensor4D,
  initLatent: tf.Tensor4D,
  noise: tf.Tensor4D,
  timesteps: readonly number[],
  i: number,
  conventions: SamplerConventions,
): tf.Tensor4D {
  const abar = conventions.precision === 'float32' ? alphasCumprodFloat32() : alphasCumprod();
  return tf.tidy(() => {
    const next = timesteps[i + 1];
    const kept = next === undefined
      ? initLatent
      : tf.add(tf.mul(initLatent, Math.sqrt(abar[next])), tf.mul(noise, Math.sqrt(1 - abar[next])));
    return tf.add(tf.mul(kept, tf.sub(1, maskLatent)), tf.mul(latent, maskLatent)) as tf.Tensor4D;
  });
}
