/**
 * `sd generate --prompt TEXT [...]`: txt2img (or img2img with --init-image, inpainting with --mask; ControlNet and
 * IP-Adapter flags in ./adapter-flags.ts) to PNG files carrying the
 * A1111 `parameters` text. Writes into --out (a folder, default outputs/, named <seed>.png; or a .png path),
 * never over an existing file (name-1.png, name-2.png, ...). Prints each path and seed on stdout; progress on
 * stderr. Ctrl-C cancels between steps.
 */
import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { dirname, extname, join } from 'node:path';
import type { CommandModule } from 'yargs';
import { BACKENDS, initBackend, type BackendName } from '../../backend/select.js';
import { PRECISIONS, type Precision } from '../../backend/kernels.js';
import {
  CONVENTION_NAMES,
  NOISE_SOURCES,
  PROMPT_SYNTAXES,
  SAMPLERS,
  type ConventionsName,
  type GenerateParams,
  type NoiseSource,
  type PixelPair,
  type PromptSyntax,
  type SamplerName,
} from '../../pipeline/api.js';
import { extractLoraTags, LoraError, resolveLora, type LoraSpec } from '../../lora/index.js';
import { limitsFor, readPipelineConfig, SD15_PIPELINE, StableDiffusion, type AnyPipelineConfig } from '../../pipeline/pipeline.js';
import { resolveParams } from '../../pipeline/params.js';
import { TokenizerError } from '../../tokenizer/index.js';
import { UsageError } from '../errors.js';
import { ProgressBar } from '../progress.js';
import { saveStepsOptions } from '../save-steps.js';
import { adapterOptions, adapterParams, withFlagName, type AdapterArgs } from './adapter-flags.js';

export const DEFAULT_WEIGHTS = 'weights/v1-5-pruned-emaonly.safetensors';

/** The flags; ControlNet, IP-Adapter and --mask are in ./adapter-flags.ts. */
interface Args extends AdapterArgs {
  /** --save-steps DIR: every step's predicted x0 as PNG (../save-steps.ts). */
  'save-steps'?: string;
  weights: string;
  config?: string;
  tokenizer?: string;
  prompt: string;
  'negative-prompt'?: string;
  seed?: number;
  steps?: number;
  /** A number (the guidance scale), or false from --no-cfg. */
  cfg?: unknown;
  sampler?: SamplerName;
  karras?: boolean;
  width?: number;
  height?: number;
  'clip-skip'?: number;
  'init-image'?: string;
  strength?: number;
  batch?: number;
  noise?: NoiseSource;
  'prompt-syntax'?: PromptSyntax;
  'pad-cond-uncond'?: boolean;
  conventions?: ConventionsName;
  'lora-dir'?: string;
  lora?: string[];
  'original-size'?: string;
  'crop-top-left'?: string;
  'target-size'?: string;
  out: string;
  backend?: BackendName;
  precision?: Precision;
  threads?: number;
}

const GET_WEIGHTS =
  'put an SD 1.x checkpoint (.safetensors, .ckpt or a diffusers folder) there or pass --weights; `sd download` fetches SD 1.5 and its tokenizer into weights/';

/** --cfg 7 -> scale 7; --no-cfg -> guidance off. */
function guidance(v: unknown): Pick<GenerateParams, 'cfg' | 'cfgScale'> {
  if (v === undefined) return {};
  if (v === false) return { cfg: false };
  if (typeof v === 'number' && Number.isFinite(v)) return { cfgScale: v };
  throw new UsageError(`--cfg needs a number (the guidance scale, e.g. 7.5), got ${JSON.stringify(v)}; --no-cfg turns guidance off`);
}

function readInitImage(path: string | undefined): Uint8Array | undefined {
  if (path === undefined) return undefined;
  if (!existsSync(path)) throw new UsageError(`--init-image ${path}: no such file`);
  return readFileSync(path);
}

/** "1024,768" -> [1024, 768]; left out: undefined. */
function pair(flag: string, v: string | undefined): PixelPair | undefined {
  if (v === undefined) return undefined;
  const m = /^\s*(\d+)\s*[,x]\s*(\d+)\s*$/.exec(String(v));
  if (m === null) throw new UsageError(`--${flag} needs two integers, e.g. 1024,1024, got ${JSON.stringify(v)}`);
  return [Number(m[1]), Number(m[2])];
}

