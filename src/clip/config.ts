/**
 * The CLIP text encoder's configuration: SD 1.x uses OpenAI CLIP ViT-L/14's text tower, and every key it reads
 * from a checkpoint with its PyTorch shape (for config-vs-checkpoint checks and generated weights).
 */
import { ConfigError } from '../nn/weight-view.js';

export interface ClipConfig {
  readonly vocabSize: number; // byte-level BPE vocabulary incl. <|startoftext|>, <|endoftext|>
  readonly width: number; // hidden size; the UNet's cross-attention context width
  readonly layers: number;
  readonly heads: number;
  readonly contextLength: number; // token positions: 75 text tokens + start + end
  readonly mlpWidth: number; // 4 * width in CLIP
  readonly layerNormEps: number;
  readonly act: 'quick_gelu' | 'gelu'; // OpenAI CLIP was trained with QuickGELU
}

/** CLIP ViT-L/14 text encoder, as in every SD 1.x checkpoint. */
export const SD15_CLIP: ClipConfig = Object.freeze({
  vocabSize: 49408,
  width: 768,
  layers: 12,
  heads: 12,
  contextLength: 77,
  mlpWidth: 3072,
  layerNormEps: 1e-5,
  act: 'quick_gelu',
});

/** Where the text encoder lives in an original single-file SD 1.x checkpoint. */
export const CLIP_PREFIX = 'cond_stage_model.transformer.text_model';

function positiveInt(json: Record<string, unknown>, field: string, fallback?: number): number {
  const v = json[field] ?? fallback;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 1) {
    throw new ConfigError(`clip config: "${field}" must be a positive integer, got ${JSON.stringify(json[field])}`);
  }
  return v;
}

/**
 * The fixtures' config format `{vocab, width, layers, heads, ctx, mlp?, act?, layer_norm_eps?}` -> ClipConfig.
 * mlp defaults to 4 * width, act to quick_gelu, layer_norm_eps to 1e-5.
 */
export function clipConfigFromLdm(json: unknown): ClipConfig {
  if (typeof json !== 'object' || json === null) throw new ConfigError('clip config: expected a JSON object');
  const j = json as Record<string, unknown>;
  const width = positiveInt(j, 'width');
  const heads = positiveInt(j, 'heads');
  if (width % heads !== 0) throw new ConfigError(`clip config: width ${width} must be a multiple of heads ${heads}`);
  const act = j.act ?? 'quick_gelu';
  if (act !== 'quick_gelu' && act !== 'gelu') {
    throw new ConfigError(`clip config: "act" must be "quick_gelu" or "gelu", got ${JSON.stringify(act)}`);
  }
  const eps = j.layer_norm_eps ?? 1e-5;
  if (typeof eps !== 'number' || !(eps > 0)) throw new ConfigError(`clip config: "layer_norm_eps" must be a positive number`);
  return Object.freeze({
    vocabSize: positiveInt(j, 'vocab'),
    width,
    layers: positiveInt(j, 'layers'),
    heads,
    contextLength: positiveInt(j, 'ctx'),
    mlpWidth: positiveInt(j, 'mlp', 4 * width),
    layerNormEps: eps,
    act,
  });
}

/** Every checkpoint key the encoder reads, with its PyTorch shape. (`embeddings.position_ids`, an int64 buffer, is not read.) */
export function expectedShapes(cfg: ClipConfig = SD15_CLIP, prefix = CLIP_PREFIX): Map<string, number[]> {
  const w = cfg.width;
  const m = new Map<string, number[]>();
  const at = (name: string) => (prefix === '' ? name : `${prefix}.${name}`);
  m.set(at('embeddings.token_embedding.weight'), [cfg.vocabSize, w]);
  m.set(at('embeddings.position_embedding.weight'), [cfg.contextLength, w]);
  for (let i = 0; i < cfg.layers; i++) {
    const l = `encoder.layers.${i}`;
    for (const proj of ['q_proj', 'k_proj', 'v_proj', 'out_proj']) {
      m.set(at(`${l}.self_attn.${proj}.weight`), [w, w]);
      m.set(at(`${l}.self_attn.${proj}.bias`), [w]);
    }
    for (const ln of ['layer_norm1', 'layer_norm2']) {
      m.set(at(`${l}.${ln}.weight`), [w]);
      m.set(at(`${l}.${ln}.bias`), [w]);
    }
    m.set(at(`${l}.mlp.fc1.weight`), [cfg.mlpWidth, w]);
    m.set(at(`${l}.mlp.fc1.bias`), [cfg.mlpWidth]);
    m.set(at(`${l}.mlp.fc2.weight`), [w, cfg.mlpWidth]);
    m.set(at(`${l}.mlp.fc2.bias`), [w]);
  }
  m.set(at('final_layer_norm.weight'), [w]);
  m.set(at('final_layer_norm.bias'), [w]);
  return m;
}
