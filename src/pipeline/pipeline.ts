/**
 * Stable Diffusion 1.x, txt2img and img2img (Rombach et al. 2022):
 *
 *   prompt, negative prompt --tokenizer--> ids [2, 77] --CLIP--> conditioning (context [2, 77, C]; conditioning.ts)
 *   seed --TorchGenerator--> noise [1, h, w, 4] --sampler (denoise.ts) + UNet with CFG (eps.ts)--> latent [1, h, w, 4]
 *   latent / scale_factor --VAE decoder--> [1, H, W, 3] in [-1, 1] --> clamp(x / 2 + 0.5, 0, 1) --> RGB uint8 + PNG
 *
 * img2img starts instead from the init image: [-1, 1] --VAE encoder--> moments; mean + std * posterior noise,
 * times scale_factor, is the init latent, which the sampler noises to its first step.
 *
 * Random numbers: image i of a batch uses its own generator seeded with seed + i (`noise`: torch's CPU one, as
 * CompVis, diffusers with a CPU generator and ComfyUI; or torch's CUDA one, as A1111 on NVIDIA), drawing the start
 * noise, then each step's noise (euler_a, ddpm). img2img's VAE posterior sample: under diffusers' conventions the
 * same generator's first draw (then the start noise), as diffusers; under A1111's a torch CPU generator of its
 * own, seeded with the bitwise complement of the image seed, so the sampler's draws stay those of the seed.
 *
 * Conventions (scheduler/conventions.ts) default by model source: a diffusers folder's scheduler_config.json,
 * else A1111's for SD 1.x and the family config's (diffusers') for SDXL. Prompts (SD 1.x) follow A1111's syntax
 * by default (a1111-prompt.ts, a1111-sdxl.ts), SDXL's too.
 *
 * Latents are NHWC [B, H/8, W/8, c], c the VAE's latent channels; h, w below are latent sizes.
 */
import { basename, dirname, extname, join, resolve } from 'node:path';
import { existsSync, readFileSync, statSync } from 'node:fs';
import * as tf from '../backend/tf.js';
import { ClipTextEncoder } from '../clip/index.js';
import { sdxlTextConditioner } from './streamed-text.js';
import { UNet, type Conditioning } from '../unet/index.js';
import { Vae, downsampleFactor } from '../vae/index.js';
import { ClipTokenizer, findTokenizer } from '../tokenizer/index.js';
import {
  A1111_CONVENTIONS,
  conventionsFromSchedulerConfig,
  createGenerator,
  createSampler,
  SD15_DIFFUSERS_CONVENTIONS,
  TorchGenerator,
  torchNoise,
  type EpsFn,
  type NoiseFn,
  type Sampler,
  type SamplerConfig,
  type SamplerConventions,
} from '../scheduler/index.js';
import { openWeights } from '../weights/open.js';
import { trimHeap } from '../backend/kernels.js';
import { extractLoraTags, readLoras, withLoras, type LoraSpec } from '../lora/index.js';
import { LayerLog } from '../nn/reload.js';
import { LoraSwitch } from './lora-switch.js';
import type { TensorSource } from '../weights/types.js';
import { decodeImage, encodePng, type RgbImage } from '../image/codec.js';
import type { ConventionsName, GenerateOptions, GenerateParams, GenerateResult, GeneratedImage, PreviewDecoder, ResolvedParams } from './api.js';
import { X0Tap } from '../scheduler/x0.js';
import { approxRgb, rgbBytes } from './preview.js';
import { checkCheckpointFits, ConfigError, familyOf, SD15_PIPELINE, type AnyPipelineConfig, type PipelineConfig } from './config.js';
import { ShapeError } from '../nn/errors.js';
import {
  disposeGuided,
  Sd1Conditioner,
  sd1Conditioning,
  type GuidedConditioning,
  type MicroConditioning,
  type Prompts,
  type TextConditioner,
} from './conditioning.js';
import { detectFamily, type ModelFamily } from './families.js';
import { diffusersFolderConfig } from './diffusers-config.js';
import { SDXL_BASE_PIPELINE, type SdxlPipelineConfig } from './sdxl-config.js';
import { denoise, throwIfAborted, type AfterStep } from './denoise.js';
import { guidedEps } from './eps.js';
import { resolveParams, usesGuidance, type ParamLimits } from './params.js';
// -- ControlNet, IP-Adapter, inpainting (./control.ts, ./ip.ts, ./inpaint-run.ts, ./eps.ts)
import { ControlNetCache } from './control.js';
import { IpAdapterCache, withAdapter, withImageTokens } from './ip.js';
import { withCheckpointInChannels } from './inpaint-run.js';
import { adapterParameters, NO_ADAPTERS, prepareAdapters, sampleImage, type RequestAdapters } from './adapters.js';

