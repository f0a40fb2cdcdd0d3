/**
 * Issue #20's conventions through StableDiffusion.generate() on the tiny fixture models (cpu backend), against
 * numbers: GPU seeds (the start latent is philoxRandn's draws, the image the one the stages make from a Philox
 * generator), img2img's random-number order per convention, A1111 prompt syntax through the pipeline's
 * conditioning (equal to encodeA1111Prompt; past 75 tokens in chunks, cond and uncond of different lengths run
 * as two UNet forwards), the conventions' default by model source, and SDXL's size conditioning.
 */
import { mkdtempSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import sharp from 'sharp';
import * as tf from '../src/backend/tf.js';
import { initBackend } from '../src/backend/select.js';
import {
  pipelineConfigFromLdm,
  sdxlConfigFromJson,
  sourceConventions,
  StableDiffusion,
  SD15_PIPELINE,
  SDXL_BASE_PIPELINE,
} from '../src/pipeline/pipeline.js';
import { resolveParams } from '../src/pipeline/params.js';
import { encodeA1111Prompt } from '../src/pipeline/a1111-prompt.js';
import { disposeGuided } from '../src/pipeline/conditioning.js';
import { ClipTextEncoder } from '../src/clip/index.js';
import { downsampleFactor } from '../src/vae/index.js';
import { ClipTokenizer } from '../src/tokenizer/index.js';
import { openWeights } from '../src/weights/open.js';
import { A1111_CONVENTIONS, createSampler, DIFFUSERS_CONVENTIONS, SD15_DIFFUSERS_CONVENTIONS, TorchGenerator, torchNoise, type NoiseFn } from '../src/scheduler/index.js';
import { philoxRandn, PhiloxGenerator } from '../src/scheduler/philox.js';
import { generationSources, parseParameters } from '../src/image/parameters.js';
import { readPngParameters } from '../src/image/codec.js';
import type { GenerateParams } from '../src/pipeline/api.js';

const DIR = 'tests/fixtures/pipeline';
const TOKENIZER = 'tests/fixtures/tokenizer';
const config = pipelineConfigFromLdm(JSON.parse(readFileSync(`${DIR}/fixture.json`, 'utf8')));
const QUICK: GenerateParams = { prompt: 'a botanical illustration of a fern', seed: 42, steps: 3, sampler: 'euler_a', cfgScale: 7.5, width: 32, height: 32 };

let sd: StableDiffusion;
const work = mkdtempSync(join(tmpdir(), 'sd-conventions-'));

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: null });
  sd = await StableDiffusion.load({ weights: `${DIR}/model.safetensors`, config, tokenizer: TOKENIZER, warn: (m) => warnings.push(m) });
});

afterAll(() => {
  sd?.dispose();
  rmSync(work, { recursive: true, force: true });
});

const warnings: string[] = [];

/** NHWC [1, h, w, c] -> NCHW values, torch's order. */
function nchw(t: tf.Tensor4D): Float32Array {
  return tf.tidy(() => tf.transpose(t, [0, 3, 1, 2]).dataSync() as Float32Array);
}

/** The image the stages make from `noise` (and an init latent drawn with `posterior`): what generate() should give. */
async function byStages(p: GenerateParams, noise: NoiseFn, posterior?: NoiseFn, init?: Uint8Array): Promise<Uint8Array> {
  const r = resolveParams(p, sd.limits);
  const cond = sd.encodePrompts(r, p.negativePrompt ?? null);
  let initLatent: tf.Tensor4D | undefined;
  if (init !== undefined && posterior !== undefined) {
    const { data } = await sharp(init).resize(32, 32).removeAlpha().raw().toBuffer({ resolveWithObject: true });
    const image = tf.tidy(() => tf.sub(tf.div(tf.tensor4d(Float32Array.from(data), [1, 32, 32, 3]), 127.5), 1)) as tf.Tensor4D;
    initLatent = sd.encodeImage(image, posterior);
    image.dispose();
  }
  const latent = await sd.sampleLatent({
    sampler: createSampler(sd.samplerConfig(r)),
    cond,
    guidanceScale: r.cfgScale,
    noise,
    latentShape: [1, 32 / downsampleFactor(config.vae), 32 / downsampleFactor(config.vae), config.vae.embedDim],
    initLatent,
  });
  disposeGuided(cond);
  initLatent?.dispose();
  const image = sd.decodeLatent(latent);
  const values = image.dataSync();
  tf.dispose([latent, image]);
  return Uint8Array.from(values, (v) => Math.round(v * 255));
}

