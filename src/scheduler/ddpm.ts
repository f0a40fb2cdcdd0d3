/**
 * DDPM ancestral sampling (Ho et al. 2020) as the educational sampler (hkproj pytorch-stable-diffusion
 * `DDPMSampler`, timesteps (arange(n) * (1000 // n))[::-1]) and diffusers' DDPMScheduler (the same + steps_offset)
 * do it: each step jumps from t to the next listed timestep t' (after the last, to "t = -1", abar 1) with the
 * posterior q(x_t' | x_t, x_0) of that jump and the "fixed small" variance beta~; noise is added while t > 0.
 */
import * as tf from '../backend/tf.js';
import { checkStepIndex, qSample, stepsToRun } from './common.js';
import type { EpsFn, NoiseFn, Sampler } from './types.js';

export interface DdpmCoefficients {
  readonly x0: number; // weight of the predicted x_0 in the posterior mean
  readonly xt: number; // weight of x_t in the posterior mean
  readonly variance: number; // beta~ = (1 - abar_t') / (1 - abar_t) * beta_t
}

/** DDPM eq. 7 for a jump t -> t': beta_t = 1 - abar_t / abar_t'; abarPrev is 1 past the start of the schedule. */
export function ddpmCoefficients(abarT: number, abarPrev: number): DdpmCoefficients {
  const alphaT = abarT / abarPrev;
  const betaT = 1 - alphaT;
  return {
    x0: (Math.sqrt(abarPrev) * betaT) / (1 - abarT),
    xt: (Math.sqrt(alphaT) * (1 - abarPrev)) / (1 - abarT),
    variance: Math.max(((1 - abarPrev) / (1 - abarT)) * betaT, 1e-20),
  };
}

export class DdpmSampler implements Sampler {
  readonly totalSteps: number;
  readonly timesteps: readonly number[];
  readonly startScale = 1;

  /** all: the spaced timesteps, descending; img2img runs the last int(len * strength). */
  constructor(
    private readonly abar: Float64Array,
    all: readonly number[],
    strength?: number,
  ) {
    this.totalSteps = stepsToRun(all.length, strength);
    this.timesteps = all.slice(all.length - this.totalSteps);
  }

  start(noise: tf.Tensor4D, initLatent?: tf.Tensor4D): tf.Tensor4D {
    if (initLatent === undefined) return tf.clone(noise);
    return qSample(initLatent, noise, this.abar[this.timesteps[0]]);
  }

  step(i: number, x: tf.Tensor4D, eps: EpsFn, noise: NoiseFn): tf.Tensor4D {
    checkStepIndex('ddpm', i, this.totalSteps);
    const t = this.timesteps[i];
    const abarT = this.abar[t];
    const c = ddpmCoefficients(abarT, i + 1 < this.totalSteps ? this.abar[this.timesteps[i + 1]] : 1);
    return tf.tidy((): tf.Tensor4D => {
      const e = eps(x, t);
      const x0 = tf.div(tf.sub(x, tf.mul(e, Math.sqrt(1 - abarT))), Math.sqrt(abarT)); // DDPM eq. 15
      const mean = tf.add<tf.Tensor4D>(tf.mul(x0, c.x0), tf.mul(x, c.xt));
      if (t === 0) return mean;
      return tf.add(mean, tf.mul(noise(x.shape), Math.sqrt(c.variance)));
    });
  }

  dispose(): void {}
}
