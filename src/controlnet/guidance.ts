/**
 * ControlNet guidance as pure functions a denoising loop calls at each step:
 *
 *   window       step i of n uses a ControlNet iff i/n >= start and (i+1)/n <= end (diffusers'
 *                control_guidance_start / _end, A1111's guidance_start / _end); other steps run the UNet without
 *                its residuals (diffusers runs it with scale 0: the same numbers).
 *   CFG halves   the ControlNet runs on the same batch as the UNet, [uncond, cond] with the same hint for both, and
 *                each half's residuals go to that half (lllyasviel's ControlLDM.apply_model, diffusers without
 *                guess mode). Guess mode (cond half only, scaled residuals) is not implemented.
 *   several      the residuals of several ControlNets are summed (diffusers' MultiControlNetModel; A1111 the same),
 *                each with its own hint, scale and window.
 */
import * as tf from '../backend/tf.js';
import { ConfigError } from '../nn/errors.js';
import type { Conditioning, UNetResiduals } from '../unet/conditioning.js';
import type { EpsFn } from '../scheduler/types.js';
import type { UNet } from '../unet/unet.js';
import type { ControlNet } from './model.js';

/** One ControlNet in use for a generation. */
export interface ControlUnit {
  readonly net: ControlNet;
  /** NHWC [1, 8h, 8w, hintChannels] in [0, 1] (e.g. controlHint(canny(...)) as NHWC), the same for both CFG halves. */
  readonly hint: tf.Tensor4D;
  /** net.embedHint(hint), when computed once for the whole generation (it depends on the hint alone). */
  readonly hintEmbedding?: tf.Tensor4D;
  /** The conditioning scale, multiplying every residual (diffusers' controlnet_conditioning_scale, A1111's weight). */
  readonly scale: number;
  /** The window, fractions of the steps in [0, 1], start < end (defaults 0 and 1: every step). */
  readonly start: number;
  readonly end: number;
}

/** Refuses a window or scale a loop cannot honour, naming the field. */
export function checkControlUnit(u: Pick<ControlUnit, 'scale' | 'start' | 'end'>, name = 'control'): void {
  if (!Number.isFinite(u.scale)) throw new ConfigError(`${name} scale: must be a finite number, got ${u.scale}`);
  if (!(u.start >= 0 && u.start <= 1)) throw new ConfigError(`${name} start: must be in [0, 1], got ${u.start}`);
  if (!(u.end >= 0 && u.end <= 1)) throw new ConfigError(`${name} end: must be in [0, 1], got ${u.end}`);
  if (!(u.start < u.end)) throw new ConfigError(`${name} start (${u.start}) must be below end (${u.end})`);
}

/** Whether step `step` (0-based) of `totalSteps` lies in the window [start, end]: i/n >= start and (i+1)/n <= end. */
export function controlActive(step: number, totalSteps: number, start: number, end: number): boolean {
  return step / totalSteps >= start && (step + 1) / totalSteps <= end;
}

/** The scale a unit runs with at each step: its scale inside the window, 0 outside (the fixture's control_scale_per_step). */
export function controlScales(totalSteps: number, u: Pick<ControlUnit, 'scale' | 'start' | 'end'>): number[] {
  return Array.from({ length: totalSteps }, (_, i) => (controlActive(i, totalSteps, u.start, u.end) ? u.scale : 0));
}

/** a + b, residual by residual: new tensors. */
export function addResiduals(a: UNetResiduals, b: UNetResiduals): UNetResiduals {
  if (a.down.length !== b.down.length) throw new ConfigError(`ControlNet residuals: ${a.down.length} and ${b.down.length} skips cannot be summed (ControlNets for different models)`);
  return { down: a.down.map((d, i) => tf.add(d, b.down[i])), middle: tf.add(a.middle, b.middle) };
}

export function disposeResiduals(r: UNetResiduals): void {
  tf.dispose([...r.down, r.middle]);
}

/**
 * The summed residuals of the units active at step `step` of `totalSteps`, for the UNet's batch x (CFG: [x, x]
 * with cond [uncond, cond]) at timestep t; undefined when none is active (run the UNet without residuals).
 * Returns new tensors, the caller's to dispose.
 */
export function controlResiduals(
  units: readonly ControlUnit[],
  x: tf.Tensor4D,
  t: number | readonly number[],
  step: number,
  totalSteps: number,
  cond: Conditioning,
): UNetResiduals | undefined {
  let sum: UNetResiduals | undefined;
  for (const u of units) {
    if (!controlActive(step, totalSteps, u.start, u.end)) continue;
    const r = u.hintEmbedding === undefined ? u.net.forward(x, t, cond, u.hint, u.scale) : u.net.forwardEmbedded(x, t, cond, u.hintEmbedding, u.scale);
    if (sum === undefined) sum = r;
    else {
      const next = addResiduals(sum, r);
      disposeResiduals(sum);
      disposeResiduals(r);
      sum = next;
    }
  }
  return sum;
}

/**
 * The guided noise predictor of step `step` with the ControlNets: guidedEps (pipeline/denoise.ts) plus the
 * residuals of the active units on the same batch. cond: batch 2 ([uncond, cond]) when guidanceScale is a number,
 * batch 1 when null.
 */
export function controlledEps(
  unet: UNet,
  units: readonly ControlUnit[],
  cond: Conditioning,
  guidanceScale: number | null,
  step: number,
  totalSteps: number,
): EpsFn {
  const predict = (x: tf.Tensor4D, t: number): tf.Tensor4D => {
    const residuals = controlResiduals(units, x, t, step, totalSteps, cond);
    if (residuals === undefined) return unet.forward(x, t, cond);
    try {
      return unet.forward(x, t, { ...cond, residuals });
    } finally {
      disposeResiduals(residuals);
    }
  };
  if (guidanceScale === null) return predict;
  return (x, t) =>
    tf.tidy(() => {
      const [epsUncond, epsCond] = tf.split(predict(tf.concat([x, x]), t), 2);
      return tf.add(epsUncond, tf.mul(tf.sub(epsCond, epsUncond), guidanceScale));
    });
}
