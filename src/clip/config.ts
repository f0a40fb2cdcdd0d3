/**
 * The CLIP text encoder's configuration: SD 1.x uses OpenAI CLIP ViT-L/14's text tower; SDXL that one and
 * OpenCLIP ViT-bigG/14's, whose pooled feature it projects.
 */
import { ConfigError } from '../nn/errors.js';

export interface ClipConfig {
  readonly vocabSize: number; // byte-level BPE vocabulary incl. <|startoftext|>, <|endoftext|>
  readonly width: number; // hidden size; the UNet's cross-attention context width
  readonly layers: number;
  readonly heads: number;
  readonly contextLength: number; // token positions: 75 text tokens + start + end
  readonly mlpWidth: number; // 4 * width in CLIP
  readonly layerNormEps: number;
  readonly act: 'quick_gelu' | 'gelu'; // OpenAI CLIP was trained with QuickGELU, OpenCLIP with the exact GELU
  /** Width of the text projection of the pooled feature (open_clip `text_projection`); absent: none is loaded. */
  readonly projectionDim?: number;
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

/** SDXL's first text encoder: the same CLIP ViT-L/14 (its pooled feature is not used). */
export const SDXL_CLIP_L: ClipConfig = SD15_CLIP;

/** SDXL's second text encoder: OpenCLIP ViT-bigG/14's text tower (laion2b), 694M parameters. */
export const SDXL_CLIP_G: ClipConfig = Object.freeze({
  vocabSize: 49408,
  width: 1280,
  layers: 32,
  heads: 20,
  contextLength: 77,
  mlpWidth: 5120,
  layerNormEps: 1e-5,
  act: 'gelu',
  projectionDim: 1280,
});

function positiveInt(json: Record<string, unknown>, field: string, fallback?: number): number {
  const v = json[field] ?? fallback;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 1) {
    throw new ConfigError(`clip config: "${field}" must be a positive integer, got ${JSON.stringify(json[field])}`);
  }
  return v;
}

/**
 * The fixtures' config format `{vocab, width, layers, heads, ctx, mlp?, act?, layer_norm_eps?, projection_dim?}`
 * -> ClipConfig. mlp defaults to 4 * width, act to quick_gelu, layer_norm_eps to 1e-5; no projection_dim, no projection.
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
    ...(j.projection_dim === undefined ? {} : { projectionDim: positiveInt(j, 'projection_dim') }),
  });
}

/**
 * HF CLIPTextConfig names (diffusers' text_encoder/config.json, and the fixtures' SDXL configs) -> ClipConfig;
 * fields left out take `fallback`'s. `act` (the fixtures) or `hidden_act` (transformers).
 */
export function clipConfigFromHf(where: string, json: unknown, fallback: ClipConfig): ClipConfig {
  if (json === undefined) return fallback;
  if (typeof json !== 'object' || json === null) throw new ConfigError(`${where}: expected an object`);
  const j = json as Record<string, unknown>;
  const int = (field: string, v: unknown): number => {
    if (typeof v !== 'number' || !Number.isInteger(v) || v < 1) throw new ConfigError(`${where}: "${field}" must be a positive integer, got ${JSON.stringify(v)}`);
    return v;
  };
  const act = j.act ?? j.hidden_act ?? fallback.act;
  if (act !== 'quick_gelu' && act !== 'gelu') throw new ConfigError(`${where}: "act" must be "quick_gelu" or "gelu", got ${JSON.stringify(act)}`);
  const width = int('hidden_size', j.hidden_size ?? fallback.width);
  const heads = int('num_attention_heads', j.num_attention_heads ?? fallback.heads);
  if (width % heads !== 0) throw new ConfigError(`${where}: hidden_size ${width} must be a multiple of num_attention_heads ${heads}`);
  // transformers writes projection_dim into every CLIPTextConfig; only a CLIPTextModelWithProjection (SDXL's
  // second encoder: the role's default has one) has the text_projection it sizes
  const architectures = Array.isArray(j.architectures) ? j.architectures : [];
  const projected = fallback.projectionDim !== undefined || architectures.includes('CLIPTextModelWithProjection');
  const projection = projected ? (j.projection_dim ?? fallback.projectionDim) : undefined;
  return Object.freeze({
    vocabSize: int('vocab_size', j.vocab_size ?? fallback.vocabSize),
    width,
    layers: int('num_hidden_layers', j.num_hidden_layers ?? fallback.layers),
    heads,
    contextLength: int('max_position_embeddings', j.max_position_embeddings ?? fallback.contextLength),
    mlpWidth: int('intermediate_size', j.intermediate_size ?? fallback.mlpWidth),
    layerNormEps: typeof j.layer_norm_eps === 'number' ? j.layer_norm_eps : fallback.layerNormEps,
    act,
    ...(projection === undefined ? {} : { projectionDim: int('projection_dim', projection) }),
  });
}
