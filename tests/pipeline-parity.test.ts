/**
 * Every case of tests/fixtures/pipeline (ddim, euler_a, dpmpp_2m karras, ddpm txt2img, ddpm img2img), loaded
 * from model.safetensors, model-fp16.safetensors and model.ckpt: text encoding, latent and image against the
 * reference values at the fixture's tolerances (see src/parity/pipeline.ts).
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { initBackend } from '../src/backend/select.js';
import { run } from '../src/parity/pipeline.js';
import { formatResult } from '../src/parity/runner.js';

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: null });
});

describe('pipeline parity (cpu)', () => {
  it('matches the reference for every case and weight file', async () => {
    const results = await run('tests/fixtures/pipeline', { backend: 'cpu' });
    const failed = results.filter((r) => !r.passed).map(formatResult);
    expect(failed).toEqual([]);
    // 3 files x (2 text + 5 cases x (latent, image) + 1 init latent)
    expect(results.length).toBe(3 * (2 + 5 * 2 + 1));
    for (const r of results) expect(r.maxRelError).toBeLessThanOrEqual(r.tolerance!);
  });
});
