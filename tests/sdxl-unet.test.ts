/**
 * The SDXL UNet (per-level transformer depth, head width 64-style heads, Linear projections, label_emb fed by the
 * micro-conditioning), VAE and whole txt2img from the single fp16 file (three samplers with diffusers' semantics)
 * against the sdxl fixture parts (tests/fixtures/sdxl/{unet,vae,pipeline}), on the cpu backend.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import * as tf from '../src/backend/tf.js';
import { initBackend } from '../src/backend/select.js';
import { ShapeError } from '../src/nn/errors.js';
import { runPart } from '../src/parity/sdxl.js';
import { sdxlAddedEmbedding, SDXL_TIME_EMBED_DIM } from '../src/pipeline/conditioning.js';
import { timestepEmbedding } from '../src/unet/index.js';

const DIR = 'tests/fixtures/sdxl';

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: null });
});

describe('SDXL UNet and VAE against the fixture', () => {
  it.each(['unet', 'vae', 'pipeline'])('%s: every case within tolerance', async (part) => {
    const results = await runPart(DIR, part, { backend: 'cpu' });
    expect(results.filter((r) => !r.passed), JSON.stringify(results)).toEqual([]);
    expect(results.length).toBeGreaterThanOrEqual({ unet: 5, vae: 1, pipeline: 18 }[part] ?? 1);
  }, 300_000);
});

describe('SDXL micro-conditioning', () => {
  it('is [pooled, F(each of the six time ids)], F the timestep embedding of one number', () => {
    const pooled = tf.tensor2d([[0.5, -1]], [1, 2]);
    const ids = [[768, 1344, 64, 32, 1024, 1024]];
    const got = sdxlAddedEmbedding(pooled, ids, 4);
    expect(got.shape).toEqual([1, 2 + 6 * 4]);
    const values = got.dataSync();
    expect(Array.from(values.subarray(0, 2))).toEqual([0.5, -1]);
    const each = timestepEmbedding([1344], 4).dataSync(); // the second id
    expect(Array.from(values.subarray(2 + 4, 2 + 8))).toEqual(Array.from(each));
    expect(SDXL_TIME_EMBED_DIM).toBe(256); // 1280 + 6 * 256 = 2816 = SDXL base's adm_in_channels
    expect(() => sdxlAddedEmbedding(pooled, [[1, 2, 3]], 4)).toThrow(ShapeError);
    tf.dispose([pooled, got]);
  });
});
