/**
 * A diffusers folder describes itself: `unet/config.json` (UNet2DConditionModel), `vae/config.json` (AutoencoderKL,
 * with its `scaling_factor`), `text_encoder/config.json` (and SDXL's `text_encoder_2/`, transformers'
 * CLIPTextConfig). This reads them into the pipeline's config, so a folder of any size loads without `--config`;
 * a component without its config.json takes the family default's part. Each name translation lives with its
 * network (unet/diffusers-config.ts, vae/config.ts, clip/config.ts); this module only puts the parts together.
 */
import { existsSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { SD15_CLIP } from '../clip/index.js';
import { clipConfigFromHf } from '../clip/config.js';
import { ConfigError } from '../nn/errors.js';
import { unetConfigFromDiffusers, type DiffusersUNetJson, type UNetConfig } from '../unet/index.js';
import { downsampleFactor, type VaeConfig } from '../vae/index.js';
import { vaeConfigFromDiffusers } from '../vae/config.js';
import { SD15_PIPELINE, type AnyPipelineConfig, type PipelineConfig } from './config.js';
import type { ModelFamily } from './families.js';
import { SDXL_BASE_PIPELINE, type SdxlPipelineConfig } from './sdxl-config.js';

type Json = Record<string, unknown>;

/** `<dir>/<component>/config.json` as an object, or undefined where the folder has none. */
function readComponent(dir: string, component: string): Json | undefined {
  const path = join(dir, component, 'config.json');
  if (!existsSync(path)) return undefined;
  let json: unknown;
  try {
    json = JSON.parse(readFileSync(path, 'utf8'));
  } catch (e) {
    throw new ConfigError(`${path}: not a readable JSON config (${e instanceof Error ? e.message : String(e)})`);
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json)) throw new ConfigError(`${path}: expected a JSON object`);
  return json as Json;
}

function positiveNumber(json: Json | undefined, field: string, fallback: number, where: string): number {
  const v = json?.[field] ?? fallback;
  if (typeof v !== 'number' || !(v > 0)) throw new ConfigError(`${where}: "${field}" must be a positive number, got ${JSON.stringify(v)}`);
  return v;
}

interface Parts {
  readonly unet: UNetConfig;
  readonly vae: VaeConfig;
  readonly scaleFactor: number;
  readonly width: number;
  readonly height: number;
}

/** The UNet and VAE parts, and the native size: the UNet's sample_size latents, times the VAE's downsampling. */
function imageParts(dir: string, fallback: AnyPipelineConfig): Parts {
  const unetJson = readComponent(dir, 'unet');
  const vaeJson = readComponent(dir, 'vae');
  const where = (c: string) => join(dir, c, 'config.json');
  const unet = unetJson === undefined ? fallback.unet : unetConfigFromDiffusers(unetJson as DiffusersUNetJson, where('unet'));
  const vae = vaeJson === undefined ? fallback.vae : vaeConfigFromDiffusers(vaeJson, where('vae'));
  const sample = unetJson?.sample_size;
  const size = typeof sample === 'number' && Number.isInteger(sample) && sample > 0 ? sample * downsampleFactor(vae) : null;
  return {
    unet,
    vae,
    scaleFactor: positiveNumber(vaeJson, 'scaling_factor', fallback.scaleFactor, where('vae')),
    width: size ?? fallback.width,
    height: size ?? fallback.height,
  };
}

/**
 * The pipeline config a diffusers folder's config.json files give, for the family its keys showed; null when
 * `weights` is not a folder with unet/config.json (a single file: the family default, or --config).
 */
export function diffusersFolderConfig(weights: string, family: ModelFamily): AnyPipelineConfig | null {
  if (!existsSync(weights) || !statSync(weights).isDirectory() || !existsSync(join(weights, 'unet', 'config.json'))) return null;
  const text = (c: string) => [join(weights, c, 'config.json'), readComponent(weights, c)] as const;
  if (family === 'sdxl') {
    const base = SDXL_BASE_PIPELINE;
    const unetJson = readComponent(weights, 'unet');
    const [w1, te1] = text('text_encoder');
    const [w2, te2] = text('text_encoder_2');
    const config: SdxlPipelineConfig = {
      family: 'sdxl',
      text: { clipL: clipConfigFromHf(w1, te1, base.text.clipL), clipG: clipConfigFromHf(w2, te2, base.text.clipG) },
      ...imageParts(weights, base),
      timeEmbedDim: positiveNumber(unetJson, 'addition_time_embed_dim', base.timeEmbedDim, join(weights, 'unet', 'config.json')),
      conventions: base.conventions,
    };
    return Object.freeze(config);
  }
  const [w, te] = text('text_encoder');
  const config: PipelineConfig = { clip: clipConfigFromHf(w, te, SD15_CLIP), ...imageParts(weights, SD15_PIPELINE) };
  return Object.freeze(config);
}
