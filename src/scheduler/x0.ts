/**
 * The predicted x0 of one noise prediction, the one definition every sampler shares (the "denoised" latent
 * k-diffusion hands its callback, DDIM's pred_x0): what the image would be if the rest of the noise came off now.
 *
 *   x0 = (x_in - sqrt(1 - abar_t) eps) / sqrt(abar_t),   abar_t = 1 / (1 + sigma(t)^2)
 *
 * x_in is what the UNet saw at model timestep t (a sigma sampler has already applied c_in = 1 / sqrt(sigma^2 + 1),
 * so this is k-diffusion's D = x - sigma eps), t may be fractional (sigma interpolated in log space as k-diffusion's
 * t_to_sigma does). Used for previews and `sd generate --save-steps`; sampling itself never needs it.
 */
import * as tf from '../backend/tf.js';
import { alphasCumprod, sigmaTable, tToSigma, type SigmaTable } from './schedule.js';
import type { EpsFn } from './types.js';

let defaultTable: SigmaTable | null = null;

/** abar at model timestep t (fractional allowed) of the scaled-linear schedule SD 1.x and SDXL share. */
export function abarAt(t: number, table: SigmaTable = (defaultTable ??= sigmaTable(alphasCumprod()))): number {
  const sigma = tToSigma(table, Math.min(Math.max(t, 0), table.sigmas.length - 1));
  return 1 / (1 + sigma * sigma);
}

/** x_in, eps [B, h, w, c] at timestep t -> x0 [B, h, w, c]. */
export function predictedX0(xIn: tf.Tensor4D, t: number, eps: tf.Tensor4D): tf.Tensor4D {
  const a = abarAt(t);
  return tf.tidy(() => tf.div<tf.Tensor4D>(tf.sub(xIn, tf.mul(eps, Math.sqrt(1 - a))), Math.sqrt(a)));
}

/**
 * Wraps a noise predictor to keep the x0 of each step's first call (heun's second call, at the next timestep, is
 * not the step's estimate). `take()` hands the kept tensor over (the caller disposes it) and readies the next step.
 */
export class X0Tap {
  private held: tf.Tensor4D | null = null;

  constructor(private readonly inner: EpsFn) {}

  readonly eps: EpsFn = (x, t) => {
    const e = this.inner(x, t);
    if (this.held === null) this.held = tf.keep(predictedX0(x, t, e));
    return e;
  };

  take(): tf.Tensor4D | null {
    const x0 = this.held;
    this.held = null;
    return x0;
  }

  dispose(): void {
    this.held?.dispose();
    this.held = null;
  }
}
