/**
 * What the k-diffusion samplers share. They see SD's eps-prediction UNet as a denoiser of x = x0 + sigma * n
 * (k-diffusion `CompVisDenoiser`):
 *   D(x, sigma) = x - sigma * eps(c_in * x, t(sigma)),  c_in = 1 / sqrt(sigma^2 + 1),
 * with t(sigma) the fractional timestep of `sigmaToT`. The derivative of the probability-flow ODE,
 * d = (x - D) / sigma (k-diffusion `to_d`), is then exactly that eps prediction.
 * A sampler walks a decreasing list of sigmas ending in 0; step i goes from sigmas[i] to sigmas[i + 1].
 */
import * as tf from '../backend/tf.js';
import { stepsToRun } from './common.js';
import { defaultSigmas, karrasSigmas, sigmaToT, type SigmaTable } from './schedule.js';
import type { EpsFn, NoiseFn, Sampler } from './types.js';

/** The sigmas a sampler walks: default or Karras spacing; img2img keeps the last int(n * strength) + 1. */
export function samplerSigmas(table: SigmaTable, steps: number, karras: boolean, strength?: number): Float64Array {
  const all = karras ? karrasSigmas(table, steps) : defaultSigmas(table, steps);
  return all.slice(steps - stepsToRun(steps, strength));
}

/** eps(c_in x, t(sigma)): the noise prediction of the CompVis denoiser at noise level sigma. */
export function epsAtSigma(eps: EpsFn, table: SigmaTable, x: tf.Tensor4D, sigma: number): tf.Tensor4D {
  return tf.tidy(() => eps(tf.mul(x, 1 / Math.sqrt(sigma * sigma + 1)), sigmaToT(table, sigma)));
}

/** D(x, sigma) = x - sigma * eps: the denoised estimate of x0. */
export function denoisedAtSigma(eps: EpsFn, table: SigmaTable, x: tf.Tensor4D, sigma: number): tf.Tensor4D {
  return tf.tidy(() => tf.sub(x, tf.mul(epsAtSigma(eps, table, x, sigma), sigma)));
}

/** The start and the bookkeeping of every sigma sampler; subclasses implement one step. */
export abstract class SigmaSampler implements Sampler {
  readonly totalSteps: number;

  constructor(
    protected readonly table: SigmaTable,
    /** Decreasing, ending in 0; length totalSteps + 1. */
    readonly sigmas: Float64Array,
  ) {
    this.totalSteps = sigmas.length - 1;
  }

  /** txt2img: noise * sigmas[0]; img2img: initLatent + noise * sigmas[0]. */
  start(noise: tf.Tensor4D, initLatent?: tf.Tensor4D): tf.Tensor4D {
    return tf.tidy((): tf.Tensor4D => {
      const scaled = tf.mul<tf.Tensor4D>(noise, this.sigmas[0]);
      return initLatent === undefined ? scaled : tf.add(initLatent, scaled);
    });
  }

  abstract step(i: number, x: tf.Tensor4D, eps: EpsFn, noise: NoiseFn): tf.Tensor4D;

  dispose(): void {}
}
