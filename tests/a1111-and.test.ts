/**
 * Issue #20: A1111's composable diffusion (AND) and its cond/uncond padding option through generate(), on the
 * tiny fixture models (cpu backend), against numbers computed here from the parts:
 *   AND            eps = eps_u + sum_i (eps_i - eps_u) * (w_i * scale) (sd_samplers_cfg_denoiser.combine_denoised),
 *                  each part encoded alone (encodeA1111Prompt) and run through the UNet alone;
 *   one part       bit for bit the plain prompt ("a fern :1.5" at scale 7.5 is "a fern" at 11.25);
 *   adapters       every part sees the ControlNet, the IP-Adapter and the inpainting input as the cond half does;
 *   padCondUncond  the shorter text padded with the empty prompt's encoding, both in one batch; "Pad conds: True".
 */
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import sharp from 'sharp';
import * as tf from '../src/backend/tf.js';
import { initBackend } from '../src/backend/select.js';
import { pipelineConfigFromLdm, sdxlConfigFromJson, StableDiffusion } from '../src/pipeline/pipeline.js';
import { resolveParams, usesGuidance } from '../src/pipeline/params.js';
import { encodeA1111Prompt, reconcileCondUncond } from '../src/pipeline/a1111-prompt.js';
import { encodeA1111Sdxl } from '../src/pipeline/a1111-sdxl.js';
import { disposeGuided, sdxlAddedEmbedding } from '../src/pipeline/conditioning.js';
import { guidedEps } from '../src/pipeline/eps.js';
import { denoise } from '../src/pipeline/denoise.js';
import { ClipTextEncoder } from '../src/clip/index.js';
import { SdxlTextEncoder } from '../src/clip/sdxl-text.js';
import { ClipTokenizer } from '../src/tokenizer/index.js';
import { UNet } from '../src/unet/index.js';
import { downsampleFactor } from '../src/vae/index.js';
import { openWeights } from '../src/weights/open.js';
import { SafetensorsFile } from '../src/weights/safetensors.js';
import { createSampler, TorchGenerator, torchNoise, type EpsFn } from '../src/scheduler/index.js';
import { formatParameters, generationSources, parseParameters } from '../src/image/parameters.js';
import { readPngParameters } from '../src/image/codec.js';
import { toParams } from '../src/cli/commands/generate.js';
import type { GenerateParams } from '../src/pipeline/api.js';

const DIR = 'tests/fixtures/pipeline';
const TOKENIZER = 'tests/fixtures/tokenizer';
const config = pipelineConfigFromLdm(JSON.parse(readFileSync(`${DIR}/fixture.json`, 'utf8')));
const BASE: GenerateParams = { prompt: 'a fern', negativePrompt: 'blurry', seed: 42, steps: 3, sampler: 'euler', cfgScale: 7.5, width: 32, height: 32 };
const F = downsampleFactor(config.vae);
const LATENT = [1, 32 / F, 32 / F, config.vae.embedDim] as const;
/** 20 comma-separated pairs: two chunks of 75 tokens. */
const LONG = Array.from({ length: 20 }, (_, i) => `leaf${i % 7} fern`).join(', ');

let sd: StableDiffusion;
let tokenizer: ClipTokenizer;
let clip: ClipTextEncoder;
let unet: UNet;

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: null });
  sd = await StableDiffusion.load({ weights: `${DIR}/model.safetensors`, config, tokenizer: TOKENIZER });
  tokenizer = ClipTokenizer.fromFile(TOKENIZER);
  const src = openWeights(`${DIR}/model.safetensors`);
  clip = ClipTextEncoder.load(src, config.clip);
  unet = UNet.load(src, config.unet);
  src.close();
});

afterAll(() => {
  sd?.dispose();
  clip?.dispose();
  unet?.dispose();
});

const encode = (text: string) => encodeA1111Prompt(tokenizer, clip, text, { clipSkip: 1 });
const rgbOf = async (p: GenerateParams) => (await sd.generate(p)).images[0].rgb;
const same = (a: Uint8Array, b: Uint8Array) => Buffer.from(a).equals(Buffer.from(b));
const maxDiff = (a: Uint8Array, b: Uint8Array) => a.reduce((m, v, i) => Math.max(m, Math.abs(v - b[i])), 0);
const maxAbs = (a: tf.Tensor, b: tf.Tensor) => tf.tidy(() => tf.max(tf.abs(tf.sub(a, b))).dataSync()[0]);

