/**
 * Pieces every sampler shares: how much of the schedule img2img runs, the forward process q(x_t | x_0) that
 * noises an init latent, step-order checks and the tensor history of multistep samplers.
 */
import * as tf from '../backend/tf.js';
import { SamplerError } from './types.js';

/**
 * img2img runs the last int(steps * strength) steps of the schedule (at least one); txt2img runs them all.
 * int() as Python's: 10 * 0.6 = 6, 10 * 0.29 = 2.9000000000000004 -> 2.
 */
export function stepsToRun(steps: number, strength: number | undefined): number {
  if (strength === undefined) return steps;
  return Math.max(1, Math.floor(steps * strength));
}

/** DDPM eq. 4, q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise. */
export function qSample(x0: tf.Tensor4D, noise: tf.Tensor4D, abarT: number): tf.Tensor4D {
  return tf.tidy(() => tf.add(tf.mul(x0, Math.sqrt(abarT)), tf.mul(noise, Math.sqrt(1 - abarT))));
}

export function checkStepIndex(sampler: string, i: number, total: number): void {
  if (!Number.isInteger(i) || i < 0 || i >= total) {
    throw new SamplerError(`${sampler}: step index ${i} is outside 0..${total - 1}`);
  }
}

/**
 * The last `size` tensors a multistep sampler remembers (newest last). Entries are tf.keep()-ed so a tf.tidy
 * around a step does not free them; the history frees what falls out and everything on dispose().
 * It also checks steps arrive in order, since the history only means something then.
 */
export class StepHistory {
  private readonly items: tf.Tensor4D[] = [];
  private nextStep = 0;

  constructor(
    private readonly sampler: string,
    private readonly size: number,
  ) {}

  /** Call at the start of step i: it must be the step after the previous one (or 0, which restarts). */
  begin(i: number, total: number): void {
    checkStepIndex(this.sampler, i, total);
    if (i === 0) this.dispose();
    else if (i !== this.nextStep) {
      throw new SamplerError(`${this.sampler}: steps must run in order; expected step ${this.nextStep}, got ${i}`);
    }
    this.nextStep = i + 1;
  }

  push(t: tf.Tensor4D): void {
    this.items.push(tf.keep(t));
    while (this.items.length > this.size) this.items.shift()?.dispose();
  }

  /** The k-th most recent entry (0 = newest). */
  recent(k: number): tf.Tensor4D {
    return this.items[this.items.length - 1 - k];
  }

  get length(): number {
    return this.items.length;
  }

  dispose(): void {
    for (const t of this.items.splice(0)) t.dispose();
  }
}
