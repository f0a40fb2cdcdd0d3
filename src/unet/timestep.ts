/**
 * Sinusoidal timestep embedding (CompVis `timestep_embedding`, repeat_only=False):
 *   f_i = exp(-ln(10000) * i / half), i < half = dim / 2;  emb(t) = [cos(t f_0..), sin(t f_0..)]  (cos first).
 * t may be fractional (sigma samplers ask for in-between timesteps). -> [B, dim]
 *
 * Computed on the CPU in float32 arithmetic step by step as torch does it, so that t * f_i rounds the same:
 * at t ~ 1000 the argument's float32 rounding moves cos/sin by ~1e-4, which a float64 version would not match.
 */
import * as tf from '../backend/tf.js';

const MAX_PERIOD = 10000;

export function timestepEmbedding(t: readonly number[], dim: number): tf.Tensor2D {
  const f32 = Math.fround;
  const half = Math.floor(dim / 2);
  const freqs = new Float32Array(half);
  for (let i = 0; i < half; i++) freqs[i] = f32(Math.exp(f32(f32(f32(-Math.log(MAX_PERIOD)) * i) / half)));
  const out = new Float32Array(t.length * dim); // an odd dim leaves the last column 0, as CompVis pads it
  t.forEach((ti, b) => {
    for (let i = 0; i < half; i++) {
      const arg = f32(f32(ti) * freqs[i]);
      out[b * dim + i] = Math.cos(arg);
      out[b * dim + half + i] = Math.sin(arg);
    }
  });
  return tf.tensor2d(out, [t.length, dim]);
}
