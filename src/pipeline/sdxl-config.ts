/**
 * SDXL base 1.0's pipeline configuration (Stability's sd_xl_base.yaml), and its translation from the fixtures'
 * `--config` JSON: `{text_encoder, text_encoder_2 (HF CLIPTextConfig names), unet, vae (sgm / LDM names),
 * scale_factor, width, height}`.
 */
import { SDXL_TEXT, type SdxlTextConfig } from '../clip/sdxl-text.js';
import { clipConfigFromHf } from '../clip/config.js';
import { ConfigError } from '../nn/errors.js';
import { unetConfigFromLdm, validateConfig, type LdmUNetParams, type UNetConfig } from '../unet/index.js';
import { SD15_VAE, vaeConfigFromLdm, type VaeConfig } from '../vae/index.js';
import { SDXL_TIME_EMBED_DIM } from './conditioning.js';
import { DIFFUSERS_CONVENTIONS, type SamplerConventions } from '../scheduler/index.js';

export interface SdxlPipelineConfig {
  readonly family: 'sdxl';
  readonly text: SdxlTextConfig;
  readonly unet: UNetConfig;
  readonly vae: VaeConfig;
  /** sgm `scale_factor`: SDXL's VAE latents are scaled by 0.13025, not SD 1.x's 0.18215. */
  readonly scaleFactor: number;
  /** Fourier features per size / crop number in the added embedding (sgm ConcatTimestepEmbedderND outdim). */
  readonly timeEmbedDim: number;
  readonly width: number;
  readonly height: number;
  /**
   * Whose sampler semantics a seed reproduces by default: diffusers' (leading timesteps, the start scaled by
   * sqrt(sigma_0^2 + 1), rounded Karras timesteps), as SDXL base's scheduler_config.json and the reference fixture.
   */
  readonly conventions: SamplerConventions;
}

/** sd_xl_base.yaml's network_config: 2,567,463,684 parameters. */
export const SDXL_BASE_UNET: UNetConfig = validateConfig({
  inChannels: 4,
  outChannels: 4,
  modelChannels: 320,
  channelMult: Object.freeze([1, 2, 4]),
  numResBlocks: 2,
  transformerDepth: Object.freeze([0, 2, 10]),
  middleTransformerDepth: 10,
  heads: Object.freeze({ width: 64 }),
  projection: 'linear',
  contextDim: 2048,
  addedEmbeddingDim: 2816, // 1280 pooled + 6 * 256
});

export const SDXL_BASE_PIPELINE: SdxlPipelineConfig = Object.freeze({
  family: 'sdxl',
  text: SDXL_TEXT,
  unet: SDXL_BASE_UNET,
  vae: SD15_VAE, // the same KL-f8 autoencoder shape
  scaleFactor: 0.13025,
  timeEmbedDim: SDXL_TIME_EMBED_DIM,
  width: 1024,
  height: 1024,
  conventions: DIFFUSERS_CONVENTIONS,
});

/** The fixtures' SDXL config format (see the header); missing sections take SDXL base's. */
export function sdxlConfigFromJson(json: unknown, where = 'sdxl config'): SdxlPipelineConfig {
  if (typeof json !== 'object' || json === null) throw new ConfigError(`${where}: expected a JSON object`);
  const j = ('config' in json && typeof json.config === 'object' ? json.config : json) as Record<string, unknown>;
  const number = (field: string, fallback: number): number => {
    const v = j[field] ?? fallback;
    if (typeof v !== 'number' || !(v > 0)) throw new ConfigError(`${where}: "${field}" must be a positive number, got ${JSON.stringify(v)}`);
    return v;
  };
  const unet = j.unet as (LdmUNetParams & { addition_time_embed_dim?: number }) | undefined;
  const width = number('width', SDXL_BASE_PIPELINE.width);
  const height = number('height', SDXL_BASE_PIPELINE.height);
  if (width % 8 !== 0 || height % 8 !== 0) throw new ConfigError(`${where}: width and height must be multiples of 8`);
  return Object.freeze({
    family: 'sdxl',
    text: Object.freeze({
      clipL: clipConfigFromHf(`${where}: "text_encoder"`, j.text_encoder, SDXL_TEXT.clipL),
      clipG: clipConfigFromHf(`${where}: "text_encoder_2"`, j.text_encoder_2, SDXL_TEXT.clipG),
    }),
    unet: unet === undefined ? SDXL_BASE_UNET : unetConfigFromLdm(unet),
    vae: j.vae === undefined ? SDXL_BASE_PIPELINE.vae : vaeConfigFromLdm(j.vae),
    scaleFactor: number('scale_factor', SDXL_BASE_PIPELINE.scaleFactor),
    timeEmbedDim: unet?.addition_time_embed_dim ?? SDXL_TIME_EMBED_DIM,
    width,
    height,
    conventions: SDXL_BASE_PIPELINE.conventions,
  });
}
