/**
 * The pipeline's configuration: the three networks' configs, the VAE latent scale and the native image size,
 * with SD 1.5's values as the default. Foreign formats are translated in exactly one function,
 * `pipelineConfigFromLdm` (the fixtures' / `--config` JSON: `{clip, unet, vae, scale_factor, width?, height?}`
 * with LDM yaml parameter names), and a checkpoint is checked against a config before anything is loaded, so a
 * tiny or SD 2.x checkpoint fails with one sentence saying what differs and what to do.
 */
import { readFileSync } from 'node:fs';
import { SD15_CLIP, clipConfigFromLdm, expectedShapes as clipShapes, type ClipConfig } from '../clip/index.js';
import { SD15_UNET, unetConfigFromLdm, expectedShapes as unetShapes, type UNetConfig } from '../unet/index.js';
import { SD15_VAE, vaeConfigFromLdm, expectedShapes as vaeShapes, type VaeConfig } from '../vae/index.js';
import { ConfigError } from '../nn/errors.js';
import { SD1_PREFIXES } from '../weights/layout.js';
import type { TensorSource } from '../weights/types.js';
import { sdxlConfigFromJson, type SdxlPipelineConfig } from './sdxl-config.js';
import type { ModelFamily } from './families.js';

export { ConfigError };

export interface PipelineConfig {
  readonly clip: ClipConfig;
  readonly unet: UNetConfig;
  readonly vae: VaeConfig;
  /** LDM v1-inference.yaml `scale_factor`: brings VAE latents to roughly unit variance. */
  readonly scaleFactor: number;
  /** The size the model was trained at, the default of width/height. */
  readonly width: number;
  readonly height: number;
}

/** The configuration of any family the pipeline runs: SD 1.x (no `family` field) or SDXL. */
export type AnyPipelineConfig = PipelineConfig | SdxlPipelineConfig;

export const familyOf = (cfg: AnyPipelineConfig): ModelFamily => ('family' in cfg ? cfg.family : 'sd1');

export const SD15_PIPELINE: PipelineConfig = Object.freeze({
  clip: SD15_CLIP,
  unet: SD15_UNET,
  vae: SD15_VAE,
  scaleFactor: 0.18215,
  width: 512,
  height: 512,
});

const { unet: UNET, vae: VAE, textEncoder: TEXT } = SD1_PREFIXES;

/** Runs one network's translator, turning whatever it throws into a ConfigError that names the section. */
function section<T>(where: string, name: string, json: unknown, translate: (j: never) => T, fallback: T): T {
  if (json === undefined) return fallback;
  if (typeof json !== 'object' || json === null) throw new ConfigError(`${where}: "${name}" must be an object`);
  try {
    return translate(json as never);
  } catch (e) {
    throw new ConfigError(`${where}: "${name}": ${e instanceof Error ? e.message : String(e)}`);
  }
}

function positive(where: string, j: Record<string, unknown>, field: string, fallback: number): number {
  const v = j[field] ?? fallback;
  if (typeof v !== 'number' || !(v > 0)) throw new ConfigError(`${where}: "${field}" must be a positive number, got ${JSON.stringify(j[field])}`);
  return v;
}

/** `{clip, unet, vae, scale_factor, width?, height?}` (LDM parameter names; missing sections take SD 1.5's). */
export function pipelineConfigFromLdm(json: unknown, where = 'pipeline config'): PipelineConfig {
  if (typeof json !== 'object' || json === null) throw new ConfigError(`${where}: expected a JSON object`);
  // The fixtures nest the config under "config" next to their cases; accept that file as it is.
  const j = ('config' in json && typeof json.config === 'object' ? json.config : json) as Record<string, unknown>;
  const width = positive(where, j, 'width', SD15_PIPELINE.width);
  const height = positive(where, j, 'height', SD15_PIPELINE.height);
  if (width % 8 !== 0 || height % 8 !== 0) throw new ConfigError(`${where}: width and height must be multiples of 8`);
  return Object.freeze({
    clip: section(where, 'clip', j.clip, clipConfigFromLdm, SD15_CLIP),
    unet: section(where, 'unet', j.unet, unetConfigFromLdm, SD15_UNET),
    vae: section(where, 'vae', j.vae, vaeConfigFromLdm, SD15_VAE),
    scaleFactor: positive(where, j, 'scale_factor', SD15_PIPELINE.scaleFactor),
    width,
    height,
  });
}