export function toParams(args: Args): GenerateParams {
  if (args.strength !== undefined && args['init-image'] === undefined) throw new UsageError('--strength applies to img2img only: add --init-image FILE');
  return {
    prompt: args.prompt,
    negativePrompt: args['negative-prompt'],
    seed: args.seed,
    steps: args.steps,
    ...guidance(args.cfg),
    sampler: args.sampler,
    karras: args.karras,
    width: args.width,
    height: args.height,
    clipSkip: args['clip-skip'],
    initImage: readInitImage(args['init-image']),
    strength: args.strength,
    batch: args.batch,
    noise: args.noise,
    promptSyntax: args['prompt-syntax'],
    padCondUncond: args['pad-cond-uncond'],
    conventions: args.conventions,
    originalSize: pair('original-size', args['original-size']),
    cropTopLeft: pair('crop-top-left', args['crop-top-left']),
    targetSize: pair('target-size', args['target-size']),
    ...adapterParams(args),
  };
}

/**
 * The LoRAs a prompt's <lora:NAME:TE:UNET> tags name (A1111 syntax only), found in --lora-dir; a name not there is
 * skipped with a warning, and without --lora-dir every tag is. The tags are stripped from the prompt either way.
 */
export function promptLoras(args: Pick<Args, 'prompt' | 'prompt-syntax' | 'lora-dir'>, warn: (message: string) => void): LoraSpec[] {
  if (args['prompt-syntax'] === 'plain') return [];
  const { loras } = extractLoraTags(args.prompt);
  const dir = args['lora-dir'];
  if (loras.length > 0 && dir === undefined) {
    warn(`LoRA tags not applied (${loras.map((t) => `<lora:${t.name}>`).join(', ')}): give --lora-dir FOLDER to apply them`);
    return [];
  }
  const specs: LoraSpec[] = [];
  for (const tag of loras) {
    try {
      specs.push({ path: resolveLora(dir as string, tag.name), te: tag.te, unet: tag.unet });
    } catch (e) {
      if (!(e instanceof LoraError)) throw e;
      warn(`${e.message}; <lora:${tag.name}> skipped`);
    }
  }
  return specs;
}

