/**
 * What the k-diffusion samplers share. They see SD's eps-prediction UNet as a denoiser of x = x0 + sigma * n
 * (k-diffusion `CompVisDenoiser`):
 *   D(x, sigma) = x - sigma * eps(c_in * x, t(sigma)),  c_in = 1 / sqrt(sigma^2 + 1),
 * with t(sigma) the model timestep the schedule lists for that sigma (./spacing.ts: k-diffusion's fractional
 * `sigmaToT`, or diffusers' spaced / rounded t). The derivative of the probability-flow ODE,
 * d = (x - D) / sigma (k-diffusion `to_d`), is then exactly that eps prediction.
 * A sampler walks a decreasing list of sigmas ending in 0; step i goes from sigmas[i] to sigmas[i + 1].
 *
 * Every step is written for that "variance exploding" latent x. Under the 'variance-preserving' start
 * (diffusers' DPM-Solver) the latent handed in and out between steps is x / sqrt(sigma^2 + 1) instead, which is
 * exactly what the UNet sees; the step converts on the way in and out (the final latent, at sigma 0, is the same).
 */
import * as tf from '../backend/tf.js';
import { stepsToRun } from './common.js';
import type { StartScale } from './conventions.js';
import { defaultSigmas, karrasSigmas, type SigmaTable } from './schedule.js';
import type { SigmaSchedule } from './spacing.js';
import type { EpsFn, NoiseFn, Sampler } from './types.js';

/** k-diffusion's sigmas: default or Karras spacing; img2img keeps the last int(n * strength) + 1. */
export function samplerSigmas(table: SigmaTable, steps: number, karras: boolean, strength?: number): Float64Array {
  const all = karras ? karrasSigmas(table, steps) : defaultSigmas(table, steps);
  return all.slice(steps - stepsToRun(steps, strength));
}

/** img2img: the last int(n * strength) steps of a schedule (all of it for txt2img). */
export function sliceSchedule(s: SigmaSchedule, strength?: number): SigmaSchedule {
  const n = s.timesteps.length;
  const skip = n - stepsToRun(n, strength);
  return { sigmas: s.sigmas.slice(skip), timesteps: s.timesteps.slice(skip) };
}

/** eps(c_in x, t): the noise prediction of the CompVis denoiser at noise level sigma, model timestep t. */
export function epsAt(eps: EpsFn, x: tf.Tensor4D, sigma: number, t: number): tf.Tensor4D {
  return tf.tidy(() => eps(tf.mul(x, 1 / Math.sqrt(sigma * sigma + 1)), t));
}

/** The start and the bookkeeping of every sigma sampler; subclasses implement one step, `advance`. */
export abstract class SigmaSampler implements Sampler {
  readonly totalSteps: number;
  /** Decreasing, ending in 0; length totalSteps + 1. */
  readonly sigmas: Float64Array;
  readonly timesteps: readonly number[];
  readonly startScale: number;
  private readonly variancePreserving: boolean;

  constructor(schedule: SigmaSchedule, start: StartScale) {
    this.sigmas = schedule.sigmas;
    this.timesteps = Array.from(schedule.timesteps);
    this.totalSteps = this.sigmas.length - 1;
    const s0 = this.sigmas[0];
    this.startScale = start === 'sigma' ? s0 : start === 'sigma-and-unit' ? Math.sqrt(s0 * s0 + 1) : 1;
    this.variancePreserving = start === 'variance-preserving';
  }

  /** txt2img: noise * startScale; img2img: initLatent + noise * sigmas[0] (over sqrt(sigma_0^2 + 1) when VP). */
  start(noise: tf.Tensor4D, initLatent?: tf.Tensor4D): tf.Tensor4D {
    return tf.tidy((): tf.Tensor4D => {
      if (initLatent === undefined) return tf.mul(noise, this.startScale);
      return tf.mul(tf.add(initLatent, tf.mul(noise, this.sigmas[0])), this.vpScale(0));
    });
  }

  step(i: number, x: tf.Tensor4D, eps: EpsFn, noise: NoiseFn): tf.Tensor4D {
    if (!this.variancePreserving) return this.advance(i, x, eps, noise);
    return tf.tidy(() => {
      const next = this.advance(i, tf.div(x, this.vpScale(i)), eps, noise);
      return tf.mul(next, this.vpScale(i + 1));
    });
  }

  /** One step from sigmas[i] to sigmas[i + 1] on the variance-exploding latent x = x0 + sigma * n. */
  protected abstract advance(i: number, x: tf.Tensor4D, eps: EpsFn, noise: NoiseFn): tf.Tensor4D;

  /** eps at the schedule's k-th sigma and timestep. */
  protected epsAt(eps: EpsFn, x: tf.Tensor4D, k: number): tf.Tensor4D {
    return epsAt(eps, x, this.sigmas[k], this.timesteps[k]);
  }

  /** D(x, sigma_k) = x - sigma_k * eps: the denoised estimate of x0. */
  protected denoisedAt(eps: EpsFn, x: tf.Tensor4D, k: number): tf.Tensor4D {
    return tf.tidy(() => tf.sub(x, tf.mul(this.epsAt(eps, x, k), this.sigmas[k])));
  }

  /** The VP latent is the VE latent times this at sigmas[k]; 1 unless variance-preserving. */
  private vpScale(k: number): number {
    const s = this.sigmas[k];
    return this.variancePreserving ? 1 / Math.sqrt(s * s + 1) : 1;
  }

  dispose(): void {}
}