/** eps_u + sum_i (eps_i - eps_u) * (w_i * scale), each text's eps from its own UNet forward (batch 1). */
function handEps(uncond: tf.Tensor3D, parts: readonly tf.Tensor3D[], weights: readonly number[], scale: number): EpsFn {
  return (x, t) =>
    tf.tidy(() => {
      const u = unet.forward(x, t, { context: uncond });
      let out: tf.Tensor4D = u;
      parts.forEach((c, i) => (out = tf.add(out, tf.mul(tf.sub(unet.forward(x, t, { context: c }), u), weights[i] * scale))));
      return out;
    });
}

/** The image generate() should give for `p` with the noise predictor `eps`: the sampler's steps, then the VAE. */
async function imageWith(p: GenerateParams, eps: EpsFn): Promise<Uint8Array> {
  const r = resolveParams(p, sd.limits);
  const sampler = createSampler(sd.samplerConfig(r));
  const noise = torchNoise(new TorchGenerator(r.seed));
  const start = tf.tidy(() => sampler.start(tf.reshape(noise(LATENT), [...LATENT]) as tf.Tensor4D));
  let latent: tf.Tensor4D = start;
  for await (const s of denoise(start, sampler, eps, noise)) latent = s.latent;
  const image = sd.decodeLatent(latent);
  const values = image.dataSync();
  tf.dispose([latent, image]);
  return Uint8Array.from(values, (v) => Math.round(v * 255));
}

describe('AND (composable diffusion), SD 1.x', () => {
  it("generate() of 'A AND B :0.7' is uncond + s (A - uncond) + 0.7 s (B - uncond), each eps computed on its own", async () => {
    const p = { ...BASE, prompt: 'a fern AND ink on paper :0.7' };
    const r = resolveParams(p, sd.limits);
    const cond = sd.encodePrompts(r);
    const [u, a, b] = [encode('blurry'), encode('a fern'), encode(' ink on paper')];
    expect(cond.weights).toEqual([1, 0.7]);
    expect(cond.context.shape).toEqual([3, 77, config.clip.width]); // [uncond, part 1, part 2]
    const rows = tf.split(cond.context, 3);
    expect([u, a, b].map((t, i) => maxAbs(t, rows[i]))).toEqual([0, 0, 0]);
    // one step's eps at a random latent: the pipeline's batched predictor against the parts run one by one
    const x = tf.randomNormal([...LATENT], 0, 1, 'float32', 7) as tf.Tensor4D;
    const got = guidedEps(unet, cond, 7.5)(x, 500);
    const want = handEps(u, [a, b], [1, 0.7], 7.5)(x, 500);
    expect(maxAbs(got, want)).toBeLessThan(1e-5 * tf.tidy(() => tf.max(tf.abs(want)).dataSync()[0]));
    const image = await rgbOf(p);
    expect(maxDiff(image, await imageWith(p, handEps(u, [a, b], [1, 0.7], 7.5)))).toBeLessThanOrEqual(1);
    expect(maxDiff(image, await rgbOf(BASE))).toBeGreaterThan(2); // the second part matters
    tf.dispose([...rows, u, a, b, x, got, want]);
    disposeGuided(cond);
  });

  it("one part is the plain prompt bit for bit; 'a fern :1.5' is 'a fern' at scale 1.5 * 7.5; 'A :0.5 AND A :0.5' is A", async () => {
    const plain = await rgbOf(BASE);
    expect(same(await rgbOf({ ...BASE, prompt: 'a fern :1' }), plain)).toBe(true);
    expect(same(await rgbOf({ ...BASE, prompt: 'a fern   ' }), plain)).toBe(true);
    expect(same(await rgbOf({ ...BASE, prompt: 'a fern :1.5' }), await rgbOf({ ...BASE, cfgScale: 11.25 }))).toBe(true);
    // the same text twice (encoded once): weights adding up to 1 give A's guidance, to 2 twice its scale
    expect(maxDiff(await rgbOf({ ...BASE, prompt: 'a fern :0.5 AND a fern :0.5' }), plain)).toBeLessThanOrEqual(1);
    expect(maxDiff(await rgbOf({ ...BASE, prompt: 'a fern AND a fern' }), await rgbOf({ ...BASE, cfgScale: 15 }))).toBeLessThanOrEqual(1);
    // plain syntax: AND is text
    const r = resolveParams({ ...BASE, prompt: 'a fern AND ink', promptSyntax: 'plain' }, sd.limits);
    const c = sd.encodePrompts(r);
    expect([c.context.shape[0], c.weights]).toEqual([2, undefined]);
    disposeGuided(c);
  });

  it('guidance at scale 1 still reads uncond when there are parts; without guidance A1111 stands part 1 in for it', () => {
    const at1 = resolveParams({ ...BASE, prompt: 'a fern AND ink :0.5', cfgScale: 1 }, sd.limits);
    expect(usesGuidance(at1)).toBe(true);
    expect(usesGuidance(resolveParams({ ...BASE, cfgScale: 1 }, sd.limits))).toBe(false);
    const off = resolveParams({ ...BASE, prompt: 'a fern AND ink :0.5', cfg: false }, sd.limits);
    expect(usesGuidance(off)).toBe(false);
    const cond = sd.encodePrompts(off);
    expect(cond.context.shape[0]).toBe(2); // the parts alone
    const [a, b] = [encode('a fern'), encode(' ink')];
    const x = tf.randomNormal([...LATENT], 0, 1, 'float32', 8) as tf.Tensor4D;
    const got = guidedEps(unet, cond, null)(x, 300);
    // combine_denoised with skip_uncond: eps_1 + (eps_1 - eps_1) * 1 + (eps_2 - eps_1) * 0.5
    const want = tf.tidy(() => {
      const e1 = unet.forward(x, 300, { context: a });
      return tf.add(e1, tf.mul(tf.sub(unet.forward(x, 300, { context: b }), e1), 0.5));
    });
    expect(maxAbs(got, want)).toBeLessThan(1e-5 * tf.tidy(() => tf.max(tf.abs(want)).dataSync()[0]));
    tf.dispose([a, b, x, got, want]);
    disposeGuided(cond);
  });

  it('parts of different lengths are stacked (the shorter repeats its last vector) and run with a shorter uncond apart', () => {
    const long = LONG;
    const r = resolveParams({ ...BASE, prompt: `a fern AND ${long}` }, sd.limits);
    const cond = sd.encodePrompts(r);
    expect(cond.context.shape).toEqual([2, 154, config.clip.width]);
    expect(cond.uncond?.context.shape).toEqual([1, 77, config.clip.width]);
    const short = encode('a fern');
    const first = tf.slice(cond.context, [0, 0, 0], [1, 77, config.clip.width]);
    const tail = tf.slice(cond.context, [0, 77, 0], [1, 77, config.clip.width]);
    const last = tf.tile(tf.slice(short, [0, 76, 0], [1, 1, config.clip.width]), [1, 77, 1]);
    expect([maxAbs(first, short), maxAbs(tail, last)]).toEqual([0, 0]);
    tf.dispose([short, first, tail, last]);
    disposeGuided(cond);
  });
});

