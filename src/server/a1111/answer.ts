/**
 * The answer of txt2img and img2img as A1111 gives it: `{images, parameters, info}`.
 *
 * `images` are bare base64 PNGs (no `data:` prefix), each with its `parameters` text chunk; `parameters` echoes the
 * request with A1111's defaults filled in (only A1111's own fields: extras a client sent, such as SillyTavern's
 * `url` and `auth`, are not echoed, and init images and mask only with `include_init_images`); `info` is a JSON
 * string (clients call json.loads on it) with the seeds, prompts and infotexts of the images.
 */
import { readPngParameters } from '../../image/codec.js';
import type { InferenceResult } from '../work.js';
import type { Body } from './fields.js';
import type { ModelInfo, Settings } from './options.js';
import { timestamp } from './progress.js';
import { imageCount, imageSeed, type A1111Generation } from './request.js';

/** The fields of modules/api/models.py's processing models, with their defaults (extensions' fields left out). */
const COMMON_DEFAULTS = Object.freeze({
  prompt: '', negative_prompt: '', styles: null, seed: -1, subseed: -1, subseed_strength: 0, seed_resize_from_h: -1,
  seed_resize_from_w: -1, sampler_name: null, scheduler: null, batch_size: 1, n_iter: 1, steps: 50, cfg_scale: 7,
  width: 512, height: 512, restore_faces: null, tiling: null, do_not_save_samples: false, do_not_save_grid: false,
  eta: null, denoising_strength: null, s_min_uncond: null, s_churn: null, s_tmax: null, s_tmin: null, s_noise: null,
  override_settings: null, override_settings_restore_afterwards: true, refiner_checkpoint: null, refiner_switch_at: null,
  disable_extra_networks: false, comments: null, sampler_index: 'Euler', script_name: null, script_args: [],
  send_images: true, save_images: false, alwayson_scripts: {}, infotext: null,
});

const TXT2IMG_DEFAULTS = Object.freeze({
  ...COMMON_DEFAULTS, enable_hr: false, firstphase_width: 0, firstphase_height: 0, hr_scale: 2, hr_upscaler: null,
  hr_second_pass_steps: 0, hr_resize_x: 0, hr_resize_y: 0, hr_checkpoint_name: null, hr_sampler_name: null,
  hr_scheduler: null, hr_prompt: '', hr_negative_prompt: '', firstpass_image: null, force_task_id: null,
});

const IMG2IMG_DEFAULTS = Object.freeze({
  ...COMMON_DEFAULTS, init_images: null, resize_mode: 0, image_cfg_scale: null, mask: null, mask_blur_x: 4, mask_blur_y: 4,
  mask_blur: null, mask_round: true, inpainting_fill: 0, inpaint_full_res: true, inpaint_full_res_padding: 0,
  inpainting_mask_invert: 0, initial_noise_multiplier: null, latent_mask: null, denoising_strength: 0.75,
  include_init_images: false, force_task_id: null,
});

/** `parameters` of the answer: the request over A1111's defaults, A1111's fields only. */
export function echoRequest(body: Body, g: A1111Generation): Record<string, unknown> {
  const defaults: Readonly<Record<string, unknown>> = g.mode === 'txt2img' ? TXT2IMG_DEFAULTS : IMG2IMG_DEFAULTS;
  const out: Record<string, unknown> = { ...defaults };
  for (const k of Object.keys(defaults)) if (body[k] !== undefined) out[k] = body[k];
  if (g.mode === 'img2img' && !g.includeInitImages) {
    out.init_images = null;
    out.mask = null;
  }
  return out;
}

export interface Made {
  readonly results: readonly InferenceResult[];
  readonly settings: Settings;
  readonly model: ModelInfo;
  readonly startedAt: Date;
  /** Images the request asked for that were not made (interrupted or skipped). */
  readonly missing: number;
}

/** `info` before JSON.stringify: A1111's Processed.js() fields. */
export function infoOf(g: A1111Generation, m: Made): Record<string, unknown> {
  const n = imageCount(g);
  const seeds = Array.from({ length: n }, (_, i) => imageSeed(g, i));
  const infotexts = m.results.map((r) => readPngParameters(Buffer.from(r.image, 'base64')) ?? '');
  const warnings = [...(g.sampler.fellBack !== null ? [g.sampler.fellBack] : []), ...g.notes];
  return {
    prompt: g.prompt,
    all_prompts: seeds.map(() => g.prompt),
    negative_prompt: g.negativePrompt,
    all_negative_prompts: seeds.map(() => g.negativePrompt),
    seed: g.seed,
    all_seeds: seeds,
    subseed: g.subseed,
    all_subseeds: seeds.map((_, i) => (g.subseed + i) >>> 0),
    subseed_strength: 0,
    width: g.width,
    height: g.height,
    sampler_name: g.sampler.name,
    cfg_scale: g.cfgScale,
    steps: g.steps,
    batch_size: g.batchSize,
    restore_faces: false,
    face_restoration_model: null,
    sd_model_name: m.model.model_name,
    sd_model_hash: m.model.hash,
    sd_vae_name: null,
    sd_vae_hash: null,
    seed_resize_from_w: -1,
    seed_resize_from_h: -1,
    denoising_strength: g.strength,
    extra_generation_params: g.sampler.scheduler !== 'automatic' ? { 'Schedule type': g.sampler.scheduler } : {},
    index_of_first_image: 0,
    infotexts,
    styles: [],
    job_timestamp: timestamp(m.startedAt),
    clip_skip: m.settings.clipSkip,
    is_using_inpainting_conditioning: false,
    version: 'sd-ts',
    ...(m.missing > 0 ? { interrupted: true, images_not_made: m.missing } : {}),
    ...(warnings.length > 0 ? { warnings } : {}),
  };
}

export function answerOf(body: Body, g: A1111Generation, m: Made): Record<string, unknown> {
  const send = body.send_images !== false && body.send_images !== 'false';
  return {
    images: send ? m.results.map((r) => r.image) : [],
    parameters: echoRequest(body, g),
    info: JSON.stringify(infoOf(g, m)),
  };
}
