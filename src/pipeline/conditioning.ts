/**
 * Text -> the UNet's Conditioning (unet/conditioning.ts), one function per model family: a family that conditions
 * differently (SDXL: two encoders, pooled text, size and crop embeddings) adds a function here, not branches in
 * the pipeline.
 *
 * SDXL's added embedding (pooled text and the size / crop micro-conditioning) is built here too (sdxlAddedEmbedding).
 *
 * With classifier-free guidance the texts are [negative prompt, prompt], encoded as one batch of 2, so the
 * conditioning's batch lines up with the guided noise predictor's [uncond, cond] (eps.ts). Prompts in A1111's
 * syntax (a1111-prompt.ts, a1111-sdxl.ts):
 *   AND       the prompt's composable-diffusion parts, each encoded on its own, are the cond rows [part_1 .. part_n]
 *             (stacked as A1111's stack_conds, the shorter ones repeating their last token vector), with their
 *             weights in `weights`; the negative prompt is never split.
 *   lengths   prompt and negative prompt may give different token counts (77 per chunk of 75 tokens). A1111's
 *             default pads neither: the conditioning is the prompt's alone, carries the negative prompt's as
 *             `uncond`, and the UNet runs on each separately. With its option pad_cond_uncond (padCondUncond) the
 *             shorter one gets copies of the empty prompt's encoding appended, and the two run as one batch.
 */
import * as tf from '../backend/tf.js';
import type { ClipTextEncoder } from '../clip/index.js';
import type { SdxlTextEmbedding, SdxlTextEncoder } from '../clip/sdxl-text.js';
import type { ClipTokenizer } from '../tokenizer/index.js';
import { disposeConditioning, timestepEmbedding, type Conditioning } from '../unet/index.js';
import { ShapeError } from '../nn/errors.js';
import { extractLoraTags } from '../lora/tags.js';
import { CHUNK_LENGTH, encodeA1111Multicond, encodeA1111Prompt, reconcileCondUncond } from './a1111-prompt.js';
import { encodeA1111SdxlMulticond, encodeA1111Sdxl } from './a1111-sdxl.js';
import type { PromptSyntax } from './api.js';

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

/** A generation's texts. `negative` is null when none was given: SD 1.x encodes "" then, SDXL base uses zeros. */
export interface Prompts {
  readonly prompt: string;
  readonly negative: string | null;
}

/** SDXL's size and crop conditioning, in pixels (the pipeline defaults: [H, W], [0, 0], [H, W]). */
export interface MicroConditioning {
  readonly originalSize: readonly [number, number];
  readonly cropTopLeft: readonly [number, number];
  readonly targetSize: readonly [number, number];
}

/**
 * What guidance runs on: one batch [uncond, part_1 .. part_n], or (`uncond` given, when the token counts differ)
 * the prompt's parts [part_1 .. part_n] with the negative prompt's conditioning beside it; without guidance the
 * parts alone. n is 1 but for an A1111 prompt with AND.
 */
export type GuidedConditioning = Conditioning & {
  readonly uncond?: Conditioning;
  /** The parts' composable-diffusion weights (A1111's AND), one per cond row; absent: one part of weight 1. */
  readonly weights?: readonly number[];
  /** Whether cond or uncond was padded with the empty prompt's encoding to run as one batch (A1111's "Pad conds"). */
  readonly padded?: boolean;
};

/** The weights of the prompt's parts: [1] without AND. */
export const partWeights = (c: GuidedConditioning): readonly number[] => c.weights ?? [1];

/** `weights` as a GuidedConditioning field: none for one part of weight 1 (a prompt without AND). */
const weightsField = (weights: readonly number[]): { weights?: readonly number[] } =>
  weights.length === 1 && weights[0] === 1 ? {} : { weights: Object.freeze([...weights]) };

/**
 * The parts' conditioning (n rows) and the negative prompt's (1 row) -> what guidance runs on (see
 * GuidedConditioning). `empty` (padCondUncond): the encoding of '' [1, 77, C], made only when the lengths differ;
 * the shorter context is padded with it (A1111's pad_cond_uncond), the added embeddings stay. Takes the tensors over.
 */
