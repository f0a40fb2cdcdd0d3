/**
 * The A1111 settings this server has (`GET/POST /sdapi/v1/options`, `override_settings` of one request) and the
 * checkpoints it serves (`/sdapi/v1/sd-models`: the loaded model, or in queue mode those the workers announce).
 *
 * A POST of the whole dict a GET answered is accepted: every key is checked if it means something here, kept
 * and read back if it is one of ours, ignored otherwise (as A1111 ignores keys it has no setting for).
 * What acts on a generation: `sd_model_checkpoint` (one of the checkpoints, ../checkpoints.ts: posted to options it
 * is the model of later requests, as A1111 loads it; in override_settings that request's), `CLIP_stop_at_last_layers`
 * (clip skip), `randn_source` (CPU: torch's CPU generator; GPU/NV: the CUDA one, as A1111 draws its noise),
 * `pad_cond_uncond` (pad the prompt and the negative prompt to one length and run them as one batch),
 * `samples_format` (png only).
 */
import { findCheckpoint, type ModelInfo } from '../checkpoints.js';
import { bool, checkNumber, invalid, type Body } from './fields.js';

export { modelInfo, type ModelInfo } from '../checkpoints.js';

/** The checkpoints there are now (the server: one loaded model, or the workers' announcements). */
export interface CheckpointHost {
  checkpoints(): readonly ModelInfo[];
  defaultCheckpoint(): ModelInfo | null;
  /** What there is, for a message: "this server has one model, X" or "the workers announce: X, Y". */
  describeCheckpoints(): string;
}

/** The checkpoint a generation asked for, and the field that named it (for the message when it is gone). */
export interface AskedCheckpoint {
  readonly title: string;
  readonly field: string;
}

/** The settings a generation reads. */
export interface Settings {
  readonly clipSkip: number;
  readonly noise: 'cpu' | 'gpu';
  /** A1111's "Pad prompt/negative prompt to be same length". */
  readonly padCondUncond: boolean;
  /** null: the server's default model. */
  readonly checkpoint: AskedCheckpoint | null;
}

export class A1111Options {
  private readonly values: Record<string, unknown>;
  /** POST /options' sd_model_checkpoint: the model of later requests; null: the server's default. */
  private chosen: string | null = null;

  constructor(private readonly models: CheckpointHost) {
    this.values = {
      sd_vae: 'Automatic',
      CLIP_stop_at_last_layers: 1,
      samples_format: 'png',
      grid_format: 'png',
      randn_source: 'CPU',
      pad_cond_uncond: false,
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

  /** The checkpoint later requests run on (the one chosen, else the server's default); null when none is known yet. */
  current(): ModelInfo | null {
    const chosen = this.chosen !== null ? findCheckpoint(this.chosen, this.models.checkpoints()) : null;
    return chosen ?? this.models.defaultCheckpoint();
  }

  get all(): Record<string, unknown> {
    const m = this.current();
    return { ...this.values, sd_model_checkpoint: this.chosen ?? m?.title ?? null, sd_checkpoint_hash: m?.sha256 ?? null };
  }

  /** POST /sdapi/v1/options: check every key first, then set them all (a bad value changes nothing). */
  set(body: Body): void {
    const checked = checkSettings(body, this.models, 'options');
    for (const [k, v] of Object.entries(checked)) if (k in this.values) this.values[k] = v;
    if (typeof checked.sd_model_checkpoint === 'string') this.chosen = checked.sd_model_checkpoint;
  }

  /** The settings of one request: these options with its `override_settings` on top. */
  settingsFor(overrides: Body): Settings {
    const checked = checkSettings(overrides, this.models, 'override_settings');
    const merged = { ...this.values, ...checked };
    const rng = String(merged.randn_source).toUpperCase();
    const checkpoint =
      typeof checked.sd_model_checkpoint === 'string'
        ? { title: checked.sd_model_checkpoint, field: 'override_settings.sd_model_checkpoint' }
        : this.chosen !== null
          ? { title: this.chosen, field: 'sd_model_checkpoint (set by POST /sdapi/v1/options)' }
          : null;
    return { clipSkip: Number(merged.CLIP_stop_at_last_layers), noise: rng === 'CPU' ? 'cpu' : 'gpu', padCondUncond: merged.pad_cond_uncond === true, checkpoint };
  }
}

/** The keys that mean something here, checked (422 naming `<where>.<key>`); others passed through unchecked. */
function checkSettings(body: Body, models: CheckpointHost, where: string): Record<string, unknown> {
  const out: Record<string, unknown> = { ...body };
  const field = (k: string): string => `${where}.${k}`;
  if (body.sd_model_checkpoint !== undefined && body.sd_model_checkpoint !== null) {
    if (typeof body.sd_model_checkpoint !== 'string') throw invalid(field('sd_model_checkpoint'), `must be a string (a title from GET /sdapi/v1/sd-models), got ${JSON.stringify(body.sd_model_checkpoint)}`);
    const found = findCheckpoint(body.sd_model_checkpoint, models.checkpoints());
    if (found === null) throw invalid(field('sd_model_checkpoint'), `${JSON.stringify(body.sd_model_checkpoint)} is not loaded; ${models.describeCheckpoints()}`);
    out.sd_model_checkpoint = found.title;
  }
  if (body.CLIP_stop_at_last_layers !== undefined && body.CLIP_stop_at_last_layers !== null) {
    out.CLIP_stop_at_last_layers = checkNumber(field('CLIP_stop_at_last_layers'), body.CLIP_stop_at_last_layers, { integer: true, min: 1, max: 12 });
  }
  if (body.samples_format !== undefined && body.samples_format !== null && String(body.samples_format).toLowerCase() !== 'png') {
    throw invalid(field('samples_format'), `${JSON.stringify(body.samples_format)}: this server makes PNG images only`);
  }
  if (body.pad_cond_uncond !== undefined && body.pad_cond_uncond !== null) {
    out.pad_cond_uncond = bool({ [field('pad_cond_uncond')]: body.pad_cond_uncond }, field('pad_cond_uncond'), false);
  }
  if (body.randn_source !== undefined && body.randn_source !== null) {
    const rng = String(body.randn_source).toUpperCase();
    if (!['CPU', 'GPU', 'NV'].includes(rng)) throw invalid(field('randn_source'), 'must be CPU, GPU or NV');
    out.randn_source = rng;
  }
  return out;
}
