/**
 * DDIM, eta = 0 (Song et al. 2021 eq. 12), as CompVis `DDIMSampler` runs it: "uniform" timesteps
 * i * (1000 // n) + 1, each step going to the previous one, and from the last (t = 1) to abar_0, not to 1.
 */
import * as tf from '../backend/tf.js';
import { checkStepIndex, qSample, stepsToRun } from './common.js';
import { ddimTimesteps } from './schedule.js';
import type { EpsFn, NoiseFn, Sampler } from './types.js';

/** DDIM, eta = 0: x_prev = a * x_t + b * eps (pred_x0 = (x_t - sqrt(1 - aT) eps) / sqrt(aT) folded in). */
export const ddimCoefficients = (aT: number, aPrev: number): [number, number] => [
  Math.sqrt(aPrev / aT),
  Math.sqrt(1 - aPrev) - Math.sqrt((aPrev * (1 - aT)) / aT),
];

export class DdimSampler implements Sampler {
  readonly totalSteps: number;
  private readonly timesteps: readonly number[];
  /** abar of the timestep each step lands on (CompVis `ddim_alphas_prev`). */
  private readonly abarPrev: readonly number[];

  constructor(
    private readonly abar: Float64Array,
    steps: number,
    strength?: number,
  ) {
    const all = ddimTimesteps(steps, abar.length);
    this.totalSteps = stepsToRun(steps, strength);
    this.timesteps = all.slice(steps - this.totalSteps);
    this.abarPrev = this.timesteps.map((_, i) => abar[i + 1 < this.timesteps.length ? this.timesteps[i + 1] : 0]);
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