function guidedPair(cond: Conditioning, uncond: Conditioning, weights: readonly number[], empty: (() => tf.Tensor3D) | null): GuidedConditioning {
  let padded = false;
  if (cond.context.shape[1] !== uncond.context.shape[1] && empty !== null) {
    const e = empty();
    const both = reconcileCondUncond(cond.context, uncond.context, 'pad_cond_uncond', e);
    tf.dispose([e, cond.context, uncond.context]);
    cond = { ...cond, context: both.cond };
    uncond = { ...uncond, context: both.uncond };
    padded = true;
  }
  if (cond.context.shape[1] !== uncond.context.shape[1]) return { ...cond, uncond, ...weightsField(weights) };
  const context = tf.concat([uncond.context, cond.context]) as tf.Tensor3D; // [1 + n, 77k, C]
  const added = cond.added === undefined || uncond.added === undefined ? undefined : (tf.concat([uncond.added, cond.added]) as tf.Tensor2D);
  disposeConditioning(uncond);
  disposeConditioning(cond);
  return { context, ...(added === undefined ? {} : { added }), ...weightsField(weights), ...(padded ? { padded } : {}) };
}

export function disposeGuided(c: GuidedConditioning): void {
  disposeConditioning(c);
  if (c.uncond !== undefined) disposeConditioning(c.uncond);
}

export interface EncodeOptions {
  readonly guidance: boolean;
  readonly clipSkip: number;
  readonly micro: MicroConditioning;
  /** Default 'plain'. */
  readonly promptSyntax?: PromptSyntax;
  /** Where a warning goes (a prompt cut at 77 tokens). */
  readonly warn?: (message: string) => void;
  /** A1111's pad_cond_uncond: pad the shorter of cond and uncond with empty-prompt chunks (a1111 syntax only). */
  readonly padCondUncond?: boolean;
}

/** Plain prompts are cut after 75 tokens (CLIP's 77 positions with start and end): say so. */
function warnIfCut(tokenizer: ClipTokenizer, text: string, warn: ((message: string) => void) | undefined): void {
  const n = tokenizer.bpe(text).length;
  if (n > CHUNK_LENGTH && warn !== undefined) {
    warn(`prompt of ${n} tokens cut after the first ${CHUNK_LENGTH} (--prompt-syntax plain); a1111 syntax encodes all of it: ${JSON.stringify(text.slice(0, 60))}...`);
  }
}

/** Text -> the UNet's Conditioning, for one model family. */
export interface TextConditioner {
  /** [uncond, parts] with guidance (or the parts with `uncond` beside it), the parts alone without. */
  encode(prompts: Prompts, o: EncodeOptions): GuidedConditioning;
  dispose(): void;
}

/**
 * SD 1.x. 'plain': the context of [negative, prompt] (negative "" when none was given), each cut at 77 tokens.
 * 'a1111': the prompt without its <lora:...> tags (they are applied at load) split at AND, each part through
 * encodeA1111Prompt (encodeA1111Multicond), the negative prompt whole; equal lengths batched as above, different
 * ones side by side (A1111's default padding 'none') or padded into one batch (padCondUncond).
 */
export class Sd1Conditioner implements TextConditioner {
  constructor(readonly text: Sd1TextEncoder) {}

  encode(p: Prompts, o: EncodeOptions): GuidedConditioning {
    const texts = o.guidance ? [p.negative ?? '', p.prompt] : [p.prompt];
    if (o.promptSyntax !== 'a1111') {
      for (const t of texts) warnIfCut(this.text.tokenizer, t, o.warn);
      return sd1Conditioning(this.text, texts, o.clipSkip);
    }
    const { tokenizer, clip } = this.text;
    const opts = { clipSkip: o.clipSkip };
    const { cond, weights } = encodeA1111Multicond(tokenizer, clip, extractLoraTags(p.prompt).prompt, opts); // [n, 77k, C]
    if (!o.guidance) return { context: cond, ...weightsField(weights) };
    const uncond = encodeA1111Prompt(tokenizer, clip, p.negative ?? '', opts);
    const empty = o.padCondUncond === true ? () => encodeA1111Prompt(tokenizer, clip, '', opts) : null;
    return guidedPair({ context: cond }, { context: uncond }, weights, empty);
  }

