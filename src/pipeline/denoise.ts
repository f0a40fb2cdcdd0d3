/**
 * The denoising loop: a sampler walks a latent from noise to an image latent, asking the noise predictor (eps.ts:
 * the UNet with classifier-free guidance over the prompt's parts, and the adapters) at every step.
 *
 * The loop is an async generator that yields after every step, so the caller shows progress and can stop;
 * each step runs in one tf.tidy, none spans an await. Latents are NHWC [B, h, w, 4].
 */
import * as tf from '../backend/tf.js';
import type { EpsFn, NoiseFn, Sampler } from '../scheduler/index.js';

/** The guided noise predictor is defined once, in eps.ts. */
export { guidedEps } from './eps.js';

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
