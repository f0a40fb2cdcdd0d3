/**
 * Parity runner for tests/fixtures/pipeline: the tiny end-to-end model, loaded from each of its three files
 * (model.safetensors, model-fp16.safetensors, model.ckpt), runs every case of fixture.json through the
 * pipeline's own stages (StableDiffusion.encodeText / encodeImage / sampleLatent / decodeLatent) and compares:
 *   text    context of the negative prompt and the prompt vs `uncond`, `cond`          (tolerance.latent)
 *   latent  the sampled latent vs the case's `latent` (NCHW in the file)               (tolerance.latent)
 *   image   the decoded image vs the case's `image` (NHWC [1, H, W, 3] in [0, 1])      (tolerance.image)
 * Noise: a case with a seed draws from TorchGenerator(seed) exactly as generate() does, and each draw is also
 * checked against the listed noise tensors; a case without one starts from `x_T` and takes its listed noise.
 * The fp16 file is held to the same expected values and tolerances as the fp32 ones. The fixture gives no
 * tolerance for the text step; it is checked at tolerance.latent, except for the fp16 file, whose rounded
 * weights alone move the text encoding by ~1.4e-3 (relative): there it is checked at TEXT_TOLERANCE_FP16.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import * as tf from '../backend/tf.js';
import { SafetensorsFile } from '../weights/safetensors.js';
import { disposeConditioning } from '../unet/index.js';
import { createSampler, type NoiseFn } from '../scheduler/index.js';
import type { SamplerName } from '../pipeline/api.js';
import { pipelineConfigFromLdm, StableDiffusion, type PipelineConfig } from '../pipeline/pipeline.js';
import { withinTolerance } from './compare.js';
import { checkedTorchDraws } from './draws.js';
import type { CaseResult, KindRunner } from './types.js';

const KIND = 'pipeline';
const MODEL_FILES = ['model.safetensors', 'model-fp16.safetensors', 'model.ckpt'] as const;
/** One draw of the seeded generator vs the listed tensor: both are torch.randn float32 values. */
/** fp16 weights (2^-11 relative rounding per weight, through every layer) vs the fp32 reference encoding. */
const TEXT_TOLERANCE_FP16 = 2e-3;

interface FixtureCase {
  readonly mode: 'txt2img' | 'img2img';
  readonly sampler: SamplerName;
  readonly karras?: boolean;
  readonly steps: number;
  readonly strength?: number;
  readonly cfg_scale: number;
  readonly seed?: number;
  readonly noise?: readonly string[];
  readonly init_image?: string;
  readonly init_posterior_noise?: string;
  readonly init_latent?: string;
  readonly latent: string;
  readonly image: string;
}

interface Fixture {
  readonly config: { readonly prompt: string; readonly negative_prompt: string };
  readonly tolerance: { readonly latent: number; readonly image: number };
  readonly cases: readonly FixtureCase[];
}

const caseName = (c: FixtureCase): string => `${c.mode}_${c.sampler}${c.karras === true ? '_karras' : ''}`;

/** NCHW values from the io file -> NHWC tensor. */
function nhwc(io: SafetensorsFile, key: string): tf.Tensor4D {
  const [b, c, h, w] = io.info(key).shape;
  return tf.tidy(() => tf.transpose(tf.tensor4d(io.float32(key), [b, c, h, w]), [0, 2, 3, 1]));
}

/** NHWC tensor -> NCHW values, to compare with the io file. */
function nchwValues(x: tf.Tensor4D): Float32Array {
  return tf.tidy(() => tf.transpose(x, [0, 3, 1, 2])).dataSync() as Float32Array;
}

function compared(name: string, actual: ArrayLike<number>, expected: ArrayLike<number>, tolerance: number, detail?: string): CaseResult {
  const { passed, maxRelError: err } = withinTolerance(actual, expected, tolerance);
  return { kind: KIND, name, passed: passed && detail === undefined, maxRelError: err, tolerance, detail };
}

/**
 * The case's noise: TorchGenerator(seed) as generate() draws it, each draw checked against the listed tensors;
 * or, without a seed, x_T for the start and then the listed tensors in order.
 */
