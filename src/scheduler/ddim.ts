/**
 * DDIM, eta = 0 (Song et al. 2021 eq. 12), as CompVis `DDIMSampler` (A1111) and diffusers' DDIMScheduler run it.
 * Each step goes from t to the timestep before it: CompVis to the next listed one (`ddim_alphas_prev`), diffusers to
 * t - 1000 // n whatever its spacing; the two agree for uniform and leading spacing but where A1111 clips 1000 to
 * 999. After the last step the target is abar_0, not 1 (CompVis; diffusers `set_alpha_to_one: false`).
 */
import * as tf from '../backend/tf.js';
import { checkStepIndex, qSample, stepsToRun } from './common.js';
import type { EpsFn, NoiseFn, Sampler } from './types.js';

/** DDIM, eta = 0: x_prev = a * x_t + b * eps (pred_x0 = (x_t - sqrt(1 - aT) eps) / sqrt(aT) folded in). */
export const ddimCoefficients = (aT: number, aPrev: number): [number, number] => [
  Math.sqrt(aPrev / aT),
  Math.sqrt(1 - aPrev) - Math.sqrt((aPrev * (1 - aT)) / aT),
];

export class DdimSampler implements Sampler {
  readonly totalSteps: number;
  readonly timesteps: readonly number[];
  readonly startScale = 1;
  /** abar of the timestep each step lands on. */
  private readonly abarPrev: readonly number[];

  /**
   * all: the spaced timesteps, descending; previous: 'listed' (CompVis) or the stride 1000 // steps (diffusers);
   * img2img runs the last int(len * strength).
   */
  constructor(
    private readonly abar: Float64Array,
    all: readonly number[],
    previous: 'listed' | { readonly stride: number },
    strength?: number,
  ) {
    this.totalSteps = stepsToRun(all.length, strength);
    this.timesteps = all.slice(all.length - this.totalSteps);
    this.abarPrev = this.timesteps.map((t, i) => {
      if (previous !== 'listed') return abar[Math.max(t - previous.stride, 0)];
      return abar[i + 1 < this.timesteps.length ? this.timesteps[i + 1] : 0];
    });
  }

  start(noise: tf.Tensor4D, initLatent?: tf.Tensor4D): tf.Tensor4D {
    if (initLatent === undefined) return tf.clone(noise);
    return qSample(initLatent, noise, this.abar[this.timesteps[0]]);
  }

  step(i: number, x: tf.Tensor4D, eps: EpsFn, _noise: NoiseFn): tf.Tensor4D {
    checkStepIndex('ddim', i, this.totalSteps);
    const t = this.timesteps[i];
    const [a, b] = ddimCoefficients(this.abar[t], this.abarPrev[i]);
    return tf.tidy(() => tf.add(tf.mul(x, a), tf.mul(eps(x, t), b)));
  }

  dispose(): void {}
}
