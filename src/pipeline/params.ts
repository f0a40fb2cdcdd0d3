/**
 * Validation of a generation request: every field of GenerateParams checked for type and range, defaults
 * filled in, and the result frozen as ResolvedParams (what was run, enough to run it again). A bad field is a
 * ParamError naming the field and its allowed range; the CLI prints it, the server answers 400 with it.
 */
import {
  CONTROL_PREPROCESSORS,
  CONVENTION_NAMES,
  NOISE_SOURCES,
  ParamError,
  PROMPT_SYNTAXES,
  SAMPLERS,
  type ConventionsName,
  type GenerateParams,
  type PixelPair,
  type ResolvedControlNet,
  type ResolvedIpAdapter,
  type ResolvedParams,
  type SamplerName,
} from './api.js';
import { extractLoraTags } from '../lora/tags.js';
import { splitMulticond } from '../tokenizer/prompt-syntax.js';

export const MAX_PROMPT_CHARS = 4000;
export const MAX_SEED = 2 ** 32 - 1;
export const MAX_STEPS = 200;
export const MAX_CFG_SCALE = 30;
export const MAX_SIZE = 2048;
export const MAX_BATCH = 8;
/** ControlNets of one request: each costs about half a UNet forward per step. */
export const MAX_CONTROLNETS = 4;
/** Largest ControlNet / IP-Adapter scale (A1111's weight slider stops at 2). */
export const MAX_ADAPTER_SCALE = 2;
/** Canny thresholds are on |dx| + |dy| of a 3x3 Sobel of 8-bit pixels, at most 4 * 255 * 2. */
export const MAX_CANNY_THRESHOLD = 2040;

/** Model families whose default bounds differ; SDXL is to come. */
export type ModelFamily = 'sd1' | 'sdxl';

/** What the loaded model decides: its native size, how many text-encoder layers clip skip may drop. */
export interface ParamLimits {
  /** Absent: 'sd1'. */
  readonly family?: ModelFamily;
  readonly width: number;
  readonly height: number;
  /** Smallest width/height in pixels: 64 for SD 1.x; a tiny test model's own size when smaller. */
  readonly minSize: number;
  /** Text-encoder layers: clip skip is 1 .. layers-1. */
  readonly clipLayers: number;
  /** The conventions a request without any gets: the model source's (absent: 'a1111'). */
  readonly conventions?: ConventionsName;
}

export const SD15_LIMITS: ParamLimits = Object.freeze({ width: 512, height: 512, minSize: 64, clipLayers: 12 });

/**
 * How much work one server request may ask for (the CLI, run by its own user, is not bound by these):
 * `maxPixels` width * height, `maxWork` steps * width * height * batch.
 */
export interface WorkBounds {
  readonly maxPixels: number;
  readonly maxWork: number;
}

/**
 * The server's defaults by family: 4x the native pixel count for SD 1.x (1024x1024; 2048x2048 at one step froze
 * a server), SDXL's 1536x1536 (2.25x its native 1024x1024); and 150 steps at that size.
 */
export const WORK_BOUNDS: Readonly<Record<ModelFamily, WorkBounds>> = Object.freeze({
  sd1: Object.freeze({ maxPixels: 1024 * 1024, maxWork: 150 * 1024 * 1024 }),
  sdxl: Object.freeze({ maxPixels: 1536 * 1536, maxWork: 150 * 1536 * 1536 }),
});

export const workBoundsFor = (limits: ParamLimits): WorkBounds => WORK_BOUNDS[limits.family ?? 'sd1'];

/** Defaults as AUTOMATIC1111's web UI users know them. */
export const DEFAULTS = Object.freeze({
  negativePrompt: '',
  steps: 20,
  cfgScale: 7.5,
  cfg: true,
  sampler: 'euler_a' as SamplerName,
  karras: false,
  clipSkip: 1,
  /** img2img: the web UI's default denoising strength. */
  strength: 0.75,
  /** ControlNet: Canny's thresholds (ControlNet's annotator and A1111's defaults), scale and window. */
  controlPreprocess: 'canny' as const,
  cannyLow: 100,
  cannyHigh: 200,
  controlScale: 1,
  controlStart: 0,
  controlEnd: 1,
  ipScale: 1,
  batch: 1,
  /** torch's CPU generator: the seeds of diffusers (with a CPU generator), ComfyUI and A1111's "RNG: CPU". */
  noise: 'cpu' as const,
  promptSyntax: 'a1111' as const,
  /** A1111's pad_cond_uncond default. */
  padCondUncond: false,
});

