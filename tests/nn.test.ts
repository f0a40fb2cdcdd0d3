// The nn layers against direct loops written from PyTorch's definitions (NCHW, OIHW), on small random tensors.
import { beforeAll, describe, expect, it } from 'vitest';
import * as tf from '../src/backend/tf.js';
import { initBackend } from '../src/backend/select.js';
import { WeightView, ShapeError, probeShapes } from '../src/nn/weight-view.js';
import { Conv2d, GroupNorm, LayerNorm, Linear, gelu, inputSplits, quickGelu, silu, upsampleNearest2x, type ConvPadding } from '../src/nn/layers.js';
import { OPENAI_RESNET, ResnetBlock } from '../src/nn/resnet.js';
import { HostTensors } from '../src/nn/residency.js';
import { SafetensorsFile } from '../src/weights/safetensors.js';
import { WeightsError } from '../src/weights/types.js';
import { rand, source } from './helpers.js';

function maxDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  expect(a.length).toBe(b.length);
  let d = 0;
  for (let i = 0; i < a.length; i++) d = Math.max(d, Math.abs(a[i] - b[i]));
  return d;
}

/** PyTorch conv2d on NCHW x [C, H, W] (batch 1), OIHW w, zero padding [top, bottom, left, right]. */
function torchConv(x: Float32Array, c: number, h: number, w: number, wt: Float32Array, bias: Float32Array, o: number, k: number, stride: number, pad: number[]) {
  const [pt, pb, pl, pr] = pad;
  const oh = Math.floor((h + pt + pb - k) / stride) + 1;
  const ow = Math.floor((w + pl + pr - k) / stride) + 1;
  const out = new Float32Array(o * oh * ow);
  for (let oc = 0; oc < o; oc++)
    for (let y = 0; y < oh; y++)
      for (let xx = 0; xx < ow; xx++) {
        let s = bias[oc];
        for (let ic = 0; ic < c; ic++)
          for (let i = 0; i < k; i++)
            for (let j = 0; j < k; j++) {
              const iy = y * stride + i - pt;
              const ix = xx * stride + j - pl;
              if (iy < 0 || ix < 0 || iy >= h || ix >= w) continue;
              s += x[(ic * h + iy) * w + ix] * wt[((oc * c + ic) * k + i) * k + j];
            }
        out[(oc * oh + y) * ow + xx] = s;
      }
  return { out, oh, ow };
}

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: null });
});

describe('Conv2d matches torch conv2d', () => {
  const cases: { k: number; stride: number; padding: ConvPadding; pad: number[] }[] = [
    { k: 3, stride: 1, padding: 'same-as-torch', pad: [1, 1, 1, 1] },
    { k: 1, stride: 1, padding: 'same-as-torch', pad: [0, 0, 0, 0] },
    { k: 3, stride: 2, padding: 1, pad: [1, 1, 1, 1] }, // UNet Downsample
    { k: 3, stride: 2, padding: [0, 1, 0, 1], pad: [0, 1, 0, 1] }, // CompVis VAE Downsample
  ];
  // splits: input channels in slices (wasm's inputSplits), from the file or from a host copy laid out per slice.
  for (const { k, stride, padding, pad } of cases) {
    it(`k=${k} stride=${stride} padding=${JSON.stringify(padding)}, whole and split over 2 or 3 slices of the inputs`, () => {
      const [c, o, h, w] = [6, 5, 8, 6];
      const src = source({ 'c.weight': [o, c, k, k], 'c.bias': [o] });
      const xNchw = rand(c * h * w);
      const ref = torchConv(xNchw, c, h, w, src.float32('c.weight'), src.float32('c.bias'), o, k, stride, pad);
      const x = tf.transpose(tf.tensor4d(xNchw, [1, c, h, w]), [0, 2, 3, 1]) as tf.Tensor4D;
      for (const [splits, from] of [[1, src], [2, src], [3, src], [3, HostTensors.copy(src, src.keys())]] as const) {
        const conv = Conv2d.load(WeightView.root(from, 'c'), c, o, k, { stride, padding, splits });
        for (let rep = 0; rep < 2; rep++) {
          const y = conv.apply(x);
          expect(y.shape).toEqual([1, ref.oh, ref.ow, o]);
          const yNchw = tf.transpose(y, [0, 3, 1, 2]).dataSync();
          expect(maxDiff(yNchw, ref.out), `splits ${splits}`).toBeLessThan(1e-5);
          y.dispose();
        }
        conv.dispose();
      }
      x.dispose();
    });
  }

  it('inputSplits splits only on wasm, and only weights over WASM_SPLIT_WEIGHTS, by halving the inputs', () => {
    expect(inputSplits(2560, 9, 1280, 'tensorflow')).toBe(1);
    expect(inputSplits(2560, 9, 1280, 'cpu')).toBe(1);
    expect(inputSplits(320, 9, 320, 'wasm')).toBe(1); // 0.9 M weights
    expect(inputSplits(2560, 9, 1280, 'wasm')).toBe(16); // 29.5 M -> 1.8 M a group
    expect(inputSplits(1280, 1, 5120, 'wasm')).toBe(4);
    expect(inputSplits(960, 9, 640, 'wasm')).toBe(4);
    expect(inputSplits(3, 1, 2 ** 22, 'wasm')).toBe(1); // an odd count cannot be halved
    expect(inputSplits(6, 1, 2 ** 22, 'wasm')).toBe(2);
  });
});

