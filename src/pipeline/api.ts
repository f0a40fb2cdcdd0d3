/**
 * The pipeline's public contract, shared by the CLI and the server: what a generation takes and returns.
 * The implementation is in ./pipeline.ts; validation of every field in ./params.ts.
 */

import type { NoiseSource, SamplerName } from '../scheduler/index.js';
import type { LoraSpec } from '../lora/types.js';

export { SAMPLERS, NOISE_SOURCES, type NoiseSource, type SamplerName } from '../scheduler/index.js';

/** How prompts are read: A1111's syntax (emphasis, BREAK, chunks past 75 tokens, <lora:> tags), or as plain text. */
export const PROMPT_SYNTAXES = ['a1111', 'plain'] as const;
export type PromptSyntax = (typeof PROMPT_SYNTAXES)[number];

/** Whose sampler conventions a seed reproduces (scheduler/conventions.ts). */
export const CONVENTION_NAMES = ['a1111', 'diffusers'] as const;
export type ConventionsName = (typeof CONVENTION_NAMES)[number];

/** [height, width] or [top, left], in pixels. */
export type PixelPair = readonly [number, number];

/** How a control image becomes a ControlNet's hint: Canny edges of it (ControlNet's annotator), or the image as given. */
export const CONTROL_PREPROCESSORS = ['canny', 'none'] as const;
export type ControlPreprocess = (typeof CONTROL_PREPROCESSORS)[number];

/** One ControlNet of a request; several at once sum their residuals (src/controlnet). */
export interface ControlNetParams {
  /** A ControlNet file (lllyasviel's .pth/.safetensors, a diffusers file) or diffusers folder, by path; cached once loaded. */
  readonly model: string;
  /** The control image, an encoded PNG or JPEG; resized to width x height. */
  readonly image: Uint8Array;
  /** Default 'canny'. */
  readonly preprocess?: ControlPreprocess;
  /** Canny's hysteresis thresholds, default 100 and 200. */
  readonly low?: number;
  readonly high?: number;
  /** Residual scale ("conditioning scale", A1111's weight), default 1. */
  readonly scale?: number;
  /** The fraction of the steps in which it is active, default 0 .. 1 (the fixture's window rule). */
  readonly start?: number;
  readonly end?: number;
}

/** An IP-Adapter of a request (src/ip-adapter). */
export interface IpAdapterParams {
  /** The adapter file (.safetensors, or tencent's .bin), by path; cached once loaded. */
  readonly model: string;
  /** The photo, an encoded PNG or JPEG. */
  readonly image: Uint8Array;
  /** Scale of the image tokens' attention, default 1. */
  readonly scale?: number;
  /** The CLIP vision encoder's folder (transformers' image_encoder/); default: looked for next to the adapter. */
  readonly imageEncoder?: string;
}

/** What a caller asks for. Everything but the prompt has a default (see DEFAULT_PARAMS). */
export interface GenerateParams {
  readonly prompt: string;
  readonly negativePrompt?: string;
  /** 0 .. 2^32-1; default: a random seed, reported in the result. */
  readonly seed?: number;
  readonly steps?: number;
  /** Classifier-free guidance scale; guidance is off when `cfg` is false or the scale is 1. */
  readonly cfgScale?: number;
  readonly cfg?: boolean;
  readonly sampler?: SamplerName;
  readonly karras?: boolean;
  /** Pixels, multiples of 8. */
  readonly width?: number;
  readonly height?: number;
  /** 1 = last layer (default), 2 = penultimate ("clip skip 2"). */
  readonly clipSkip?: number;
  /** img2img: an encoded PNG or JPEG; resized to width x height. */
  readonly initImage?: Uint8Array;
  /** img2img: how much of the schedule to run, (0, 1]. */
  readonly strength?: number;
  /** Inpainting (with initImage): an encoded PNG or JPEG, white = repaint, black = keep; binarised at 0.5. */
  readonly mask?: Uint8Array;
  /** ControlNets guiding the UNet, in order. */
  readonly controlNets?: readonly ControlNetParams[];
  /** An IP-Adapter conditioning on a photo. */
  readonly ipAdapter?: IpAdapterParams;
  /** LoRAs for this request (paths and multipliers); the model switches to them and back without reloading. */
  readonly loras?: readonly LoraSpec[];
  /** Images in one call; image i uses seed + i. */
  readonly batch?: number;
  /** Random numbers: 'cpu' torch's CPU generator (default; diffusers, ComfyUI), 'gpu' torch's CUDA one (A1111). */
  readonly noise?: NoiseSource;
  /** Default 'a1111' (SD 1.x and SDXL alike). */
  readonly promptSyntax?: PromptSyntax;
  /**
   * A1111's "Pad prompt/negative prompt to be same length" (setting pad_cond_uncond), a1111 syntax only: when the
   * prompt and the negative prompt encode to different chunk counts, the shorter gets copies of the empty prompt's
   * encoding appended and both run as one UNet batch (faster; a different image). Default false: A1111's default,
   * each runs on its own. The PNG records `Pad conds: True` when padding happened, as A1111 does.
   */
  readonly padCondUncond?: boolean;
  /** Default: the model source's (a diffusers folder: diffusers; a single file: A1111 for SD 1.x, diffusers for SDXL). */
  readonly conventions?: ConventionsName;
  /** SDXL micro-conditioning: [height, width], default [height, width] of the image. */
  readonly originalSize?: PixelPair;
  /** SDXL micro-conditioning: [top, left], default [0, 0]. */
  readonly cropTopLeft?: PixelPair;
  /** SDXL micro-conditioning: [height, width], default [height, width] of the image. */
  readonly targetSize?: PixelPair;
}

