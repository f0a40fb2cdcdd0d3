/**
 * The pipeline's public contract, shared by the CLI and the server: what a generation takes and returns.
 * The implementation is in ./pipeline.ts; validation of every field in ./params.ts.
 */

import type { NoiseSource, SamplerName } from '../scheduler/index.js';

export { SAMPLERS, NOISE_SOURCES, type NoiseSource, type SamplerName } from '../scheduler/index.js';

/** How prompts are read: A1111's syntax (emphasis, BREAK, chunks past 75 tokens, <lora:> tags), or as plain text. */
export const PROMPT_SYNTAXES = ['a1111', 'plain'] as const;
export type PromptSyntax = (typeof PROMPT_SYNTAXES)[number];

/** Whose sampler conventions a seed reproduces (scheduler/conventions.ts). */
export const CONVENTION_NAMES = ['a1111', 'diffusers'] as const;
export type ConventionsName = (typeof CONVENTION_NAMES)[number];

/** [height, width] or [top, left], in pixels. */
export type PixelPair = readonly [number, number];

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
  /** Images in one call; image i uses seed + i. */
  readonly batch?: number;
  /** Random numbers: 'cpu' torch's CPU generator (default; diffusers, ComfyUI), 'gpu' torch's CUDA one (A1111). */
  readonly noise?: NoiseSource;
  /** Default 'a1111'. SDXL prompts are read as plain text whatever this says. */
  readonly promptSyntax?: PromptSyntax;
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
  readonly conventions: ConventionsName;
  readonly originalSize: PixelPair;
  readonly cropTopLeft: PixelPair;
  readonly targetSize: PixelPair;
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
}

export interface GenerateOptions {
  /** Called after every denoising step: step is 1-based, total is the number of steps that will run. */
  readonly onProgress?: (step: number, total: number) => void;
  /** Cancels between steps; generate() then rejects with an AbortError and frees every tensor. */
  readonly signal?: AbortSignal;
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