/** Largest SDXL original / target size and crop offset, in pixels (the model saw up to a few thousand). */
export const MAX_MICRO_SIZE = 16384;

function string(field: string, v: unknown, fallback: string): string {
  if (v === undefined) return fallback;
  if (typeof v !== 'string') throw new ParamError(field, `must be a string, got ${typeof v}`);
  if (v.length > MAX_PROMPT_CHARS) throw new ParamError(field, `must be at most ${MAX_PROMPT_CHARS} characters, got ${v.length}`);
  return v;
}

function boolean(field: string, v: unknown, fallback: boolean): boolean {
  if (v === undefined) return fallback;
  if (typeof v !== 'boolean') throw new ParamError(field, `must be true or false, got ${JSON.stringify(v)}`);
  return v;
}

function integer(field: string, v: unknown, fallback: number, min: number, max: number): number {
  if (v === undefined) return fallback;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
    throw new ParamError(field, `must be an integer in ${min}..${max}, got ${JSON.stringify(v)}`);
  }
  return v;
}

function number(field: string, v: unknown, fallback: number, min: number, max: number): number {
  if (v === undefined) return fallback;
  if (typeof v !== 'number' || !Number.isFinite(v) || v < min || v > max) {
    throw new ParamError(field, `must be a number in ${min}..${max}, got ${JSON.stringify(v)}`);
  }
  return v;
}

function size(field: string, v: unknown, fallback: number, limits: ParamLimits): number {
  if (v === undefined) return fallback;
  const ok = typeof v === 'number' && Number.isInteger(v) && v % 8 === 0 && v >= limits.minSize && v <= MAX_SIZE;
  if (!ok) throw new ParamError(field, `must be a multiple of 8 in ${limits.minSize}..${MAX_SIZE}, got ${JSON.stringify(v)}`);
  return v;
}

function sampler(v: unknown): SamplerName {
  if (v === undefined) return DEFAULTS.sampler;
  if (typeof v !== 'string' || !(SAMPLERS as readonly string[]).includes(v)) {
    throw new ParamError('sampler', `must be one of ${SAMPLERS.join(', ')}, got ${JSON.stringify(v)}`);
  }
  return v as SamplerName;
}

function oneOf<T extends string>(field: string, v: unknown, fallback: T, choices: readonly T[]): T {
  if (v === undefined) return fallback;
  if (typeof v !== 'string' || !(choices as readonly string[]).includes(v)) {
    throw new ParamError(field, `must be one of ${choices.join(', ')}, got ${JSON.stringify(v)}`);
  }
  return v as T;
}

/** Two integers in min..MAX_MICRO_SIZE: SDXL's [height, width] or [top, left]. */
function pixelPair(field: string, v: unknown, fallback: PixelPair, min: number): PixelPair {
  if (v === undefined) return fallback;
  const ok = Array.isArray(v) && v.length === 2 && v.every((n) => typeof n === 'number' && Number.isInteger(n) && n >= min && n <= MAX_MICRO_SIZE);
  if (!ok) throw new ParamError(field, `must be two integers in ${min}..${MAX_MICRO_SIZE}, got ${JSON.stringify(v)}`);
  return Object.freeze([v[0], v[1]] as [number, number]);
}

