/**
 * StableDiffusion.generate() with ControlNet, IP-Adapter and inpainting on the tiny fixture models (cpu backend):
 * each feature's fixture case reproduced through generate() (the same numbers as its parity runner), ControlNet
 * scale 0 = no ControlNet bit for bit, the guidance window and several ControlNets, the 9-channel inpainting UNet
 * from a checkpoint built here, the IP-Adapter detached after a request, the PNG parameters, ParamErrors naming the
 * field, and tensor counts after a full request and after an aborted one.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import sharp from 'sharp';
import * as tf from '../src/backend/tf.js';
import { initBackend } from '../src/backend/select.js';
import { SafetensorsFile, writeSafetensors } from '../src/weights/safetensors.js';
import type { TensorInfo } from '../src/weights/types.js';
import { withinTolerance } from '../src/parity/compare.js';
import { pipelineConfigFromLdm, StableDiffusion } from '../src/pipeline/pipeline.js';
import { ParamError, type GenerateParams } from '../src/pipeline/api.js';
import { readPngParameters } from '../src/image/codec.js';
import { controlUnits, parseParameters } from '../src/image/parameters.js';
import { UNet } from '../src/unet/index.js';
import { IpAdapterCache, ipTokensFor } from '../src/pipeline/ip.js';

const PIPE = 'tests/fixtures/pipeline';
const CN = 'tests/fixtures/controlnet';
const IP = 'tests/fixtures/ip-adapter';
const INP = 'tests/fixtures/inpaint';
const TOKENIZER = 'tests/fixtures/tokenizer';
const config = pipelineConfigFromLdm(JSON.parse(readFileSync(`${PIPE}/fixture.json`, 'utf8')));
const PROMPT = 'a botanical illustration of a fern';
const cnIo = SafetensorsFile.open(`${CN}/io.safetensors`);
const ipIo = SafetensorsFile.open(`${IP}/io.safetensors`);
const inIo = SafetensorsFile.open(`${INP}/io.safetensors`);
const cnTol = (JSON.parse(readFileSync(`${CN}/fixture.json`, 'utf8')) as { tolerance: { image: number } }).tolerance.image;
const ipTol = (JSON.parse(readFileSync(`${IP}/fixture.json`, 'utf8')) as { tolerance: { image: number } }).tolerance.image;
const inTol = (JSON.parse(readFileSync(`${INP}/fixture.json`, 'utf8')) as { tolerance: { image: number } }).tolerance.image;
/** uint8 output: half a level of rounding on top of a fixture's tolerance. */
const ROUNDING = 0.5 / 255;

const work = mkdtempSync(join(tmpdir(), 'sd-adapters-'));
let sd: StableDiffusion;
let sketch: Buffer; // the ControlNet cases' source image (64x64, the hint size of a 32x32 image)
let photo: Buffer;
let initPng: Buffer;
let maskPng: Buffer;

/** An HWC uint8 (or [0, 1] float, channels 1 or 3) array as a PNG. */
const png = (data: Uint8Array, width: number, height: number, channels: 1 | 3) =>
  sharp(Buffer.from(data), { raw: { width, height, channels } }).png().toBuffer();

/** NCHW [1, C, H, W] floats of the io file -> HWC uint8 via `toByte`. */
function hwcBytes(io: SafetensorsFile, key: string, toByte: (v: number) => number): { data: Uint8Array; c: number; h: number; w: number } {
  const [, c, h, w] = io.info(key).shape;
  const v = io.float32(key);
  const data = new Uint8Array(c * h * w);
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) for (let k = 0; k < c; k++) data[(y * w + x) * c + k] = toByte(v[(k * h + y) * w + x]);
  return { data, c, h, w };
}

function expectImage(rgb: Uint8Array, expected: Float32Array, tol: number): void {
  const { passed, maxRelError } = withinTolerance(Float32Array.from(rgb, (v) => v / 255), expected, tol + ROUNDING);
  expect(maxRelError).toBeLessThan(tol + ROUNDING);
  expect(passed).toBe(true);
}

const same = (a: Uint8Array, b: Uint8Array) => Buffer.from(a).equals(Buffer.from(b));

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: null });
  sd = await StableDiffusion.load({ weights: `${PIPE}/model.safetensors`, config, tokenizer: TOKENIZER });
  sketch = await png(cnIo.bytes('e2e_ddim_a_source_image'), 64, 64, 3);
  photo = readFileSync(`${IP}/photo.png`);
  const init = hwcBytes(inIo, 'init_image', (v) => Math.round((v + 1) * 127.5));
  initPng = await png(init.data, init.w, init.h, 3);
  const mask = hwcBytes(inIo, 'mask', (v) => Math.round(v * 255));
  maskPng = await png(mask.data, mask.w, mask.h, 1);
});

