/**
 * The UNet's Conditioning (src/unet/conditioning.ts) carries, besides the text context, an added embedding
 * (label_emb, SDXL) and residuals for the skips and the middle block (ControlNet) through a tiny random UNet:
 * each changes exactly the outputs it should, zero residuals change nothing, bad shapes are refused by name, and
 * classifier-free guidance batches the whole conditioning.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as tf from '../src/backend/tf.js';
import { initBackend } from '../src/backend/select.js';
import { ShapeError } from '../src/nn/errors.js';
import { maxRelError } from '../src/parity/compare.js';
import { guidedEps } from '../src/pipeline/denoise.js';
import {
  UNet, concatConditioning, disposeConditioning, expectedShapes, unetBlockPlan, validateConfig, type Conditioning, type UNetConfig,
} from '../src/unet/index.js';
import { rand, source } from './helpers.js';

/** Two levels, attention at the top one, Linear projections and a label_emb of width 8: SDXL's shape in small. */
const CFG: UNetConfig = validateConfig({
  inChannels: 4, outChannels: 4, modelChannels: 32, channelMult: [1, 2], numResBlocks: 1,
  transformerDepth: [1, 0], middleTransformerDepth: 1, heads: { width: 16 }, projection: 'linear',
  contextDim: 16, addedEmbeddingDim: 8,
});
const [H, W] = [8, 6];

let unet: UNet;
let plain: UNet; // the same without label_emb
const owned: tf.Tensor[] = [];
const keep = <T extends tf.Tensor>(t: T): T => (owned.push(t), t);

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: null });
  const shapes = expectedShapes(CFG, '');
  unet = UNet.load(source(Object.fromEntries(shapes)), CFG, '');
  const plainCfg = { ...CFG, addedEmbeddingDim: 0 };
  plain = UNet.load(source(Object.fromEntries(expectedShapes(plainCfg, ''))), plainCfg, '');
});

afterAll(() => {
  unet.dispose();
  plain.dispose();
  tf.dispose(owned);
});

const x = () => keep(tf.tensor4d(rand(2 * H * W * 4), [2, H, W, 4]));
const context = () => keep(tf.tensor3d(rand(2 * 5 * 16), [2, 5, 16]));
const added = () => keep(tf.tensor2d(rand(2 * 8), [2, 8]));

/** The shapes of the residuals a ControlNet hands this UNet for a latent of H x W: one per input block, and the middle's. */
function residuals(fill: (i: number) => number, onlyItem?: number): NonNullable<Conditioning['residuals']> {
  const plan = unetBlockPlan(CFG);
  let [h, w] = [H, W];
  const make = (c: number, i: number) => keep(tf.tidy(() => {
    const r = tf.mul(tf.tensor4d(rand(2 * h * w * c), [2, h, w, c]), fill(i));
    if (onlyItem === undefined) return r;
    return tf.mul(r, tf.tensor4d([0, 1].map((b) => (b === onlyItem ? 1 : 0)), [2, 1, 1, 1]));
  }) as tf.Tensor4D);
  const down = plan.input.map((spec, i) => {
    if (spec.kind === 'down') [h, w] = [Math.ceil(h / 2), Math.ceil(w / 2)];
    return make(spec.kind === 'down' ? spec.ch : spec.cout, i);
  });
  return { down, middle: make(plan.middle.channels, plan.input.length) };
}

const values = (t: tf.Tensor): Float32Array => {
  const v = t.dataSync() as Float32Array;
  t.dispose();
  return v;
};
const item = (v: Float32Array, b: number) => v.subarray((b * v.length) / 2, ((b + 1) * v.length) / 2);

