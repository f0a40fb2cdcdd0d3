/**
 * Euler and Euler ancestral (k-diffusion `sample_euler` with s_churn = 0, `sample_euler_ancestral` with eta = 1).
 * Euler: x' = x + d (sigma' - sigma). Ancestral: step down to sigma_down with Euler, then add fresh noise of
 * size sigma_up, where sigma_down^2 + sigma_up^2 = sigma'^2 (no noise on the last step, to sigma' = 0).
 */
import * as tf from '../backend/tf.js';
import { checkStepIndex } from './common.js';
import type { SamplerConventions, StartScale } from './conventions.js';
import { SigmaSampler } from './k-diffusion.js';
import type { SigmaSchedule } from './spacing.js';
import type { EpsFn, NoiseFn } from './types.js';

export class EulerSampler extends SigmaSampler {
  protected advance(i: number, x: tf.Tensor4D, eps: EpsFn, _noise: NoiseFn): tf.Tensor4D {
    checkStepIndex('euler', i, this.totalSteps);
    const [sigma, next] = [this.sigmas[i], this.sigmas[i + 1]];
    return tf.tidy(() => tf.add(x, tf.mul(this.epsAt(eps, x, i), next - sigma)));
  }
}

/** k-diffusion `get_ancestral_step`, eta = 1: sigma_up = min(to, sqrt(to^2 (from^2 - to^2) / from^2)). */
export function ancestralStep(from: number, to: number): { down: number; up: number } {
  const up = Math.min(to, Math.sqrt((to * to * (from * from - to * to)) / (from * from)));
  return { down: Math.sqrt(to * to - up * up), up };
}

/** Ancestral noise: k-diffusion draws it while the next sigma is > 0; diffusers at every step (the last times 0). */
export class EulerAncestralSampler extends SigmaSampler {
  constructor(
    schedule: SigmaSchedule,
    start: StartScale,
    private readonly noiseRule: SamplerConventions['ancestralNoise'],
  ) {
    super(schedule, start);
  }

  protected advance(i: number, x: tf.Tensor4D, eps: EpsFn, noise: NoiseFn): tf.Tensor4D {
    checkStepIndex('euler_a', i, this.totalSteps);
    const [sigma, next] = [this.sigmas[i], this.sigmas[i + 1]];
    const { down, up } = ancestralStep(sigma, next);
    return tf.tidy((): tf.Tensor4D => {
      const xDown = tf.add<tf.Tensor4D>(x, tf.mul(this.epsAt(eps, x, i), down - sigma));
      if (next > 0) return tf.add(xDown, tf.mul(noise(x.shape), up));
      if (this.noiseRule === 'every-step') noise(x.shape).dispose(); // drawn, multiplied by sigma_up = 0
      return xDown;
    });
  }
}