export { AbortError } from './denoise.js';
export { SD15_PIPELINE, familyOf, pipelineConfigFromLdm, readPipelineConfig, type AnyPipelineConfig, type PipelineConfig } from './config.js';
export { SDXL_BASE_PIPELINE, sdxlConfigFromJson, type SdxlPipelineConfig } from './sdxl-config.js';

export interface LoadOptions {
  /** A .safetensors or .ckpt file, or a diffusers folder. */
  readonly weights: string;
  /**
   * Default: a diffusers folder's own (its config.json files, diffusers-config.ts), else the family's (SD 1.5's,
   * SDXL base's), the family recognised from the checkpoint's keys.
   */
  readonly config?: AnyPipelineConfig;
  /** A tokenizer file or folder; default: looked for next to the weights, then in ./weights. */
  readonly tokenizer?: string;
  /**
   * LoRA files merged into the text encoder and UNet weights as they load (src/lora), with their multipliers. Left
   * out, the model takes none and a prompt's <lora:...> tags are stripped with a warning that they were not applied.
   */
  readonly loras?: readonly LoraSpec[];
  /** Where warnings go (a prompt cut at 77 tokens, LoRA tags not applied); default: stderr. */
  readonly warn?: (message: string) => void;
}

/** The sampler conventions used under the name 'diffusers', and the default name, by model source. */
interface SourceConventions {
  readonly diffusers: SamplerConventions;
  readonly default: ConventionsName;
}

/**
 * A diffusers folder with scheduler/scheduler_config.json: its conventions (and the default); else the family's
 * (SD 1.x: diffusers' are those of SD 1.5's scheduler config, SD15_DIFFUSERS_CONVENTIONS).
 */
export function sourceConventions(weights: string, cfg: AnyPipelineConfig): SourceConventions {
  const path = join(weights, 'scheduler', 'scheduler_config.json');
  if (existsSync(weights) && statSync(weights).isDirectory() && existsSync(path)) {
    return { diffusers: conventionsFromSchedulerConfig(JSON.parse(readFileSync(path, 'utf8'))).conventions, default: 'diffusers' };
  }
  const family = 'conventions' in cfg ? cfg.conventions : A1111_CONVENTIONS;
  return { diffusers: family.name === 'diffusers' ? family : SD15_DIFFUSERS_CONVENTIONS, default: family.name === 'diffusers' ? 'diffusers' : 'a1111' };
}

const stderrWarn = (message: string): void => {
  process.stderr.write(`sd: warning: ${message}\n`);
};

/** Where a tokenizer is looked for when none is given: next to the weights (and in a diffusers folder), then ./weights. */
export function tokenizerCandidates(weights: string): string[] {
  const isDir = existsSync(weights) && statSync(weights).isDirectory();
  const next = isDir ? weights : dirname(weights);
  return [...new Set([next, resolve('weights')])];
}