describe('AND with adapters: every part sees them as the cond half does', () => {
  const CN = 'tests/fixtures/controlnet';
  const IP = 'tests/fixtures/ip-adapter';
  let sketch: Buffer;
  let photo: Buffer;
  let initPng: Buffer;
  let maskPng: Buffer;
  beforeAll(async () => {
    const cnIo = SafetensorsFile.open(`${CN}/io.safetensors`);
    sketch = await sharp(Buffer.from(cnIo.bytes('e2e_ddim_a_source_image')), { raw: { width: 64, height: 64, channels: 3 } }).png().toBuffer();
    cnIo.close();
    photo = readFileSync(`${IP}/photo.png`);
    const gradient = Uint8Array.from({ length: 32 * 32 * 3 }, (_, i) => (i * 7) % 256);
    initPng = await sharp(Buffer.from(gradient), { raw: { width: 32, height: 32, channels: 3 } }).png().toBuffer();
    const half = Uint8Array.from({ length: 32 * 32 }, (_, i) => (i % 32 < 16 ? 255 : 0));
    maskPng = await sharp(Buffer.from(half), { raw: { width: 32, height: 32, channels: 1 } }).png().toBuffer();
  });

  const adapters = (): Record<string, Partial<GenerateParams>> => ({
    controlNet: { controlNets: [{ model: `${CN}/control_tiny.safetensors`, image: sketch, preprocess: 'canny', scale: 0.8, start: 0, end: 0.8 }] },
    ipAdapter: { ipAdapter: { model: `${IP}/ip-adapter_sd15.safetensors`, image: photo, scale: 0.6 } },
    inpainting: { initImage: initPng, mask: maskPng, strength: 0.9 },
  });

  it("'A AND A' at scale s is A at 2s, 'A :1.5' at 7.5 is A at 11.25 bit for bit, with each adapter", async () => {
    for (const [name, extra] of Object.entries(adapters())) {
      const p = { ...BASE, ...extra };
      const twice = await rgbOf({ ...p, prompt: 'a fern AND a fern' });
      expect(maxDiff(twice, await rgbOf({ ...p, cfgScale: 15 })), name).toBeLessThanOrEqual(1);
      expect(same(await rgbOf({ ...p, prompt: 'a fern :1.5' }), await rgbOf({ ...p, cfgScale: 11.25 })), name).toBe(true);
      expect(maxDiff(twice, await rgbOf({ ...BASE, prompt: 'a fern AND a fern' })), name).toBeGreaterThan(2); // the adapter acts
    }
  });

  it('a negative prompt of another length (uncond apart) and guidance off take the adapters with AND too', async () => {
    const long = LONG;
    const before = tf.memory().numTensors;
    for (const extra of Object.values(adapters())) {
      const apart = await rgbOf({ ...BASE, ...extra, prompt: 'a fern AND ink :0.5', negativePrompt: long });
      const off = await rgbOf({ ...BASE, ...extra, prompt: 'a fern AND ink :0.5', cfg: false });
      expect(apart.length).toBe(32 * 32 * 3);
      expect(off.length).toBe(32 * 32 * 3);
    }
    expect(tf.memory().numTensors).toBe(before);
  });
});