const MULTIPLIER = /^[+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?$/i;

/**
 * One --lora value: FILE, FILE:M (text encoder and UNet both M) or FILE:TE:UNET, A1111's <lora:...:TE:UNET>
 * order. Multipliers are read off the end, so a path may hold ':' itself (C:\loras\x.safetensors:0.8).
 */
export function loraFlag(value: string): LoraSpec {
  const parts = value.split(':');
  const numbers: number[] = [];
  while (numbers.length < 2 && parts.length > 1 && MULTIPLIER.test(parts[parts.length - 1].trim())) numbers.unshift(Number(parts.pop()));
  const path = parts.join(':');
  if (!existsSync(path)) {
    const tail = parts.length > 1 ? `; "${parts[parts.length - 1]}" after a ':' is not a multiplier either` : '';
    throw new UsageError(`--lora ${value}: no file ${path}${tail} (FILE, FILE:MULTIPLIER or FILE:TE:UNET)`);
  }
  if (numbers.some((n) => !Number.isFinite(n))) throw new UsageError(`--lora ${value}: a multiplier is not a finite number`);
  const te = numbers[0] ?? 1;
  return { path, te, unet: numbers[1] ?? te };
}

const warnStderr = (message: string): void => {
  process.stderr.write(`sd: warning: ${message}\n`);
};

function checkWeights(path: string): void {
  if (!existsSync(path)) throw new UsageError(`weights not found: ${path}; ${GET_WEIGHTS}`);
}

/**
 * Writes bytes to `path`, or to path-1, path-2, ... if that exists: never overwrites (the 'wx' flag makes the
 * check and the creation one step). Returns the path written.
 */
export function writeNew(path: string, bytes: Uint8Array): string {
  const ext = extname(path);
  const stem = path.slice(0, path.length - ext.length);
  for (let n = 0; ; n++) {
    const candidate = n === 0 ? path : `${stem}-${n}${ext}`;
    try {
      writeFileSync(candidate, bytes, { flag: 'wx' });
      return candidate;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    }
  }
}

/** --out: a .png path, or a folder (made if missing) where each image is named after its seed. */
export function outputPath(out: string, seed: number): string {
  const isFile = extname(out).toLowerCase() === '.png' && !(existsSync(out) && statSync(out).isDirectory());
  const path = isFile ? out : join(out, `${seed}.png`);
  mkdirSync(dirname(path), { recursive: true });
  return path;
}

/** `flagged`: the --lora files, merged as the model loads with those of the prompt's tags (one model, one image set). */
async function loadModel(args: Args, config: AnyPipelineConfig | undefined, flagged: readonly LoraSpec[]): Promise<StableDiffusion> {
  try {
    const loras = [...flagged, ...promptLoras(args, warnStderr)];
    return await StableDiffusion.load({ weights: args.weights, config, tokenizer: args.tokenizer, loras, warn: warnStderr });
  } catch (e) {
    if (e instanceof TokenizerError && args.tokenizer === undefined) {
      throw new TokenizerError(`${e.message}; \`sd download --only bpe_simple_vocab_16e6.txt.gz\` fetches it into weights/`);
    }
    throw e;
  }
}

/** A progress bar made at the first step, when the total is known. */
function lazyBar(label: string): { update: (step: number, total: number) => void; finish: () => void } {
  let bar: ProgressBar | null = null;
  return {
    update: (step, total) => (bar ??= new ProgressBar(label, total)).update(step),
    finish: () => bar?.finish(),
  };
}

/** Cancels the generation on Ctrl-C (between steps); a second Ctrl-C exits at once. */
function abortOnSigint(): { signal: AbortSignal; release: () => void } {
  const controller = new AbortController();
  const onSigint = () => {
    if (controller.signal.aborted) process.exit(130);
    process.stderr.write('\ncancelling after this step (Ctrl-C again to quit now)\n');
    controller.abort();
  };
  process.on('SIGINT', onSigint);
  return { signal: controller.signal, release: () => process.off('SIGINT', onSigint) };
}

export const generateCommand: CommandModule<object, Args> = {
  command: 'generate',
  describe: 'generate images from a prompt (txt2img, or img2img with --init-image) into PNG files',
  builder: (y) =>
    adapterOptions(y)
      .option('prompt', { alias: 'p', type: 'string', demandOption: true, describe: 'what to draw' })
      .option('negative-prompt', { alias: 'n', type: 'string', describe: 'what to steer away from (the CFG uncond)' })
      .option('weights', { type: 'string', default: DEFAULT_WEIGHTS, describe: '.safetensors / .ckpt file or diffusers folder' })
      .option('config', { type: 'string', describe: 'pipeline config JSON (as the fixtures\' fixture.json "config"); default: the family\'s (SD 1.5, SDXL base), recognised from the weights' })
      .option('tokenizer', { type: 'string', describe: 'tokenizer file or folder; default: next to the weights, then ./weights' })
      .option('seed', { type: 'number', describe: '0..2^32-1; default random (printed). Image i of a batch uses seed + i' })
      .option('steps', { type: 'number', describe: 'denoising steps (default 20)' })
      .option('cfg', { coerce: (v: unknown) => v, describe: 'classifier-free guidance scale (default 7.5); --no-cfg: off' })
      .option('sampler', { choices: SAMPLERS, describe: 'sampler (default euler_a)' })
      .option('karras', { type: 'boolean', describe: 'Karras sigmas (sigma samplers)' })
      .option('width', { alias: 'W', type: 'number', describe: 'pixels, a multiple of 8 (default: the model\'s: 512 for SD 1.x, 1024 for SDXL)' })
      .option('height', { alias: 'H', type: 'number', describe: 'pixels, a multiple of 8 (default: the model\'s: 512 for SD 1.x, 1024 for SDXL)' })
      .option('clip-skip', { type: 'number', describe: '1 = last text-encoder layer (default), 2 = penultimate' })
      .option('init-image', { type: 'string', describe: 'img2img: a PNG or JPEG, resized to width x height' })
      .option('strength', { type: 'number', describe: 'img2img: how much to change the image, (0, 1] (default 0.75)' })
      .option('batch', { type: 'number', describe: 'images to make, 1..8 (default 1)' })
      .option('noise', { choices: NOISE_SOURCES, describe: "random numbers: cpu = torch's CPU generator (default; diffusers, ComfyUI), gpu = torch's CUDA one (A1111's default)" })
      .option('prompt-syntax', { choices: PROMPT_SYNTAXES, describe: 'a1111 (default): (emphasis:1.2), [less], BREAK, past 75 tokens, "a cat AND a dog :0.7", <lora:...>; plain: text, cut at 75 tokens' })
      .option('pad-cond-uncond', { type: 'boolean', describe: "a1111 syntax: pad prompt and negative prompt of different lengths with empty-prompt chunks and run them as one batch (A1111's pad_cond_uncond; a different image)" })
      .option('conventions', { choices: CONVENTION_NAMES, describe: "sampler conventions: a1111 (k-diffusion) or diffusers; default: a diffusers folder's, else a1111 for SD 1.x, diffusers for SDXL" })
      .option('lora-dir', { type: 'string', describe: 'folder of LoRA files the prompt\'s <lora:NAME:WEIGHT> tags are looked up in' })
      .option('lora', { type: 'string', array: true, describe: 'a LoRA file to apply, FILE[:MULTIPLIER] (default 1) or FILE:TE:UNET; repeatable, with the prompt\'s tags' })
      .option('original-size', { type: 'string', describe: 'SDXL size conditioning H,W (default: the image size)' })
      .option('crop-top-left', { type: 'string', describe: 'SDXL crop conditioning T,L (default 0,0)' })
      .option('target-size', { type: 'string', describe: 'SDXL target size conditioning H,W (default: the image size)' })
      .option('out', { alias: 'o', type: 'string', default: 'outputs', describe: 'a folder (images named <seed>.png) or a .png path' })
      .option('backend', { choices: BACKENDS, describe: 'TensorFlow.js backend (default: SD_BACKEND, else the best available)' })
      .option('precision', { choices: PRECISIONS, describe: 'native kernels\' matrix products: float32 (default: SD_PRECISION, else float32) or bf16, an opt-in for CPUs with AMX-BF16 or AVX512-BF16 (faster, a slightly different image)' })
      .option('threads', { type: 'number', describe: 'wasm threads (default: SD_THREADS, else one per core)' })
      .option('save-steps', { type: 'string', describe: "write every step's predicted x0 (VAE-decoded) into this folder as step_001.png, ... to watch the image emerge" }) as never,
  handler: async (args) => {
    const config = args.config !== undefined ? readPipelineConfig(args.config) : undefined;
    // Validate every parameter before the slow part; the resolved seed is the one generated with. The model's
    // family (its default size) is known once it is loaded; sizes are checked against it again then.
    const params = toParams(args);
    // SDXL's size conditioning waits for the family too.
    const early = { ...params, originalSize: undefined, cropTopLeft: undefined, targetSize: undefined };
    let seed: number;
    try {
      ({ seed } = resolveParams(early, limitsFor(config ?? SD15_PIPELINE)));
    } catch (e) {
      throw withFlagName(e); // an adapter field's ParamError names its flag
    }
    checkWeights(args.weights);
    const loras = (args.lora ?? []).map(loraFlag); // a bad --lora fails before the backend starts
    await initBackend({ backend: args.backend, threads: args.threads, precision: args.precision });
    const sd = await loadModel(args, config, loras);
    const { signal, release } = abortOnSigint();
    const bar = lazyBar('sampling');
    try {
      // one generation and exit: each network is freed once done with (the text encoders, then the UNet before the VAE)
      const result = await sd.generate({ ...params, seed }, { signal, onProgress: bar.update, oneShot: true, ...saveStepsOptions(args['save-steps'], params.batch ?? 1) });
      bar.finish();
      for (const img of result.images) {
        const path = writeNew(outputPath(args.out, img.seed), img.png);
        process.stdout.write(`${path} (seed ${img.seed})\n`);
      }
    } catch (e) {
      bar.finish();
      if (e instanceof Error && e.name === 'AbortError') {
        process.stderr.write('sd: cancelled\n');
        process.exitCode = 130;
        return;
      }
      throw withFlagName(e);
    } finally {
      release();
      sd.dispose();
    }
  },
};