function caseNoise(io: SafetensorsFile, c: FixtureCase): { noise: NoiseFn; problems: () => string | undefined } {
  const listed = c.noise ?? [];
  if (c.seed !== undefined) return checkedTorchDraws(io, c.seed, listed);
  const queue = ['x_T', ...listed];
  const noise: NoiseFn = (shape) => {
    const key = queue.shift();
    if (key === undefined) throw new Error(`the sampler asked for more noise than the case lists (shape [${shape.join(', ')}])`);
    return nhwc(io, key);
  };
  return { noise, problems: () => undefined };
}

async function runCase(sd: StableDiffusion, io: SafetensorsFile, fx: Fixture, c: FixtureCase, file: string): Promise<CaseResult[]> {
  const name = `${file}/${caseName(c)}`;
  const tol = fx.tolerance;
  const results: CaseResult[] = [];
  const cond = sd.encodeText([fx.config.negative_prompt, fx.config.prompt], 1);
  const { noise, problems } = caseNoise(io, c);
  let initLatent: tf.Tensor4D | undefined;
  let latent: tf.Tensor4D | undefined;
  try {
    if (c.mode === 'img2img') {
      const image = nhwc(io, c.init_image ?? 'init_image');
      const posterior = nhwc(io, c.init_posterior_noise ?? 'init_posterior_noise');
      initLatent = sd.encodeImage(image, () => tf.clone(posterior));
      tf.dispose([image, posterior]);
      results.push(compared(`${name}/init_latent`, nchwValues(initLatent), io.float32(c.init_latent ?? 'init_latent'), tol.latent));
    }
    const [, , h, w] = io.info(c.latent).shape;
    const zc = io.info(c.latent).shape[1];
    latent = await sd.sampleLatent({
      sampler: createSampler({ name: c.sampler, steps: c.steps, karras: c.karras ?? false, strength: c.strength }),
      cond,
      guidanceScale: c.cfg_scale === 1 ? null : c.cfg_scale,
      noise,
      latentShape: [1, h, w, zc],
      initLatent,
    });
    results.push(compared(`${name}/latent`, nchwValues(latent), io.float32(c.latent), tol.latent, problems()));
    const image = sd.decodeLatent(latent);
    results.push(compared(`${name}/image`, image.dataSync(), io.float32(c.image), tol.image));
    image.dispose();
  } catch (e) {
    results.push({ kind: KIND, name, passed: false, detail: e instanceof Error ? e.message : String(e) });
  } finally {
    disposeConditioning(cond);
    for (const t of [initLatent, latent]) t?.dispose();
  }
  return results;
}

function textResults(sd: StableDiffusion, io: SafetensorsFile, fx: Fixture, file: string): CaseResult[] {
  const { context } = sd.encodeText([fx.config.negative_prompt, fx.config.prompt], 1);
  const [uncond, cond] = tf.split(context, 2);
  const tol = file.includes('fp16') ? TEXT_TOLERANCE_FP16 : fx.tolerance.latent;
  const out = [
    compared(`${file}/text/uncond`, uncond.dataSync(), io.float32('uncond'), tol),
    compared(`${file}/text/cond`, cond.dataSync(), io.float32('cond'), tol),
  ];
  tf.dispose([context, uncond, cond]);
  return out;
}

async function runModelFile(dir: string, file: string, cfg: PipelineConfig, fx: Fixture, io: SafetensorsFile): Promise<CaseResult[]> {
  let sd: StableDiffusion;
  try {
    sd = await StableDiffusion.load({ weights: join(dir, file), config: cfg, tokenizer: join(dir, '..', 'tokenizer') });
  } catch (e) {
    return [{ kind: KIND, name: `${file}/*`, passed: false, detail: `load failed: ${e instanceof Error ? e.message : String(e)}` }];
  }
  try {
    const results = textResults(sd, io, fx, file);
    for (const c of fx.cases) results.push(...(await runCase(sd, io, fx, c, file)));
    return results;
  } finally {
    sd.dispose();
  }
}

export const run: KindRunner = async (dir) => {
  const fx = JSON.parse(readFileSync(join(dir, 'fixture.json'), 'utf8')) as Fixture;
  const cfg = pipelineConfigFromLdm(fx, join(dir, 'fixture.json'));
  const io = SafetensorsFile.open(join(dir, 'io.safetensors'));
  try {
    const results: CaseResult[] = [];
    for (const file of MODEL_FILES) results.push(...(await runModelFile(dir, file, cfg, fx, io)));
    return results;
  } finally {
    io.close();
  }
};
