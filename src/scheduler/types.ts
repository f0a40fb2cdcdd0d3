/**
 * The one interface every sampler implements, and what it is given. A sampler only sees latents (tensors, any
 * layout: every operation is elementwise) and a noise predictor; its schedule and coefficients are plain numbers.
 */
import type * as tf from '../backend/tf.js';
import type { SamplerConventions } from './conventions.js';
/** The samplers by name, as the CLI, the server and the PNG parameters spell them. */
export const SAMPLERS = ['ddpm', 'ddim', 'euler', 'euler_a', 'heun', 'lms', 'dpmpp_2m'] as const;
export type SamplerName = (typeof SAMPLERS)[number];

/** Noise prediction at model timestep t (fractional for sigma samplers); the sampler has already applied c_in. */
export type EpsFn = (x: tf.Tensor4D, t: number) => tf.Tensor4D;

/** Fresh standard normal noise of the given shape (TorchGenerator draws, or fixture tensors); the sampler disposes it. */
export type NoiseFn = (shape: readonly number[]) => tf.Tensor;

export interface SamplerConfig {
  readonly name: SamplerName;
  /** Steps of the full schedule, 1..1000. */
  readonly steps: number;
  /** Sigma samplers only: Karras et al. 2022 sigmas (rho 7) instead of evenly spaced timesteps. */
  readonly karras?: boolean;
  /** img2img: the fraction of the schedule to run, (0, 1]; absent for txt2img. */
  readonly strength?: number;
  /** Whose timesteps, sigmas and start (./conventions.ts); default A1111_CONVENTIONS (k-diffusion, CompVis DDIM). */
  readonly conventions?: SamplerConventions;
}

export interface Sampler {
  /** Steps that will run (img2img: fewer than cfg.steps; DDIM's uniform spacing: more when steps does not divide 1000). */
  readonly totalSteps: number;
  /** The model timestep eps is first called with at each step (heun's second call is at the next step's). */
  readonly timesteps: readonly number[];
  /** What start() multiplies txt2img noise by: diffusers' init_noise_sigma (1 for DDIM, DDPM and DPM-Solver's VP form). */
  readonly startScale: number;
  /**
   * txt2img: the first latent from unit noise, noise * startScale; img2img: initLatent
   * noised to the first step's noise level with `noise`. Returns a new tensor; disposes neither input.
   */
  start(noise: tf.Tensor4D, initLatent?: tf.Tensor4D): tf.Tensor4D;
  /**
   * Step i (0-based, called in order 0 .. totalSteps-1): returns the next latent; calls eps one or more times
   * (heun twice) and may call noise() (euler_a, ddpm). Does not dispose x.
   */
  step(i: number, x: tf.Tensor4D, eps: EpsFn, noise: NoiseFn): tf.Tensor4D;
  /** Frees the history a multistep sampler keeps (LMS, DPM++ 2M); also done after the last step. Idempotent. */
  dispose(): void;
}

/** A sampler asked for something it cannot do: the message names the field and the allowed values. */
export class SamplerError extends Error {
  override name = 'SamplerError';
}
