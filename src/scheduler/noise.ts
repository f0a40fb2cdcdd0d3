/**
 * Where the noise comes from, chosen in one place: `createGenerator(source, seed)` imitates one of torch's two seeded
 * generators, and `torchNoise(gen)` turns it into the NoiseFn the samplers draw from, in the engine's NHWC layout.
 *   'cpu'  torch.Generator('cpu'), mt19937 (./torch-generator.ts): diffusers' and CompVis' seeds, A1111 "RNG: CPU"
 *   'gpu'  torch.Generator('cuda') on NVIDIA, Philox (./philox.ts): A1111's default "GPU" and its "NV" source
 * One generator serves a whole generation: the start noise is its first draw and every step's noise (euler_a, ddpm)
 * a later one, which is also how A1111 draws them (modules/rng.py, `ImageRNG.first` then `ImageRNG.next`).
 *
 * Torch draws latents as NCHW [B, C, H, W], so a NoiseFn asked for [B, H, W, C] draws [B, C, H, W] from the
 * generator and transposes. With this, a seed gives the same starting noise (and step noise) as the tool it came from.
 */
import * as tf from '../backend/tf.js';
import { PhiloxGenerator } from './philox.js';
import { TorchGenerator } from './torch-generator.js';
import type { NoiseFn } from './types.js';

/** A seeded torch generator: each call is the next torch.randn(shape) on it. */
export interface NoiseGenerator {
  /** Standard normal float32 values in row-major order of `shape`, continuing the generator's stream. */
  randn(shape: readonly number[]): Float32Array;
}

export const NOISE_SOURCES = ['cpu', 'gpu'] as const;
export type NoiseSource = (typeof NOISE_SOURCES)[number];

/** A fresh generator of the given kind: `torch.Generator(source === 'gpu' ? 'cuda' : 'cpu').manual_seed(seed)`. */
export function createGenerator(source: NoiseSource, seed: number | bigint): NoiseGenerator {
  switch (source) {
    case 'cpu':
      return new TorchGenerator(seed);
    case 'gpu':
      return new PhiloxGenerator(seed);
    default:
      throw new RangeError(`noise source: unknown "${String(source)}"; use one of ${NOISE_SOURCES.join(', ')}`);
  }
}

export function torchNoise(gen: NoiseGenerator): NoiseFn {
  return (shape) => {
    if (shape.length !== 4) throw new RangeError(`torchNoise: expected an NHWC shape [B, H, W, C], got [${shape.join(', ')}]`);
    const [b, h, w, c] = shape;
    return tf.tidy(() => tf.transpose(tf.tensor4d(gen.randn([b, c, h, w]), [b, c, h, w]), [0, 2, 3, 1]));
  };
}