describe('noise: cpu | gpu', () => {
  it("gpu: the start latent is philoxRandn's first draw, each step's noise the next ones; cpu: torch's CPU draws", () => {
    const shape = [1, 4, 4, config.vae.embedDim] as const;
    const gpu = sd.imageNoise(resolveParams({ ...QUICK, noise: 'gpu' }, sd.limits), 42).noise;
    const first = gpu(shape) as tf.Tensor4D;
    const second = gpu(shape) as tf.Tensor4D;
    expect(nchw(first)).toEqual(philoxRandn(42, [1, 4, 4, 4], 0));
    expect(nchw(second)).toEqual(philoxRandn(42, [1, 4, 4, 4], 1));
    const cpu = sd.imageNoise(resolveParams(QUICK, sd.limits), 42).noise(shape) as tf.Tensor4D;
    expect(nchw(cpu)).toEqual(new TorchGenerator(42).randn([1, 4, 4, 4]));
    expect(nchw(cpu)).not.toEqual(nchw(first));
    tf.dispose([first, second, cpu]);
  });

  it('gpu: generate() gives the image the stages make from a Philox generator, unlike cpu; recorded as A1111 does', async () => {
    const gpu = await sd.generate({ ...QUICK, noise: 'gpu' });
    const cpu = await sd.generate({ ...QUICK, noise: 'cpu' });
    expect(Buffer.from(gpu.images[0].rgb).equals(Buffer.from(await byStages(QUICK, torchNoise(new PhiloxGenerator(42)))))).toBe(true);
    expect(Buffer.from(cpu.images[0].rgb).equals(Buffer.from(await byStages(QUICK, torchNoise(new TorchGenerator(42)))))).toBe(true);
    expect(Buffer.from(gpu.images[0].rgb).equals(Buffer.from(cpu.images[0].rgb))).toBe(false);
    const gpuText = parseParameters(readPngParameters(gpu.images[0].png)!);
    const cpuText = parseParameters(readPngParameters(cpu.images[0].png)!);
    expect(gpuText.settings).not.toHaveProperty('RNG');
    expect(cpuText.settings.RNG).toBe('CPU');
    expect(generationSources(gpuText.settings).noise).toBe('gpu');
    expect(generationSources(cpuText.settings).noise).toBe('cpu');
    expect(generationSources({ RNG: 'NV' }).noise).toBe('gpu');
  });
});

describe('img2img random numbers', () => {
  it("diffusers: the posterior sample is the generator's first draw, then the start noise; a1111: a generator of ~seed", async () => {
    const init = await sharp({ create: { width: 32, height: 32, channels: 3, background: '#3a7d44' } }).png().toBuffer();
    const p: GenerateParams = { ...QUICK, initImage: init, strength: 0.7 };
    for (const noise of ['cpu', 'gpu'] as const) {
      const make = (s: number) => (noise === 'gpu' ? new PhiloxGenerator(s) : new TorchGenerator(s));
      const diffusers = await sd.generate({ ...p, noise, conventions: 'diffusers' });
      const one = torchNoise(make(42));
      expect(Buffer.from(diffusers.images[0].rgb).equals(Buffer.from(await byStages({ ...p, conventions: 'diffusers' }, one, one, init)))).toBe(true);
      const a1111 = await sd.generate({ ...p, noise, conventions: 'a1111' });
      const own = await byStages({ ...p, conventions: 'a1111' }, torchNoise(make(42)), torchNoise(new TorchGenerator(~42 >>> 0)), init);
      expect(Buffer.from(a1111.images[0].rgb).equals(Buffer.from(own))).toBe(true);
      expect(Buffer.from(a1111.images[0].rgb).equals(Buffer.from(diffusers.images[0].rgb))).toBe(false);
    }
  });
});