/** What a model of this config allows: its native size as default, clip skip up to its text-encoder depth. */
export function limitsFor(cfg: AnyPipelineConfig): ParamLimits {
  const family = familyOf(cfg);
  const clipLayers = 'family' in cfg ? cfg.text.clipL.layers : cfg.clip.layers;
  const conventions: ConventionsName = 'conventions' in cfg && cfg.conventions.name === 'diffusers' ? 'diffusers' : 'a1111';
  return { family, width: cfg.width, height: cfg.height, minSize: Math.min(64, cfg.width, cfg.height), clipLayers, conventions };
}

/** A tf.Tensor4D NHWC [1, H, W, 3] in [-1, 1] from RGB bytes. */
function rgbToTensor(img: RgbImage): tf.Tensor4D {
  return tf.tidy(() => tf.sub(tf.div(tf.tensor4d(Float32Array.from(img.rgb), [1, img.height, img.width, 3]), 127.5), 1));
}

/** [1, H, W, 3] in [0, 1] -> RGB bytes, round(255 x). */
async function tensorToRgb(image: tf.Tensor4D): Promise<Uint8Array> {
  const values = await image.data();
  const rgb = new Uint8Array(values.length);
  for (let i = 0; i < values.length; i++) rgb[i] = Math.round(values[i] * 255);
  return rgb;
}

export class StableDiffusion {
  private disposed = false;
  /** Set by a oneShot generate (GenerateOptions.oneShot): some networks are freed. */
  private spent = false;

  private constructor(
    readonly config: AnyPipelineConfig,
    /** The weights file's name without extension, written into the PNG parameters. */
    readonly modelName: string,
    /** The family's text -> conditioning (conditioning.ts). */
    private readonly text: TextConditioner,
    private readonly unet: UNet,
    private readonly vae: Vae,
    /** What 'a1111' / 'diffusers' conventions mean for this model, and which one a request gets by default. */
    readonly conventions: SourceConventions,
    private readonly warn: (message: string) => void,
    /** Whether LoRAs were given at load: without, a prompt's <lora:...> tags get a warning. */
    private readonly lorasGiven: boolean,
    /** A request's LoRAs (GenerateParams.loras), switched on and off in the loaded layers (lora-switch.ts). */
    readonly loras: LoraSwitch,
  ) {}

  /** ControlNets and IP-Adapters loaded by requests, kept until the model is disposed. */
  private controlCache: ControlNetCache | null = null;
  private readonly ipCache = new IpAdapterCache();

  private get controlNets(): ControlNetCache {
    return (this.controlCache ??= new ControlNetCache(this.config.unet));
  }

  /** Opens the weights, recognises the family from their keys, and loads the family's networks. */
  static async load(o: LoadOptions): Promise<StableDiffusion> {
    const tokenizer = ClipTokenizer.fromFile(o.tokenizer ?? findTokenizer(tokenizerCandidates(o.weights)));
    const src = openWeights(o.weights);
    try {
      const family = detectFamily(src);
      if (o.config !== undefined && familyOf(o.config) !== family) {
        throw new ConfigError(`${o.weights}: the checkpoint is ${family === 'sdxl' ? 'SDXL' : 'SD 1.x'}, but the config given is for ${familyOf(o.config) === 'sdxl' ? 'SDXL' : 'SD 1.x'}`);
      }
      const name = basename(o.weights, extname(o.weights));
      const fixed = readLoras(o.loras ?? []);
      const log = new LayerLog();
      const weights = log.source(withLoras(src, fixed));
      const loras = new LoraSwitch(o.weights, () => openWeights(o.weights), fixed, log);
      const warn = o.warn ?? stderrWarn;
      const make = (config: AnyPipelineConfig) => {
        const conventions = sourceConventions(o.weights, config);
        return (t: TextConditioner, unet: UNet, vae: Vae) => new StableDiffusion(config, name, t, unet, vae, conventions, warn, o.loras !== undefined, loras);
      };
      if (family === 'sdxl') {
        const config = (o.config ?? diffusersFolderConfig(o.weights, family) ?? SDXL_BASE_PIPELINE) as SdxlPipelineConfig;
        const text = () => sdxlTextConditioner(weights, tokenizer, config); // streamed on wasm, as the UNet
        return StableDiffusion.loadModels(weights, config, text, make(config));
      }
      // an inpainting checkpoint's 9-channel UNet widens the config (inpaint-run.ts)
      const config = withCheckpointInChannels(src, (o.config ?? diffusersFolderConfig(o.weights, family) ?? SD15_PIPELINE) as PipelineConfig);
      checkCheckpointFits(src, config);
      const text = () => new Sd1Conditioner({ tokenizer, clip: ClipTextEncoder.load(weights, config.clip) });
      return StableDiffusion.loadModels(weights, config, text, make(config));
    } finally {
      src.close();
    }
  }

