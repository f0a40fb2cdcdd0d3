/**
 * Heun's method (Karras et al. 2022 algorithm 1; k-diffusion `sample_heun`, s_churn = 0): an Euler step to
 * sigma', then the average of the slopes at both ends; the last step, to sigma' = 0, is plain Euler.
 * Two model calls per step but the last.
 */
import * as tf from '../backend/tf.js';
import { checkStepIndex } from './common.js';
import { SigmaSampler } from './k-diffusion.js';
import type { EpsFn, NoiseFn } from './types.js';

export class HeunSampler extends SigmaSampler {
  protected advance(i: number, x: tf.Tensor4D, eps: EpsFn, _noise: NoiseFn): tf.Tensor4D {
    checkStepIndex('heun', i, this.totalSteps);
    const [sigma, next] = [this.sigmas[i], this.sigmas[i + 1]];
    const dt = next - sigma;
    return tf.tidy((): tf.Tensor4D => {
      const d = this.epsAt(eps, x, i);
      const euler = tf.add<tf.Tensor4D>(x, tf.mul(d, dt));
      if (next === 0) return euler;
      const d2 = this.epsAt(eps, euler, i + 1);
      return tf.add(x, tf.mul(tf.add(d, d2), dt / 2));
    });
  }
}