  dispose(): void {
    this.text.clip.dispose();
  }
}

/**
 * SDXL: context = both encoders' penultimate states side by side [B, 77, 2048]; added = [pooled text of encoder 2,
 * F(size and crop ids)] [B, 2816], the same ids for both halves. 'plain' prompts are cut at 77 tokens; 'a1111'
 * ones are read as A1111 reads them (a1111-sdxl.ts). No negative prompt: zero context and pooled
 * (force_zeros_for_empty_prompt); an explicit "" is encoded. clipSkip does not apply (SDXL takes the penultimate).
 */
export class SdxlConditioner implements TextConditioner {
  constructor(readonly text: SdxlTextEncoder, readonly timeEmbedDim: number) {}

  encode(p: Prompts, o: EncodeOptions): GuidedConditioning {
    const { originalSize, cropTopLeft, targetSize } = o.micro;
    const ids = [...originalSize, ...cropTopLeft, ...targetSize];
    if (o.promptSyntax === 'a1111') return this.encodeA1111(p, o, ids);
    for (const t of o.guidance && p.negative !== null ? [p.negative, p.prompt] : [p.prompt]) warnIfCut(this.text.tokenizer, t, o.warn);
    const cond = this.text.encode([p.prompt]);
    if (!o.guidance) {
      const added = sdxlAddedEmbedding(cond.pooled, [ids], this.timeEmbedDim);
      cond.pooled.dispose();
      return { context: cond.context, added };
    }
    const neg = this.text.encodeNegative(p.negative === null ? null : [p.negative], 1);
    const context = tf.concat([neg.context, cond.context]) as tf.Tensor3D;
    const pooled = tf.concat([neg.pooled, cond.pooled]) as tf.Tensor2D;
    const added = sdxlAddedEmbedding(pooled, [ids, ids], this.timeEmbedDim);
    tf.dispose([neg.context, neg.pooled, cond.context, cond.pooled, pooled]);
    return { context, added };
  }

  /**
   * A1111's syntax (a1111-sdxl.ts), its <lora:...> tags stripped, split at AND (each part with its own pooled
   * text in the added embedding, as A1111 stacks SDXL's conditioning dicts); a negative prompt of another chunk
   * count stays beside the prompt's (A1111's padding 'none'), or is padded (padCondUncond: the context only, with
   * the crossattn of '' as A1111's empty prompt), as for SD 1.x. No negative prompt: zeros, as above.
   */
  private encodeA1111(p: Prompts, o: EncodeOptions, ids: readonly number[]): GuidedConditioning {
    const withAdded = ({ context, pooled }: SdxlTextEmbedding): Conditioning => {
      const added = sdxlAddedEmbedding(pooled, new Array<readonly number[]>(pooled.shape[0]).fill(ids), this.timeEmbedDim);
      pooled.dispose();
      return { context, added };
    };
    const { embedding, weights } = encodeA1111SdxlMulticond(this.text, extractLoraTags(p.prompt).prompt);
    const cond = withAdded(embedding);
    if (!o.guidance) return { ...cond, ...weightsField(weights) };
    const uncond = withAdded(p.negative === null ? this.text.encodeNegative(null, 1) : encodeA1111Sdxl(this.text, p.negative));
    const empty = (): tf.Tensor3D => {
      const e = encodeA1111Sdxl(this.text, '');
      e.pooled.dispose();
      return e.context;
    };
    return guidedPair(cond, uncond, weights, o.padCondUncond === true ? empty : null);
  }

  dispose(): void {
    this.text.dispose();
  }
}