  /** Loads the text encoders, the UNet and the VAE; frees those already loaded when a later one fails. */
  private static loadModels<T>(
    src: TensorSource,
    cfg: AnyPipelineConfig,
    text: () => TextConditioner,
    make: (t: TextConditioner, u: UNet, v: Vae) => T,
  ): T {
    const loaded: { dispose(): void }[] = [];
    try {
      const t = text();
      loaded.push(t);
      const unet = UNet.load(src, cfg.unet);
      loaded.push(unet);
      const vae = Vae.load(src, cfg.vae);
      return make(t, unet, vae);
    } catch (e) {
      for (const m of loaded) m.dispose();
      if (e instanceof ShapeError) throw new ConfigError(e.message);
      throw e;
    }
  }

  get family(): ModelFamily {
    return familyOf(this.config);
  }

  get limits(): ParamLimits {
    return { ...limitsFor(this.config), conventions: this.conventions.default };
  }

  /** SD 1.x: the conditioning of `texts`, context [texts.length, 77, C] (the fixtures compare it). */
  encodeText(texts: readonly string[], clipSkip: number): Conditioning {
    if (!(this.text instanceof Sd1Conditioner)) throw new ConfigError('encodeText: SD 1.x only; use encodePrompts');
    return sd1Conditioning(this.text.text, texts, clipSkip);
  }

  /**
   * CFG conditioning of batch 2 (negative prompt, then prompt), or of batch 1 (prompt) without guidance; prompts
   * in A1111 syntax: a row per AND part, and of different token counts the prompt's, with the negative's as
   * `uncond` (unless r.padCondUncond pads them into one batch). `negative`
   * null: none was given (SD 1.x encodes "", SDXL base uses zeros); default: the resolved negative prompt.
   * Dispose with disposeGuided.
   */
  encodePrompts(r: ResolvedParams, negative: string | null = r.negativePrompt, micro: MicroConditioning = microOf(r)): GuidedConditioning {
    const prompts: Prompts = { prompt: r.prompt, negative };
    const promptSyntax = r.promptSyntax;
    if (promptSyntax === 'a1111' && !this.lorasGiven && !this.loras.on) {
      const tags = extractLoraTags(r.prompt).loras;
      if (tags.length > 0) this.warn(`LoRA tags not applied (${tags.map((t) => `<lora:${t.name}>`).join(', ')}): this model was loaded without LoRAs`);
    }
    return this.text.encode(prompts, { guidance: usesGuidance(r), clipSkip: r.clipSkip, micro, promptSyntax, warn: this.warn, padCondUncond: r.padCondUncond });
  }

  /** image NHWC [1, H, W, 3] in [-1, 1] -> init latent [1, h, w, 4] = (mean + std * noise) * scale_factor. */
  encodeImage(image: tf.Tensor4D, posteriorNoise: NoiseFn): tf.Tensor4D {
    return tf.tidy(() => {
      const { mean, logvar } = this.vae.encode(image);
      const std = tf.exp(tf.mul(tf.clipByValue(logvar, -30, 20), 0.5));
      return tf.mul(tf.add(mean, tf.mul(std, posteriorNoise(mean.shape))), this.config.scaleFactor);
    });
  }

