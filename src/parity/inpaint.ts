/**
 * Parity runner for fixtures/inpaint (diffusers' StableDiffusionInpaintPipeline with DDIM, step for step): the
 * mask preparation, one 9-channel UNet eps (`unet9`), and whole inpaintings with the 9-channel UNet (`inpaint9`) and
 * with the ordinary model blending after every step (`blend`), at strengths 1 and 0.75. The text encoder and VAE are
 * ../pipeline/model.safetensors'; DDIM follows diffusers' conventions (leading + 1). Tensors in io.safetensors are
 * NCHW (images out NHWC); the random draws of each case's seed are checked in the listed order.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import * as tf from '../backend/tf.js';
import { initBackend } from '../backend/select.js';
import { ClipTextEncoder } from '../clip/index.js';
import { pipelineConfigFromLdm, type PipelineConfig } from '../pipeline/config.js';
import { sd1Conditioning } from '../pipeline/conditioning.js';
import { blendKept, disposeMasks, inpaintingEps, inpaintMasks } from '../pipeline/inpaint.js';
import { ClipTokenizer } from '../tokenizer/index.js';
import { createSampler, DIFFUSERS_CONVENTIONS, type EpsFn } from '../scheduler/index.js';
import { UNet, disposeConditioning, type Conditioning } from '../unet/index.js';
import { Vae } from '../vae/index.js';
import { SafetensorsFile } from '../weights/safetensors.js';
import { withinTolerance } from './compare.js';
import { checkedTorchDraws } from './draws.js';
import type { CaseResult, KindRunner } from './types.js';
import { readNhwc } from './vae.js';

const KIND = 'inpaint';

interface InpaintCase {
  readonly case: string;
  readonly mode?: 'inpaint9' | 'blend';
  readonly strength?: number;
  readonly steps?: number;
  readonly cfg_scale?: number;
  readonly seed?: number;
  readonly timesteps: readonly number[] | string;
  readonly random_draws_in_order?: readonly string[];
  readonly [key: string]: unknown;
}

interface Fixture {
  readonly config: Record<string, unknown> & { prompt: string; negative_prompt: string; latent_downsample: number };
  readonly tolerance: { unet_eps: number; latent: number; image: number };
  readonly cases: readonly InpaintCase[];
}

const nchw = (x: tf.Tensor4D): Float32Array => tf.tidy(() => tf.transpose(x, [0, 3, 1, 2])).dataSync() as Float32Array;

interface Models {
  readonly cfg: PipelineConfig;
  readonly unet9: UNet;
  readonly unet4: UNet;
  readonly vae: Vae;
  readonly cond: Conditioning; // [uncond, cond]
}

export const run: KindRunner = async (dir, opts) => {
  await initBackend({ backend: opts.backend, log: null });
  const fx = JSON.parse(readFileSync(join(dir, 'fixture.json'), 'utf8')) as Fixture;
  const io = SafetensorsFile.open(join(dir, 'io.safetensors'));
  const base = SafetensorsFile.open(join(dir, '..', 'pipeline', 'model.safetensors'));
  const inpaintFile = SafetensorsFile.open(join(dir, 'unet-fp16.safetensors'));
  const results: CaseResult[] = [];
  const compare: Compare = (name, got, key, tol, detail) => {
    if (key === null) return void results.push({ kind: KIND, name, passed: detail === undefined, detail });
    const r = withinTolerance(Float32Array.from(got), io.float32(key), tol);
    results.push({ kind: KIND, name, passed: r.passed && detail === undefined, maxRelError: r.maxRelError, tolerance: tol, detail });
  };
  const loaded: { dispose(): void }[] = [];
  try {
    const cfg = pipelineConfigFromLdm(fx.config);
    const keep = <T extends { dispose(): void }>(m: T): T => (loaded.push(m), m);
    const tokenizer = ClipTokenizer.fromFile(join(dir, '..', 'tokenizer'));
    const clip = keep(ClipTextEncoder.load(base, cfg.clip));
    const text = sd1Conditioning({ tokenizer, clip }, [fx.config.negative_prompt, fx.config.prompt], 1);
    const [uncond, cond] = tf.split(text.context, 2);
    compare('text/uncond', uncond.dataSync(), 'uncond', fx.tolerance.unet_eps);
    compare('text/cond', cond.dataSync(), 'cond', fx.tolerance.unet_eps);
    tf.dispose([uncond, cond]);
    const m: Models = {
      cfg,
      unet9: keep(UNet.load(inpaintFile, cfg.unet)),
      unet4: keep(UNet.load(base, { ...cfg.unet, inChannels: 4 })),
      vae: keep(Vae.load(base, cfg.vae)),
      cond: text,
    };
    loaded.push({ dispose: () => disposeConditioning(text) });
    maskCases(io, fx, compare);
    for (const c of fx.cases) {
      if (c.case === 'unet9') unetCase(io, m, compare);
      else await inpaintCase(io, fx, m, c, compare);
    }
    return results;
  } catch (e) {
    return [...results, { kind: KIND, name: '*', passed: false, detail: e instanceof Error ? e.message : String(e) }];
  } finally {
    for (const x of loaded.reverse()) x.dispose();
    for (const f of [io, base, inpaintFile]) f.close();
  }
};

/** Compares `got` with io's `key` within `tol` (a `detail` fails the case); key null: a check without numbers. */
type Compare = (name: string, got: ArrayLike<number>, key: string | null, tol: number, detail?: string) => void;

