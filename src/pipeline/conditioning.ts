/**
 * Text -> the UNet's Conditioning (unet/conditioning.ts), one function per model family: a family that conditions
 * differently (SDXL: two encoders, pooled text, size and crop embeddings) adds a function here, not branches in
 * the pipeline.
 *
 * With classifier-free guidance the texts are [negative prompt, prompt], encoded as one batch of 2, so the
 * conditioning's batch lines up with the guided noise predictor's [uncond, cond] (denoise.ts).
 */
import * as tf from '../backend/tf.js';
import type { ClipTextEncoder } from '../clip/index.js';
import type { ClipTokenizer } from '../tokenizer/index.js';
import type { Conditioning } from '../unet/index.js';

/** What SD 1.x encodes text with. */
export interface Sd1TextEncoder {
  readonly tokenizer: ClipTokenizer;
  readonly clip: ClipTextEncoder;
}

/**
 * SD 1.x: each text -> 77 ids -> CLIP ViT-L's features after `clipSkip` (1: the last layer) as the context,
 * [texts.length, 77, 768]. Nothing else conditions an SD 1.x UNet.
 */
export function sd1Conditioning({ tokenizer, clip }: Sd1TextEncoder, texts: readonly string[], clipSkip: number): Conditioning {
  const ids = texts.map((t) => tokenizer.encode(t));
  const idsTensor = tf.tensor2d(ids, [texts.length, ids[0].length], 'int32');
  const out = clip.forward(idsTensor, { clipSkip });
  tf.dispose([idsTensor, out.penultimate]);
  return { context: out.hidden };
}