  /** latent [1, h, w, 4] -> image NHWC [1, H, W, 3] in [0, 1]. */
  decodeLatent(latent: tf.Tensor4D): tf.Tensor4D {
    return tf.tidy(() => {
      const decoded = this.vae.decode(tf.div<tf.Tensor4D>(latent, this.config.scaleFactor));
      return tf.clipByValue(tf.add<tf.Tensor4D>(tf.mul(decoded, 0.5), 0.5), 0, 1);
    });
  }

  /**
   * One latent: start from `noise` (and the init latent for img2img), run every sampler step with guidance.
   * Disposes nothing it was given; returns a new tensor.
   */
  async sampleLatent(o: {
    readonly sampler: Sampler;
    readonly cond: GuidedConditioning;
    readonly guidanceScale: number | null;
    readonly noise: NoiseFn;
    readonly latentShape: readonly [number, number, number, number];
    readonly initLatent?: tf.Tensor4D;
    readonly signal?: AbortSignal;
    readonly onStep?: (step: number, total: number) => void;
  } & X0Hooks & AdapterHooks): Promise<tf.Tensor4D> {
    const start = tf.tidy(() => o.sampler.start(o.startNoise ?? tf.reshape(o.noise(o.latentShape), [...o.latentShape]), o.initLatent));
    const eps = o.eps ?? guidedEps(this.unet, o.cond, o.guidanceScale);
    // The predicted x0 of each step, when previews or an early stop may want it (../scheduler/x0.ts).
    const tap = o.onX0 !== undefined || o.stop !== undefined ? new X0Tap(eps) : null;
    let latent = start;
    let x0: tf.Tensor4D | null = null;
    try {
      for await (const s of denoise(start, o.sampler, tap?.eps ?? eps, o.noise, o.signal, o.afterStep)) {
        latent = s.latent;
        o.onStep?.(s.step, s.total);
        if (tap === null) continue;
        x0?.dispose();
        x0 = tap.take();
        if (x0 !== null) await o.onX0?.(x0, s.step, s.total);
        if (o.stop?.aborted === true && s.step < s.total && x0 !== null) {
          o.onStopped?.(s.step);
          return x0; // leaving the loop frees the step's latent
        }
      }
    } catch (e) {
      latent.dispose();
      x0?.dispose();
      throw e;
    } finally {
      tap?.dispose();
    }
    x0?.dispose();
    return latent;
  }

  /** A preview of latent-space `x0` [1, h, w, c]: RGB bytes and their size (./preview.ts). */
  async previewOf(x0: tf.Tensor4D, decoder: PreviewDecoder): Promise<{ rgb: Uint8Array; width: number; height: number }> {
    const image = decoder === 'vae' ? this.decodeLatent(x0) : approxRgb(x0, this.family);
    try {
      return { rgb: await rgbBytes(image), width: image.shape[2], height: image.shape[1] };
    } finally {
      image.dispose();
    }
  }

  /** Runs with the request's LoRAs on (switched to if others were), the base weights when it has none. */
  async generate(p: GenerateParams, o: GenerateOptions = {}): Promise<GenerateResult> {
    if (this.disposed) throw new Error('StableDiffusion.generate: the model has been disposed');
    if (this.spent) throw new Error('StableDiffusion.generate: a oneShot generation freed this model\'s networks; load it again');
    if (o.oneShot === true) this.spent = true;
    const release = this.loras.use(p.loras ?? []);
    try {
      return await this.generateOnWeights(p, o);
    } finally {
      release();
    }
  }

