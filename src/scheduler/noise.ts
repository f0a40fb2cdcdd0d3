/**
 * Torch-compatible latent noise in the engine's NHWC layout: torch draws latents as NCHW [B, C, H, W], so a
 * NoiseFn asked for [B, H, W, C] draws [B, C, H, W] from the generator and transposes. With this, a seed gives
 * the same starting noise (and euler_a / ddpm step noise) as diffusers or CompVis with a CPU generator.
 */
import * as tf from '../backend/tf.js';
import type { TorchGenerator } from './torch-generator.js';
import type { NoiseFn } from './types.js';

export function torchNoise(gen: TorchGenerator): NoiseFn {
  return (shape) => {
    if (shape.length !== 4) throw new RangeError(`torchNoise: expected an NHWC shape [B, H, W, C], got [${shape.join(', ')}]`);
    const [b, h, w, c] = shape;
    return tf.tidy(() => tf.transpose(tf.tensor4d(gen.randn([b, c, h, w]), [b, c, h, w]), [0, 2, 3, 1]));
  };
}
