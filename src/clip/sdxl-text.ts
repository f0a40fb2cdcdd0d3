/**
 * SDXL's text conditioning: prompts -> the context the UNet cross-attends to and the pooled text embedding that,
 * with the micro-conditioning time ids, makes its added embedding (src/unet/conditioning.ts). As diffusers'
 * StableDiffusionXLPipeline.encode_prompt and Stability's sgm conditioner compute it:
 *
 *   ids_L = tokenizer(text), padded with <|endoftext|>           [B, 77]
 *   ids_G = tokenizer(text), padded with 0 (open_clip.tokenize)  [B, 77]
 *   context = concat(penultimate_L(ids_L), penultimate_G(ids_G))  [B, 77, 768 + 1280 = 2048], neither final-normed
 *   pooled  = ln_final_G(h_L)[<|endoftext|>] @ text_projection_G  [B, 1280] (`text_embeds`; encoder L's is unused)
 *
 * No negative prompt given: SDXL base's `force_zeros_for_empty_prompt` makes the unconditional context and pooled
 * embedding all zeros. A given negative prompt, "" included, is encoded like a prompt.
 * Weights: `conditioner.embedders.0.transformer.text_model.*` (CLIP ViT-L, HF names) and
 * `conditioner.embedders.1.model.*` (OpenCLIP ViT-bigG, open_clip names), as in sd_xl_base_1.0.safetensors.
 */
import * as tf from '../backend/tf.js';
import { ConfigError } from '../nn/errors.js';
import { OPEN_CLIP_PAD_ID, type ClipTokenizer } from '../tokenizer/index.js';
import type { TensorSource } from '../weights/types.js';
import type { ResidencyPolicy } from '../nn/residency.js';
import { SDXL_CLIP_G, SDXL_CLIP_L, type ClipConfig } from './config.js';
import { ClipTextEncoder, expectedShapes } from './index.js';
import { loadOpenClipText, openClipShapes } from './open-clip.js';

/** Where SDXL's text encoders live in an original single-file checkpoint (sgm's conditioner.embedders). */
export const SDXL_TEXT_PREFIXES = Object.freeze({
  clipL: 'conditioner.embedders.0.transformer.text_model',
  clipG: 'conditioner.embedders.1.model',
});

export interface SdxlTextConfig {
  readonly clipL: ClipConfig;
  readonly clipG: ClipConfig; // must have a projectionDim
}

export const SDXL_TEXT: SdxlTextConfig = Object.freeze({ clipL: SDXL_CLIP_L, clipG: SDXL_CLIP_G });

/** The text half of SDXL's conditioning for a batch of prompts. The caller owns (disposes) both tensors. */
export interface SdxlTextEmbedding {
  /** [B, 77, clipL.width + clipG.width]: the UNet's cross-attention context. */
  readonly context: tf.Tensor3D;
  /** [B, clipG.projectionDim]: `text_embeds`, the start of the UNet's added-embedding input. */
  readonly pooled: tf.Tensor2D;
}

export interface NegativeOptions {
  /** SDXL base's model_index.json `force_zeros_for_empty_prompt` (true); false encodes "" when none is given. */
  readonly forceZerosForEmptyPrompt?: boolean;
}

/** Every key of SDXL's two text encoders, as the single file names them, with its PyTorch shape. */
export function sdxlTextShapes(cfg: SdxlTextConfig = SDXL_TEXT): Map<string, number[]> {
  return new Map([...expectedShapes(cfg.clipL, SDXL_TEXT_PREFIXES.clipL), ...openClipShapes(cfg.clipG, SDXL_TEXT_PREFIXES.clipG)]);
}

export class SdxlTextEncoder {
  /** Width of `context`: the UNet's cross-attention dim (2048). */
  readonly contextWidth: number;
  /** Width of `pooled` (1280). */
  readonly pooledWidth: number;