  private async generateOnWeights(p: GenerateParams, o: GenerateOptions): Promise<GenerateResult> {
    const r = resolveParams(p, this.limits);
    const init = p.initImage === undefined ? null : await decodeImage(p.initImage, r.width, r.height, 'init image');
    throwIfAborted(o.signal);
    const probe = createSampler(this.samplerConfig(r));
    const perImage = probe.totalSteps;
    probe.dispose();
    const total = perImage * r.batch;
    // ControlNets, IP-Adapter, mask (./adapters.ts): decoded and loaded before the text is encoded
    const f = downsampleFactor(this.config.vae);
    const adapters = await prepareAdapters(p, r, { controlNets: this.controlNets, ipAdapters: this.ipCache, unet: this.unet, latentHeight: r.height / f, latentWidth: r.width / f });
    let cond: GuidedConditioning | null = null;
    let initImage: tf.Tensor4D | null = null;
    let joined: { readonly cond: GuidedConditioning; dispose(): void } | null = null;
    const images: GeneratedImage[] = [];
    let stoppedAt: number | undefined;
    try {
      throwIfAborted(o.signal);
      cond = this.encodePrompts(r, p.negativePrompt ?? null);
      if (o.oneShot === true && !this.loras.on) this.text.dispose();
      initImage = init === null ? null : rgbToTensor(init);
      joined = adapters.ip === null ? null : withImageTokens(cond, adapters.ip.tokens, usesGuidance(r));
      const c = joined?.cond ?? cond;
      const image = initImage;
      await withAdapter(adapters.ip?.adapter ?? null, this.unet, async () => {
        for (let i = 0; i < r.batch && stoppedAt === undefined; i++) {
          const done = i * perImage;
          const onStep = (step: number) => o.onProgress?.(done + step, total);
          const hooks: X0Hooks = {
            onX0: this.previewHook(o, i, done, total),
            stop: o.stop,
            onStopped: (step) => (stoppedAt = done + step),
          };
          const sampled = o.oneShot === true && i === r.batch - 1 ? () => this.freeSampling() : undefined;
          images.push(await this.generateOne(r, (r.seed + i) >>> 0, c, image, o.signal, onStep, { ...hooks, sampled }, adapters));
        }
      });
    } finally {
      joined?.dispose();
      if (cond !== null) disposeGuided(cond);
      initImage?.dispose();
      adapters.dispose();
    }
    return { images, params: r, ...(stoppedAt !== undefined ? { stoppedAt } : {}) };
  }

  /** onX0 for image `image` of a call: every `preview.every`-th step and the last, made and handed to onPreview. */
  private previewHook(o: GenerateOptions, image: number, done: number, total: number): X0Hooks['onX0'] {
    const { preview, onPreview } = o;
    if (preview === undefined || onPreview === undefined) return undefined;
    const every = Math.max(1, Math.floor(preview.every ?? 1));
    return async (x0, step, perImage) => {
      if (step % every !== 0 && step !== perImage) return;
      const made = await this.previewOf(x0, preview.decoder);
      await onPreview({ step: done + step, total, image, decoder: preview.decoder, ...made });
    };
  }

  /** The sampler of `r` under its conventions: A1111's (k-diffusion), or diffusers' (this model's scheduler config). */
  samplerConfig(r: ResolvedParams): SamplerConfig {
    const conventions = r.conventions === 'diffusers' ? this.conventions.diffusers : A1111_CONVENTIONS;
    return { name: r.sampler, steps: r.steps, karras: r.karras, strength: r.strength ?? undefined, conventions };
  }

  /**
   * The random numbers of one image: `noise` (the start noise, then each step's) from r.noise's generator seeded
   * with `seed`; `posterior` (img2img's VAE sample): under diffusers' conventions the same generator, drawn first,
   * as diffusers does; under A1111's a torch CPU generator seeded with ~seed (A1111's own is not seeded at all).
   */
  imageNoise(r: ResolvedParams, seed: number): { readonly noise: NoiseFn; readonly posterior: NoiseFn } {
    const noise = torchNoise(createGenerator(r.noise, seed));
    return { noise, posterior: r.conventions === 'diffusers' ? noise : torchNoise(new TorchGenerator(~seed >>> 0)) };
  }