/** SDXL's micro-conditioning: defaults [H, W], [0, 0], [H, W]; refused for SD 1.x, whose UNet takes none. */
function micro(p: GenerateParams, limits: ParamLimits, height: number, width: number): Pick<ResolvedParams, 'originalSize' | 'cropTopLeft' | 'targetSize'> {
  if ((limits.family ?? 'sd1') !== 'sdxl') {
    for (const field of ['originalSize', 'cropTopLeft', 'targetSize'] as const) {
      if (p[field] !== undefined) throw new ParamError(field, 'applies to SDXL models only (SD 1.x has no size conditioning)');
    }
  }
  const size = Object.freeze([height, width] as const);
  return {
    originalSize: pixelPair('originalSize', p.originalSize, size, 1),
    cropTopLeft: pixelPair('cropTopLeft', p.cropTopLeft, Object.freeze([0, 0] as const), 0),
    targetSize: pixelPair('targetSize', p.targetSize, size, 1),
  };
}

/** A seed drawn uniformly from 0 .. 2^32-1, used when the caller gives none (and reported back). */
export function randomSeed(): number {
  return Math.floor(Math.random() * (MAX_SEED + 1));
}

/** img2img only: (0, 1]; the sampler runs the last int(steps * strength) steps, at least one. */
function strength(p: GenerateParams): number | null {
  if (p.initImage === undefined) {
    if (p.strength !== undefined) throw new ParamError('strength', 'only applies to img2img: give an init image too');
    return null;
  }
  if (!(p.initImage instanceof Uint8Array) || p.initImage.length === 0) {
    throw new ParamError('initImage', 'must be the bytes of a PNG or JPEG file');
  }
  const s = p.strength ?? DEFAULTS.strength;
  if (typeof s !== 'number' || !Number.isFinite(s) || s <= 0 || s > 1) {
    throw new ParamError('strength', `must be a number in (0, 1], got ${JSON.stringify(s)}`);
  }
  return s;
}

function bytes(field: string, v: unknown, what: string): void {
  if (!(v instanceof Uint8Array) || v.length === 0) throw new ParamError(field, `must be the bytes of ${what}`);
}

function path(field: string, v: unknown): string {
  if (typeof v !== 'string' || v.trim() === '') throw new ParamError(field, `must be a file or folder path, got ${JSON.stringify(v)}`);
  return v;
}

/** One ControlNet: its file, image, preprocessor (thresholds only for canny, low <= high), scale and window start < end. */
function controlNet(v: unknown, i: number): ResolvedControlNet {
  const at = `controlNets[${i}]`;
  if (typeof v !== 'object' || v === null) throw new ParamError(at, 'must be an object with at least model and image');
  const c = v as Record<string, unknown>;
  const model = path(`${at}.model`, c.model);
  bytes(`${at}.image`, c.image, 'a PNG or JPEG control image');
  const preprocess = oneOf(`${at}.preprocess`, c.preprocess, DEFAULTS.controlPreprocess, CONTROL_PREPROCESSORS);
  let low: number | null = null;
  let high: number | null = null;
  if (preprocess === 'canny') {
    low = number(`${at}.low`, c.low, DEFAULTS.cannyLow, 0, MAX_CANNY_THRESHOLD);
    high = number(`${at}.high`, c.high, DEFAULTS.cannyHigh, 0, MAX_CANNY_THRESHOLD);
    if (low > high) throw new ParamError(`${at}.low`, `must be at most high (${high}), got ${low}`);
  } else {
    for (const f of ['low', 'high'] as const) {
      if (c[f] !== undefined) throw new ParamError(`${at}.${f}`, "is a Canny threshold: it applies to preprocess 'canny' only");
    }
  }
  const scale = number(`${at}.scale`, c.scale, DEFAULTS.controlScale, 0, MAX_ADAPTER_SCALE);
  const start = number(`${at}.start`, c.start, DEFAULTS.controlStart, 0, 1);
  const end = number(`${at}.end`, c.end, DEFAULTS.controlEnd, 0, 1);
  if (!(start < end)) throw new ParamError(`${at}.start`, `must be below end (${end}), got ${start}`);
  return Object.freeze({ model, preprocess, low, high, scale, start, end });
}

function controlNets(v: unknown): readonly ResolvedControlNet[] {
  if (v === undefined) return Object.freeze([]);
  if (!Array.isArray(v)) throw new ParamError('controlNets', 'must be a list of ControlNets');
  if (v.length > MAX_CONTROLNETS) throw new ParamError('controlNets', `at most ${MAX_CONTROLNETS} at once, got ${v.length}`);
  return Object.freeze(v.map(controlNet));
}

