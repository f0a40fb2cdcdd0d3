/**
 * The UNet on the cpu backend: the CompVis reference fixture (tests/fixtures/unet), tensor lifetime, latent
 * sizes the fixture does not cover (480x640 images, sides that halve to odd numbers), config translation and
 * the checkpoint shapes of the full SD 1.5 UNet. The wasm run is tests/models-wasm.test.ts.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import * as tf from '../src/backend/tf.js';
import { initBackend } from '../src/backend/select.js';
import { ConfigError, ShapeError } from '../src/nn/errors.js';
import { SafetensorsFile } from '../src/weights/safetensors.js';
import { WeightsError } from '../src/weights/types.js';
import { run } from '../src/parity/unet.js';
import { maxRelError } from '../src/parity/compare.js';
import {
  SD15_UNET, UNet, expectedShapes, timestepEmbedding, unetConfigFromLdm, type LdmUNetParams, type UNetConfig,
} from '../src/unet/index.js';

const DIR = 'tests/fixtures/unet';
const fixtureConfig = (): UNetConfig =>
  unetConfigFromLdm((JSON.parse(readFileSync(`${DIR}/fixture.json`, 'utf8')) as { config: LdmUNetParams }).config);

let weights: SafetensorsFile;
let unet: UNet;
let cfg: UNetConfig;

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: null });
  cfg = fixtureConfig();
  weights = SafetensorsFile.open(`${DIR}/weights.safetensors`);
  unet = UNet.load(weights, cfg);
});

afterAll(() => {
  unet.dispose();
  weights.close();
});

/** Deterministic values in [-1, 1) (a linear congruential generator; only needs to be varied). */
function values(n: number, seed: number): Float32Array {
  const out = new Float32Array(n);
  let s = seed;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = s / 2 ** 31 - 1;
  }
  return out;
}

function latents(b: number, h: number, w: number, seed: number): tf.Tensor4D {
  return tf.tensor4d(values(b * h * w * cfg.inChannels, seed), [b, h, w, cfg.inChannels]);
}

function contexts(b: number, seed: number): tf.Tensor3D {
  return tf.tensor3d(values(b * 77 * cfg.contextDim, seed), [b, 77, cfg.contextDim]);
}

describe('UNet against the CompVis fixture', () => {
  it('matches the reference output within the fixture tolerance (16x16: the upsample is CompVis nearest 2x)', async () => {
    const results = await run(DIR, { backend: 'cpu' });
    for (const r of results) expect(r, `${r.name}: ${r.detail ?? ''}`).toMatchObject({ passed: true });
    const forward = results.find((r) => r.name === 'forward');
    expect(forward?.maxRelError).toBeLessThanOrEqual(forward?.tolerance ?? 0);
  });

  it('keeps no tensors after two forwards, and none after dispose', () => {
    const x = latents(2, 16, 16, 1);
    const ctx = contexts(2, 2);
    const before = tf.memory().numTensors;
    unet.forward(x, [981, 1.5], { context: ctx }).dispose();
    tf.tidy(() => unet.forward(x, 500, { context: ctx })).dispose();
    expect(tf.memory().numTensors).toBe(before);
    tf.dispose([x, ctx]);

    const loadedBefore = tf.memory().numTensors;
    UNet.load(weights, cfg).dispose();
    expect(tf.memory().numTensors).toBe(loadedBefore);
  });
});

describe('latent sizes', () => {
  it('runs a 480x640 image (60x80 latent, attention sliced at 4800 tokens)', () => {
    const x = latents(1, 60, 80, 3);
    const ctx = contexts(1, 4);
    const before = tf.memory().numTensors;
    const out = unet.forward(x, 700, { context: ctx });
    expect(out.shape).toEqual([1, 60, 80, cfg.outChannels]);
    const data = out.dataSync();
    expect(data.every(Number.isFinite)).toBe(true);
    expect(Math.max(...data.map(Math.abs))).toBeGreaterThan(0);
    out.dispose();
    expect(tf.memory().numTensors).toBe(before);
    tf.dispose([x, ctx]);
  });

  it('runs sides that halve to odd numbers (18x26 -> 9x13 -> 5x7), each batch item as if alone', () => {
    // The upsample goes to the skip's size (9x13 from 5x7), as diffusers does; CompVis' fixed 2x would crash at
    // the concat. The reference for a batch is the same call per item: classifier-free guidance relies on it.
    const x = latents(2, 18, 26, 5);
    const ctx = contexts(2, 6);
    const both = unet.forward(x, [10, 900], { context: ctx });
    expect(both.shape).toEqual([2, 18, 26, cfg.outChannels]);
    for (const [i, t] of [[0, 10], [1, 900]]) {
      const alone = tf.tidy(() => unet.forward(tf.slice(x, [i, 0, 0, 0], [1, -1, -1, -1]), t, { context: tf.slice(ctx, [i, 0, 0], [1, -1, -1]) }));
      const fromBatch = tf.slice(both, [i, 0, 0, 0], [1, -1, -1, -1]);
      expect(maxRelError(fromBatch.dataSync(), alone.dataSync())).toBeLessThan(1e-5);
      tf.dispose([alone, fromBatch]);
    }
    tf.dispose([x, ctx, both]);
  });

  it('refuses inputs that do not fit, saying what was expected', () => {
    const x = latents(2, 8, 8, 7);
    const ctx = contexts(1, 8);
    expect(() => unet.forward(x, 1, { context: ctx })).toThrow(ShapeError);
    const ctx2 = contexts(2, 9);
    expect(() => unet.forward(x, [1, 2, 3], { context: ctx2 })).toThrow(/2 finite numbers/);
    expect(() => unet.forward(x, [1, Number.NaN], { context: ctx2 })).toThrow(ShapeError);
    tf.dispose([x, ctx, ctx2]);
  });
});