describe('norms and linear', () => {
  it('GroupNorm: biased variance per group over positions and the group channels', () => {
    const [b, h, w, c, g, eps] = [2, 3, 4, 8, 4, 1e-6];
    const src = source({ 'n.weight': [c], 'n.bias': [c] });
    const norm = GroupNorm.load(WeightView.root(src, 'n'), c, { groups: g, eps });
    const x = rand(b * h * w * c);
    const y = norm.apply(tf.tensor4d(x, [b, h, w, c])).dataSync();
    const [gamma, beta] = [src.float32('n.weight'), src.float32('n.bias')];
    const ref = new Float32Array(x.length);
    const per = c / g;
    for (let n = 0; n < b; n++)
      for (let gi = 0; gi < g; gi++) {
        const idx: number[] = [];
        for (let p = 0; p < h * w; p++) for (let j = 0; j < per; j++) idx.push((n * h * w + p) * c + gi * per + j);
        const mean = idx.reduce((s, i) => s + x[i], 0) / idx.length;
        const v = idx.reduce((s, i) => s + (x[i] - mean) ** 2, 0) / idx.length;
        for (const i of idx) ref[i] = ((x[i] - mean) / Math.sqrt(v + eps)) * gamma[i % c] + beta[i % c];
      }
    expect(maxDiff(y, ref)).toBeLessThan(1e-5);
  });

  it('LayerNorm over the last axis', () => {
    const [n, d] = [5, 6];
    const src = source({ 'ln.weight': [d], 'ln.bias': [d] });
    const ln = LayerNorm.load(WeightView.root(src, 'ln'), d);
    const x = rand(n * d);
    const y = ln.apply(tf.tensor2d(x, [n, d])).dataSync();
    const [gamma, beta] = [src.float32('ln.weight'), src.float32('ln.bias')];
    const ref = new Float32Array(n * d);
    for (let r = 0; r < n; r++) {
      const row = x.subarray(r * d, r * d + d);
      const mean = row.reduce((s, v) => s + v, 0) / d;
      const v = row.reduce((s, e) => s + (e - mean) ** 2, 0) / d;
      for (let j = 0; j < d; j++) ref[r * d + j] = ((row[j] - mean) / Math.sqrt(v + 1e-5)) * gamma[j] + beta[j];
    }
    expect(maxDiff(y, ref)).toBeLessThan(1e-5);
  });

  it('Linear: [B, N, in] -> [B, N, out] with torch [out, in] weights', () => {
    const [i, o] = [4, 3];
    const src = source({ 'l.weight': [o, i], 'l.bias': [o] });
    const lin = Linear.load(WeightView.root(src, 'l'), i, o);
    const x = rand(2 * 2 * i);
    const y = lin.apply(tf.tensor3d(x, [2, 2, i]));
    expect(y.shape).toEqual([2, 2, o]);
    const [wt, bias] = [src.float32('l.weight'), src.float32('l.bias')];
    const ref = new Float32Array(4 * o);
    for (let r = 0; r < 4; r++) for (let oc = 0; oc < o; oc++) {
      let s = bias[oc];
      for (let j = 0; j < i; j++) s += x[r * i + j] * wt[oc * i + j];
      ref[r * o + oc] = s;
    }
    expect(maxDiff(y.dataSync(), ref)).toBeLessThan(1e-6);
  });

  it('Linear: one block of the outputs, whole or split over its inputs, from the file or a host copy', () => {
    const [i, o] = [6, 8];
    const src = source({ 'l.weight': [o, i], 'l.bias': [o] });
    const [wt, bias] = [src.float32('l.weight'), src.float32('l.bias')];
    const x = rand(5 * i);
    // The second half of the outputs: rows 4..7 of the weight.
    const ref = new Float32Array(5 * 4);
    for (let r = 0; r < 5; r++) for (let oc = 0; oc < 4; oc++) {
      let s = bias[4 + oc];
      for (let j = 0; j < i; j++) s += x[r * i + j] * wt[(4 + oc) * i + j];
      ref[r * 4 + oc] = s;
    }
    for (const [splits, from] of [[1, src], [3, src], [2, HostTensors.copy(src, src.keys())]] as const) {
      const [first, lin] = Linear.loadBlocks(WeightView.root(from, 'l'), i, 4, 2, { splits });
      first.dispose();
      for (let rep = 0; rep < 2; rep++) {
        const y = lin.apply(tf.tensor2d(x, [5, i]));
        expect(maxDiff(y.dataSync(), ref), `splits ${splits}`).toBeLessThan(1e-6);
        y.dispose();
      }
      lin.dispose();
    }
  });
});

