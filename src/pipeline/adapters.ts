/**
 * What a request's adapters add to a generation, between generate() and its denoising loop:
 *
 *   prepareAdapters  before the slow part: the mask decoded, each ControlNet loaded (cached) with its hint and hint
 *                    embedding, the IP-Adapter and its image encoder loaded (cached) and the photo's tokens made
 *   sampleImage      one image: txt2img / img2img as before, or inpainting (a mask, or a 9-channel UNet), with the
 *                    ControlNets' residuals in the noise predictor (eps.ts)
 *   adapterParameters  what the PNG's parameters record of them (image/parameters.ts)
 *
 * Inpainting's random draws follow diffusers' StableDiffusionInpaintPipeline (the inpaint fixture's order): the init
 * image's VAE sample (when the init latent is used: strength < 1, or an ordinary model, which blends with it), the
 * start noise, then the masked image's VAE sample (drawn, and unused, for an ordinary model too, as diffusers does).
 * Under A1111's conventions the VAE samples come from their own generator (pipeline.ts imageNoise), so the seed's
 * draws are the sampler's alone. A strength of 1 starts from pure noise (diffusers' is_strength_max).
 */
import { basename, extname } from 'node:path';
import * as tf from '../backend/tf.js';
import type { ControlUnit } from '../controlnet/index.js';
import type { IpAdapter } from '../ip-adapter/index.js';
import type { ControlUnitParameters, IpAdapterParameters } from '../image/parameters.js';
import { createSampler, type EpsFn, type NoiseFn, type Sampler, type SamplerConfig } from '../scheduler/index.js';
import type { ExtraTokens, UNet } from '../unet/index.js';
import type { GenerateParams, ResolvedParams } from './api.js';
import type { GuidedConditioning } from './conditioning.js';
import { prepareControl, type ControlNetCache } from './control.js';
import type { AfterStep } from './denoise.js';
import { guidedEps, type InpaintInput } from './eps.js';
import { inpaintMasks } from './inpaint.js';
import { decodeMask, fullMask, isInpaintingUNet, keptBlend } from './inpaint-run.js';
import { ipTokensFor, type IpAdapterCache } from './ip.js';

/** A request's adapters, ready to run; dispose frees their tensors (the cached models stay). */
export interface RequestAdapters {
  readonly control: readonly ControlUnit[];
  readonly ip: { readonly adapter: IpAdapter; readonly tokens: ExtraTokens } | null;
  /** [1, H, W, 1] in [0, 1], 1 = repaint. */
  readonly mask: tf.Tensor4D | null;
  dispose(): void;
}

export interface AdapterModels {
  readonly controlNets: ControlNetCache;
  readonly ipAdapters: IpAdapterCache;
  readonly unet: UNet;
  /** The latent's size: the hints are hint-downsample times it. */
  readonly latentHeight: number;
  readonly latentWidth: number;
  /** Largest width x height of a decoded request image (control images, the photo, the mask). */
  readonly maxPixels?: number;
}

/** Decodes and loads everything `p`'s adapters need (see the header); frees what it made when a later part fails. */
export async function prepareAdapters(p: GenerateParams, r: ResolvedParams, m: AdapterModels): Promise<RequestAdapters> {
  const made: { dispose(): void }[] = [];
  const decode = { maxPixels: m.maxPixels };
  try {
    const mask = p.mask === undefined ? null : await decodeMask(p.mask, r.width, r.height, decode);
    if (mask !== null) made.push(mask);
    const requests = r.controlNets.map((resolved, i) => ({ resolved, image: (p.controlNets ?? [])[i].image }));
    const control = await prepareControl(requests, m.controlNets, m.latentHeight, m.latentWidth, decode);
    made.push(control);
    const ip = r.ipAdapter === null || p.ipAdapter === undefined ? null : await ipTokensFor(r.ipAdapter, p.ipAdapter.image, m.ipAdapters, m.unet, decode);
    if (ip !== null) made.push(ip.tokens.tokens);
    return { control: control.units, ip, mask, dispose: () => made.forEach((x) => x.dispose()) };
  } catch (e) {
    for (const x of made) x.dispose();
    throw e;
  }
}

export const NO_ADAPTERS: RequestAdapters = Object.freeze({ control: [], ip: null, mask: null, dispose: () => undefined });

