/**
 * Issue #20, "same seed, same image as diffusers", against diffusers itself: tests/fixtures/diffusers-runs holds a
 * tiny random SD 1.x diffusers folder (SD 1.5's PNDM scheduler_config.json) and the float images diffusers'
 * StableDiffusionPipeline / StableDiffusionImg2ImgPipeline made with it, one case per scheduler class
 * (<Class>.from_config(pipe.scheduler.config), as a diffusers user switches schedulers), seeded
 * torch.Generator('cpu'). The folder is loaded with StableDiffusion.load and run through generate() with the same
 * seed, prompt, steps and sampler under the folder's default conventions (diffusers'); the 8-bit image is compared
 * with diffusers' float image times 255. The resaved_* cases run the same folder with the scheduler config diffusers
 * writes when it saves SD 1.5's again (timestep_spacing "leading" spelled out). make.py regenerates the fixture.
 */
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { initBackend } from '../src/backend/select.js';
import { StableDiffusion } from '../src/pipeline/pipeline.js';
import { ClipTokenizer } from '../src/tokenizer/index.js';
import { SafetensorsFile } from '../src/weights/safetensors.js';
import type { SamplerName } from '../src/scheduler/index.js';

const DIR = 'tests/fixtures/diffusers-runs';
const TOKENIZER = 'tests/fixtures/tokenizer';

interface RunCase {
  readonly name: string;
  readonly mode: 'txt2img' | 'img2img';
  readonly scheduler: string;
  readonly sampler: SamplerName;
  readonly karras: boolean;
  readonly steps: number;
  readonly seed: number;
  readonly strength?: number;
  readonly init_image?: string;
  /** The case ran from this scheduler config (relative to the fixture) instead of model/'s. */
  readonly scheduler_config?: string;
  readonly image: string;
}

interface RunFixture {
  readonly width: number;
  readonly height: number;
  readonly prompt: string;
  readonly negative_prompt: string;
  readonly guidance_scale: number;
  readonly token_ids: { readonly prompt: readonly number[]; readonly negative_prompt: readonly number[] };
  readonly cases: readonly RunCase[];
}

/**
 * What float32 agreement allows. generate() gives round(255 x), so rounding alone differs from diffusers' float
 * image by up to 0.5 level (a PSNR of about 59 dB for uniform rounding error); measured, every case is within
 * 0.501 level, and the float images themselves (before rounding, checked on five cases) agree within 1e-5
 * (0.0025 level): float32 noise through the text encoder, the UNet, the sampler and the VAE. The bounds leave that noise room to grow (another CPU, another V8) yet fail on any
 * convention: a different spacing, start scale or noise order moves pixels by tens of levels (PSNR under 35 dB).
 */
const MAX_LEVELS = 1;
const MIN_PSNR_DB = 55;

const fixture = JSON.parse(readFileSync(join(DIR, 'fixture.json'), 'utf8')) as RunFixture;
let sd: StableDiffusion;
/** model/ with another scheduler config: a folder of links to its components (loaded on first use). */
const others = new Map<string, StableDiffusion>();
let images: SafetensorsFile;
const work = mkdtempSync(join(tmpdir(), 'sd-diffusers-runs-'));

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: null });
  sd = await StableDiffusion.load({ weights: join(DIR, 'model'), tokenizer: TOKENIZER, warn: () => undefined });
  images = SafetensorsFile.open(join(DIR, 'images.safetensors'));
});

afterAll(() => {
  sd?.dispose();
  for (const m of others.values()) m.dispose();
  images?.close();
  rmSync(work, { recursive: true, force: true });
});

async function modelFor(c: RunCase): Promise<StableDiffusion> {
  const config = c.scheduler_config;
  if (config === undefined) return sd;
  let m = others.get(config);
  if (m === undefined) {
    const folder = join(work, `model-${others.size}`);
    mkdirSync(join(folder, 'scheduler'), { recursive: true });
    for (const part of ['unet', 'vae', 'text_encoder', 'model_index.json']) symlinkSync(resolve(DIR, 'model', part), join(folder, part));
    copyFileSync(join(DIR, config), join(folder, 'scheduler', 'scheduler_config.json'));
    m = await StableDiffusion.load({ weights: folder, tokenizer: TOKENIZER, warn: () => undefined });
    others.set(config, m);
  }
  return m;
}

/** Max |a - 255 b| in 8-bit levels and the PSNR (dB, peak 255) of 8-bit `rgb` against a float image in [0, 1]. */
function compare(rgb: Uint8Array, expected: Float32Array): { maxLevels: number; psnr: number } {
  let max = 0;
  let sq = 0;
  for (let i = 0; i < rgb.length; i++) {
    const d = Math.abs(rgb[i] - 255 * expected[i]);
    max = Math.max(max, d);
    sq += d * d;
  }
  const mse = sq / rgb.length;
  return { maxLevels: max, psnr: mse === 0 ? Infinity : 10 * Math.log10((255 * 255) / mse) };
}

describe('the diffusers folder', () => {
  it("defaults to diffusers' conventions (its scheduler_config.json) and tokenizes as transformers' CLIPTokenizer", () => {
    expect(sd.limits.conventions).toBe('diffusers');
    expect([sd.limits.width, sd.limits.height]).toEqual([fixture.width, fixture.height]);
    const tokenizer = ClipTokenizer.fromFile(TOKENIZER);
    expect(Array.from(tokenizer.encode(fixture.prompt))).toEqual(fixture.token_ids.prompt);
    expect(Array.from(tokenizer.encode(fixture.negative_prompt))).toEqual(fixture.token_ids.negative_prompt);
  });
});

describe("generate() against diffusers' pipelines, same seed", () => {
  const rows: string[] = [];
  afterAll(() => {
    process.stdout.write(`diffusers-runs: case, max |diff| (8-bit levels), PSNR\n${rows.join('\n')}\n`);
  });

  it.each(fixture.cases.map((c) => [c.name, c] as const))('%s', async (_, c) => {
    const model = await modelFor(c);
    const result = await model.generate({
      prompt: fixture.prompt,
      negativePrompt: fixture.negative_prompt,
      seed: c.seed,
      steps: c.steps,
      sampler: c.sampler,
      karras: c.karras,
      cfgScale: fixture.guidance_scale,
      width: fixture.width,
      height: fixture.height,
      ...(c.mode === 'img2img' ? { initImage: readFileSync(join(DIR, c.init_image as string)), strength: c.strength } : {}),
    });
    const { maxLevels, psnr } = compare(result.images[0].rgb, images.float32(c.image));
    rows.push(`  ${c.name.padEnd(24)} ${c.scheduler.padEnd(34)} ${maxLevels.toFixed(3).padStart(8)} ${psnr.toFixed(1).padStart(6)} dB`);
    expect(result.params.conventions).toBe('diffusers');
    expect(maxLevels, `${c.name}: max difference ${maxLevels.toFixed(2)} levels, PSNR ${psnr.toFixed(1)} dB`).toBeLessThanOrEqual(MAX_LEVELS);
    expect(psnr).toBeGreaterThanOrEqual(MIN_PSNR_DB);
  });
});
