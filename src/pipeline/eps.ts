/**
 * The guided noise predictor, the one definition every generation runs (with or without adapters):
 * classifier-free guidance (Ho & Salimans 2022) over the prompt's composable-diffusion parts (A1111's AND; Liu et
 * al. 2022), as A1111's CFGDenoiser.combine_denoised:
 *
 *   eps = eps_uncond + sum_i (eps_i - eps_uncond) * (w_i * scale)        parts i = 1..n, weights w_i
 *
 * summed in part order. A prompt without AND is one part of weight 1: eps_uncond + (eps_cond - eps_uncond) * scale.
 * (A1111 combines the denoised x0 = x - sigma * eps; the combination is linear, so on eps it is the same.)
 *
 * The batch the UNet sees (GuidedConditioning, conditioning.ts):
 *   guidance, batched   [x] * (1 + n) with [uncond, part_1 .. part_n]
 *   guidance, apart     [x] * n with the parts, then x with `cond.uncond` (their context lengths differ)
 *   no guidance         [x] * n with the parts; n > 1 gives A1111's combination without uncond (its skip_uncond:
 *                       part 1's eps stands in for it, scale 1): eps_1 + sum_i (eps_i - eps_1) * w_i
 *
 * Adapters, on the same batch as the UNet:
 *   ControlNets  the residuals of the units whose window holds step i (controlnet/guidance.ts), each batch row
 *                with its own text (both CFG halves, every part: the fixture's rule). They read the text context
 *                (and SDXL's added embedding), not the IP-Adapter tokens.
 *   inpainting   a 9-channel UNet reads cat([x, mask_latent, masked_latent]) (inpaint.ts's inpaintingEps rule); the
 *                ControlNets read x alone.
 *
 * The step a call belongs to is the index of its timestep in the sampler's list (every sampler calls the predictor
 * at timesteps[i] in step i), so the predictor stays a plain EpsFn that wrappers (x0 previews) can take; Heun's
 * second call, at the next step's timestep, gets that step's window.
 */
import * as tf from '../backend/tf.js';
import { controlResiduals, disposeResiduals, type ControlUnit } from '../controlnet/guidance.js';
import type { EpsFn } from '../scheduler/index.js';
import type { Conditioning, UNet } from '../unet/index.js';
import { partWeights, type GuidedConditioning } from './conditioning.js';

/** A 9-channel UNet's extra input: the latent-size mask [1, h, w, 1] and masked image latent [1, h, w, 4]. */
export interface InpaintInput {
  readonly mask: tf.Tensor4D;
  readonly maskedLatent: tf.Tensor4D;
}

/** What runs beside the UNet at each step. */
export interface EpsAdapters {
  readonly control: readonly ControlUnit[];
  readonly inpaint: InpaintInput | null;
  /** The sampler's timesteps and the steps it runs (the ControlNet windows are fractions of them). */
  readonly timesteps: readonly number[];
  readonly totalSteps: number;
}

export const NO_EPS_ADAPTERS: EpsAdapters = Object.freeze({ control: [], inpaint: null, timesteps: [], totalSteps: 0 });

/** The step of a call at timestep t: its index in `timesteps` (descending), else the first step at or below t. */
export function stepOf(timesteps: readonly number[], t: number): number {
  const exact = timesteps.indexOf(t);
  if (exact >= 0) return exact;
  const below = timesteps.findIndex((v) => v <= t);
  return below >= 0 ? below : timesteps.length - 1;
}

/** What the ControlNets read of a conditioning: text context and added embedding. */
const controlConditioning = (c: Conditioning): Conditioning => ({ context: c.context, ...(c.added === undefined ? {} : { added: c.added }) });

/** [1, h, w, c] -> [b, h, w, c], x repeated (x itself when b is 1). */
const repeat = (x: tf.Tensor4D, b: number): tf.Tensor4D => (b === 1 ? x : (tf.concat(new Array<tf.Tensor4D>(b).fill(x)) as tf.Tensor4D));

/** combine_denoised: base + sum_i (parts[i] - base) * (weights[i] * scale), in part order. */
function combine(base: tf.Tensor4D, parts: readonly tf.Tensor4D[], weights: readonly number[], scale: number): tf.Tensor4D {
  let out = base;
  parts.forEach((e, i) => {
    out = tf.add(out, tf.mul(tf.sub(e, base), weights[i] * scale));
  });
  return out;
}

/** [b, h, w, c] -> b tensors [1, h, w, c] (the tensor itself when b is 1). */
const rows = (t: tf.Tensor4D, b: number): tf.Tensor4D[] => (b === 1 ? [t] : tf.split(t, b));

/**
 * The noise predictor of a run. cond: see the header; `scale` null without guidance.
 * x: [1, h, w, 4] -> eps [1, h, w, 4].
 */
export function guidedEps(unet: UNet, cond: GuidedConditioning, scale: number | null, adapters: EpsAdapters = NO_EPS_ADAPTERS): EpsFn {
  const { control, inpaint, timesteps, totalSteps } = adapters;
  // [B, h, w, 4] -> [B, h, w, 9] for an inpainting UNet, the mask and masked latent repeated per batch item
  const unetInput = (x: tf.Tensor4D): tf.Tensor4D => {
    if (inpaint === null) return x;
    const b = x.shape[0];
    const each = (t: tf.Tensor4D) => (b === 1 ? t : tf.tile(t, [b, 1, 1, 1]));
    return tf.concat([x, each(inpaint.mask), each(inpaint.maskedLatent)], 3) as tf.Tensor4D;
  };
  const predict = (x: tf.Tensor4D, t: number, c: Conditioning): tf.Tensor4D => {
    const residuals = control.length === 0 ? undefined : controlResiduals(control, x, t, stepOf(timesteps, t), totalSteps, controlConditioning(c));
    if (residuals === undefined) return unet.forward(unetInput(x), t, c);
    try {
      return unet.forward(unetInput(x), t, { ...c, residuals });
    } finally {
      disposeResiduals(residuals);
    }
  };
  const weights = partWeights(cond);
  const n = weights.length;
  const { uncond } = cond;
  if (scale === null) {
    if (n === 1) return (x, t) => tf.tidy(() => predict(x, t, cond));
    return (x, t) =>
      tf.tidy(() => {
        const parts = rows(predict(repeat(x, n), t, cond), n); // [n, h, w, 4]
        return combine(parts[0], parts, weights, 1);
      });
  }
  if (uncond !== undefined) {
    return (x, t) => tf.tidy(() => combine(predict(x, t, uncond), rows(predict(repeat(x, n), t, cond), n), weights, scale));
  }
  return (x, t) =>
    tf.tidy(() => {
      const [epsUncond, ...parts] = tf.split(predict(repeat(x, 1 + n), t, cond), 1 + n) as tf.Tensor4D[]; // [1 + n, h, w, 4]
      return combine(epsUncond, parts, weights, scale);
    });
}
