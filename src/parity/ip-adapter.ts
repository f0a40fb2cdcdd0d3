/**
 * Parity runner for tests/fixtures/ip-adapter: tencent-ailab IP-Adapter (basic and Plus) on the tiny SD 1.x model
 * of ../pipeline (fixture.json `about` fields). Cases:
 *   preprocess     photo.png -> Pillow-bicubic `resized` (one uint8 level) and `pixel_values`
 *   image_encoder  the stored pixel_values (and zeros) -> image_embeds, pooled, last_hidden_state, penultimate
 *   image_proj     basic and Plus, each from .safetensors and .bin: photo tokens and the negative tokens
 *   unet_eps       batch [cond, uncond] with the image tokens attached, per ip scale; detached = the plain UNet
 *   txt2img        photo.png -> ipAdapterTokens (preprocess, encoder, [negative; photo] tokens) -> CFG sampling
 *                  ([uncond text + negative tokens, cond text + photo tokens], ip scale on both halves) -> VAE;
 *                  the text embeddings are the stored text_uncond / text_cond; x_T and the noise from the io file
 * Arrays are NCHW in io.safetensors and NHWC here. The denoising loop is pipeline/denoise.ts's, from its pieces.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import * as tf from '../backend/tf.js';
import { SafetensorsFile } from '../weights/safetensors.js';
import { openWeights } from '../weights/open.js';
import type { TensorSource } from '../weights/types.js';
import { ClipVisionEncoder, clipVisionConfigFromJson, type ClipVisionConfig } from '../clip/vision.js';
import { UNet } from '../unet/unet.js';
import { Vae } from '../vae/index.js';
import { createSampler, type NoiseFn } from '../scheduler/index.js';
import type { SamplerName } from '../pipeline/api.js';
import { pipelineConfigFromLdm, type PipelineConfig } from '../pipeline/config.js';
import { denoise, guidedEps } from '../pipeline/denoise.js';
import { IpAdapter } from '../ip-adapter/adapter.js';
import { decodePhoto, preprocessClipImage } from '../ip-adapter/preprocess.js';
import { ipAdapterTokens } from '../ip-adapter/tokens.js';
import { withinTolerance } from './compare.js';
import type { CaseResult, KindRunner } from './types.js';

const KIND = 'ip-adapter';

interface Tolerance {
  readonly resized: number;
  readonly pixel_values: number;
  readonly image_encoder: number;
  readonly image_proj: number;
  readonly eps: number;
  readonly latent: number;
  readonly image: number;
}

interface Txt2ImgCase {
  readonly name: 'txt2img';
  readonly adapter: string;
  readonly sampler: SamplerName;
  readonly steps: number;
  readonly cfg_scale: number;
  readonly ip_scale: number;
  readonly karras?: boolean;
  readonly noise?: readonly string[];
  readonly latent: string;
  readonly image: string;
}

interface EpsCase {
  readonly name: 'unet_eps';
  readonly adapter: string;
  readonly ip_tokens: string;
  readonly expected: Readonly<Record<string, string>>;
}

interface Fixture {
  readonly files: { readonly adapter: string; readonly adapter_bin: string; readonly adapter_plus: string; readonly adapter_plus_bin: string; readonly checkpoint: string };
  readonly config: { readonly preprocess: { readonly size: number } };
  readonly tolerance: Tolerance;
  readonly cases: readonly { readonly name: string; readonly adapter?: string; readonly sampler?: string }[];
}

/** What each case compares against: kept open for the whole run. */
interface Ctx {
  readonly dir: string;
  readonly fx: Fixture;
  readonly io: SafetensorsFile;
  readonly encoder: ClipVisionEncoder;
}

const message = (e: unknown): string => (e instanceof Error ? e.message : String(e));

function compared(name: string, actual: ArrayLike<number>, expected: ArrayLike<number>, tolerance: number): CaseResult {
  const { passed, maxRelError } = withinTolerance(actual, expected, tolerance);
  return { kind: KIND, name, passed, maxRelError, tolerance };
}

/** Runs `make`; a throw becomes one failed result named `name`. */
async function guarded(name: string, make: () => CaseResult[] | Promise<CaseResult[]>): Promise<CaseResult[]> {
  try {
    return await make();
  } catch (e) {
    return [{ kind: KIND, name, passed: false, detail: message(e) }];
  }
}

/** An io tensor as stored. */
function stored(io: SafetensorsFile, key: string): tf.Tensor {
  return tf.tensor(io.float32(key), [...io.info(key).shape]);
}

/** NCHW io tensor -> NHWC. */
function nhwc(io: SafetensorsFile, key: string): tf.Tensor4D {
  return tf.tidy(() => tf.transpose(stored(io, key), [0, 2, 3, 1]) as tf.Tensor4D);
}