describe('timestep embedding', () => {
  it('is [cos, sin] of t * 10000^(-i/half), cos first', () => {
    const dim = 8;
    const got = timestepEmbedding([0, 981.5], dim).arraySync();
    expect(got[0]).toEqual([1, 1, 1, 1, 0, 0, 0, 0]);
    const want = [0, 1, 2, 3].map((i) => 981.5 * 10000 ** (-i / 4));
    for (let i = 0; i < 4; i++) {
      expect(got[1][i]).toBeCloseTo(Math.cos(want[i]), 3);
      expect(got[1][4 + i]).toBeCloseTo(Math.sin(want[i]), 3);
    }
  });
});

describe('config and checkpoint shapes', () => {
  it('translates LDM params; missing ones are SD 1.5', () => {
    expect(unetConfigFromLdm({})).toEqual(SD15_UNET);
    // attention_resolutions [1, 2] over 3 levels: transformers at the two top levels
    expect(cfg).toMatchObject({ modelChannels: 32, channelMult: [1, 2, 2], transformerDepth: [1, 1, 0], heads: { count: 2 }, contextDim: 32 });
    expect(cfg).toMatchObject({ middleTransformerDepth: 1, projection: 'conv', addedEmbeddingDim: 0 });
    expect(() => unetConfigFromLdm({ model_channels: 40 })).toThrow(/multiple of 32/);
    expect(() => unetConfigFromLdm({ model_channels: 40 })).toThrow(ConfigError);
    expect(() => unetConfigFromLdm({ num_heads: 7 })).toThrow(/does not split into 7 heads/);
    expect(() => unetConfigFromLdm({ num_classes: 1000 })).toThrow(/num_classes/);
  });

  it('translates sgm (SDXL) params: per-level depth, head width, linear projections, label_emb', () => {
    const xl = unetConfigFromLdm({
      adm_in_channels: 2816, num_classes: 'sequential', in_channels: 4, out_channels: 4, model_channels: 320,
      attention_resolutions: [4, 2], num_res_blocks: 2, channel_mult: [1, 2, 4], num_head_channels: 64,
      use_linear_in_transformer: true, transformer_depth: [1, 2, 10], context_dim: 2048,
    });
    expect(xl).toMatchObject({ transformerDepth: [0, 2, 10], middleTransformerDepth: 10, heads: { width: 64 }, projection: 'linear', addedEmbeddingDim: 2816 });
    const shapes = expectedShapes(xl);
    const params = [...shapes.values()].reduce((n, s) => n + s.reduce((a, d) => a * d, 1), 0);
    expect(params).toBe(2_567_463_684); // SDXL base 1.0's UNet
    expect(shapes.get('model.diffusion_model.label_emb.0.0.weight')).toEqual([1280, 2816]);
    expect(shapes.get('model.diffusion_model.input_blocks.4.1.proj_in.weight')).toEqual([640, 640]); // a Linear
    expect(shapes.has('model.diffusion_model.input_blocks.1.1.norm.weight')).toBe(false); // no attention at level 0
    expect(shapes.has('model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.bias')).toBe(true);
  });

  it('names the 686 tensors and 859,520,964 parameters of the SD 1.5 UNet', () => {
    const shapes = expectedShapes(SD15_UNET);
    expect(shapes.size).toBe(686);
    const params = [...shapes.values()].reduce((n, s) => n + s.reduce((a, d) => a * d, 1), 0);
    expect(params).toBe(859_520_964);
    expect(shapes.get('model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight')).toEqual([640, 768]);
    expect(shapes.get('model.diffusion_model.output_blocks.8.2.conv.weight')).toEqual([640, 640, 3, 3]);
    expect(shapes.get('model.diffusion_model.output_blocks.2.1.conv.weight')).toEqual([1280, 1280, 3, 3]);
  });

  it('refuses a checkpoint the config does not describe', () => {
    expect(() => UNet.load(weights, { ...cfg, contextDim: 48 })).toThrow(ShapeError);
    // fewer transformers than the file has: their weights would be silently ignored
    expect(() => UNet.load(weights, { ...cfg, transformerDepth: [1, 0, 0] })).toThrow(WeightsError);
  });
});
