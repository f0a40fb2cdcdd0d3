/**
 * DPM-Solver++(2M) (Lu et al. 2022, algorithm 2; k-diffusion `sample_dpmpp_2m`). In half-log-SNR time
 * lambda = -log(sigma), with h = lambda' - lambda:
 *   x' = (sigma' / sigma) x - expm1(-h) D,  and from the second step on D is extrapolated with the previous
 *   denoised estimate: D = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_{i-1} / h.
 * The step to sigma' = 0 uses D_i alone (x' = D_i). -expm1(-h) = 1 - sigma' / sigma.
 * diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint) writes the same update on the
 * variance-preserving latent x / sqrt(sigma^2 + 1): with alpha = 1/sqrt(sigma^2+1), s = sigma alpha, dividing its
 * x' = (s'/s) x - alpha' (e^-h - 1) D by alpha' gives the line above. Its different numbers come from the
 * conventions (rounded timesteps, VP start), not the step (tests/sampler-conventions.test.ts checks both forms).
 */
import * as tf from '../backend/tf.js';
import { StepHistory } from './common.js';
import { SigmaSampler } from './k-diffusion.js';
import type { EpsFn, NoiseFn } from './types.js';

export class DpmPp2mSampler extends SigmaSampler {
  private readonly denoised = new StepHistory('dpmpp_2m', 1);

  protected advance(i: number, x: tf.Tensor4D, eps: EpsFn, _noise: NoiseFn): tf.Tensor4D {
    this.denoised.begin(i, this.totalSteps);
    const [sigma, next] = [this.sigmas[i], this.sigmas[i + 1]];
    const ratio = next / sigma;
    const result = tf.tidy((): tf.Tensor4D => {
      const d = this.denoisedAt(eps, x, i);
      let target = d;
      if (this.denoised.length > 0 && next > 0) {
        const r = Math.log(this.sigmas[i - 1] / sigma) / Math.log(sigma / next); // h_{i-1} / h
        const w = 1 / (2 * r);
        target = tf.sub(tf.mul(d, 1 + w), tf.mul(this.denoised.recent(0), w));
      }
      const out = tf.add<tf.Tensor4D>(tf.mul(x, ratio), tf.mul(target, 1 - ratio));
      this.denoised.push(d);
      return out;
    });
    if (i === this.totalSteps - 1) this.denoised.dispose();
    return result;
  }

  override dispose(): void {
    this.denoised.dispose();
  }
}
