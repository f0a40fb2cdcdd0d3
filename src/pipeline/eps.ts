/**
 * The guided noise predictor of a generation with adapters, step by step: denoise.ts's guidedEps, plus
 *
 *   ControlNets  the residuals of the units whose window holds step i (controlnet/guidance.ts), computed on the
 *                same batch as the UNet: [x, x] with [uncond, cond] under guidance (both CFG halves, the fixture's
 *                rule), each half alone when the negative prompt's conditioning is apart, x alone without guidance.
 *                They read the text context (and SDXL's added embedding), not the IP-Adapter tokens.
 *   inpainting   a 9-channel UNet reads cat([x, mask_latent, masked_latent]) (inpaint.ts's inpaintingEps rule); the
 *                ControlNets read x alone.
 *
 * The operations are those of guidedEps, controlledEps and inpaintingEps in the same order, so a run through here
 * gives their numbers (tests/pipeline-adapters.test.ts compares them).
 *
 * The step a call belongs to is the index of its timestep in the sampler's list (every sampler calls the predictor
 * at timesteps[i] in step i), so the predictor stays a plain EpsFn that wrappers (x0 previews) can take; Heun's
 * second call, at the next step's timestep, gets that step's window.
 */
import * as tf from '../backend/tf.js';
import { controlResiduals, disposeResiduals, type ControlUnit } from '../controlnet/guidance.js';
import type { EpsFn } from '../scheduler/index.js';
import type { Conditioning, UNet } from '../unet/index.js';
import type { GuidedConditioning } from './conditioning.js';

/** A 9-channel UNet's extra input: the latent-size mask [1, h, w, 1] and masked image latent [1, h, w, 4]. */
export interface InpaintInput {
  readonly mask: tf.Tensor4D;
  readonly maskedLatent: tf.Tensor4D;
}

export interface StepEpsParts {
  readonly unet: UNet;
  readonly cond: GuidedConditioning;
  /** The guidance scale, or null without guidance. */
  readonly guidanceScale: number | null;
  readonly control: readonly ControlUnit[];
  readonly inpaint: InpaintInput | null;
  /** The sampler's timesteps and the steps it runs (the ControlNet windows are fractions of them). */
  readonly timesteps: readonly number[];
  readonly totalSteps: number;
}

/** The step of a call at timestep t: its index in `timesteps` (descending), else the first step at or below t. */
export function stepOf(timesteps: readonly number[], t: number): number {
  const exact = timesteps.indexOf(t);
  if (exact >= 0) return exact;
  const below = timesteps.findIndex((v) => v <= t);
  return below >= 0 ? below : timesteps.length - 1;
}

/** What the ControlNets read of a conditioning: text context and added embedding. */
const controlConditioning = (c: Conditioning): Conditioning => ({ context: c.context, ...(c.added === undefined ? {} : { added: c.added }) });

/** The noise predictor of the whole run. */
export function adapterEps(p: StepEpsParts): EpsFn {
  const { unet, cond, guidanceScale: scale, control, inpaint, timesteps, totalSteps } = p;
  // [B, h, w, 4] -> [B, h, w, 9] for an inpainting UNet, the mask and masked latent repeated per batch item
  const unetInput = (x: tf.Tensor4D): tf.Tensor4D => {
    if (inpaint === null) return x;
    const b = x.shape[0];
    const repeat = (t: tf.Tensor4D) => (b === 1 ? t : tf.tile(t, [b, 1, 1, 1]));
    return tf.concat([x, repeat(inpaint.mask), repeat(inpaint.maskedLatent)], 3) as tf.Tensor4D;
  };
  const predict = (x: tf.Tensor4D, t: number, c: Conditioning, step: number): tf.Tensor4D => {
    const residuals = control.length === 0 ? undefined : controlResiduals(control, x, t, step, totalSteps, controlConditioning(c));
    if (residuals === undefined) return unet.forward(unetInput(x), t, c);
    try {
      return unet.forward(unetInput(x), t, { ...c, residuals });
    } finally {
      disposeResiduals(residuals);
    }
  };
  const guide = (epsUncond: tf.Tensor, epsCond: tf.Tensor, s: number) => tf.add<tf.Tensor4D>(epsUncond, tf.mul(tf.sub(epsCond, epsUncond), s));
  const { uncond } = cond;
  if (scale === null) return (x, t) => tf.tidy(() => predict(x, t, cond, stepOf(timesteps, t)));
  if (uncond !== undefined) {
    return (x, t) => tf.tidy(() => guide(predict(x, t, uncond, stepOf(timesteps, t)), predict(x, t, cond, stepOf(timesteps, t)), scale));
  }
  return (x, t) =>
    tf.tidy(() => {
      const [epsUncond, epsCond] = tf.split(predict(tf.concat([x, x]), t, cond, stepOf(timesteps, t)), 2); // [2, h, w, 4]
      return guide(epsUncond, epsCond, scale);
    });
}
