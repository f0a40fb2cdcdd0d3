/**
 * The A1111 settings this server has (`GET/POST /sdapi/v1/options`, `override_settings` of one request) and the
 * one model it serves (`/sdapi/v1/sd-models`).
 *
 * A POST of the whole dict a GET answered is accepted: every key is checked if it means something here, kept
 * and read back if it is one of ours, ignored otherwise (as A1111 ignores keys it has no setting for).
 * What acts on a generation: `sd_model_checkpoint` (only the loaded model may be named), `CLIP_stop_at_last_layers`
 * (clip skip), `randn_source` (CPU: torch's CPU generator; GPU/NV: the CUDA one, as A1111 draws its noise),
 * `samples_format` (png only).
 */
import * as path from 'node:path';
import { checkNumber, invalid, type Body } from './fields.js';

export interface ModelInfo {
  readonly title: string;
  readonly model_name: string;
  readonly hash: string | null;
  readonly sha256: string | null;
  readonly filename: string;
  readonly config: string | null;
}

/** The loaded weights as A1111 lists a checkpoint; no hash (A1111 too leaves it null until it has hashed the file). */
export function modelInfo(weights: string | null): ModelInfo {
  const file = weights ?? 'model.safetensors';
  const base = path.basename(file.replace(/[\\/]+$/, ''));
  return { title: base, model_name: base.replace(/\.(safetensors|ckpt|pt|pth|bin)$/i, ''), hash: null, sha256: null, filename: path.resolve(file), config: null };
}

/** The settings a generation reads. */
export interface Settings {
  readonly clipSkip: number;
  readonly noise: 'cpu' | 'gpu';
}

export class A1111Options {
  private readonly values: Record<string, unknown>;

  constructor(readonly model: ModelInfo) {
    this.values = {
      sd_model_checkpoint: model.title,
      sd_checkpoint_hash: model.sha256,
      sd_vae: 'Automatic',
      CLIP_stop_at_last_layers: 1,
      samples_format: 'png',
      grid_format: 'png',
      randn_source: 'CPU',
      eta_noise_seed_delta: 0,
      sd_lora: 'None',
      enable_pnginfo: true,
      save_images_add_number: true,
      samples_save: true,
      live_previews_enable: false,
      show_progress_every_n_steps: 0,
      face_restoration_model: null,
      upscaler_for_img2img: null,
    };
  }

  get all(): Record<string, unknown> {
    return { ...this.values };
  }

  /** POST /sdapi/v1/options: check every key first, then set them all (a bad value changes nothing). */
  set(body: Body): void {
    const checked = checkSettings(body, this.model, 'options');
    for (const [k, v] of Object.entries(checked)) if (k in this.values) this.values[k] = v;
  }

  /** The settings of one request: these options with its `override_settings` on top. */
  settingsFor(overrides: Body): Settings {
    const merged = { ...this.values, ...checkSettings(overrides, this.model, 'override_settings') };
    const rng = String(merged.randn_source).toUpperCase();
    return { clipSkip: Number(merged.CLIP_stop_at_last_layers), noise: rng === 'CPU' ? 'cpu' : 'gpu' };
  }
}

/** The keys that mean something here, checked (422 naming `<where>.<key>`); others passed through unchecked. */
function checkSettings(body: Body, model: ModelInfo, where: string): Record<string, unknown> {
  const out: Record<string, unknown> = { ...body };
  const field = (k: string): string => `${where}.${k}`;
  if (body.sd_model_checkpoint !== undefined && body.sd_model_checkpoint !== null) {
    const name = String(body.sd_model_checkpoint).replace(/\s*\[[0-9a-f]+\]$/i, '').trim();
    const known = [model.title, model.model_name, model.filename, path.basename(model.filename)];
    if (!known.includes(name)) throw invalid(field('sd_model_checkpoint'), `${JSON.stringify(body.sd_model_checkpoint)} is not loaded; this server has one model, ${model.title}`);
    out.sd_model_checkpoint = model.title;
  }
  if (body.CLIP_stop_at_last_layers !== undefined && body.CLIP_stop_at_last_layers !== null) {
    out.CLIP_stop_at_last_layers = checkNumber(field('CLIP_stop_at_last_layers'), body.CLIP_stop_at_last_layers, { integer: true, min: 1, max: 12 });
  }
  if (body.samples_format !== undefined && body.samples_format !== null && String(body.samples_format).toLowerCase() !== 'png') {
    throw invalid(field('samples_format'), `${JSON.stringify(body.samples_format)}: this server makes PNG images only`);
  }
  if (body.randn_source !== undefined && body.randn_source !== null) {
    const rng = String(body.randn_source).toUpperCase();
    if (!['CPU', 'GPU', 'NV'].includes(rng)) throw invalid(field('randn_source'), 'must be CPU, GPU or NV');
    out.randn_source = rng;
  }
  return out;
}
