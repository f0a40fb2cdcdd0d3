/**
 * `--precision bf16`: the native kernels' Linear, Conv2d and attention as bfloat16 products (native/kernels.c,
 * "bfloat16 products"), on each ISA this CPU runs of the two (AMX tiles; AVX512-BF16's VDPBF16PS), where the kernels
 * are built (skipped otherwise, with the reason). Each layer runs on TensorFlow.js ops in float32 and on the kernels
 * in bf16: the two must agree to bfloat16's precision (8 bits of mantissa: a relative RMS error near 2^-9) and must
 * differ by more than float32 rounding does, or bf16 was not used; a product of inputs rounded to bfloat16 in JS and
 * summed in float64 must match the kernels' to float32 summation. The choice itself is tested everywhere: bf16 is
 * refused off the tensorflow backend, and a CPU without either ISA names what it lacks.
 */
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { attention } from '../src/nn/attention.js';
import { BackendError, initBackend } from '../src/backend/select.js';
import * as kernels from '../src/backend/kernels.js';
import { kernelsPath, kernelsSourceHash } from '../src/backend/kernels.js';
import { Conv2d, Linear, type ConvPadding } from '../src/nn/layers.js';
import { WeightView } from '../src/nn/weight-view.js';
import * as tf from '../src/backend/tf.js';
import { rand, source } from './helpers.js';

type Bf16Addon = { source?: () => string; bf16: (name?: string) => string | null };

function addonOrProblem(): Bf16Addon | string {
  if (!existsSync(kernelsPath())) return `${kernelsPath()} is not built`;
  const addon = createRequire(import.meta.url)(kernelsPath()) as Bf16Addon;
  if (addon.source?.() !== kernelsSourceHash()) return `${kernelsPath()} was built from another native/kernels.c`;
  if (addon.bf16() === null) return 'this CPU (or its OS) has neither AMX-BF16 nor AVX512-BF16';
  return addon;
}
const found = addonOrProblem();
const problem = typeof found === 'string' ? found : null;
if (problem !== null) console.warn(`skipping the bf16 kernel tests: ${problem}`);

/** The bf16 ISAs this CPU runs, the default (the first) restored after asking. */
function isasHere(): string[] {
  if (typeof found === 'string') return [];
  const first = found.bf16() as string;
  const all = ['amx', 'avx512bf16'].filter((name) => {
    try {
      return found.bf16(name) === name;
    } catch {
      return false;
    }
  });
  found.bf16(first);
  return [first, ...all.filter((n) => n !== first)];
}
const isas = isasHere();
const CPU_FLAG: Record<string, RegExp> = { amx: / amx_bf16/, avx512bf16: / avx512_bf16/ };

/** v rounded to bfloat16 (nearest, ties to even), as a float. */
function bf16Round(v: Float32Array): Float32Array {
  const out = new Float32Array(v);
  const u = new Uint32Array(out.buffer);
  for (let i = 0; i < u.length; i++) u[i] = ((u[i] + 0x7fff + ((u[i] >>> 16) & 1)) >>> 16) << 16;
  return out;
}

/** sqrt(sum (a - b)^2 / sum b^2). */
function relRms(a: Float32Array, b: Float32Array): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < b.length; i++) {
    num += (a[i] - b[i]) ** 2;
    den += b[i] ** 2;
  }
  return Math.sqrt(num / den);
}

/** Within bfloat16's precision of float32, and farther than float32 rounding alone would be. */
function expectBf16Close(bf16: Float32Array, float32: Float32Array): void {
  expect(bf16.length).toBe(float32.length);
  const e = relRms(bf16, float32);
  expect(e).toBeLessThan(1e-2);
  expect(e).toBeGreaterThan(2e-4);
}