describe('conventions by model source', () => {
  it("a diffusers folder with scheduler_config.json: its conventions, the default; a single file: A1111 (SD 1.x), diffusers (SDXL)", () => {
    const folder = join(work, 'model');
    mkdirSync(join(folder, 'scheduler'), { recursive: true });
    const schedulerConfig = { _class_name: 'EulerDiscreteScheduler', timestep_spacing: 'trailing', steps_offset: 1 };
    writeFileSync(join(folder, 'scheduler', 'scheduler_config.json'), JSON.stringify(schedulerConfig));
    const fromFolder = sourceConventions(folder, SD15_PIPELINE);
    expect(fromFolder.default).toBe('diffusers');
    expect(fromFolder.diffusers.sigma.spacing).toBe('trailing');
    expect(sourceConventions(`${DIR}/model.safetensors`, SD15_PIPELINE)).toEqual({ diffusers: SD15_DIFFUSERS_CONVENTIONS, default: 'a1111' });
    expect(sourceConventions(`${DIR}/model.safetensors`, SDXL_BASE_PIPELINE)).toEqual({ diffusers: DIFFUSERS_CONVENTIONS, default: 'diffusers' });
    expect(sd.limits.conventions).toBe('a1111');
    expect(sd.samplerConfig(resolveParams(QUICK, sd.limits)).conventions).toBe(A1111_CONVENTIONS);
    expect(sd.samplerConfig(resolveParams({ ...QUICK, conventions: 'diffusers' }, sd.limits)).conventions).toBe(SD15_DIFFUSERS_CONVENTIONS);
  });

  it('records Conventions: diffusers and keeps the requested steps when DDIM runs more (uniform spacing)', async () => {
    const totals = new Set<number>();
    const r = await sd.generate({ ...QUICK, sampler: 'ddim', steps: 3, conventions: 'a1111', cfg: false }, { onProgress: (_, n) => totals.add(n) });
    expect([...totals][0]).toBeGreaterThan(3); // range(0, 1000, 333) + 1: four steps
    expect(parseParameters(readPngParameters(r.images[0].png)!).settings.Steps).toBe('3');
    const d = await sd.generate({ ...QUICK, steps: 1, conventions: 'diffusers' });
    const settings = parseParameters(readPngParameters(d.images[0].png)!).settings;
    expect(settings.Conventions).toBe('diffusers');
    expect(generationSources(settings).conventions).toBe('diffusers');
  });
});