/** One image's sampling, as generateOne sets it up. */
export interface ImageSampling {
  readonly unet: UNet;
  readonly cond: GuidedConditioning;
  readonly guidanceScale: number | null;
  readonly samplerConfig: SamplerConfig;
  readonly latentShape: readonly [number, number, number, number];
  /** The VAE's downsampling factor. */
  readonly factor: number;
  readonly noise: NoiseFn;
  /** The VAE samples' noise (pipeline.ts imageNoise). */
  readonly posterior: NoiseFn;
  /** [1, H, W, 3] in [-1, 1], or null (txt2img). */
  readonly initImage: tf.Tensor4D | null;
  readonly strength: number | null;
  /** image [-1, 1] -> its latent, a VAE sample drawn with `posterior`. */
  readonly encode: (image: tf.Tensor4D, posterior: NoiseFn) => tf.Tensor4D;
  /** sampleLatent with these options. */
  readonly sample: (o: { readonly sampler: Sampler; readonly initLatent?: tf.Tensor4D; readonly eps?: EpsFn; readonly startNoise?: tf.Tensor4D; readonly afterStep?: AfterStep }) => Promise<tf.Tensor4D>;
}

/** One image's final latent (see the header); frees everything it made. */
export async function sampleImage(s: ImageSampling, a: RequestAdapters): Promise<tf.Tensor4D> {
  const sampler = createSampler(s.samplerConfig);
  const nine = isInpaintingUNet(s.unet.config);
  const epsOf = (inpaint: InpaintInput | null): EpsFn =>
    guidedEps(s.unet, s.cond, s.guidanceScale, { control: a.control, inpaint, timesteps: sampler.timesteps, totalSteps: sampler.totalSteps });
  const held: tf.Tensor[] = [];
  try {
    if (!nine && a.mask === null) {
      const initLatent = s.initImage === null ? undefined : s.encode(s.initImage, s.posterior);
      if (initLatent !== undefined) held.push(initLatent);
      return await s.sample({ sampler, initLatent, eps: epsOf(null) });
    }
    const [, h, w, c] = s.latentShape;
    const [H, W] = [h * s.factor, w * s.factor];
    const image = s.initImage ?? tf.zeros<tf.Rank.R4>([1, H, W, 3]); // 9 channels without an image: all repainted
    if (s.initImage === null) held.push(image);
    const mask = a.mask ?? fullMask(H, W);
    if (a.mask === null) held.push(mask);
    const masks = inpaintMasks(image, mask, s.factor);
    held.push(masks.binary, masks.maskedImage, masks.latent);
    const strength = s.strength ?? 1;
    const initLatent = s.initImage !== null && (strength < 1 || !nine) ? s.encode(s.initImage, s.posterior) : undefined;
    if (initLatent !== undefined) held.push(initLatent);
    const startNoise = tf.tidy(() => tf.reshape(s.noise(s.latentShape), [...s.latentShape]) as tf.Tensor4D);
    held.push(startNoise);
    let inpaint: InpaintInput | null = null;
    if (nine) {
      const maskedLatent = s.encode(masks.maskedImage, s.posterior);
      held.push(maskedLatent);
      inpaint = { mask: masks.latent, maskedLatent };
    } else {
      tf.dispose(s.posterior([1, h, w, c])); // the masked image's VAE sample diffusers draws (and an ordinary model does not read)
    }
    const afterStep = nine || initLatent === undefined ? undefined : keptBlend(sampler, s.samplerConfig, masks.latent, initLatent, startNoise);
    return await s.sample({ sampler, initLatent: strength < 1 ? initLatent : undefined, startNoise, eps: epsOf(inpaint), afterStep });
  } finally {
    sampler.dispose();
    tf.dispose(held);
  }
}

/** A file's or folder's name without extension, as the parameters name models. */
const nameOf = (path: string) => basename(path.replace(/[/\\]+$/, ''), extname(path));

/** The parameters' record of the adapters (image/parameters.ts), the models by name. */
export function adapterParameters(r: ResolvedParams, family: 'sd1' | 'sdxl'): { controlNets: ControlUnitParameters[]; ipAdapter: IpAdapterParameters | null; mask: boolean } {
  const controlNets: ControlUnitParameters[] = r.controlNets.map((c) => ({
    module: c.preprocess,
    model: nameOf(c.model),
    weight: c.scale,
    start: c.start,
    end: c.end,
    low: c.low,
    high: c.high,
  }));
  const ipAdapter = r.ipAdapter === null ? null : { model: nameOf(r.ipAdapter.model), weight: r.ipAdapter.scale, module: family === 'sdxl' ? 'ip-adapter_clip_sdxl' : 'ip-adapter_clip_sd15' };
  return { controlNets, ipAdapter, mask: r.mask };
}

