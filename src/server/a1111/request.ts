/**
 * A1111's txt2img and img2img bodies (modules/api/models.py: StableDiffusionTxt2ImgProcessingAPI and
 * StableDiffusionImg2ImgProcessingAPI) -> what this server generates: one GenerateParams per image.
 *
 * Defaults are A1111's API defaults (steps 50, cfg_scale 7, sampler "Euler", seed -1 = random), except the size:
 * absent, it is the model's native size (512x512 for SD 1.x, as A1111's). A width or height that is not a multiple
 * of 8 is rounded down, as A1111's latent size is. Image i of batch_size x n_iter gets seed + i. Fields this
 * server has no use for are ignored (A1111's whole field set arrives from most clients, nulls included);
 * `denoising_strength` is read by img2img only. What would change the image and cannot be done here answers 422
 * naming the field: hires fix, tiling, a script other than ControlNet (./controlnet.ts), an inpainting option that
 * does not map (./mask.ts). `<lora:NAME:W>` tags in the prompt are looked up in --lora-dir (an unknown name is
 * skipped with a warning, as A1111 skips it); without --lora-dir the engine strips them with a warning.
 */
import { MAX_PROMPT_CHARS, MAX_SEED, MAX_STEPS, MAX_CFG_SCALE, MAX_SIZE, MAX_BATCH } from '../../pipeline/params.js';
import type { GenerateParams } from '../../pipeline/api.js';
import { extractLoraTags } from '../../lora/tags.js';
import type { LoraSpec } from '../../lora/types.js';
import { HttpError } from '../errors.js';
import { checkModelName, modelRef, resolveModel, type ModelDirs } from '../models-dir.js';
import { controlNetScript, parseControlNetArgs, toControlNetParams, toIpAdapterParams, type A1111ControlUnit } from './controlnet.js';
import { maskNote, parseMask, type A1111Mask } from './mask.js';
import { asBody, bool, invalid, list, num, obj, str, strOrNull, type Body } from './fields.js';
import { chooseSampler, type SamplerChoice } from './names.js';
import type { Settings } from './options.js';

export type A1111Mode = 'txt2img' | 'img2img';

/** One request, translated and checked for form (the model's ranges are checked later, by resolveParams). */
export interface A1111Generation {
  readonly mode: A1111Mode;
  readonly prompt: string;
  readonly negativePrompt: string;
  /** The seed of image 0 (a random one when the request said -1 or nothing). */
  readonly seed: number;
  readonly subseed: number;
  readonly steps: number;
  readonly cfgScale: number;
  readonly width: number;
  readonly height: number;
  readonly sampler: SamplerChoice;
  readonly batchSize: number;
  readonly nIter: number;
  /** img2img: the first of `init_images`, base64 as sent. */
  readonly initImage: string | null;
  readonly strength: number | null;
  readonly overrideSettings: Body;
  readonly includeInitImages: boolean;
  /** alwayson_scripts.controlnet's enabled units (ControlNets, and at most one IP-Adapter unit). */
  readonly controlNets: readonly A1111ControlUnit[];
  /** The server's --image-encoder, for an IP-Adapter unit. */
  readonly imageEncoder: string | null;
  /** img2img: the inpainting mask and its fields; null: plain img2img. */
  readonly mask: A1111Mask | null;
  /** The prompt's <lora:> tags found in --lora-dir. */
  readonly loras: readonly LoraSpec[];
  /** What ran otherwise than asked (a LoRA tag skipped, an inpainting_fill that runs as original): info.warnings. */
  readonly notes: readonly string[];
}

/** Most images one request may ask for (batch_size * n_iter): the pipeline's batch bound. */
export const MAX_IMAGES = MAX_BATCH;

const randomSeed = (): number => Math.floor(Math.random() * (MAX_SEED + 1));

/** -1 (or absent) is "random"; anything else must be a seed. */
function seedOf(b: Body, field: string): number {
  const s = num(b, field, -1, { integer: true, min: -1, max: MAX_SEED });
  return s === -1 ? randomSeed() : s;
}