/** NHWC tensor -> NCHW values. */
function nchwValues(x: tf.Tensor4D): Float32Array {
  return tf.tidy(() => tf.transpose(x, [0, 3, 1, 2])).dataSync() as Float32Array;
}

function values(t: tf.Tensor): Float32Array {
  const v = t.dataSync() as Float32Array;
  t.dispose();
  return v;
}

async function preprocessCase(c: Ctx): Promise<CaseResult[]> {
  const photo = await decodePhoto(readFileSync(join(c.dir, 'photo.png')));
  const { resized, pixels } = preprocessClipImage(photo, c.fx.config.preprocess.size);
  const tol = c.fx.tolerance;
  return [
    compared('preprocess/resized', resized.rgb, c.io.float32('resized'), tol.resized),
    compared('preprocess/pixel_values', values(tf.tidy(() => tf.transpose(pixels, [0, 3, 1, 2]))), c.io.float32('pixel_values'), tol.pixel_values),
    ...(pixels.dispose(), []),
  ];
}

function encoderCases(c: Ctx): CaseResult[] {
  const tol = c.fx.tolerance.image_encoder;
  const photo = nhwc(c.io, 'pixel_values');
  const zeros = tf.zerosLike(photo);
  const a = c.encoder.forward(photo);
  const z = c.encoder.forward(zeros);
  const results = [
    compared('image_encoder/image_embeds', values(a.imageEmbeds), c.io.float32('image_embeds'), tol),
    compared('image_encoder/pooled', values(a.pooled), c.io.float32('pooled'), tol),
    compared('image_encoder/last_hidden_state', values(a.lastHidden), c.io.float32('last_hidden_state'), tol),
    compared('image_encoder/penultimate', values(a.penultimate), c.io.float32('penultimate'), tol),
    compared('image_encoder/zeros/image_embeds', values(z.imageEmbeds), c.io.float32('zero_image_embeds'), tol),
    compared('image_encoder/zeros/penultimate', values(z.penultimate), c.io.float32('zero_penultimate'), tol),
  ];
  tf.dispose([photo, zeros, z.pooled, z.lastHidden]);
  return results;
}

function imageProjCases(c: Ctx, file: string, plus: boolean): CaseResult[] {
  const tol = c.fx.tolerance.image_proj;
  const adapter = IpAdapter.open(join(c.dir, file));
  try {
    const features = plus
      ? { imageEmbeds: tf.zeros([1, 1]) as tf.Tensor2D, penultimate: stored(c.io, 'penultimate') as tf.Tensor3D }
      : { imageEmbeds: stored(c.io, 'image_embeds') as tf.Tensor2D };
    const tokens = values(adapter.imageTokens(features));
    tf.dispose(Object.values(features));
    const negative = values(adapter.negativeTokens(c.encoder));
    return [
      compared(`image_proj/${file}/tokens`, tokens, c.io.float32(plus ? 'plus_tokens' : 'ip_tokens'), tol),
      compared(`image_proj/${file}/negative`, negative, c.io.float32(plus ? 'plus_tokens_uncond' : 'ip_tokens_uncond'), tol),
    ];
  } finally {
    adapter.dispose();
  }
}

function epsCase(c: Ctx, unet: UNet, ec: EpsCase): CaseResult[] {
  const tol = c.fx.tolerance.eps;
  const adapter = IpAdapter.open(join(c.dir, ec.adapter));
  const x = nhwc(c.io, 'unet_x');
  const context = stored(c.io, 'unet_text') as tf.Tensor3D;
  const tokens = stored(c.io, ec.ip_tokens) as tf.Tensor3D;
  const t = Array.from(c.io.float32('unet_t'));
  try {
    const plain = values(tf.tidy(() => tf.clone(unet.forward(x, t, { context }))));
    adapter.attach(unet);
    const results = Object.entries(ec.expected).map(([scale, key]) => {
      const eps = tf.tidy(() => unet.forward(x, t, { context, extraTokens: [{ tokens, scale: Number(scale) }] }));
      return compared(`unet_eps/${ec.adapter}/scale${scale}`, nchwValues(eps), c.io.float32(key), tol);
    });
    adapter.detach();
    const again = values(tf.tidy(() => tf.clone(unet.forward(x, t, { context }))));
    const same = plain.every((v, i) => v === again[i]);
    results.push({ kind: KIND, name: `unet_eps/${ec.adapter}/detached`, passed: same, detail: same ? 'plain output unchanged bit for bit' : 'detach changed the plain output' });
    return results;
  } finally {
    adapter.dispose();
    tf.dispose([x, context, tokens]);
  }
}

/** x_T, then the listed noise tensors in order. */
function listedNoise(io: SafetensorsFile, keys: readonly string[]): NoiseFn {
  const queue = ['x_T', ...keys];
  return (shape) => {
    const key = queue.shift();
    if (key === undefined) throw new Error(`the sampler asked for more noise than the case lists (shape [${shape.join(', ')}])`);
    return nhwc(io, key);
  };
}

