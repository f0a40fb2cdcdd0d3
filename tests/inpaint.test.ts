/**
 * Inpainting (src/pipeline/inpaint.ts): the mask rules on a hand-made case, the 9-channel noise predictor's input
 * and refusals, the blend of a 4-channel model's steps, and the inpaint fixture through its runner (diffusers'
 * StableDiffusionInpaintPipeline step for step, 9-channel and blended, strengths 1 and 0.75).
 */
import { beforeAll, describe, expect, it } from 'vitest';
import * as tf from '../src/backend/tf.js';
import { initBackend } from '../src/backend/select.js';
import { ShapeError } from '../src/nn/errors.js';
import { run } from '../src/parity/inpaint.js';
import { blendKept, disposeMasks, inpaintMasks } from '../src/pipeline/inpaint.js';
import { A1111_CONVENTIONS, alphasCumprod } from '../src/scheduler/index.js';

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: null });
});

describe('inpainting masks', () => {
  it('binarises at 0.5, greys the repaint area, and keeps the top-left pixel of each block at latent size', () => {
    // a 4x4 image, f = 2; the mask's soft values straddle 0.5
    const mask = tf.tensor4d([0.49, 0.5, 0, 0, 1, 0, 0, 0, 0, 0, 0.6, 0.2, 0, 0, 0.1, 0.9], [1, 4, 4, 1]);
    const image = tf.tensor4d(Array.from({ length: 48 }, (_, i) => (i % 7) / 7 - 0.5), [1, 4, 4, 3]);
    const m = inpaintMasks(image, mask, 2);
    expect(Array.from(m.binary.dataSync())).toEqual([0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]);
    expect(Array.from(m.latent.dataSync())).toEqual([0, 0, 0, 1]); // pixels (0,0), (0,2), (2,0), (2,2)
    const masked = m.maskedImage.dataSync();
    const img = image.dataSync();
    for (let p = 0; p < 16; p++) for (let c = 0; c < 3; c++) expect(masked[p * 3 + c] + 0).toBe(m.binary.dataSync()[p] === 1 ? 0 : img[p * 3 + c]);
    disposeMasks(m);
    expect(() => inpaintMasks(image, tf.zeros([1, 4, 2, 1]) as tf.Tensor4D, 2)).toThrow(ShapeError);
    expect(() => inpaintMasks(image, mask, 3)).toThrow(/multiples of 3/);
    tf.dispose([mask, image]);
  });

  it('blends: the kept area is the init latent noised to the next timestep, clean after the last step', () => {
    const latent = tf.fill([1, 2, 2, 4], 5) as tf.Tensor4D;
    const init = tf.fill([1, 2, 2, 4], 1) as tf.Tensor4D;
    const noise = tf.fill([1, 2, 2, 4], 2) as tf.Tensor4D;
    const mask = tf.tensor4d([1, 0, 0, 1], [1, 2, 2, 1]);
    const abar = alphasCumprod();
    const mid = blendKept(latent, mask, init, noise, [801, 401, 1], 0, A1111_CONVENTIONS).dataSync();
    const kept = Math.sqrt(abar[401]) + 2 * Math.sqrt(1 - abar[401]);
    expect(mid[0]).toBe(5); // repaint area: the sampler's latent
    expect(mid[4]).toBeCloseTo(kept, 5); // kept area: noised init
    const last = blendKept(latent, mask, init, noise, [801, 401, 1], 2, A1111_CONVENTIONS).dataSync();
    expect(last[4]).toBe(1);
    tf.dispose([latent, init, noise, mask]);
  });
});

describe('the inpaint fixture', () => {
  it('every case within tolerance: masks, the 9-channel eps, both modes at both strengths', async () => {
    const results = await run('tests/fixtures/inpaint', { backend: 'cpu' });
    expect(results.filter((r) => !r.passed), JSON.stringify(results.filter((r) => !r.passed))).toEqual([]);
    expect(results.length).toBeGreaterThanOrEqual(29);
  }, 600_000);
});