/** A1111 sizes: any integer, the latent is size // 8. */
function sizeOf(b: Body, field: string, fallback: number): number {
  const v = num(b, field, fallback, { integer: true, min: 8, max: MAX_SIZE });
  return Math.floor(v / 8) * 8;
}

export function parseGeneration(raw: unknown, mode: A1111Mode, native: { width: number; height: number }, models: ModelDirs = {}): A1111Generation {
  const b = asBody(raw);
  refuseUnsupported(b, mode);
  const script = controlNetScript(obj(b, 'alwayson_scripts'));
  const controlNets = script !== null ? parseControlNetArgs(script, models, mode === 'img2img') : [];
  const mask = mode === 'img2img' ? parseMask(b) : null;
  const prompt = str(b, 'prompt', '', MAX_PROMPT_CHARS);
  const notes: string[] = [];
  const loras = promptLoras(prompt, models, notes);
  const fill = mask !== null ? maskNote(mask) : null;
  if (fill !== null) notes.push(fill);
  const sampler = chooseSampler(strOrNull(b, 'sampler_name') ?? strOrNull(b, 'sampler_index'), strOrNull(b, 'scheduler'));
  const batchSize = num(b, 'batch_size', 1, { integer: true, min: 1, max: MAX_IMAGES });
  const nIter = num(b, 'n_iter', 1, { integer: true, min: 1, max: MAX_IMAGES });
  if (batchSize * nIter > MAX_IMAGES) throw invalid('batch_size', `batch_size x n_iter is ${batchSize * nIter} images, over this server's limit of ${MAX_IMAGES} per request`);
  const initImages = mode === 'img2img' ? list(b, 'init_images') : [];
  if (mode === 'img2img' && initImages.length === 0) throw invalid('init_images', 'img2img needs one image (a base64 PNG, JPEG or WebP)');
  if (mode === 'img2img' && typeof initImages[0] !== 'string') throw invalid('init_images', 'must be a list of base64 strings');
  return {
    mode,
    prompt,
    negativePrompt: str(b, 'negative_prompt', '', MAX_PROMPT_CHARS),
    seed: seedOf(b, 'seed'),
    subseed: seedOf(b, 'subseed'),
    steps: num(b, 'steps', 50, { integer: true, min: 1, max: MAX_STEPS }),
    cfgScale: num(b, 'cfg_scale', 7, { min: 0, max: MAX_CFG_SCALE }),
    width: sizeOf(b, 'width', native.width),
    height: sizeOf(b, 'height', native.height),
    sampler,
    batchSize,
    nIter,
    initImage: mode === 'img2img' ? (initImages[0] as string) : null,
    strength: mode === 'img2img' ? num(b, 'denoising_strength', 0.75, { min: 0, max: 1 }) : null,
    overrideSettings: obj(b, 'override_settings'),
    includeInitImages: bool(b, 'include_init_images', false),
    controlNets,
    imageEncoder: models.imageEncoder ?? null,
    mask,
    loras,
    notes,
  };
}

/**
 * The prompt's <lora:NAME:TE:UNET> tags as A1111's Lora extension applies them: each found in --lora-dir, an
 * unknown name (or a malformed tag) skipped with a note. Without --lora-dir: none (the engine strips the tags).
 * Queue mode: references the worker resolves in its --lora-dir, skipping (and logging) what it does not have.
 */
function promptLoras(prompt: string, models: ModelDirs, notes: string[]): LoraSpec[] {
  const onWorker = models.onWorker === true;
  if ((models.lora == null || models.lora === '') && !onWorker) return [];
  let tags;
  try {
    tags = extractLoraTags(prompt).loras;
  } catch (e) {
    notes.push(`LoRA tags not applied: ${e instanceof Error ? e.message : String(e)}`);
    return [];
  }
  const out: LoraSpec[] = [];
  for (const t of tags) {
    try {
      checkModelName('lora', t.name, 'prompt', 422);
      const path = onWorker ? modelRef({ kind: 'lora', name: t.name, field: 'prompt', status: 422, optional: 'unknown' }) : resolveModel('lora', models, t.name, 'prompt', 422);
      out.push({ path, te: t.te, unet: t.unet });
    } catch (e) {
      if (!(e instanceof HttpError) || e.statusCode !== 422) throw e;
      notes.push(`<lora:${t.name}> skipped: ${e.message.replace(/^prompt: /, '')}`);
    }
  }
  return out;
}