describe('Conditioning through the UNet', () => {
  it('zero residuals give the same noise prediction as none', () => {
    const [lat, ctx, emb] = [x(), context(), added()];
    const none = values(unet.forward(lat, [500, 20], { context: ctx, added: emb }));
    const zero = values(unet.forward(lat, [500, 20], { context: ctx, added: emb, residuals: residuals(() => 0) }));
    expect(maxRelError(zero, none)).toBe(0);
  });

  it('a residual for one batch item changes that item only, and each residual position matters', () => {
    const [lat, ctx, emb] = [x(), context(), added()];
    const none = values(unet.forward(lat, 500, { context: ctx, added: emb }));
    const one = values(unet.forward(lat, 500, { context: ctx, added: emb, residuals: residuals(() => 0.5, 1) }));
    expect(maxRelError(item(one, 0), item(none, 0))).toBe(0);
    expect(maxRelError(item(one, 1), item(none, 1))).toBeGreaterThan(1e-3);
    // only the middle residual, then only the first skip's: both reach the output
    const n = unetBlockPlan(CFG).input.length;
    for (const at of [n, 0]) {
      const y = values(unet.forward(lat, 500, { context: ctx, added: emb, residuals: residuals((i) => (i === at ? 1 : 0)) }));
      expect(maxRelError(y, none)).toBeGreaterThan(1e-5); // zero residuals give exactly 0 (above)
    }
  });

  it('the added embedding steers each item through label_emb, and is required exactly when the UNet has one', () => {
    const [lat, ctx, emb] = [x(), context(), added()];
    const base = values(unet.forward(lat, 300, { context: ctx, added: emb }));
    const other = keep(tf.tidy(() => tf.concat([tf.slice(emb, [0, 0], [1, 8]), tf.mul(tf.slice(emb, [1, 0], [1, 8]), -3)])) as tf.Tensor2D);
    const changed = values(unet.forward(lat, 300, { context: ctx, added: other }));
    expect(maxRelError(item(changed, 0), item(base, 0))).toBe(0);
    expect(maxRelError(item(changed, 1), item(base, 1))).toBeGreaterThan(1e-3);
    expect(() => unet.forward(lat, 300, { context: ctx })).toThrow(/added embedding: expected \[2, 8\]/);
    expect(() => plain.forward(lat, 300, { context: ctx, added: emb })).toThrow(ShapeError);
    expect(() => unet.forward(lat, 300, { context: ctx, added: keep(tf.zeros([2, 7]) as tf.Tensor2D) })).toThrow(ShapeError);
  });

  it('refuses residuals of the wrong count or shape, naming which', () => {
    const [lat, ctx, emb] = [x(), context(), added()];
    const r = residuals(() => 1);
    expect(() => unet.forward(lat, 1, { context: ctx, added: emb, residuals: { ...r, down: r.down.slice(1) } })).toThrow(/one per input block/);
    const wrong = { ...r, middle: r.down[0] };
    expect(() => unet.forward(lat, 1, { context: ctx, added: emb, residuals: wrong })).toThrow(/residuals: middle must be/);
  });

  it('refuses extra token sets where no adapter gave the cross-attention their projections', () => {
    const [lat, ctx, emb] = [x(), context(), added()];
    const extraTokens = [{ tokens: keep(tf.zeros([2, 4, 16]) as tf.Tensor3D), scale: 0.5 }];
    expect(() => unet.forward(lat, 1, { context: ctx, added: emb, extraTokens })).toThrow(/extra token sets/);
  });

  it('classifier-free guidance runs the batched conditioning once: uncond + s * (cond - uncond)', () => {
    const lat = keep(tf.tensor4d(rand(H * W * 4), [1, H, W, 4]));
    const half = (b: number): Conditioning => ({
      context: keep(tf.tensor3d(rand(5 * 16).map((v) => v * (b + 1)), [1, 5, 16])),
      added: keep(tf.tensor2d(rand(8), [1, 8])),
    });
    const [uncond, cond] = [half(0), half(1)];
    const both = concatConditioning([uncond, cond]);
    const guided = values(guidedEps(unet, both, 7.5)(lat, 400));
    const u = values(unet.forward(lat, 400, uncond));
    const c = values(unet.forward(lat, 400, cond));
    expect(maxRelError(guided, u.map((v, i) => v + 7.5 * (c[i] - v)))).toBeLessThan(1e-5);
    disposeConditioning(both);
  });

  it('runs cond and uncond of different context lengths as two forwards, the same as the batch when they match', () => {
    const lat = keep(tf.tensor4d(rand(H * W * 4), [1, H, W, 4]));
    const ctx = (n: number, b: number) => keep(tf.tensor3d(rand(n * 16).map((v) => v * (b + 1)), [1, n, 16]));
    const emb = keep(tf.tensor2d(rand(8), [1, 8]));
    const [u5, c5] = [{ context: ctx(5, 0), added: emb }, { context: ctx(5, 1), added: emb }];
    const both = concatConditioning([u5, c5]);
    const batched = values(guidedEps(unet, both, 7.5)(lat, 400));
    const apart = values(guidedEps(unet, { ...c5, uncond: u5 }, 7.5)(lat, 400));
    expect(maxRelError(apart, batched)).toBeLessThan(1e-5);
    const c10 = { context: ctx(10, 1), added: emb }; // cond twice as long as uncond: no batch could hold them
    const guided = values(guidedEps(unet, { ...c10, uncond: u5 }, 7.5)(lat, 400));
    const u = values(unet.forward(lat, 400, u5));
    const c = values(unet.forward(lat, 400, c10));
    expect(maxRelError(guided, u.map((v, i) => v + 7.5 * (c[i] - v)))).toBeLessThan(1e-5);
    disposeConditioning(both);
  });

  it('leaks no tensors', () => {
    const [lat, ctx, emb] = [x(), context(), added()];
    const r = residuals(() => 1);
    values(unet.forward(lat, 1, { context: ctx, added: emb, residuals: r }));
    const before = tf.memory().numTensors;
    values(unet.forward(lat, 1, { context: ctx, added: emb, residuals: r }));
    expect(tf.memory().numTensors).toBe(before);
  });
});