describe('padCondUncond (A1111 pad_cond_uncond)', () => {
  const long = LONG;

  it("pads the shorter with the empty prompt's chunk into one batch [uncond, cond]; the image is the padded texts' guidance", async () => {
    const p: GenerateParams = { ...BASE, prompt: long, padCondUncond: true };
    const r = resolveParams(p, sd.limits);
    expect(r.padCondUncond).toBe(true);
    const cond = sd.encodePrompts(r);
    expect(cond.uncond).toBeUndefined();
    expect(cond.padded).toBe(true);
    expect(cond.context.shape).toEqual([2, 154, config.clip.width]);
    const [neg, pos, empty] = [encode('blurry'), encode(long), encode('')];
    const padded = tf.concat([neg, empty], 1) as tf.Tensor3D; // sd_samplers_cfg_denoiser.pad_cond
    const reconciled = reconcileCondUncond(pos, neg, 'pad_cond_uncond', empty);
    const [u, c] = tf.split(cond.context, 2);
    expect([maxAbs(u, padded), maxAbs(c, pos), maxAbs(reconciled.uncond, padded)]).toEqual([0, 0, 0]);
    const image = await sd.generate(p);
    expect(maxDiff(image.images[0].rgb, await imageWith(p, handEps(padded, [pos], [1], 7.5)))).toBeLessThanOrEqual(1);
    const unpadded = await sd.generate({ ...p, padCondUncond: false });
    expect(same(image.images[0].rgb, unpadded.images[0].rgb)).toBe(false); // the cross-attention sees more keys
    // recorded as A1111 does, only when padding happened, and read back
    const settings = parseParameters(readPngParameters(image.images[0].png)!).settings;
    expect(settings['Pad conds']).toBe('True');
    expect(generationSources(settings).padCondUncond).toBe(true);
    const plain = parseParameters(readPngParameters(unpadded.images[0].png)!).settings;
    expect([plain['Pad conds'], generationSources(plain).padCondUncond]).toEqual([undefined, false]);
    tf.dispose([neg, pos, empty, padded, reconciled.cond, reconciled.uncond, u, c]);
    disposeGuided(cond);
  });

  it('pads cond when it is the shorter (AND parts too); equal lengths: nothing padded, nothing recorded, bit for bit', async () => {
    const r = resolveParams({ ...BASE, prompt: 'a fern AND ink', negativePrompt: long, padCondUncond: true }, sd.limits);
    const cond = sd.encodePrompts(r);
    expect([cond.context.shape, cond.weights, cond.padded]).toEqual([[3, 154, config.clip.width], [1, 1], true]);
    const [pos, empty] = [encode('a fern'), encode('')];
    const row = tf.slice(cond.context, [1, 0, 0], [1, 154, config.clip.width]);
    const want = tf.concat([pos, empty], 1);
    expect(maxAbs(row, want)).toBe(0);
    tf.dispose([pos, empty, row, want]);
    disposeGuided(cond);
    const on = await sd.generate({ ...BASE, padCondUncond: true });
    expect(same(on.images[0].rgb, await rgbOf(BASE))).toBe(true);
    expect(parseParameters(readPngParameters(on.images[0].png)!).settings['Pad conds']).toBeUndefined();
  });

  it("is a boolean field, the CLI's --pad-cond-uncond, and A1111's infotext key 'Pad conds'", () => {
    expect(() => resolveParams({ ...BASE, padCondUncond: 'yes' as unknown as boolean }, sd.limits)).toThrow(/padCondUncond/);
    expect(resolveParams(BASE, sd.limits).padCondUncond).toBe(false);
    expect(toParams({ prompt: 'x', out: 'o', 'pad-cond-uncond': true } as Parameters<typeof toParams>[0]).padCondUncond).toBe(true);
    const text = formatParameters({ ...resolveParams(BASE, sd.limits), controlNets: [], ipAdapter: null, padConds: true });
    expect(text).toMatch(/, Pad conds: True(,|$)/);
    expect(generationSources(parseParameters('x\nSteps: 20, Pad conds: True').settings).padCondUncond).toBe(true);
  });
});