/** A `--config` file: SD 1.x's format (pipelineConfigFromLdm) or SDXL's (sdxlConfigFromJson). */
export function readPipelineConfig(path: string): AnyPipelineConfig {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    throw new ConfigError(`${path}: cannot read the config (${(e as NodeJS.ErrnoException).code ?? String(e)})`);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new ConfigError(`${path}: not JSON (${e instanceof Error ? e.message : String(e)})`);
  }
  const j = (typeof json === 'object' && json !== null && 'config' in json ? json.config : json) as Record<string, unknown> | null;
  // SDXL's two text encoders make its format: `text_encoder_2` (sdxl-config.ts)
  return typeof j === 'object' && j !== null && 'text_encoder_2' in j ? sdxlConfigFromJson(json, path) : pipelineConfigFromLdm(json, path);
}

/** The few tensors whose shapes say, in words, which part of a config differs: [what, key, dimension]. */
const HEADLINES: readonly [string, string, number][] = [
  ['text encoder width', `${TEXT}.embeddings.token_embedding.weight`, 1],
  ['text encoder vocabulary', `${TEXT}.embeddings.token_embedding.weight`, 0],
  ['unet width (model_channels)', `${UNET}.input_blocks.0.0.weight`, 0],
  ['unet latent channels', `${UNET}.input_blocks.0.0.weight`, 1],
  ['unet context width (context_dim)', `${UNET}.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight`, 1],
  ['vae width (ch)', `${VAE}.encoder.conv_in.weight`, 0],
  ['vae latent channels (z_channels)', `${VAE}.post_quant_conv.weight`, 0],
];

const fix = 'pass --config FILE with the checkpoint\'s config (format: tests/fixtures/pipeline/fixture.json "config")';

function countLayers(src: TensorSource): number {
  const re = new RegExp(`^${TEXT.replace(/\./g, '\\.')}\\.encoder\\.layers\\.(\\d+)\\.`);
  let n = 0;
  for (const k of src.keys()) {
    const m = re.exec(k);
    if (m !== null) n = Math.max(n, Number(m[1]) + 1);
  }
  return n;
}

/**
 * SD 1.x (families.ts tells the families apart first): every tensor the three networks will read must exist with
 * the shape the config implies. Throws one
 * ConfigError: the first headline difference in words ("checkpoint has unet width 32 but the config says 320"),
 * else the list of differing keys. Unexpected extra keys are left to each network's own load check.
 */
export function checkCheckpointFits(src: TensorSource, cfg: PipelineConfig): void {
  const expected = new Map([...clipShapes(cfg.clip, TEXT), ...unetShapes(cfg.unet, UNET), ...vaeShapes(cfg.vae, VAE)]);
  for (const [what, key, dim] of HEADLINES) {
    const want = expected.get(key);
    if (want === undefined || !src.has(key)) continue;
    const got = src.info(key).shape[dim];
    if (got !== want[dim]) throw new ConfigError(`${src.path}: checkpoint has ${what} ${got} but the config says ${want[dim]}: ${fix}`);
  }
  const layers = countLayers(src);
  if (layers > 0 && layers !== cfg.clip.layers) {
    throw new ConfigError(`${src.path}: checkpoint has ${layers} text encoder layers but the config says ${cfg.clip.layers}: ${fix}`);
  }
  const problems: string[] = [];
  for (const [key, shape] of expected) {
    if (!src.has(key)) problems.push(`missing ${key}`);
    else if (src.info(key).shape.join(',') !== shape.join(',')) problems.push(`${key} is [${src.info(key).shape.join(', ')}], the config says [${shape.join(', ')}]`);
  }
  if (problems.length === 0) return;
  const more = problems.length > 5 ? ` and ${problems.length - 5} more` : '';
  const missingAll = problems.length === expected.size;
  const hint = missingAll ? 'is this a Stable Diffusion 1.x checkpoint with the original key names?' : fix;
  throw new ConfigError(`${src.path}: ${problems.slice(0, 5).join('; ')}${more}: ${hint}`);
}