afterAll(() => {
  sd?.dispose();
  for (const f of [cnIo, ipIo, inIo]) f.close();
  rmSync(work, { recursive: true, force: true });
});

/** The controlnet fixture's ddim_a case: DDIM 8 steps, cfg 7.5, seed 1234, canny 100/200, scale 0.8, window 0 .. 0.8. */
const DDIM_A: GenerateParams = { prompt: PROMPT, seed: 1234, steps: 8, cfgScale: 7.5, sampler: 'ddim', width: 32, height: 32 };
const control = (o: Partial<NonNullable<GenerateParams['controlNets']>[number]> = {}) => ({
  model: `${CN}/control_tiny.safetensors`, image: sketch, preprocess: 'canny' as const, low: 100, high: 200, scale: 0.8, start: 0, end: 0.8, ...o,
});

describe('ControlNet', () => {
  it('reproduces the fixture image of ddim_a (canny of the sketch, window 0 .. 0.8) and records the unit', async () => {
    const r = await sd.generate({ ...DDIM_A, controlNets: [control()] });
    expectImage(r.images[0].rgb, cnIo.float32('e2e_ddim_a_image'), cnTol);
    expect(r.params.controlNets).toEqual([{ model: `${CN}/control_tiny.safetensors`, preprocess: 'canny', low: 100, high: 200, scale: 0.8, start: 0, end: 0.8 }]);
    const settings = parseParameters(readPngParameters(r.images[0].png)!).settings;
    expect(controlUnits(settings)).toEqual([{ Module: 'canny', Model: 'control_tiny', Weight: '0.8', 'Resize Mode': 'Just Resize', 'Threshold A': '100', 'Threshold B': '200', 'Guidance Start': '0', 'Guidance End': '0.8' }]);
  });

  it('scale 0 is no ControlNet, bit for bit; outside its window it does nothing; the window changes the image', async () => {
    const quick = { ...DDIM_A, steps: 2 };
    const plain = await sd.generate(quick);
    const zero = await sd.generate({ ...quick, controlNets: [control({ scale: 0, end: 1 })] });
    expect(same(zero.images[0].rgb, plain.images[0].rgb)).toBe(true);
    const late = await sd.generate({ ...quick, controlNets: [control({ start: 0.9, end: 1 })] }); // step 1: 1/2 < 0.9
    expect(same(late.images[0].rgb, plain.images[0].rgb)).toBe(true);
    const half = await sd.generate({ ...quick, controlNets: [control({ end: 0.5 })] });
    const every = await sd.generate({ ...quick, controlNets: [control({ end: 1 })] });
    expect(same(half.images[0].rgb, plain.images[0].rgb)).toBe(false);
    expect(same(half.images[0].rgb, every.images[0].rgb)).toBe(false);
  });

  it("two ControlNets sum their residuals (0.5 + 0.3 = one at 0.8); preprocess 'none' takes the canny map as it is", async () => {
    const quick = { ...DDIM_A, steps: 2 };
    const one = await sd.generate({ ...quick, controlNets: [control({ end: 1 })] });
    const two = await sd.generate({ ...quick, controlNets: [control({ scale: 0.5, end: 1 }), control({ model: `${CN}/diffusers`, scale: 0.3, end: 1 })] });
    expect(withinTolerance(Float32Array.from(two.images[0].rgb), Float32Array.from(one.images[0].rgb), 2 / 255).passed).toBe(true);
    expect(controlUnits(parseParameters(readPngParameters(two.images[0].png)!).settings).map((u) => u.Model)).toEqual(['control_tiny', 'diffusers']);
    const edges = cnIo.bytes('e2e_ddim_a_edges');
    const rgb = new Uint8Array(edges.length * 3).map((_, i) => edges[Math.floor(i / 3)]);
    const given = await sd.generate({ ...quick, controlNets: [control({ image: await png(rgb, 64, 64, 3), preprocess: 'none', low: undefined, high: undefined, end: 1 })] });
    expect(same(given.images[0].rgb, one.images[0].rgb)).toBe(true);
  });
});