describe('activations and upsampling', () => {
  it('gelu (erf), quickGelu, silu', () => {
    const x = tf.tensor1d([-2, -0.5, 0, 1, 3]);
    // torch.nn.functional.gelu(torch.tensor([-2., -.5, 0., 1., 3.]))
    expect(maxDiff(gelu(x).dataSync(), [-0.04550028, -0.15426877, 0, 0.84134475, 2.99595031])).toBeLessThan(1e-6);
    const sig = (v: number) => 1 / (1 + Math.exp(-v));
    expect(maxDiff(quickGelu(x).dataSync(), [-2, -0.5, 0, 1, 3].map((v) => v * sig(1.702 * v)))).toBeLessThan(1e-6);
    expect(maxDiff(silu(x).dataSync(), [-2, -0.5, 0, 1, 3].map((v) => v * sig(v)))).toBeLessThan(1e-6);
  });

  it('upsampleNearest2x repeats each pixel as a 2x2 block', () => {
    const x = tf.tensor4d([1, 2, 3, 4, 5, 6], [1, 2, 3, 1]);
    const y = upsampleNearest2x(x);
    expect(y.shape).toEqual([1, 4, 6, 1]);
    expect(Array.from(y.dataSync())).toEqual([1, 1, 2, 2, 3, 3, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 4, 4, 5, 5, 6, 6]);
  });
});