function ipAdapter(v: unknown): ResolvedIpAdapter | null {
  if (v === undefined) return null;
  if (typeof v !== 'object' || v === null) throw new ParamError('ipAdapter', 'must be an object with at least model and image');
  const a = v as Record<string, unknown>;
  const model = path('ipAdapter.model', a.model);
  bytes('ipAdapter.image', a.image, 'a PNG or JPEG photo');
  const scale = number('ipAdapter.scale', a.scale, DEFAULTS.ipScale, 0, MAX_ADAPTER_SCALE);
  const imageEncoder = a.imageEncoder === undefined ? null : path('ipAdapter.imageEncoder', a.imageEncoder);
  return Object.freeze({ model, scale, imageEncoder });
}

/** Inpainting: a mask needs the init image it applies to. */
function mask(p: GenerateParams): boolean {
  if (p.mask === undefined) return false;
  if (p.initImage === undefined) throw new ParamError('mask', 'needs the image it applies to: give an init image too');
  bytes('mask', p.mask, 'a PNG or JPEG mask (white = repaint, black = keep)');
  return true;
}

export function resolveParams(p: GenerateParams, limits: ParamLimits = SD15_LIMITS): ResolvedParams {
  if (typeof p !== 'object' || p === null) throw new ParamError('params', 'must be an object with at least a prompt');
  if (p.prompt === undefined) throw new ParamError('prompt', 'is required (a string, may be empty)');
  const width = size('width', p.width, limits.width, limits);
  const height = size('height', p.height, limits.height, limits);
  return Object.freeze({
    prompt: string('prompt', p.prompt, ''),
    negativePrompt: string('negativePrompt', p.negativePrompt, DEFAULTS.negativePrompt),
    seed: integer('seed', p.seed, randomSeed(), 0, MAX_SEED),
    steps: integer('steps', p.steps, DEFAULTS.steps, 1, MAX_STEPS),
    cfgScale: number('cfgScale', p.cfgScale, DEFAULTS.cfgScale, 0, MAX_CFG_SCALE),
    cfg: boolean('cfg', p.cfg, DEFAULTS.cfg),
    sampler: sampler(p.sampler),
    karras: boolean('karras', p.karras, DEFAULTS.karras),
    width,
    height,
    clipSkip: integer('clipSkip', p.clipSkip, DEFAULTS.clipSkip, 1, limits.clipLayers - 1),
    strength: strength(p),
    batch: integer('batch', p.batch, DEFAULTS.batch, 1, MAX_BATCH),
    noise: oneOf('noise', p.noise, DEFAULTS.noise, NOISE_SOURCES),
    promptSyntax: oneOf('promptSyntax', p.promptSyntax, DEFAULTS.promptSyntax, PROMPT_SYNTAXES),
    padCondUncond: boolean('padCondUncond', p.padCondUncond, DEFAULTS.padCondUncond),
    conventions: oneOf('conventions', p.conventions, limits.conventions ?? 'a1111', CONVENTION_NAMES),
    ...micro(p, limits, height, width),
    controlNets: controlNets(p.controlNets),
    ipAdapter: ipAdapter(p.ipAdapter),
    mask: mask(p),
  });
}

/**
 * Whether classifier-free guidance runs: a scale of 1 gives eps_cond exactly, so the uncond pass is skipped; but
 * not for an A1111 prompt with AND parts (or a part weight), whose combination at scale 1 still reads uncond.
 */
export const usesGuidance = (r: ResolvedParams): boolean => r.cfg && (r.cfgScale !== 1 || isComposable(r));

/** Whether an A1111 prompt has composable-diffusion parts: more than one, or a weight other than 1. */
export function isComposable(r: Pick<ResolvedParams, 'prompt' | 'promptSyntax'>): boolean {
  if (r.promptSyntax !== 'a1111') return false;
  const parts = splitMulticond(extractLoraTags(r.prompt).prompt);
  return parts.length > 1 || parts[0].weight !== 1;
}