describe('IP-Adapter', () => {
  const EULER_A: GenerateParams = { prompt: PROMPT, seed: 504, steps: 6, cfgScale: 7.5, sampler: 'euler_a', width: 32, height: 32 };

  it('reproduces the fixture txt2img (euler_a, ip scale 0.6, the encoder found beside the adapter), then detaches', async () => {
    const before = await sd.generate({ ...EULER_A, steps: 1 });
    const r = await sd.generate({ ...EULER_A, ipAdapter: { model: `${IP}/ip-adapter_sd15.safetensors`, image: photo, scale: 0.6 } });
    expectImage(r.images[0].rgb, ipIo.float32('euler_a_6_image'), ipTol);
    expect(r.params.ipAdapter).toEqual({ model: `${IP}/ip-adapter_sd15.safetensors`, scale: 0.6, imageEncoder: null });
    expect(controlUnits(parseParameters(readPngParameters(r.images[0].png)!).settings)).toEqual([
      { Module: 'ip-adapter_clip_sd15', Model: 'ip-adapter_sd15', Weight: '0.6', 'Resize Mode': 'Just Resize', 'Guidance Start': '0', 'Guidance End': '1' },
    ]);
    const after = await sd.generate({ ...EULER_A, steps: 1 });
    expect(same(after.images[0].rgb, before.images[0].rgb)).toBe(true);
  });

  it('the Plus adapter (.bin) with an explicit encoder folder reproduces its DDIM case', async () => {
    const r = await sd.generate({
      prompt: PROMPT, seed: 504, steps: 8, cfgScale: 7.5, sampler: 'ddim', width: 32, height: 32,
      ipAdapter: { model: `${IP}/ip-adapter-plus_sd15.bin`, image: photo, scale: 0.6, imageEncoder: `${IP}/image_encoder` },
    });
    expectImage(r.images[0].rgb, ipIo.float32('plus_ddim_8_image'), ipTol);
  });

  it("is refused on a streamed UNet (wasm's default), which cannot keep the adapter's projections", async () => {
    const src = SafetensorsFile.open(`${PIPE}/model.safetensors`);
    const unet = UNet.load(src, config.unet, undefined, { residency: 'streamed' });
    src.close();
    const cache = new IpAdapterCache();
    try {
      const r = { model: `${IP}/ip-adapter_sd15.safetensors`, scale: 1, imageEncoder: null };
      await expect(ipTokensFor(r, photo, cache, unet)).rejects.toMatchObject({ name: 'ParamError', field: 'ipAdapter', message: /tensorflow or cpu backend/ });
      expect(cache.size).toEqual({ adapters: 0, encoders: 0 });
    } finally {
      cache.dispose();
      unet.dispose();
    }
  });

  it('refuses a photo that does not decode and a missing encoder, naming the field, and stays detached', async () => {
    const ip = { model: `${IP}/ip-adapter_sd15.safetensors`, image: new Uint8Array([1, 2, 3]) };
    await expect(sd.generate({ ...EULER_A, steps: 1, ipAdapter: ip })).rejects.toMatchObject({ name: 'ParamError', field: 'ipAdapter.image' });
    await expect(sd.generate({ ...EULER_A, steps: 1, ipAdapter: { ...ip, image: photo, imageEncoder: work } })).rejects.toMatchObject({ field: 'ipAdapter.imageEncoder' });
    const plain = await sd.generate({ ...EULER_A, steps: 1 });
    expect(plain.images).toHaveLength(1);
  });
});

describe('inpainting', () => {
  const BLEND: GenerateParams = { prompt: PROMPT, seed: 32, steps: 6, cfgScale: 7.5, sampler: 'ddim', width: 32, height: 32, conventions: 'diffusers' };

  it('an ordinary model blends after every step: the fixture images at strengths 0.75 and 1', async () => {
    for (const [strength, key] of [[0.75, 'blend_s0.75_image'], [1, 'blend_s1.0_image']] as const) {
      const r = await sd.generate({ ...BLEND, initImage: initPng, mask: maskPng, strength });
      expectImage(r.images[0].rgb, inIo.float32(key), inTol);
      expect(r.params.mask).toBe(true);
      expect(parseParameters(readPngParameters(r.images[0].png)!).settings).toMatchObject({ 'Mask blur': '0', 'Denoising strength': String(strength) });
    }
  });

  it('blends with sigma samplers too (euler_a, k-diffusion): the mask changes the img2img image', async () => {
    const quick: GenerateParams = { ...BLEND, steps: 3, sampler: 'euler_a', conventions: 'a1111', initImage: initPng, strength: 0.75 };
    const init = await sd.generate(quick);
    const masked = await sd.generate({ ...quick, mask: maskPng });
    expect(same(init.images[0].rgb, masked.images[0].rgb)).toBe(false);
  });

  it('a 9-channel inpainting checkpoint (its UNet widens the config) reproduces the fixture at strengths 1 and 0.75', async () => {
    const path = join(work, 'inpainting.safetensors');
    const base = SafetensorsFile.open(`${PIPE}/model.safetensors`);
    const unet = SafetensorsFile.open(`${INP}/unet-fp16.safetensors`);
    const infos: [string, TensorInfo][] = [
      ...base.keys().filter((k) => !k.startsWith('model.diffusion_model.')).map((k): [string, TensorInfo] => [k, base.info(k)]),
      ...unet.keys().map((k): [string, TensorInfo] => [k, unet.info(k)]),
    ];
    writeSafetensors(path, infos, (k) => (unet.has(k) ? unet.bytes(k) : base.bytes(k)));
    base.close();
    unet.close();
    const nine = await StableDiffusion.load({ weights: path, config, tokenizer: TOKENIZER });
    try {
      for (const [strength, key] of [[1, 'inpaint9_s1.0_image'], [0.75, 'inpaint9_s0.75_image']] as const) {
        const r = await nine.generate({ ...BLEND, seed: 31, initImage: initPng, mask: maskPng, strength });
        expectImage(r.images[0].rgb, inIo.float32(key), inTol);
      }
      // txt2img on an inpainting model: everything repainted from a zero image
      const t2i = await nine.generate({ ...BLEND, seed: 31, steps: 2 });
      expect(t2i.images[0].rgb.length).toBe(32 * 32 * 3);
    } finally {
      nine.dispose();
    }
  });
});

