/**
 * StableDiffusion.generate() end to end on the tiny fixture model (cpu backend): numbers against the fixture's
 * seeded DDPM case, determinism, batches, progress, cancellation, tensor leaks and load-time errors.
 * Stage-by-stage parity over every case and weight file is tests/pipeline-parity.test.ts.
 */
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import sharp from 'sharp';
import * as tf from '../src/backend/tf.js';
import { initBackend } from '../src/backend/select.js';
import { SafetensorsFile } from '../src/weights/safetensors.js';
import { withinTolerance } from '../src/parity/compare.js';
import { pipelineConfigFromLdm, StableDiffusion, type PipelineConfig } from '../src/pipeline/pipeline.js';
import { readPngParameters } from '../src/image/codec.js';
import { parseParameters } from '../src/image/parameters.js';
import type { GenerateParams } from '../src/pipeline/api.js';

const DIR = 'tests/fixtures/pipeline';
const fixture = JSON.parse(readFileSync(`${DIR}/fixture.json`, 'utf8')) as {
  config: { prompt: string; negative_prompt: string };
  tolerance: { image: number };
};
const config: PipelineConfig = pipelineConfigFromLdm(fixture);
const io = SafetensorsFile.open(`${DIR}/io.safetensors`);

/** The fixture's seeded txt2img case (sampler ddpm, seed 42, 10 steps, cfg 7.5) as generate() parameters. */
const DDPM_CASE: GenerateParams = {
  prompt: fixture.config.prompt,
  negativePrompt: fixture.config.negative_prompt,
  seed: 42,
  steps: 10,
  cfgScale: 7.5,
  sampler: 'ddpm',
  width: 32,
  height: 32,
};

let sd: StableDiffusion;

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: null });
  sd = await StableDiffusion.load({ weights: `${DIR}/model.safetensors`, config, tokenizer: 'tests/fixtures/tokenizer' });
});

afterAll(() => {
  sd?.dispose();
  io.close();
});