/** Features that change the image and that this server does not have: 422 naming the field, not a silent ignore. */
function refuseUnsupported(b: Body, mode: A1111Mode): void {
  if (mode === 'txt2img' && bool(b, 'enable_hr', false)) throw invalid('enable_hr', 'hires fix is not supported by this server; send enable_hr: false');
  if (bool(b, 'tiling', false)) throw invalid('tiling', 'tiling is not supported by this server');
  const script = strOrNull(b, 'script_name');
  if (script !== null && script !== '' && script.toLowerCase() !== 'none') throw invalid('script_name', `no script ${JSON.stringify(script)} on this server (GET /sdapi/v1/scripts lists none)`);
  const scripts = Object.keys(obj(b, 'alwayson_scripts')).filter((k) => k.toLowerCase() !== 'controlnet');
  if (scripts.length > 0) throw invalid(`alwayson_scripts.${scripts[0]}`, `no script ${JSON.stringify(scripts[0])} on this server (GET /sdapi/v1/scripts lists what it has)`);
}

/** Image i of the request: seed + i, as A1111 numbers a batch. */
export const imageSeed = (g: A1111Generation, i: number): number => (g.seed + i) >>> 0;

export const imageCount = (g: A1111Generation): number => g.batchSize * g.nIter;

/** The checked and prepared images of a request: init image, mask, and one control image per unit. */
export interface A1111Images {
  readonly initImage?: Uint8Array;
  readonly mask?: Uint8Array;
  readonly controlImages?: readonly Uint8Array[];
}

/** The pipeline's parameters of image i; `images` are the checked bytes of the uploads (absent: form checks only). */
export function toGenerateParams(g: A1111Generation, s: Settings, i: number, images: A1111Images = {}): GenerateParams {
  const { initImage, mask, controlImages } = images;
  // Without its images (the form check before anything is decoded) a request is checked without its ControlNets.
  const units = controlImages === undefined ? [] : g.controlNets.map((u, k) => ({ u, image: controlImages[k] }));
  const controlNets = units.filter(({ u }) => u.module !== 'ip-adapter').map(({ u, image }) => toControlNetParams(u, image));
  const ip = units.find(({ u }) => u.module === 'ip-adapter');
  const ipAdapter = ip !== undefined ? toIpAdapterParams(ip.u, ip.image, { imageEncoder: g.imageEncoder }) : undefined;
  return {
    prompt: g.prompt,
    negativePrompt: g.negativePrompt,
    seed: imageSeed(g, i),
    steps: g.steps,
    cfgScale: g.cfgScale,
    sampler: g.sampler.sampler,
    karras: g.sampler.karras,
    width: g.width,
    height: g.height,
    clipSkip: s.clipSkip,
    ...(s.padCondUncond ? { padCondUncond: true } : {}),
    noise: s.noise,
    ...(initImage !== undefined ? { initImage, strength: g.strength ?? undefined } : {}),
    ...(mask !== undefined ? { mask } : {}),
    ...(controlNets.length > 0 ? { controlNets } : {}),
    ...(ipAdapter !== undefined ? { ipAdapter } : {}),
    ...(g.loras.length > 0 ? { loras: g.loras } : {}),
  };
}

/** ParamError fields (the pipeline's names) as an A1111 body names them. */
export const A1111_FIELD: Readonly<Record<string, string>> = Object.freeze({
  negativePrompt: 'negative_prompt',
  cfgScale: 'cfg_scale',
  cfg: 'cfg_scale',
  clipSkip: 'CLIP_stop_at_last_layers',
  initImage: 'init_images',
  init_image: 'init_images',
  strength: 'denoising_strength',
  batch: 'batch_size',
  sampler: 'sampler_name',
});
