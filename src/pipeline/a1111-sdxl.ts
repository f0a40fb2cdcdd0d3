/**
 * AUTOMATIC1111's text conditioning for SDXL: the SD 1.x chunking and emphasis (a1111-prompt.ts) run through each
 * of SDXL's two encoders, as A1111's sd_hijack_clip does for its two embedders (FrozenCLIPEmbedderForSDXLWith-
 * CustomWords, FrozenOpenCLIPEmbedder2WithCustomWords):
 *
 *   text -> chunks of 75 ids with weights (tokenizeLine)              the same for both encoders
 *        -> ids_L [k, 77]: start, ids, end-padded                     ids_G: every id after the first end -> 0
 *        -> CLIP ViT-L penultimate [k, 77, 768], bigG penultimate [k, 77, 1280], each chunk on its own
 *        -> emphasis ('Original': weighted, each encoder's chunk mean restored) per encoder
 *        -> side by side [k, 77, 2048] -> the chunks on the token axis: context [1, 77k, 2048]
 *   pooled: the first chunk's pooled, projected output of bigG (A1111's `zs[0].pooled`), unweighted.
 *
 * A prompt without emphasis or BREAK of at most 75 tokens gives exactly the plain encoding.
 * AND (composable diffusion): each part encoded on its own, contexts stacked as for SD 1.x (stackConds), one pooled
 * row per part (A1111's reconstruct_multicond_batch stacks every key of SDXL's conditioning dict).
 */
import * as tf from '../backend/tf.js';
import type { SdxlTextEmbedding, SdxlTextEncoder } from '../clip/sdxl-text.js';
import { OPEN_CLIP_PAD_ID } from '../tokenizer/index.js';
import { A1111_DEFAULTS, applyEmphasis, stackConds, tokenizeLine, type A1111Options } from './a1111-prompt.js';
import { splitMulticond } from '../tokenizer/prompt-syntax.js';

/** One prompt (no AND) -> context [1, 77k, L + G] and pooled [1, P]. The caller disposes both. */
export function encodeA1111Sdxl(text: SdxlTextEncoder, prompt: string, opts: Partial<Pick<A1111Options, 'emphasis' | 'commaPaddingBacktrack'>> = {}): SdxlTextEmbedding {
  const o = { ...A1111_DEFAULTS, ...opts };
  const { chunks } = tokenizeLine(text.tokenizer, prompt, o);
  const k = chunks.length;
  const n = chunks[0].tokens.length;
  const end = text.tokenizer.endId;
  // FrozenOpenCLIPEmbedder2WithCustomWords.process_tokens: id_pad (0) after the first end token
  const padG = (tokens: readonly number[]) => tokens.map((id, i) => (i > tokens.indexOf(end) ? OPEN_CLIP_PAD_ID : id));
  const idsL = tf.tensor2d(chunks.flatMap((c) => c.tokens), [k, n], 'int32');
  const idsG = tf.tensor2d(chunks.flatMap((c) => padG(c.tokens)), [k, n], 'int32');
  const multipliers = tf.tensor2d(chunks.flatMap((c) => c.multipliers), [k, n], 'float32');
  const l = text.clipL.forward(idsL);
  const g = text.clipG.forward(idsG, { pooled: true });
  try {
    return tf.tidy(() => {
      const zL = applyEmphasis(l.penultimate, multipliers, o.emphasis);
      const zG = applyEmphasis(g.penultimate, multipliers, o.emphasis);
      const context = tf.reshape(tf.concat([zL, zG], -1), [1, k * n, text.contextWidth]) as tf.Tensor3D;
      const pooled = tf.slice(g.projected as tf.Tensor2D, [0, 0], [1, text.pooledWidth]) as tf.Tensor2D;
      return { context, pooled };
    });
  } finally {
    // the encoders' outputs are kept tensors (they outlive the encoders' own tidy): freed here
    tf.dispose([idsL, idsG, multipliers, l.hidden, l.penultimate, g.hidden, g.penultimate, g.pooled as tf.Tensor, g.projected as tf.Tensor]);
  }
}

/**
 * A positive prompt with AND -> context [parts, 77 * max chunks, L + G], pooled [parts, P], and each part's weight
 * (encodeA1111Multicond's rule; equal part texts encoded once). Without AND: one part, weight 1. Caller disposes.
 */
export function encodeA1111SdxlMulticond(
  text: SdxlTextEncoder,
  prompt: string,
  opts: Partial<Pick<A1111Options, 'emphasis' | 'commaPaddingBacktrack'>> = {},
): { embedding: SdxlTextEmbedding; weights: number[] } {
  const parts = splitMulticond(prompt);
  const byText = new Map<string, SdxlTextEmbedding>();
  try {
    for (const { text: t } of parts) if (!byText.has(t)) byText.set(t, encodeA1111Sdxl(text, t, opts));
    const each = parts.map((p) => byText.get(p.text) as SdxlTextEmbedding);
    const context = stackConds(each.map((e) => e.context));
    const pooled = tf.concat(each.map((e) => e.pooled)) as tf.Tensor2D;
    return { embedding: { context, pooled }, weights: parts.map((p) => p.weight) };
  } finally {
    for (const e of byText.values()) tf.dispose([e.context, e.pooled]);
  }
}