  constructor(
    /** Both of SDXL's tokenizers: the same vocabulary, padded differently. */
    readonly tokenizer: ClipTokenizer,
    readonly clipL: ClipTextEncoder,
    readonly clipG: ClipTextEncoder,
  ) {
    const { projectionDim } = clipG.cfg;
    if (projectionDim === undefined) throw new ConfigError('sdxl text: encoder G needs its text projection (projectionDim)');
    if (clipL.cfg.contextLength !== clipG.cfg.contextLength) {
      throw new ConfigError(`sdxl text: the encoders' context lengths differ (${clipL.cfg.contextLength} / ${clipG.cfg.contextLength})`);
    }
    this.contextWidth = clipL.cfg.width + clipG.cfg.width;
    this.pooledWidth = projectionDim;
  }

  /** Both encoders from an SDXL single file, every key and shape checked against cfg first. */
  /** `policy` 'streamed': each encoder's layers are built at each use (ClipTextEncoder.loadFrom). */
  static load(src: TensorSource, tokenizer: ClipTokenizer, cfg: SdxlTextConfig = SDXL_TEXT, policy: ResidencyPolicy = 'resident'): SdxlTextEncoder {
    const clipL = ClipTextEncoder.load(src, cfg.clipL, SDXL_TEXT_PREFIXES.clipL, policy);
    try {
      return new SdxlTextEncoder(tokenizer, clipL, loadOpenClipText(src, cfg.clipG, SDXL_TEXT_PREFIXES.clipG, policy));
    } catch (e) {
      clipL.dispose();
      throw e;
    }
  }

  /** The ids each encoder takes: [ids_L, ids_G], 77 per prompt. */
  tokenize(prompts: readonly string[]): [number[][], number[][]] {
    return [prompts.map((p) => this.tokenizer.encode(p)), prompts.map((p) => this.tokenizer.encode(p, { padId: OPEN_CLIP_PAD_ID }))];
  }

  encode(prompts: readonly string[]): SdxlTextEmbedding {
    const [l, g] = this.tokenize(prompts);
    const n = this.clipL.cfg.contextLength;
    const idsL = tf.tensor2d(l.flat(), [prompts.length, n], 'int32');
    const idsG = tf.tensor2d(g.flat(), [prompts.length, n], 'int32');
    try {
      return this.encodeIds(idsL, idsG);
    } finally {
      tf.dispose([idsL, idsG]);
    }
  }

  /** From token ids: int32 [B, 77] for each encoder (tokenize). */
  encodeIds(idsL: tf.Tensor2D, idsG: tf.Tensor2D): SdxlTextEmbedding {
    const l = this.clipL.forward(idsL);
    const g = this.clipG.forward(idsG, { pooled: true });
    const context = tf.concat([l.penultimate, g.penultimate], -1);
    const pooled = g.projected as tf.Tensor2D; // present: the constructor checked projectionDim
    tf.dispose([l.hidden, l.penultimate, g.hidden, g.penultimate, g.pooled as tf.Tensor2D]);
    return { context, pooled };
  }

  /**
   * The unconditional half for classifier-free guidance, `batch` rows: `negativePrompts` null means none was given
   * (then zeros, or "" encoded with forceZerosForEmptyPrompt false); else one negative prompt per row.
   */
  encodeNegative(
    negativePrompts: readonly string[] | null,
    batch: number,
    { forceZerosForEmptyPrompt = true }: NegativeOptions = {},
  ): SdxlTextEmbedding {
    if (negativePrompts !== null && negativePrompts.length !== batch) {
      throw new RangeError(`sdxl text: ${negativePrompts.length} negative prompts for a batch of ${batch}`);
    }
    if (negativePrompts === null && forceZerosForEmptyPrompt) {
      const n = this.clipL.cfg.contextLength;
      return { context: tf.zeros([batch, n, this.contextWidth]), pooled: tf.zeros([batch, this.pooledWidth]) };
    }
    return this.encode(negativePrompts ?? new Array<string>(batch).fill(''));
  }

  dispose(): void {
    this.clipL.dispose();
    this.clipG.dispose();
  }
}