  private async generateOne(
    r: ResolvedParams,
    seed: number,
    cond: GuidedConditioning,
    initImage: tf.Tensor4D | null,
    signal: AbortSignal | undefined,
    onStep: (step: number) => void,
    hooks: X0Hooks = {},
    adapters: RequestAdapters = NO_ADAPTERS,
  ): Promise<GeneratedImage> {
    const f = downsampleFactor(this.config.vae);
    const latentShape = [1, r.height / f, r.width / f, this.config.vae.embedDim] as const;
    const { noise, posterior } = this.imageNoise(r, seed);
    const guidanceScale = usesGuidance(r) ? r.cfgScale : null;
    // txt2img / img2img, or inpainting, with the ControlNets (./adapters.ts)
    const latent = await sampleImage({
      unet: this.unet,
      cond,
      guidanceScale,
      samplerConfig: this.samplerConfig(r),
      latentShape,
      factor: f,
      noise,
      posterior,
      initImage,
      strength: r.strength,
      encode: (image, post) => this.encodeImage(image, post),
      sample: (s) => this.sampleLatent({ cond, guidanceScale, noise, latentShape, signal, onStep, ...hooks, ...s }),
    }, adapters);
    hooks.sampled?.();
    const image = this.decodeLatent(latent);
    latent.dispose();
    let rgb: Uint8Array;
    try {
      rgb = await tensorToRgb(image);
    } finally {
      image.dispose();
    }
    const png = await encodePng({ rgb, width: r.width, height: r.height }, {
      ...r,
      seed,
      model: this.modelName,
      promptSyntax: r.promptSyntax,
      padConds: cond.padded === true,
      ...adapterParameters(r, this.family),
    });
    return { png, rgb, seed };
  }

  /** oneShot: the UNet, ControlNets and IP-Adapters go once the last latent is sampled (kept while LoRAs are switched on). */
  private freeSampling(): void {
    if (this.loras.on) return;
    this.controlCache?.dispose();
    this.controlCache = null;
    this.ipCache.dispose();
    this.unet.dispose();
    trimHeap(); // their pages back to the system before the VAE decode allocates
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    this.controlCache?.dispose();
    this.ipCache.dispose();
    this.loras.restore(); // the layers' own weights back in place, so that disposing them frees everything
    this.text.dispose();
    this.unet.dispose();
    this.vae.dispose();
    trimHeap();
  }
}

/** What sampleLatent does with each step's predicted x0: a preview, an early stop (GenerateOptions.stop). */
interface X0Hooks {
  readonly onX0?: (x0: tf.Tensor4D, step: number, total: number) => Promise<void>;
  readonly stop?: AbortSignal;
  readonly onStopped?: (step: number) => void;
  /** After the latent is sampled, before it is decoded (oneShot's last image: the sampling networks are freed). */
  readonly sampled?: () => void;
}

/** What inpainting and ControlNets change in sampleLatent (./adapters.ts). */
export interface AdapterHooks {
  /** The noise predictor, instead of guidedEps of cond alone (with the ControlNets, a 9-channel UNet's inputs). */
  readonly eps?: EpsFn;
  /** The start noise drawn by the caller (inpainting draws it between two VAE samples); not disposed. */
  readonly startNoise?: tf.Tensor4D;
  /** Runs after every step (an ordinary model's inpainting blend). */
  readonly afterStep?: AfterStep;
}

/** SDXL's size and crop conditioning of `r` (defaults: original size = target size = the image's, no crop). */
function microOf(r: ResolvedParams): MicroConditioning {
  return { originalSize: r.originalSize, cropTopLeft: r.cropTopLeft, targetSize: r.targetSize };
}