describe('generate', () => {
  it('reproduces the fixture image for the seeded DDPM case, byte-identically twice, without leaking tensors', async () => {
    const before = tf.memory().numTensors;
    const steps: [number, number][] = [];
    const first = await sd.generate(DDPM_CASE, { onProgress: (s, n) => steps.push([s, n]) });
    expect(steps).toEqual(Array.from({ length: 10 }, (_, i) => [i + 1, 10]));
    const [img] = first.images;
    expect(img.seed).toBe(42);
    // uint8 output: the fixture's tolerance plus half a level of rounding.
    const actual = Float32Array.from(img.rgb, (v) => v / 255);
    const { passed, maxRelError } = withinTolerance(actual, io.float32('ddpm_image'), fixture.tolerance.image + 0.5 / 255);
    expect(maxRelError).toBeLessThan(fixture.tolerance.image + 0.5 / 255);
    expect(passed).toBe(true);

    const { data, info } = await sharp(img.png).raw().toBuffer({ resolveWithObject: true });
    expect([info.width, info.height, info.channels]).toEqual([32, 32, 3]);
    expect(Buffer.from(img.rgb).equals(data)).toBe(true);
    const text = parseParameters(readPngParameters(img.png)!);
    expect(text.prompt).toBe(fixture.config.prompt);
    expect(text.settings).toMatchObject({ Steps: '10', Sampler: 'DDPM', 'CFG scale': '7.5', Seed: '42', Size: '32x32', Model: 'model' });

    const second = await sd.generate(DDPM_CASE);
    expect(second.images[0].png.equals(img.png)).toBe(true);
    expect(tf.memory().numTensors).toBe(before);
  });

  it('gives image i of a batch the seed + i, the same image as a single run with that seed', async () => {
    const quick: GenerateParams = { prompt: 'a fern', seed: 100, steps: 2, sampler: 'euler_a', cfg: false, width: 32, height: 32 };
    const totals: number[] = [];
    const batch = await sd.generate({ ...quick, batch: 2 }, { onProgress: (_, n) => totals.push(n) });
    expect(totals.every((n) => n === 4)).toBe(true);
    expect(batch.images.map((i) => i.seed)).toEqual([100, 101]);
    const single = await sd.generate({ ...quick, seed: 101 });
    expect(Buffer.from(single.images[0].rgb).equals(Buffer.from(batch.images[1].rgb))).toBe(true);
    expect(Buffer.from(batch.images[0].rgb).equals(Buffer.from(batch.images[1].rgb))).toBe(false);
  });

  it('runs img2img for int(steps * strength) steps and records the strength', async () => {
    const init = await sharp({ create: { width: 40, height: 24, channels: 3, background: '#3a7d44' } }).png().toBuffer();
    const totals = new Set<number>();
    const r = await sd.generate(
      { ...DDPM_CASE, initImage: init, strength: 0.6 },
      { onProgress: (_, n) => totals.add(n) },
    );
    expect([...totals]).toEqual([6]);
    expect(r.params.strength).toBe(0.6);
    expect(parseParameters(readPngParameters(r.images[0].png)!).settings['Denoising strength']).toBe('0.6');
  });

  it('cancels between steps with an AbortError and frees every tensor', async () => {
    const before = tf.memory().numTensors;
    const controller = new AbortController();
    const seen: number[] = [];
    const run = sd.generate(
      { ...DDPM_CASE, sampler: 'ddim', steps: 5 },
      { signal: controller.signal, onProgress: (s) => (seen.push(s), s === 2 && controller.abort()) },
    );
    await expect(run).rejects.toMatchObject({ name: 'AbortError' });
    expect(seen).toEqual([1, 2]);
    expect(tf.memory().numTensors).toBe(before);
  });

  it('oneShot frees the text encoder after encoding and the UNet before the last decode: the same images, then it refuses', async () => {
    const quick: GenerateParams = { prompt: 'a fern', negativePrompt: 'blurry', seed: 7, steps: 2, sampler: 'euler', width: 32, height: 32, batch: 2 };
    const kept = await sd.generate(quick);
    const own = await StableDiffusion.load({ weights: `${DIR}/model.safetensors`, config, tokenizer: 'tests/fixtures/tokenizer' });
    try {
      const loaded = tf.memory().numTensors;
      let duringLast = -1;
      const once = await own.generate(quick, { oneShot: true, onProgress: (s, n) => s === n && (duringLast = tf.memory().numTensors) });
      expect(once.images.map((i) => i.png)).toEqual(kept.images.map((i) => i.png));
      // by the last step the text encoder is gone; after the call the UNet too: only the VAE's tensors are left
      expect(duringLast).toBeGreaterThan(0);
      expect(duringLast).toBeLessThan(loaded);
      expect(tf.memory().numTensors).toBeLessThan(duringLast);
      await expect(own.generate(quick)).rejects.toThrow(/oneShot generation freed this model's networks; load it again/);
    } finally {
      own.dispose();
    }
  });
});

describe('StableDiffusion.load', () => {
  it('says which part of the config does not fit the checkpoint', async () => {
    const load = StableDiffusion.load({ weights: `${DIR}/model.safetensors`, tokenizer: 'tests/fixtures/tokenizer' });
    await expect(load).rejects.toMatchObject({ name: 'ConfigError' });
    await expect(load).rejects.toThrow(/checkpoint has text encoder width 32 but the config says 768: pass --config/);
    const unetOnly = pipelineConfigFromLdm({ ...(fixture as object), config: { ...(fixture as { config: object }).config, unet: { model_channels: 64, channel_mult: [1, 2, 2], attention_resolutions: [1, 2], num_res_blocks: 1, num_heads: 2, context_dim: 32 } } });
    await expect(StableDiffusion.load({ weights: `${DIR}/model.safetensors`, config: unetOnly, tokenizer: 'tests/fixtures/tokenizer' })).rejects.toThrow(
      /unet width \(model_channels\) 32 but the config says 64/,
    );
  });

  it('refuses a missing tokenizer or weight file with the error the CLI prints', async () => {
    await expect(StableDiffusion.load({ weights: `${DIR}/model.safetensors`, config, tokenizer: 'tests/fixtures/nowhere' })).rejects.toMatchObject({
      name: 'TokenizerError',
    });
    await expect(StableDiffusion.load({ weights: `${DIR}/missing.safetensors`, config, tokenizer: 'tests/fixtures/tokenizer' })).rejects.toMatchObject({
      name: 'WeightsError',
    });
  });
});
