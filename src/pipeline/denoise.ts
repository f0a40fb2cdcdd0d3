/**
 * The denoising loop: a sampler walks a latent from noise to an image latent, asking the UNet for the noise
 * prediction at every step, with classifier-free guidance (Ho & Salimans 2022):
 *
 *   eps = eps_uncond + scale * (eps_cond - eps_uncond)
 *
 * uncond and cond run as one UNet forward on a batch of 2 (the conditioning batched [uncond, cond]: negative
 * prompt, then prompt; pipeline/conditioning.ts builds it), or as two forwards when their contexts differ in
 * length (A1111 prompts of different chunk counts: the conditioning then carries `uncond` beside it).
 * Without guidance (off, or scale 1, which gives eps_cond exactly) one forward on the prompt alone.
 *
 * The loop is an async generator that yields after every step, so the caller shows progress and can stop;
 * each step runs in one tf.tidy, none spans an await. Latents are NHWC [B, h, w, 4].
 */
import * as tf from '../backend/tf.js';
import type { UNet } from '../unet/index.js';
import type { EpsFn, NoiseFn, Sampler } from '../scheduler/index.js';
import type { GuidedConditioning } from './conditioning.js';

/** generate() was cancelled through its AbortSignal; every tensor it held has been freed. */
export class AbortError extends Error {
  override name = 'AbortError';
  constructor(message = 'generation cancelled') {
    super(message);
  }
}

export function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted === true) throw new AbortError();
}

/**
 * The guided noise predictor. cond: batch 2 (uncond, cond) when scale is a number, batch 1 when null; or, with
 * `cond.uncond` given, cond and uncond of batch 1 each (two forwards).
 * x: [1, h, w, 4] -> eps [1, h, w, 4].
 */
export function guidedEps(unet: UNet, cond: GuidedConditioning, scale: number | null): EpsFn {
  const { uncond } = cond;
  if (scale === null) return (x, t) => unet.forward(x, t, cond);
  const guide = (epsUncond: tf.Tensor, epsCond: tf.Tensor) => tf.add<tf.Tensor4D>(epsUncond, tf.mul(tf.sub(epsCond, epsUncond), scale));
  if (uncond !== undefined) return (x, t) => tf.tidy(() => guide(unet.forward(x, t, uncond), unet.forward(x, t, cond)));
  return (x, t) =>
    tf.tidy(() => {
      const both = unet.forward(tf.concat([x, x]), t, cond); // [2, h, w, 4]
      const [epsUncond, epsCond] = tf.split(both, 2);
      return guide(epsUncond, epsCond);
    });
}

export interface DenoiseStep {
  /** 1-based. */
  readonly step: number;
  readonly total: number;
  /** The latent after this step; valid until the next step. The last one is the caller's to dispose. */
  readonly latent: tf.Tensor4D;
}

/** Lets timers and I/O (an abort, an HTTP request) run between steps. */
const nextTurn = () => new Promise<void>((resolve) => setImmediate(resolve));

/** What runs on the latent after step i (0-based), e.g. inpainting's blend of the kept area; returns a new tensor. */
export type AfterStep = (i: number, latent: tf.Tensor4D) => tf.Tensor4D;

/**
 * Runs every step of `sampler` from `start` (taken over: it is disposed along the way), then `afterStep` if given.
 * Yields after each step. If the signal fires, or the caller stops iterating early, the current latent and the
 * sampler are freed; an abort throws AbortError from the generator.
 */
export async function* denoise(
  start: tf.Tensor4D,
  sampler: Sampler,
  eps: EpsFn,
  noise: NoiseFn,
  signal?: AbortSignal,
  afterStep?: AfterStep,
): AsyncGenerator<DenoiseStep, void, void> {
  let x = start;
  let finished = false;
  try {
    for (let i = 0; i < sampler.totalSteps; i++) {
      throwIfAborted(signal);
      const cur = x;
      const next = tf.tidy(() => {
        const stepped = sampler.step(i, cur, eps, noise);
        return afterStep === undefined ? stepped : afterStep(i, stepped);
      });
      x.dispose();
      x = next;
      const last = i === sampler.totalSteps - 1;
      if (last) finished = true;
      yield { step: i + 1, total: sampler.totalSteps, latent: x };
      if (!last) await nextTurn();
    }
  } finally {
    sampler.dispose();
    if (!finished) x.dispose();
  }
}