describe('requests with adapters', () => {
  const ALL: GenerateParams = {
    prompt: PROMPT, seed: 7, steps: 2, sampler: 'euler_a', width: 32, height: 32, initImage: null as unknown as Uint8Array, mask: null as unknown as Uint8Array,
  };
  const all = (): GenerateParams => ({
    ...ALL,
    initImage: initPng,
    mask: maskPng,
    strength: 0.9,
    controlNets: [control({ end: 1 })],
    ipAdapter: { model: `${IP}/ip-adapter_sd15.safetensors`, image: photo, scale: 0.6 },
  });

  it('free every tensor: ControlNet + IP-Adapter + inpainting, and an aborted one (models stay cached)', async () => {
    await sd.generate(all()); // loads and caches the models
    const before = tf.memory().numTensors;
    const r = await sd.generate({ ...all(), batch: 2 });
    expect(r.images).toHaveLength(2);
    expect(tf.memory().numTensors).toBe(before);
    const controller = new AbortController();
    await expect(sd.generate({ ...all(), steps: 4 }, { signal: controller.signal, onProgress: (s) => s === 1 && controller.abort() })).rejects.toMatchObject({ name: 'AbortError' });
    expect(tf.memory().numTensors).toBe(before);
    // the adapter was detached on abort: a plain request runs
    await expect(sd.generate({ prompt: PROMPT, seed: 1, steps: 1, width: 32, height: 32 })).resolves.toBeDefined();
  });

  it('guidance off and A1111 prompts of different lengths (the negative apart) take the adapters too', async () => {
    const long = Array.from({ length: 40 }, () => 'fern, leaf').join(' ');
    for (const p of [{ cfg: false }, { prompt: long, negativePrompt: 'blurry' }]) {
      const r = await sd.generate({ ...all(), ...p, steps: 1 });
      expect(r.images).toHaveLength(1);
    }
  });

  it('refuses bad adapter fields with a ParamError naming them', async () => {
    const cases: [GenerateParams, string][] = [
      [{ ...DDIM_A, mask: maskPng }, 'mask'],
      [{ ...DDIM_A, controlNets: [control({ start: 0.5, end: 0.5 })] }, 'controlNets[0].start'],
      [{ ...DDIM_A, controlNets: [control({ scale: 3 })] }, 'controlNets[0].scale'],
      [{ ...DDIM_A, controlNets: [control({ low: 250, high: 200 })] }, 'controlNets[0].low'],
      [{ ...DDIM_A, controlNets: [control({ preprocess: 'none' })] }, 'controlNets[0].low'],
      [{ ...DDIM_A, controlNets: [control({ model: `${PIPE}/model.safetensors` })] }, 'controlNets[0].model'],
      [{ ...DDIM_A, controlNets: [control({ model: `${work}/missing.safetensors` })] }, 'controlNets[0].model'],
      [{ ...DDIM_A, controlNets: [control({ image: new Uint8Array([0x89, 0x50]) })] }, 'controlNets[0].image'],
      [{ ...DDIM_A, ipAdapter: { model: `${IP}/ip-adapter_sd15.safetensors`, image: photo, scale: -1 } }, 'ipAdapter.scale'],
      [{ ...DDIM_A, ipAdapter: { model: `${CN}/control_tiny.safetensors`, image: photo } }, 'ipAdapter.model'],
    ];
    for (const [p, field] of cases) {
      const e = await sd.generate(p).then(() => null, (x: unknown) => x);
      expect(e, field).toBeInstanceOf(Error);
      expect((e as Error).name === 'ParamError' || (e as Error).name === 'ImageError', `${field}: ${String(e)}`).toBe(true);
      if (e instanceof ParamError) expect(e.field).toBe(field);
      else expect((e as Error).message).toContain(field);
    }
  });
});