describe('the bf16 precision choice', () => {
  beforeAll(async () => {
    await initBackend({ backend: 'cpu', log: () => undefined });
  });

  it('is refused off the tensorflow backend, naming the backend in use', async () => {
    await expect(initBackend({ backend: 'cpu', precision: 'bf16', log: null })).rejects.toThrow(BackendError);
    await expect(initBackend({ backend: 'cpu', precision: 'bf16', log: null })).rejects.toThrow(/tensorflow backend's native kernels; the backend in use is cpu/);
    expect(kernels.currentPrecision()).toBe('float32');
  });

  it('says what is missing where it cannot run', () => {
    const saved = process.env.SD_KERNELS;
    process.env.SD_KERNELS = '1'; // the kernels on this cpu backend, as the tests run them
    try {
      if (problem === null) expect(kernels.bf16Problem()).toBeNull();
      else expect(() => kernels.setPrecision('bf16')).toThrow(/--precision bf16 is not available: /);
    } finally {
      if (saved === undefined) delete process.env.SD_KERNELS;
      else process.env.SD_KERNELS = saved;
    }
    expect(kernels.currentPrecision()).toBe('float32');
  });
});

describe.each(isas)('bf16 products on %s', (isa) => {
  const saved = process.env.SD_KERNELS;
  beforeAll(async () => {
    await initBackend({ backend: 'cpu', log: () => undefined });
    process.env.SD_KERNELS = '1';
    (found as Bf16Addon).bf16(isa);
  });
  afterAll(() => {
    kernels.setPrecision('float32');
    (found as Bf16Addon).bf16(isas[0]);
    if (saved === undefined) delete process.env.SD_KERNELS;
    else process.env.SD_KERNELS = saved;
  });

  it('is the ISA the kernels report', () => {
    expect(kernels.bf16Isa()).toBe(isa);
  });

  it.each([
    [37, 70, 33],
    [64, 320, 40],
    [5, 2, 17],
  ])('Linear %i x %i -> %i: the product of bfloat16-rounded inputs, summed in float32', (m, k, n) => {
    const x = rand(m * k), w = rand(n * k), bias = rand(n);
    kernels.setPrecision('bf16');
    try {
      const packed = kernels.packWeight(w, n, { kind: 'linear' }, bias);
      expect(packed.bf16).toBe(true);
      const xt = tf.tensor2d(x, [m, k]);
      const y = kernels.linear(xt, packed);
      const got = y.dataSync() as Float32Array;
      tf.dispose([xt, y]);
      const xr = bf16Round(x), wr = bf16Round(w), want = new Float32Array(m * n);
      for (let i = 0; i < m; i++)
        for (let j = 0; j < n; j++) {
          let acc = 0;
          for (let t = 0; t < k; t++) acc += xr[i * k + t] * wr[j * k + t];
          want[i * n + j] = acc + bias[j];
        }
      expect(relRms(got, want)).toBeLessThan(2e-6);
    } finally {
      kernels.setPrecision('float32');
    }
  });

  /** `make` on TensorFlow ops (float32), then on the kernels with precision bf16. */
  function float32AndBf16(make: (native: boolean) => tf.Tensor): { float32: Float32Array; bf16: Float32Array } {
    const run = (native: boolean) => {
      kernels.setPrecision(native ? 'bf16' : 'float32');
      try {
        const t = make(native);
        const values = t.dataSync() as Float32Array;
        t.dispose();
        return values;
      } finally {
        kernels.setPrecision('float32');
      }
    };
    return { float32: run(false), bf16: run(true) };
  }

  const linearCases: [string, number[], number][] = [
    ['[2, 77, 768] -> 320 (cross-attention keys: rows not a multiple of 32)', [2, 77, 768], 320],
    ['[3, 50] -> 1283 (shared dimension not a multiple of 32, columns not of 16)', [3, 50], 1283],
    ['[1, 600, 320] -> 1280', [1, 600, 320], 1280],
    ['[70, 2] -> 17 (one pair of shared values)', [70, 2], 17],
  ];
  it.each(linearCases)('Linear %s', (_name, shape, out) => {
    const inF = shape[shape.length - 1];
    const src = source({ 'l.weight': [out, inF], 'l.bias': [out] });
    const x = tf.tensor(rand(shape.reduce((a, b) => a * b, 1)), shape);
    const { float32, bf16 } = float32AndBf16((native) => {
      const l = Linear.load(WeightView.root(src, '', { native }).child('l'), inF, out, { bias: true });
      const y = l.apply(x);
      l.dispose();
      return y;
    });
    expectBf16Close(bf16, float32);
    x.dispose();
  });

  const convCases: [string, number, number, number, number, ConvPadding, number, number][] = [
    ['3x3 same (a Winograd shape: direct under bf16)', 64, 40, 3, 1, 'same-as-torch', 9, 7],
    ['3x3 over 300 channels (taps not a multiple of 32)', 300, 24, 3, 1, 'same-as-torch', 5, 6],
    ['3x3 stride 2, pad (0,1,0,1)', 32, 24, 3, 2, [0, 1, 0, 1], 10, 12],
    ['3x3 from 4 channels (conv_in)', 4, 32, 3, 1, 'same-as-torch', 8, 8],
    ['1x1', 96, 33, 1, 1, 0, 5, 6],
  ];
  it.each(convCases)('Conv2d %s', (_name, cin, cout, k, stride, padding, h, w) => {
    const src = source({ 'c.weight': [cout, cin, k, k], 'c.bias': [cout] });
    const x = tf.tensor4d(rand(2 * h * w * cin), [2, h, w, cin]);
    const { float32, bf16 } = float32AndBf16((native) => {
      const conv = Conv2d.load(WeightView.root(src, '', { native }).child('c'), cin, cout, k, { stride, padding });
      const y = conv.apply(x);
      conv.dispose();
      return y;
    });
    expectBf16Close(bf16, float32);
    x.dispose();
  });

  it('packs bf16 panels for even shared segments only, and never Winograd', () => {
    kernels.setPrecision('bf16');
    try {
      const lin = kernels.packWeight(rand(40 * 24), 40, { kind: 'linear' }, null);
      expect(lin.bf16).toBe(true);
      expect(lin.panels).toBeInstanceOf(Uint16Array);
      const conv = kernels.packWeight(rand(40 * 24 * 9), 40, { kind: 'conv', kernel: 3, winograd: true }, null);
      expect(conv.bf16).toBe(true);
      expect(conv.winograd).toBeUndefined();
      // three input channels (the VAE encoder's conv_in): odd taps keep the float32 product
      const odd = kernels.packWeight(rand(32 * 3 * 9), 32, { kind: 'conv', kernel: 3 }, null);
      expect(odd.bf16).toBeUndefined();
    } finally {
      kernels.setPrecision('float32');
    }
  });

  it.each([
    ['8 heads of 40 over 300 tokens', 2, 300, 300, 8, 40],
    ['cross-attention over 77 tokens', 2, 130, 77, 8, 40],
    ['one head of 512 (the VAE mid-block)', 1, 257, 257, 1, 512],
    ['heads of 160 over 600 keys', 1, 64, 600, 2, 160],
  ])('attention: %s', (_name, b, nq, nk, heads, d) => {
    const q = tf.tensor3d(rand(b * nq * heads * d), [b, nq, heads * d]);
    const k = tf.tensor3d(rand(b * nk * heads * d).map((v) => v * 4), [b, nk, heads * d]);
    const v = tf.tensor3d(rand(b * nk * heads * d), [b, nk, heads * d]);
    const { float32, bf16 } = float32AndBf16((native) => (native ? kernels.attention(q, k, v, heads) : attention(q, k, v, heads)));
    expectBf16Close(bf16, float32);
    tf.dispose([q, k, v]);
  });

  it('refuses float32 panels or an odd shared dimension for a bf16 product', () => {
    const addon = createRequire(import.meta.url)(kernelsPath()) as { linear(...a: unknown[]): void; conv2d(...a: unknown[]): void };
    const f = (n: number) => new Float32Array(n);
    expect(() => addon.linear(f(8), 2, 4, f(64), 3, null, f(6), 2, null, true)).toThrow(/bf16 panels must be the Uint16Array packWeights\(\.\.\., bf16\) made/);
    expect(() => addon.linear(f(6), 2, 3, new Uint16Array(48 + 512), 3, null, f(6), 2, null, true)).toThrow(/even shared dimension/);
    expect(() => addon.linear(f(8), 2, 4, new Uint16Array(64), 3, null, f(6), 2, null, true)).toThrow(/packed holds 64 values, the shapes need 576/);
  });

  it('the cpu flag list agrees: the ISA is in /proc/cpuinfo', () => {
    expect(readFileSync('/proc/cpuinfo', 'utf8')).toMatch(CPU_FLAG[isa]);
  });
});