/** mask -> mask_binary, masked_image, mask_latent. */
function maskCases(io: SafetensorsFile, fx: Fixture, compare: Compare): void {
  const image = readNhwc(io, 'init_image');
  const mask = readNhwc(io, 'mask');
  const masks = inpaintMasks(image, mask, fx.config.latent_downsample);
  compare('mask_binary', nchw(masks.binary), 'mask_binary', 0);
  compare('masked_image', nchw(masks.maskedImage), 'masked_image', 1e-6);
  compare('mask_latent', nchw(masks.latent), 'mask_latent', 0);
  disposeMasks(masks);
  tf.dispose([image, mask]);
}

/** One eps of the 9-channel UNet on cat([x, mask, masked latent]). */
function unetCase(io: SafetensorsFile, m: Models, compare: Compare): void {
  const input = tf.tidy(() => tf.concat([readNhwc(io, 'unet_x'), readNhwc(io, 'unet_mask'), readNhwc(io, 'unet_masked_latent')], 3) as tf.Tensor4D);
  const [b, n, d] = io.info('unet_context').shape;
  const context = tf.tensor3d(io.float32('unet_context'), [b, n, d]);
  const eps = m.unet9.forward(input, Array.from(io.float32('unet_timesteps')), { context });
  compare('unet9/eps', nchw(eps), 'unet_eps', 1e-4);
  tf.dispose([input, context, eps]);
}

/** (mean + std * noise) * scale_factor: a posterior sample of the VAE encoder, as the pipeline draws it. */
function encodeSample(vae: Vae, image: tf.Tensor4D, noise: tf.Tensor4D, scale: number): tf.Tensor4D {
  return tf.tidy(() => {
    const { mean, logvar } = vae.encode(image);
    return tf.mul(tf.add(mean, tf.mul(tf.exp(tf.mul(tf.clipByValue(logvar, -30, 20), 0.5)), noise)), scale) as tf.Tensor4D;
  });
}

async function inpaintCase(io: SafetensorsFile, fx: Fixture, m: Models, c: InpaintCase, compare: Compare): Promise<void> {
  const name = c.case;
  const nine = c.mode === 'inpaint9';
  const strength = c.strength ?? 1;
  const draws = (c.random_draws_in_order ?? []).map((d) => c[d] as string);
  const { noise: draw, problems } = checkedTorchDraws(io, c.seed ?? 0, draws, { allListed: true });
  const image = readNhwc(io, 'init_image');
  const mask = readNhwc(io, 'mask');
  const masks = inpaintMasks(image, mask, fx.config.latent_downsample);
  const [, h, w] = masks.latent.shape;
  const shape = [1, h, w, 4] as const;
  // the draws in diffusers' order: the init latent's posterior noise (when it is used), the start noise, the masked image's
  const usesInit = strength < 1 || !nine;
  const initLatent = usesInit ? encodeSample(m.vae, image, draw(shape) as tf.Tensor4D, m.cfg.scaleFactor) : null;
  const noise = draw(shape) as tf.Tensor4D;
  const maskedLatent = encodeSample(m.vae, masks.maskedImage, draw(shape) as tf.Tensor4D, m.cfg.scaleFactor);
  compare(`${name}/masked_image_latent`, nchw(maskedLatent), c.masked_image_latent as string, fx.tolerance.latent);
  if (initLatent !== null && typeof c.init_latent === 'string') compare(`${name}/init_latent`, nchw(initLatent), c.init_latent, fx.tolerance.latent);
  const sampler = createSampler({ name: 'ddim', steps: c.steps ?? 6, strength: strength < 1 ? strength : undefined, conventions: DIFFUSERS_CONVENTIONS });
  const timesteps = sampler.timesteps;
  checkTimesteps(timesteps, c, name, compare);
  let x = strength < 1 && initLatent !== null ? sampler.start(noise, initLatent) : sampler.start(noise);
  compare(`${name}/latent_start`, nchw(x), c.latent_start as string, fx.tolerance.latent);
  const eps: EpsFn = nine
    ? inpaintingEps(m.unet9, m.cond, c.cfg_scale ?? 7.5, masks.latent, maskedLatent)
    : (xi, t) => tf.tidy(() => {
      const both = m.unet4.forward(tf.concat([xi, xi]) as tf.Tensor4D, t, m.cond);
      const [u, k] = tf.split(both, 2);
      return tf.add(u, tf.mul(tf.sub(k, u), c.cfg_scale ?? 7.5));
    });
  for (let i = 0; i < sampler.totalSteps; i++) {
    let next = tf.tidy(() => sampler.step(i, x, eps, draw));
    if (!nine && initLatent !== null) {
      const blended = blendKept(next, masks.latent, initLatent, noise, timesteps, i, DIFFUSERS_CONVENTIONS);
      next.dispose();
      next = blended;
    }
    x.dispose();
    x = next;
  }
  sampler.dispose();
  compare(`${name}/latent`, nchw(x), c.latent as string, fx.tolerance.latent, problems());
  const decoded = tf.tidy(() => tf.clipByValue(tf.add(tf.mul(m.vae.decode(tf.div(x, m.cfg.scaleFactor) as tf.Tensor4D), 0.5), 0.5), 0, 1));
  compare(`${name}/image`, decoded.dataSync(), c.image as string, fx.tolerance.image);
  tf.dispose([image, mask, initLatent ?? [], noise, maskedLatent, x, decoded]);
  disposeMasks(masks);
}

/** The DDIM timesteps the case lists, as diffusers spaces them. */
function checkTimesteps(timesteps: readonly number[], c: InpaintCase, name: string, compare: Compare): void {
  const want = c.timesteps as readonly number[];
  const same = want.length === timesteps.length && want.every((t, i) => t === timesteps[i]);
  compare(`${name}/timesteps`, [], null, 0, same ? undefined : `timesteps [${timesteps.join(', ')}], the case lists [${want.join(', ')}]`);
}