describe('AND and padding on SDXL', () => {
  it('each part with its own context and pooled text in the added embedding; padding pads the context only; plain warns past 75 tokens', async () => {
    const sdxlDir = 'tests/fixtures/sdxl/pipeline';
    const fixture = JSON.parse(readFileSync(`${sdxlDir}/fixture.json`, 'utf8')) as { config: Record<string, unknown> };
    const xlConfig = sdxlConfigFromJson(fixture.config);
    const warnings: string[] = [];
    const xl = await StableDiffusion.load({ weights: `${sdxlDir}/model-fp16.safetensors`, config: xlConfig, tokenizer: TOKENIZER, warn: (m) => warnings.push(m) });
    const src = openWeights(`${sdxlDir}/model-fp16.safetensors`);
    const text = SdxlTextEncoder.load(src, tokenizer, xlConfig.text);
    src.close();
    try {
      const p = { ...BASE, width: xlConfig.width, height: xlConfig.height, prompt: 'a fern AND ink :0.5' };
      const r = resolveParams(p, xl.limits);
      const cond = xl.encodePrompts(r);
      expect(cond.weights).toEqual([1, 0.5]);
      expect(cond.context.shape).toEqual([3, 77, text.contextWidth]);
      const ids = [...r.originalSize, ...r.cropTopLeft, ...r.targetSize];
      const parts = ['blurry', 'a fern', ' ink'].map((t) => encodeA1111Sdxl(text, t));
      const added = parts.map((e) => sdxlAddedEmbedding(e.pooled, [ids], xlConfig.timeEmbedDim));
      const rows = tf.split(cond.context, 3);
      const addedRows = tf.split(cond.added as tf.Tensor2D, 3);
      expect(parts.map((e, i) => maxAbs(e.context, rows[i]))).toEqual([0, 0, 0]);
      expect(added.map((a, i) => maxAbs(a, addedRows[i]))).toEqual([0, 0, 0]);
      tf.dispose([...rows, ...addedRows, ...added, ...parts.flatMap((e) => [e.context, e.pooled])]);
      disposeGuided(cond);
      const long = LONG;
      const padded = xl.encodePrompts(resolveParams({ ...p, prompt: long, padCondUncond: true }, xl.limits));
      expect([padded.context.shape, padded.padded, padded.uncond]).toEqual([[2, 154, text.contextWidth], true, undefined]);
      const empty = encodeA1111Sdxl(text, '');
      const tail = tf.slice(padded.context, [0, 77, 0], [1, 77, text.contextWidth]);
      expect(maxAbs(tail, empty.context)).toBe(0);
      tf.dispose([tail, empty.context, empty.pooled]);
      disposeGuided(padded);
      // plain syntax cuts at 75 tokens, and says so (SD 1.x: tests/conventions-pipeline)
      disposeGuided(xl.encodePrompts(resolveParams({ ...p, prompt: LONG, promptSyntax: 'plain' }, xl.limits)));
      expect(warnings.some((w) => /prompt of \d+ tokens cut after the first 75 \(--prompt-syntax plain\)/.test(w))).toBe(true);
      const image = await xl.generate({ ...p, steps: 2 });
      expect(image.images[0].rgb.length).toBe(xlConfig.width * xlConfig.height * 3);
    } finally {
      text.dispose();
      xl.dispose();
    }
  });
});