describe('WeightView', () => {
  it('checks shapes, names missing keys, and tracks what was read', () => {
    const src = source({ 'm.a.weight': [2, 3], 'm.a.bias': [2], 'm.pos_ids': [1], 'other.x': [1] });
    const p = WeightView.root(src, 'm');
    expect(() => p.child('a').tensor('weight', [3, 2])).toThrow(ShapeError);
    expect(() => p.child('a').tensor('weight', [3, 2])).toThrow(/m\.a\.weight: expected \[3, 2\], got \[2, 3\]/);
    expect(() => p.tensor('missing', [1])).toThrow(WeightsError);
    tf.dispose(p.child('a').tensor('weight', [2, 3]));
    expect(p.unused()).toEqual(['m.a.bias', 'm.pos_ids']);
    expect(p.unused(/pos_ids$/)).toEqual(['m.a.bias']);
  });

  it('layers leak no tensors per call and free their weights on dispose', () => {
    const before = tf.memory().numTensors;
    const src = source({ 'c.weight': [4, 2, 3, 3], 'c.bias': [4], 'n.weight': [4], 'n.bias': [4] });
    const conv = Conv2d.load(WeightView.root(src, 'c'), 2, 4, 3);
    const norm = GroupNorm.load(WeightView.root(src, 'n'), 4, { groups: 2, eps: 1e-5 });
    const x = tf.ones([1, 4, 4, 2]) as tf.Tensor4D;
    const mid = tf.memory().numTensors;
    for (let i = 0; i < 3; i++) tf.tidy(() => silu(norm.apply(conv.apply(x)))).dispose();
    expect(tf.memory().numTensors).toBe(mid);
    x.dispose();
    conv.dispose();
    norm.dispose();
    expect(tf.memory().numTensors).toBe(before);
  });

  it('a disposed Linear or Conv2d lets go of its weights (packed panels too) and says so when used again', () => {
    const src = source({ 'c.weight': [4, 2, 3, 3], 'c.bias': [4], 'l.weight': [3, 4], 'l.bias': [3] });
    const conv = Conv2d.load(WeightView.root(src, 'c'), 2, 4, 3);
    const lin = Linear.load(WeightView.root(src, 'l'), 4, 3);
    conv.dispose();
    lin.dispose();
    conv.dispose(); // twice is harmless
    const x = tf.ones([1, 4, 4, 2]) as tf.Tensor4D;
    expect(() => conv.apply(x)).toThrow(/Conv2d: used after dispose/);
    expect(() => lin.apply(tf.ones([2, 4]))).toThrow(/Linear: used after dispose/);
    expect(() => conv.native).toThrow(/used after dispose/);
    x.dispose();
  });
});

describe('ResnetBlock', () => {
  it('with a time embedding and a 1x1 shortcut (UNet names, eps 1e-5) is the composition of its layers', () => {
    // A UNet resblock of the unet fixture: input_blocks.3.0, 32 -> 64 channels, time embedding width 128.
    const src = SafetensorsFile.open('tests/fixtures/unet/weights.safetensors');
    const p = WeightView.root(src, 'model.diffusion_model.input_blocks.3.0');
    const [cin, cout, temb] = [32, 64, 128];
    const block = ResnetBlock.load(p, cin, cout, { names: OPENAI_RESNET, eps: 1e-5, timeChannels: temb });
    const probed = probeShapes(p.prefix, (q) => ResnetBlock.load(q, cin, cout, { names: OPENAI_RESNET, eps: 1e-5, timeChannels: temb }));
    expect([...probed.keys()].sort()).toEqual(src.keys().filter((k) => k.startsWith(`${p.prefix}.`)).sort());
    for (const [k, shape] of probed) expect(src.info(k).shape).toEqual(shape);
    const norm1 = GroupNorm.load(p.child('in_layers.0'), cin, { eps: 1e-5 });
    const conv1 = Conv2d.load(p.child('in_layers.2'), cin, cout, 3);
    const proj = Linear.load(p.child('emb_layers.1'), temb, cout);
    const norm2 = GroupNorm.load(p.child('out_layers.0'), cout, { eps: 1e-5 });
    const conv2 = Conv2d.load(p.child('out_layers.3'), cout, cout, 3);
    const skip = Conv2d.load(p.child('skip_connection'), cin, cout, 1);
    src.close();
    const x = tf.tensor4d(rand(2 * 4 * 4 * cin), [2, 4, 4, cin]);
    const t = tf.tensor2d(rand(2 * temb), [2, temb]);
    const got = block.apply(x, t);
    const want = tf.tidy(() => {
      let h = conv1.apply(silu(norm1.apply(x)));
      h = tf.add(h, tf.reshape(proj.apply(t), [2, 1, 1, cout]));
      return tf.add(skip.apply(x), conv2.apply(silu(norm2.apply(h))));
    });
    expect(maxDiff(got.dataSync(), want.dataSync())).toBeLessThan(1e-5);
    expect(() => block.apply(x)).toThrow(/time embedding/);
    tf.dispose([x, t, got, want]);
    for (const m of [block, norm1, conv1, proj, norm2, conv2, skip]) m.dispose();
  });
});