/** Every field resolved: what was actually run, enough to run it again. */
export interface ResolvedParams {
  readonly prompt: string;
  readonly negativePrompt: string;
  readonly seed: number;
  readonly steps: number;
  readonly cfgScale: number;
  readonly cfg: boolean;
  readonly sampler: SamplerName;
  readonly karras: boolean;
  readonly width: number;
  readonly height: number;
  readonly clipSkip: number;
  readonly strength: number | null;
  readonly batch: number;
  readonly noise: NoiseSource;
  readonly promptSyntax: PromptSyntax;
  readonly padCondUncond: boolean;
  readonly conventions: ConventionsName;
  readonly originalSize: PixelPair;
  readonly cropTopLeft: PixelPair;
  readonly targetSize: PixelPair;
  /** The ControlNets run, in order (empty: none); their images are not repeated here. */
  readonly controlNets: readonly ResolvedControlNet[];
  /** The IP-Adapter run, or null; its photo is not repeated here. */
  readonly ipAdapter: ResolvedIpAdapter | null;
  /** Whether a mask was given (inpainting; the init image and strength are img2img's fields). */
  readonly mask: boolean;
}

/** A ControlNet as run: every default filled in (thresholds null unless the preprocessor is canny). */
export interface ResolvedControlNet {
  readonly model: string;
  readonly preprocess: ControlPreprocess;
  readonly low: number | null;
  readonly high: number | null;
  readonly scale: number;
  readonly start: number;
  readonly end: number;
}

/** An IP-Adapter as run (imageEncoder: as given, or null when looked for next to the adapter). */
export interface ResolvedIpAdapter {
  readonly model: string;
  readonly scale: number;
  readonly imageEncoder: string | null;
}

export interface GeneratedImage {
  /** PNG bytes, with the A1111-style `parameters` text chunk. */
  readonly png: Buffer;
  /** RGB, row-major, width*height*3 bytes. */
  readonly rgb: Uint8Array;
  readonly seed: number;
}

export interface GenerateResult {
  readonly images: readonly GeneratedImage[];
  readonly params: ResolvedParams;
  /** Set when `stop` finished it early: the step (over the whole call) its last image was taken at. */
  readonly stoppedAt?: number;
}

export interface GenerateOptions {
  /** Called after every denoising step: step is 1-based, total is the number of steps that will run. */
  readonly onProgress?: (step: number, total: number) => void;
  /** Cancels between steps; generate() then rejects with an AbortError and frees every tensor. */
  readonly signal?: AbortSignal;
  // -- previews and early stop (server progress, sd generate --save-steps; ./preview.ts)
  /** Make a preview of the step's predicted x0 every `every` steps (default 1; the last step always) and hand it to onPreview. */
  readonly preview?: PreviewOptions;
  readonly onPreview?: (p: StepPreview) => void | Promise<void>;
  /** Finish early (A1111's interrupt): stop between steps; the image is the last step's predicted x0, decoded. */
  readonly stop?: AbortSignal;
  /**
   * One generation, then done (sd generate): each network is freed once this call no longer needs it, the text
   * encoders when the prompts are encoded, the UNet with its ControlNets and IP-Adapters when the last image is
   * sampled, so the VAE decode does not sit on top of them. The model is spent afterwards: generate() refuses.
   * Networks a request's LoRAs are switched on in (GenerateParams.loras) are kept until dispose().
   */
  readonly oneShot?: boolean;
}

export const PREVIEW_DECODERS = ['approx', 'vae'] as const;
/** 'approx': the latent-to-RGB linear approximation, at latent size; 'vae': a full VAE decode, at image size. */
export type PreviewDecoder = (typeof PREVIEW_DECODERS)[number];

export interface PreviewOptions {
  readonly decoder: PreviewDecoder;
  readonly every?: number;
}

/** One preview: bytes only (it crosses threads). step is 1-based over the whole call, as onProgress's. */
export interface StepPreview {
  readonly step: number;
  readonly total: number;
  /** Which image of the batch, 0-based. */
  readonly image: number;
  readonly decoder: PreviewDecoder;
  /** RGB, row-major, width*height*3 bytes. */
  readonly rgb: Uint8Array;
  readonly width: number;
  readonly height: number;
}

/** A parameter out of its allowed range, named with the range: the CLI prints it, the server answers 400. */
export class ParamError extends Error {
  override name = 'ParamError';
  constructor(
    readonly field: string,
    message: string,
  ) {
    super(`${field}: ${message}`);
  }
}