describe('prompt syntax', () => {
  let tokenizer: ClipTokenizer;
  let clip: ClipTextEncoder;
  beforeAll(() => {
    tokenizer = ClipTokenizer.fromFile(TOKENIZER);
    const src = openWeights(`${DIR}/model.safetensors`);
    clip = ClipTextEncoder.load(src, config.clip);
    src.close();
  });
  afterAll(() => clip?.dispose());

  const long = Array.from({ length: 40 }, (_, i) => `leaf${i % 7} fern`).join(', '); // > 75 tokens

  it("a1111: the pipeline's conditioning is encodeA1111Prompt's (emphasis, <lora:> tags stripped), batched [uncond, cond]", () => {
    const before = tf.memory().numTensors;
    const prompt = 'a ((botanical)) illustration of a (fern:1.3), [ink] <lora:x:0.5>';
    const r = resolveParams({ ...QUICK, prompt, negativePrompt: 'blurry (blotchy:0.8)' }, sd.limits);
    const c = sd.encodePrompts(r);
    expect(c.uncond).toBeUndefined();
    expect(c.context.shape).toEqual([2, 77, config.clip.width]);
    const cond = encodeA1111Prompt(tokenizer, clip, 'a ((botanical)) illustration of a (fern:1.3), [ink] ', { clipSkip: 1 });
    const uncond = encodeA1111Prompt(tokenizer, clip, 'blurry (blotchy:0.8)', { clipSkip: 1 });
    const [u, k] = tf.split(c.context, 2);
    expect(u.dataSync()).toEqual(uncond.dataSync());
    expect(k.dataSync()).toEqual(cond.dataSync());
    expect(warnings.some((w) => /LoRA tags not applied \(<lora:x>\)/.test(w))).toBe(true);
    // plain: the brackets are text
    const plain = sd.encodePrompts({ ...r, promptSyntax: 'plain' });
    expect(plain.context.dataSync()).not.toEqual(c.context.dataSync());
    tf.dispose([u, k, cond, uncond]);
    disposeGuided(c);
    disposeGuided(plain);
    expect(tf.memory().numTensors).toBe(before);
  });

  it('a1111: a prompt past 75 tokens is encoded in chunks, not cut; cond and uncond of different lengths run as two forwards', async () => {
    expect(tokenizer.bpe(long).length).toBeGreaterThan(75);
    const r = resolveParams({ ...QUICK, prompt: long }, sd.limits);
    const c = sd.encodePrompts(r);
    const direct = encodeA1111Prompt(tokenizer, clip, long, { clipSkip: 1 });
    expect(direct.shape[1]).toBeGreaterThanOrEqual(154);
    expect(c.context.shape).toEqual(direct.shape);
    expect(c.uncond?.context.shape).toEqual([1, 77, config.clip.width]);
    expect(c.context.dataSync()).toEqual(direct.dataSync());
    direct.dispose();
    disposeGuided(c);
    // The image: the stages with the separate conditionings; and not the image of the prompt cut at 75 tokens.
    const a1111 = await sd.generate({ ...QUICK, prompt: long });
    expect(Buffer.from(a1111.images[0].rgb).equals(Buffer.from(await byStages({ ...QUICK, prompt: long }, torchNoise(new TorchGenerator(42)))))).toBe(true);
    warnings.length = 0;
    const plain = await sd.generate({ ...QUICK, prompt: long, promptSyntax: 'plain' });
    expect(Buffer.from(plain.images[0].rgb).equals(Buffer.from(a1111.images[0].rgb))).toBe(false);
    expect(warnings.some((w) => /prompt of \d+ tokens cut after the first 75/.test(w))).toBe(true);
    expect(parseParameters(readPngParameters(plain.images[0].png)!).settings['Prompt syntax']).toBe('plain');
    expect(parseParameters(readPngParameters(a1111.images[0].png)!).prompt).toBe(long);
  });
});

describe('SDXL size conditioning', () => {
  it('originalSize, cropTopLeft and targetSize reach the added embedding and the parameters when not default', async () => {
    const sdxlDir = 'tests/fixtures/sdxl/pipeline';
    const fixture = JSON.parse(readFileSync(join(sdxlDir, 'fixture.json'), 'utf8')) as { config: { width: number; height: number } };
    const xl = await StableDiffusion.load({ weights: join(sdxlDir, 'model-fp16.safetensors'), config: sdxlConfigFromJson(fixture.config), tokenizer: TOKENIZER });
    try {
      const { width, height } = fixture.config;
      const base = { prompt: 'a fern', seed: 1, steps: 1, width, height };
      const micro = { originalSize: [2 * height, width] as const, cropTopLeft: [8, 16] as const, targetSize: [height, 2 * width] as const };
      const r = resolveParams({ ...base, ...micro }, xl.limits);
      const a = xl.encodePrompts(r, null);
      const b = xl.encodePrompts(resolveParams(base, xl.limits), null, micro);
      const d = xl.encodePrompts(resolveParams(base, xl.limits), null);
      expect(a.added?.dataSync()).toEqual(b.added?.dataSync());
      expect(a.added?.dataSync()).not.toEqual(d.added?.dataSync());
      [a, b, d].forEach(disposeGuided);
      const img = await xl.generate({ ...base, ...micro });
      const settings = parseParameters(readPngParameters(img.images[0].png)!).settings;
      expect(settings).toMatchObject({ 'Original size': `${width}x${2 * height}`, 'Crop top': '8', 'Crop left': '16', 'Target size': `${2 * width}x${height}` });
      expect(settings).not.toHaveProperty('Prompt syntax');
      const plain = await xl.generate(base);
      const plainSettings = parseParameters(readPngParameters(plain.images[0].png)!).settings;
      expect(Object.keys(plainSettings).filter((k) => /size|crop/i.test(k))).toEqual(['Size']);
    } finally {
      xl.dispose();
    }
  });
});
