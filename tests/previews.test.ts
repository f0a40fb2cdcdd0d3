/**
 * Previews and the early stop of generate() on the tiny fixture model (cpu): the predicted x0 of ../src/scheduler/x0.ts
 * against DDIM's own pred_x0, the approx decoder's numbers against the 4x3 factors by hand, the last Euler step's x0
 * decoded = the final image (sigma ends at 0), `stop` answering the image of the step it stopped at, no tensor leaks.
 */
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as tf from '../src/backend/tf.js';
import { initBackend } from '../src/backend/select.js';
import { pipelineConfigFromLdm, StableDiffusion } from '../src/pipeline/pipeline.js';
import type { GenerateParams, StepPreview } from '../src/pipeline/api.js';
import { LATENT_RGB_FACTORS, approxRgb } from '../src/pipeline/preview.js';
import { abarAt, predictedX0 } from '../src/scheduler/x0.js';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import sharp from 'sharp';
import { saveStepsOptions, stepFileName } from '../src/cli/save-steps.js';
import { alphasCumprod } from '../src/scheduler/schedule.js';

const DIR = 'tests/fixtures/pipeline';
const config = pipelineConfigFromLdm(JSON.parse(readFileSync(`${DIR}/fixture.json`, 'utf8')));
const CASE: GenerateParams = { prompt: 'a photo', seed: 7, steps: 4, cfgScale: 5, sampler: 'euler', width: 32, height: 32 };

let sd: StableDiffusion;

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: null });
  sd = await StableDiffusion.load({ weights: `${DIR}/model.safetensors`, config, tokenizer: 'tests/fixtures/tokenizer' });
});

afterAll(() => sd?.dispose());

describe('predicted x0', () => {
  it('abar at integer t is the schedule, and x0 = (x - sqrt(1 - abar) eps) / sqrt(abar)', () => {
    const acp = alphasCumprod();
    for (const t of [0, 1, 250, 999]) expect(Math.abs(abarAt(t) - acp[t]) / acp[t]).toBeLessThan(1e-5);
    const x = tf.tensor4d([1, 2, 3, 4], [1, 1, 1, 4]);
    const e = tf.tensor4d([0.5, -0.5, 0.25, 0], [1, 1, 1, 4]);
    const got = predictedX0(x, 500, e).dataSync();
    const a = acp[500];
    const want = [1, 2, 3, 4].map((v, i) => (v - Math.sqrt(1 - a) * [0.5, -0.5, 0.25, 0][i]) / Math.sqrt(a));
    for (let i = 0; i < 4; i++) expect(got[i]).toBeCloseTo(want[i], 4);
    tf.dispose([x, e]);
  });
});

describe('approx decoder', () => {
  it('RGB = latent x factors, / 2 + 0.5, clamped, at latent size', () => {
    const latent = [0.5, -1, 0.25, 2];
    const rgb = approxRgb(tf.tensor4d(latent, [1, 1, 1, 4]), 'sd1').dataSync();
    const f = LATENT_RGB_FACTORS.sd1;
    for (let c = 0; c < 3; c++) {
      const v = latent.reduce((s, l, k) => s + l * f[k][c], 0);
      expect(rgb[c]).toBeCloseTo(Math.min(1, Math.max(0, v / 2 + 0.5)), 5);
    }
  });
});

describe('generate with previews', () => {
  it('approx: one preview per step at latent size (1/4 here: the fixture VAE has 3 levels); vae every 2 steps and the last, at image size; no leaks', async () => {
    const before = tf.memory().numTensors;
    const approx: StepPreview[] = [];
    const plain = await sd.generate(CASE);
    const r = await sd.generate(CASE, { preview: { decoder: 'approx' }, onPreview: (p) => void approx.push(p) });
    expect(approx.map((p) => p.step)).toEqual([1, 2, 3, 4]);
    expect(approx.every((p) => p.width === 8 && p.height === 8 && p.rgb.length === 8 * 8 * 3 && p.total === 4)).toBe(true);
    expect(Buffer.from(r.images[0].rgb).equals(Buffer.from(plain.images[0].rgb))).toBe(true); // previews change nothing
    const vae: StepPreview[] = [];
    await sd.generate({ ...CASE, steps: 3 }, { preview: { decoder: 'vae', every: 2 }, onPreview: (p) => void vae.push(p) });
    expect(vae.map((p) => p.step)).toEqual([2, 3]);
    expect(vae.every((p) => p.width === 32 && p.height === 32)).toBe(true);
    expect(tf.memory().numTensors).toBe(before);
  });

  it("Euler's last x0 decoded is the final image (its last sigma is 0); earlier ones differ", async () => {
    const vae: StepPreview[] = [];
    const r = await sd.generate(CASE, { preview: { decoder: 'vae' }, onPreview: (p) => void vae.push(p) });
    const last = vae.at(-1) as StepPreview;
    const diff = (a: Uint8Array, b: Uint8Array) => a.reduce((m, v, i) => Math.max(m, Math.abs(v - b[i])), 0);
    expect(diff(last.rgb, r.images[0].rgb)).toBeLessThanOrEqual(1);
    expect(diff(vae[0].rgb, r.images[0].rgb)).toBeGreaterThan(1);
  });

  it('stop: finishes at the step it was asked at, with that step\'s x0 as the image; the rest of a batch is skipped', async () => {
    const before = tf.memory().numTensors;
    const stop = new AbortController();
    const vae: StepPreview[] = [];
    const r = await sd.generate({ ...CASE, batch: 2 }, {
      preview: { decoder: 'vae' },
      onPreview: (p) => void vae.push(p),
      onProgress: (step) => { if (step === 2) stop.abort(); },
      stop: stop.signal,
    });
    expect(r.stoppedAt).toBe(2);
    expect(r.images.length).toBe(1);
    expect(Buffer.from(r.images[0].rgb).equals(Buffer.from(vae[1].rgb))).toBe(true);
    expect(tf.memory().numTensors).toBe(before);
  });
});

describe('sd generate --save-steps', () => {
  it('writes step_001.png ... with the last one = the final image (Euler); batches name the image', async () => {
    const dir = mkdtempSync(path.join(tmpdir(), 'sd-steps-'));
    try {
      const r = await sd.generate({ ...CASE, steps: 2 }, saveStepsOptions(dir, 1));
      expect(readdirSync(dir).sort()).toEqual(['step_001.png', 'step_002.png']);
      const last = await sharp(path.join(dir, 'step_002.png')).raw().toBuffer({ resolveWithObject: true });
      expect(last.info).toMatchObject({ width: 32, height: 32, channels: 3 });
      expect(last.data.reduce((m, v, i) => Math.max(m, Math.abs(v - r.images[0].rgb[i])), 0)).toBeLessThanOrEqual(1);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
    const p = { step: 7, total: 10, image: 1, decoder: 'vae' as const, rgb: new Uint8Array(0), width: 0, height: 0 };
    expect(stepFileName(p, 2)).toBe('image2_step_002.png');
    expect(stepFileName({ ...p, step: 3, image: 0 }, 1)).toBe('step_003.png');
  });
});