async function txt2imgCase(c: Ctx, unet: UNet, vae: Vae, cfg: PipelineConfig, tc: Txt2ImgCase): Promise<CaseResult[]> {
  const name = `txt2img/${tc.adapter}/${tc.sampler}_${tc.steps}`;
  const tol = c.fx.tolerance;
  const adapter = IpAdapter.open(join(c.dir, tc.adapter));
  const extra = await ipAdapterTokens(adapter, c.encoder, readFileSync(join(c.dir, 'photo.png')), tc.ip_scale);
  const { tokens } = extra;
  const context = tf.tidy(() => tf.concat([stored(c.io, 'text_uncond'), stored(c.io, 'text_cond')]) as tf.Tensor3D);
  const cond = { context, extraTokens: [extra] };
  const sampler = createSampler({ name: tc.sampler, steps: tc.steps, karras: tc.karras ?? false });
  let latent: tf.Tensor4D | null = null;
  try {
    adapter.attach(unet);
    const noise = listedNoise(c.io, tc.noise ?? []);
    const [, zc, h, w] = c.io.info(tc.latent).shape;
    const start = tf.tidy(() => sampler.start(noise([1, h, w, zc]) as tf.Tensor4D));
    latent = start;
    for await (const s of denoise(start, sampler, guidedEps(unet, cond, tc.cfg_scale), noise)) latent = s.latent;
    const done = latent;
    const image = tf.tidy(() => tf.clipByValue(tf.add(tf.mul(vae.decode(tf.div<tf.Tensor4D>(done, cfg.scaleFactor)), 0.5), 0.5), 0, 1));
    return [compared(`${name}/latent`, nchwValues(done), c.io.float32(tc.latent), tol.latent), compared(`${name}/image`, values(image), c.io.float32(tc.image), tol.image)];
  } finally {
    adapter.dispose();
    latent?.dispose();
    tf.dispose([tokens, context]);
  }
}

export const run: KindRunner = async (dir) => {
  let fx: Fixture;
  let vcfg: ClipVisionConfig;
  try {
    fx = JSON.parse(readFileSync(join(dir, 'fixture.json'), 'utf8')) as Fixture;
    vcfg = clipVisionConfigFromJson(JSON.parse(readFileSync(join(dir, 'image_encoder', 'config.json'), 'utf8')));
  } catch (e) {
    return [{ kind: KIND, name: '*', passed: false, detail: `cannot read ${dir}/fixture.json or image_encoder/config.json: ${message(e)}` }];
  }
  const io = SafetensorsFile.open(join(dir, 'io.safetensors'));
  const encoderFile = SafetensorsFile.open(join(dir, 'image_encoder', 'model.safetensors'));
  let encoder: ClipVisionEncoder;
  try {
    encoder = ClipVisionEncoder.load(encoderFile, vcfg);
  } catch (e) {
    io.close();
    return [{ kind: KIND, name: 'image_encoder', passed: false, detail: `load failed: ${message(e)}` }];
  } finally {
    encoderFile.close();
  }
  const c: Ctx = { dir, fx, io, encoder };
  const results: CaseResult[] = [];
  let model: TensorSource | null = null;
  let unet: UNet | null = null;
  let vae: Vae | null = null;
  try {
    results.push(...(await guarded('preprocess', () => preprocessCase(c))));
    results.push(...(await guarded('image_encoder', () => encoderCases(c))));
    for (const [file, plus] of [[fx.files.adapter, false], [fx.files.adapter_bin, false], [fx.files.adapter_plus, true], [fx.files.adapter_plus_bin, true]] as const) {
      results.push(...(await guarded(`image_proj/${file}`, () => imageProjCases(c, file, plus))));
    }
    const cfg = pipelineConfigFromLdm(fx, join(dir, 'fixture.json'));
    model = openWeights(join(dir, fx.files.checkpoint));
    unet = UNet.load(model, cfg.unet, undefined, { residency: 'resident' });
    vae = Vae.load(model, cfg.vae);
    const [u, v] = [unet, vae];
    for (const k of fx.cases) {
      if (k.name === 'unet_eps') results.push(...(await guarded(`unet_eps/${k.adapter}`, () => epsCase(c, u, k as unknown as EpsCase))));
      if (k.name === 'txt2img') results.push(...(await guarded(`txt2img/${k.adapter}/${k.sampler}`, () => txt2imgCase(c, u, v, cfg, k as unknown as Txt2ImgCase))));
    }
  } catch (e) {
    results.push({ kind: KIND, name: 'unet', passed: false, detail: message(e) });
  } finally {
    unet?.dispose();
    vae?.dispose();
    model?.close();
    encoder.dispose();
    io.close();
  }
  return results;
};
