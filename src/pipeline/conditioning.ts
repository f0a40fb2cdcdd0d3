/**
 * Text -> the UNet's Conditioning (unet/conditioning.ts), one function per model family: a family that conditions
 * differently (SDXL: two encoders, pooled text, size and crop embeddings) adds a function here, not branches in
 * the pipeline.
 *
 * SDXL's added embedding (pooled text and the size / crop micro-conditioning) is built here too (sdxlAddedEmbedding).
 *
 * With classifier-free guidance the texts are [negative prompt, prompt], encoded as one batch of 2, so the
 * conditioning's batch lines up with the guided noise predictor's [uncond, cond] (denoise.ts).
 */
import * as tf from '../backend/tf.js';
import type { ClipTextEncoder } from '../clip/index.js';
import type { ClipTokenizer } from '../tokenizer/index.js';
import { timestepEmbedding, type Conditioning } from '../unet/index.js';
import { ShapeError } from '../nn/errors.js';

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

/** SDXL's size and crop conditioning: each number's Fourier features are this wide (sgm ConcatTimestepEmbedderND). */
export const SDXL_TIME_EMBED_DIM = 256;

/**
 * SDXL's micro-conditioning, the UNet's added embedding: [pooled text, F(time ids)], where the time ids are
 * [original height, original width, crop top, crop left, target height, target width] in pixels and F embeds each
 * of the six numbers alone with the timestep formula (cos first) at `dim` features, in that order.
 * pooled [B, P], timeIds B rows of 6 -> [B, P + 6 * dim] (SDXL base: 1280 + 6 * 256 = 2816).
 */
export function sdxlAddedEmbedding(pooled: tf.Tensor2D, timeIds: readonly (readonly number[])[], dim = SDXL_TIME_EMBED_DIM): tf.Tensor2D {
  const b = pooled.shape[0];
  if (timeIds.length !== b || timeIds.some((row) => row.length !== 6)) {
    throw new ShapeError(`SDXL time ids: expected ${b} rows of 6 numbers (original size, crop top-left, target size), got ${JSON.stringify(timeIds)}`);
  }
  return tf.tidy(() => {
    const features = tf.reshape(timestepEmbedding(timeIds.flat(), dim), [b, 6 * dim]);
    return tf.concat([pooled, features], 1) as tf.Tensor2D;
  });
}
