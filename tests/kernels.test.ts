/**
 * The native kernels (native/kernels.c through src/backend/kernels.ts), where `sd setup-native` has built them
 * (skipped otherwise, with the reason). Each layer is loaded twice from the same weights, once for TensorFlow.js ops
 * and once for the kernels (WeightView's `native`; they run on the cpu backend these tests use), and the two must
 * agree; then the model fixtures must pass their parity checks with every layer on the kernels (SD_KERNELS=1).
 * Whole blocks on the kernels: tests/native-blocks.test.ts.
 */
import { closeSync, constants, existsSync, mkdtempSync, openSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { decodeToFloat32, encodeFloat16 } from '../src/weights/dtypes.js';
import { createRequire } from 'node:module';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { maxRelError } from '../src/parity/compare.js';
import { runParity, summary } from '../src/parity/runner.js';
import { attention } from '../src/nn/attention.js';
import { initBackend } from '../src/backend/select.js';
import * as kernels from '../src/backend/kernels.js';
import { kernelsPath, kernelsProblem, kernelsSourceHash, microKernel, WINOGRAD_F4_MAX_MATRICES, WINOGRAD_MIN_PIXELS, winogradFits, winogradTile } from '../src/backend/kernels.js';
import { Conv2d, GroupNorm, Linear, type ConvPadding } from '../src/nn/layers.js';
import { WeightView } from '../src/nn/weight-view.js';
import { OPENAI_RESNET, ResnetBlock } from '../src/nn/resnet.js';
import { SafetensorsFile, writeSafetensors } from '../src/weights/safetensors.js';
import * as tf from '../src/backend/tf.js';
import { MemorySource, rand, source } from './helpers.js';

/** Built, and from this native/kernels.c (a stale build is refused by the loader, so there is nothing to test). */
function buildProblem(): string | null {
  if (!existsSync(kernelsPath())) return `${kernelsPath()} is not built`;
  const addon = createRequire(import.meta.url)(kernelsPath()) as { source?: () => string };
  if (addon.source?.() !== kernelsSourceHash()) return `${kernelsPath()} was built from another native/kernels.c`;
  return null;
}
const problem = buildProblem();
const built = problem === null;
if (!built) console.warn(`skipping the native kernel tests: ${problem}; run \`sd setup-native\``);

/** Runs `make` for layers loaded for TensorFlow ops and for the kernels; returns both results as arrays. */
function bothWays(make: (native: boolean) => tf.Tensor): { tfjs: Float32Array; native: Float32Array } {
  const run = (native: boolean) => {
    const t = make(native);
    const values = t.dataSync() as Float32Array;
    t.dispose();
    return values;
  };
  return { tfjs: run(false), native: run(true) };
}

/** The micro-kernels this CPU runs. */
function cpuIsas(): ('avx2' | 'avx512')[] {
  return readFileSync('/proc/cpuinfo', 'utf8').includes(' avx512f') ? ['avx2', 'avx512'] : ['avx2'];
}

describe.runIf(built)('native kernels', () => {
  const saved = process.env.SD_KERNELS;
  beforeAll(async () => {
    await initBackend({ backend: 'cpu', log: () => undefined });
    process.env.SD_KERNELS = '1';
    expect(kernelsProblem()).toBeNull(); // built here, so it must load: a CPU without AVX2 would fail this loudly
  });
  afterAll(() => {
    if (saved === undefined) delete process.env.SD_KERNELS;
    else process.env.SD_KERNELS = saved;
  });

  const convCases: [string, number, number, number, number, ConvPadding, number, number][] = [
    // name, cin, cout, kernel, stride, padding, h, w
    ['3x3 same', 21, 19, 3, 1, 'same-as-torch', 9, 7],
    ['3x3 same, Winograd F(2x2, 3x3) (odd sides: partial tiles)', 24, 40, 3, 1, 'same-as-torch', 13, 11],
    ['3x3 same, Winograd F(4x4, 3x3) (odd sides: partial tiles)', 24, 40, 3, 1, 'same-as-torch', 31, 29],
    ['3x3 same, a Winograd shape on a 1x1 image (direct: under WINOGRAD_MIN_PIXELS)', 16, 16, 3, 1, 'same-as-torch', 1, 1],
    ['3x3 same, Winograd over more than 256 input channels', 264, 8, 3, 1, 'same-as-torch', 12, 11],
    ['3x3 stride 2, pad 1 (UNet Downsample)', 16, 8, 3, 2, 1, 11, 10],
    ['3x3 stride 2, pad (0,1,0,1) (VAE Downsample)', 8, 24, 3, 2, [0, 1, 0, 1], 10, 12],
    ['1x1 with more than 256 input channels', 300, 33, 1, 1, 0, 5, 6],
    ['3x3 from 4 channels (conv_in)', 4, 32, 3, 1, 'same-as-torch', 8, 8],
    ['3x3 to 4 channels over several shared blocks (the UNet\'s conv_out: one partial panel)', 320, 4, 3, 1, 'same-as-torch', 9, 7],
    ['3x3 to 3 channels (the VAE\'s conv_out)', 128, 3, 3, 1, 'same-as-torch', 6, 5],
  ];
  it.each(convCases)('Conv2d %s matches the tfjs conv', (_name, cin, cout, k, stride, padding, h, w) => {
    const src = source({ 'c.weight': [cout, cin, k, k], 'c.bias': [cout] });
    const x = tf.tensor4d(rand(2 * h * w * cin), [2, h, w, cin]);
    const { tfjs, native } = bothWays((onKernels) => {
      const p = WeightView.root(src, '', { native: onKernels });
      const conv = Conv2d.load(p.child('c'), cin, cout, k, { stride, padding });
      const y = conv.apply(x);
      conv.dispose();
      return y;
    });
    expect(native.length).toBe(tfjs.length);
    expect(maxRelError(native, tfjs)).toBeLessThan(1e-5);
    x.dispose();
  });

  it('Winograd serves 3x3 stride-1 convs with channels in eights, F(4x4) where it pays and its matrices fit', () => {
    const same = { kernel: 3, stride: 1, pad: [1, 1, 1, 1] } as const;
    expect(winogradFits(320, 320, same)).toBe(true);
    expect(winogradFits(1280, 640, same)).toBe(true);
    expect(winogradFits(1280, 1280, same)).toBe(true);
    // the cases above: F(2x2) at 2 x 13 x 11, F(4x4) at 2 x 31 x 29
    expect(winogradTile(2, 13, 11, 24, 40)).toBe(2);
    expect(winogradTile(2, 31, 29, 24, 40)).toBe(4);
    // SD 1.5's UNet at 512x512 (batch 2): 64x64 and 32x32 levels F(4x4); its 16x16 level's 1280 channels too, and
    // SDXL's 32x32 ones: 36 x 1280 x 1280 floats is over the limit of matrices made whole, but with at most
    // WINOGRAD_F4_FEW_TILES the kernels make them where they are used. With more tiles (SDXL's 64x64 1280-channel
    // conv), or matrices that fit but too few tiles for F(4x4) to pay, F(2x2)
    expect(winogradTile(2, 64, 64, 320, 320)).toBe(4);
    expect(winogradTile(2, 32, 32, 640, 640)).toBe(4);
    expect(36 * 1280 * 1280).toBeGreaterThan(WINOGRAD_F4_MAX_MATRICES);
    expect(winogradTile(2, 16, 16, 1280, 1280)).toBe(4);
    expect(winogradTile(2, 16, 16, 2560, 1280)).toBe(4);
    expect(winogradTile(2, 32, 32, 1280, 1280)).toBe(4);
    expect(winogradTile(2, 64, 64, 1280, 1280)).toBe(2);
    expect(winogradTile(2, 16, 16, 640, 1280)).toBe(2);
    expect(winogradFits(4, 320, same)).toBe(false); // conv_in
    expect(winogradFits(320, 320, { ...same, stride: 2 })).toBe(false);
    expect(winogradFits(320, 320, { kernel: 3, stride: 1, pad: [0, 1, 0, 1] })).toBe(false);
    expect(winogradFits(320, 320, { kernel: 1, stride: 1, pad: [0, 0, 0, 0] })).toBe(false);
  });

  it('F(4x4) with 1280 channels (its matrices too large to make whole: made where used) stays within 1e-5 of the direct conv', () => {
    const addon = createRequire(import.meta.url)(kernelsPath()) as Record<string, (...a: unknown[]) => unknown>;
    const [b, h, w, cin, cout] = [2, 6, 7, 1280, 1280];
    const taps = addon.halvePanels(addon.packWeights(rand(cout * cin * 9).map((v) => Math.round(v * 1024) / 1024), 9 * cin, cout, 2, 9)) as Uint16Array;
    const x = rand(b * h * w * cin), bias = rand(cout);
    const direct = new Float32Array(b * h * w * cout), wino = new Float32Array(b * h * w * cout).fill(Number.NaN);
    addon.conv2d(x, b, h, w, cin, taps, cout, 3, 1, 1, 1, h, w, bias, direct, 2, null, false);
    addon.conv3x3Winograd(x, b, h, w, cin, taps, cout, bias, wino, 2, null, false, 4);
    expect(maxRelError(wino, direct)).toBeLessThan(1e-5);
  });

  it.each([2, 4] as const)('conv3x3Winograd with tile m = %i computes the direct conv: edge tiles, 1x1 and thin images, Cin over a block, residual, per-image bias; half taps as float32 ones; U made where used or whole before, the same bits', (tile) => {
    const addon = createRequire(import.meta.url)(kernelsPath()) as Record<string, (...a: unknown[]) => unknown>;
    // [2, 6, 5, 264, 48]: whole panels over two shared blocks; [1, 60, 60, 8, 24]: over one block of 96 tiles per
    // thread (225 at F(4x4)), so U_xi is made whole before the GEMMs
    const shapes = [[2, 9, 7, 24, 40], [1, 1, 1, 16, 16], [1, 2, 13, 8, 8], [2, 5, 6, 264, 24], [1, 12, 8, 8, 56], [1, 17, 3, 32, 8], [2, 6, 5, 264, 48], [1, 60, 60, 8, 24]];
    for (const [b, h, w, cin, cout] of shapes) {
      const weights = rand(cout * cin * 9).map((v) => Math.round(v * 1024) / 1024); // every one exactly a half
      const taps = addon.packWeights(weights, 9 * cin, cout, 2, 9) as Float32Array;
      const halfTaps = addon.halvePanels(taps) as Uint16Array;
      expect(halfTaps).toBeInstanceOf(Uint16Array);
      const x = rand(b * h * w * cin), bias = rand(b * cout), res = rand(b * h * w * cout);
      const run = (t: Float32Array | Uint16Array, direct: boolean) => {
        const out = new Float32Array(b * h * w * cout).fill(Number.NaN);
        if (direct) addon.conv2d(x, b, h, w, cin, t, cout, 3, 1, 1, 1, h, w, bias, out, 2, res, true);
        else addon.conv3x3Winograd(x, b, h, w, cin, t, cout, bias, out, 2, res, true, tile);
        return out;
      };
      const direct = run(taps, true), wino = run(taps, false);
      // F(4x4)'s transforms scale by up to 8 (G by 1/24): a few more bits lost than F(2x2)'s adds and halvings
      expect(maxRelError(wino, direct), `${[b, h, w, cin, cout]}`).toBeLessThan(tile === 2 ? 1e-6 : 1e-5);
      expect(Buffer.from(run(halfTaps, false).buffer).equals(Buffer.from(wino.buffer)), `${[b, h, w, cin, cout]}`).toBe(true);
      for (const how of ['0', '1']) { // SD_WINO_FUSED: U_xi made whole before the GEMMs (0), or one panel pair at a time (1)
        process.env.SD_WINO_FUSED = how;
        try {
          expect(Buffer.from(run(halfTaps, false).buffer).equals(Buffer.from(wino.buffer)), `${[b, h, w, cin, cout]} SD_WINO_FUSED=${how}`).toBe(true);
        } finally {
          delete process.env.SD_WINO_FUSED;
        }
      }
    }
  });

  const linearCases: [string, number[], number, boolean][] = [
    ['[2, 77, 768] -> 320 without bias (cross-attention keys)', [2, 77, 768], 320, false],
    ['[3, 50] -> 1283 with bias (columns not a multiple of 16)', [3, 50], 1283, true],
    ['[1, 600, 320] -> 1280 with bias (shared dimension over two blocks)', [1, 600, 320], 1280, true],
  ];
  it.each(linearCases)('Linear %s matches the tfjs matMul', (_name, shape, out, bias) => {
    const inF = shape[shape.length - 1];
    const src = source({ 'l.weight': [out, inF], 'l.bias': [out] });
    const x = tf.tensor(rand(shape.reduce((a, b) => a * b, 1)), shape);
    const { tfjs, native } = bothWays((onKernels) => {
      const p = WeightView.root(src, '', { native: onKernels });
      const l = Linear.load(p.child('l'), inF, out, { bias });
      const y = l.apply(x);
      l.dispose();
      return y;
    });
    expect(maxRelError(native, tfjs)).toBeLessThan(1e-5);
    x.dispose();
  });

  /*
   * The last panel when N is not a multiple of 16 is summed in a buffer of its own over every shared block and its
   * bias, per-image bias and residual added once (gemm_block's edge): against sums in double, for column counts with
   * that panel alone, after whole ones and after a pair of the AVX-512 kernel's, over one and several shared blocks
   * and row blocks.
   */
  it.each([
    [29, 40, 4], [29, 600, 4], [200, 300, 24], [13, 520, 40], [7, 50, 3],
  ])('a partial last panel gets each product, bias, per-image bias and residual once (M %i, K %i, N %i)', (m, k, n) => {
    const w = rand(n * k), bias = rand(n), x = rand(m * k), res = rand(m * n);
    const reference = (withRes: boolean, rowBias: (row: number) => Float64Array | Float32Array) => {
      const out = new Float32Array(m * n);
      for (let i = 0; i < m; i++) {
        for (let j = 0; j < n; j++) {
          let acc = rowBias(i)[j] + (withRes ? res[i * n + j] : 0);
          for (let t = 0; t < k; t++) acc += x[i * k + t] * w[j * k + t];
          out[i * n + j] = acc;
        }
      }
      return out;
    };
    const packed = kernels.packWeight(w, n, { kind: 'linear' }, bias);
    const y = kernels.linearHost({ data: x, shape: [m, k] }, packed, { data: res, shape: [m, n] });
    expect(maxRelError(y.data, reference(true, () => bias))).toBeLessThan(1e-5);
    // a 1x1 conv on two images, each with its own bias row (a ResnetBlock's time embedding)
    const half = Math.floor(m / 2), rows = half * 2;
    const conv = kernels.packWeight(w, n, { kind: 'conv', kernel: 1 }, bias);
    const imageBias = rand(2 * n);
    const z = kernels.conv2dHost({ data: x.subarray(0, rows * k), shape: [2, 1, half, k] }, conv, { kernel: 1, stride: 1, pad: [0, 0, 0, 0] }, { imageBias });
    const perImage = (i: number) => Float64Array.from({ length: n }, (_, j) => imageBias[Math.floor(i / half) * n + j] + bias[j]);
    expect(maxRelError(z.data, reference(false, perImage).subarray(0, rows * n))).toBeLessThan(1e-5);
  });

  it.each([
    ['[2, 300, 320] -> 1280 (two row blocks, N a multiple of 8: the same bits)', [2, 300, 320], 1280, true],
    ['[37, 50] -> 83 (N not a multiple of 8: the last columns by libm erff)', [37, 50], 83, false],
    ['[5, 600] -> 600 without bias (K over two shared blocks)', [5, 600], 600, true],
  ])('linearGegluHost %s: value * GELU(gate) as linear, linear and geglu make it', (_name, shape, n, exact) => {
    const k = shape[shape.length - 1], m = shape.slice(0, -1).reduce((a, b) => a * b, 1);
    const bias = !_name.includes('without bias');
    const value = kernels.packWeight(rand(n * k), n, { kind: 'linear' }, bias ? rand(n) : null);
    const gate = kernels.packWeight(rand(n * k).map((v) => v * 3), n, { kind: 'linear' }, bias ? rand(n) : null);
    const x = { data: rand(m * k), shape };
    const fused = kernels.linearGegluHost(x, value, gate);
    const apart = kernels.gegluHost(kernels.linearHost(x, value), kernels.linearHost(x, gate));
    expect(fused.shape).toEqual([...shape.slice(0, -1), n]);
    const same = Buffer.from(fused.data.buffer).equals(Buffer.from(apart.data.buffer));
    if (exact) expect(same).toBe(true);
    else expect(maxRelError(fused.data, apart.data)).toBeLessThan(1e-5);
    expect(() => kernels.linearGegluHost(x, value, kernels.packWeight(rand(8 * k), 8, { kind: 'linear' }, null))).toThrow(/value \[\d+ -> \d+\] and gate \[\d+ -> 8\] differ/);
  });

  it.each([false, true])('GroupNorm (then SiLU: %s) matches the tfjs ops', (withSilu) => {
    const src = source({ 'n.weight': [64], 'n.bias': [64] });
    const x = tf.tidy(() => tf.add(tf.mul(tf.tensor4d(rand(2 * 9 * 11 * 64), [2, 9, 11, 64]), 6), 2) as tf.Tensor4D);
    const { tfjs, native } = bothWays((onKernels) => {
      const p = WeightView.root(src, '', { native: onKernels });
      const n = GroupNorm.load(p.child('n'), 64, { eps: 1e-6 });
      const y = withSilu ? n.applySilu(x) : n.apply(x);
      n.dispose();
      return y;
    });
    expect(maxRelError(native, tfjs)).toBeLessThan(1e-5);
    x.dispose();
  });

  it.each([
    ['self-attention, 8 heads of 40, 700 tokens (blocks of queries and keys not full)', 2, 700, 700, 8, 40],
    ['cross-attention over 77 context tokens', 2, 130, 77, 8, 40],
    ['one head of 512 (the VAE mid-block)', 1, 257, 257, 1, 512],
    ['heads of 160 over 1100 keys (three key blocks)', 1, 64, 1100, 2, 160],
    ['heads of 36 over 53 and 61 keys (head width and keys past whole 8x8 blocks when K and V are packed)', 1, 40, 53, 3, 36],
    ['heads of 37 over 61 keys', 2, 9, 61, 2, 37],
  ])('attention: %s', (_name, b, nq, nk, heads, d) => {
    const q = tf.tensor3d(rand(b * nq * heads * d), [b, nq, heads * d]);
    const k = tf.tensor3d(rand(b * nk * heads * d).map((v) => v * 4), [b, nk, heads * d]);
    const v = tf.tensor3d(rand(b * nk * heads * d), [b, nk, heads * d]);
    const { tfjs, native } = bothWays((onKernels) => (onKernels ? kernels.attention(q, k, v, heads) : attention(q, k, v, heads)));
    expect(maxRelError(native, tfjs)).toBeLessThan(1e-5);
    tf.dispose([q, k, v]);
  });

  describe('the micro-kernels (AVX2 6x16 and AVX-512 12x32 tiles)', () => {
    const cpuHasAvx512 = readFileSync('/proc/cpuinfo', 'utf8').includes(' avx512f');
    afterAll(() => {
      if (cpuHasAvx512) microKernel('avx512');
    });

    it('the widest one this CPU runs is chosen when the kernels load', () => {
      expect(microKernel()).toBe(process.env.SD_KERNELS_ISA ?? (cpuHasAvx512 ? 'avx512' : 'avx2'));
      if (!cpuHasAvx512) expect(() => microKernel('avx512')).toThrow(/not one this CPU runs/);
    });

    /*
     * Both sum each output's products in the same order, one FMA per shared index, so they agree bit for bit: the
     * cases cover row counts that fill no tile (1, 7, 13), column panels in odd counts (a last single panel),
     * columns not a multiple of 16, several shared blocks, and attention's key and head-width panels.
     */
    it.runIf(cpuHasAvx512)('agree bit for bit on linear, conv, Winograd and attention shapes', () => {
      const run = (isa: 'avx2' | 'avx512', f: () => Float32Array) => {
        microKernel(isa);
        return f();
      };
      const host = (shape: number[], scale = 1) => ({ data: rand(shape.reduce((a, b) => a * b, 1)).map((v) => v * scale), shape });
      const cases: [string, () => Float32Array][] = [];
      for (const [m, k, n] of [[1, 40, 16], [7, 300, 48], [13, 768, 320], [37, 50, 1283], [130, 600, 272], [25, 520, 80]]) {
        const w = kernels.packWeight(rand(n * k), n, { kind: 'linear' }, rand(n));
        const x = host([m, k]);
        const res = host([m, n]);
        cases.push([`linear ${m}x${k}x${n}`, () => kernels.linearHost(x, w, res).data]);
      }
      for (const [cin, cout, h, wd, winograd] of [[24, 40, 13, 11, true], [24, 40, 31, 29, true], [16, 48, 5, 13, false], [264, 8, 12, 11, true]] as const) {
        const w = kernels.packWeight(rand(cout * cin * 9), cout, { kind: 'conv', kernel: 3, winograd }, rand(cout));
        const x = host([2, h, wd, cin]);
        cases.push([`conv ${cin}->${cout} ${winograd ? 'winograd' : 'direct'}`, () => kernels.conv2dHost(x, w, { kernel: 3, stride: 1, pad: [1, 1, 1, 1] }).data]);
      }
      for (const [b, nq, nk, heads, d] of [[2, 300, 300, 8, 40], [2, 130, 77, 8, 40], [1, 97, 600, 2, 64], [1, 13, 29, 3, 24]]) {
        const q = host([b, nq, heads * d]), k = host([b, nk, heads * d], 4), v = host([b, nk, heads * d]);
        cases.push([`attention ${nq}x${nk} ${heads}x${d}`, () => kernels.attentionHost(q, k, v, heads).data]);
      }
      for (const [name, f] of cases) {
        const wide = run('avx512', f), narrow = run('avx2', f);
        expect(wide.length, name).toBe(narrow.length);
        expect(Buffer.from(wide.buffer, wide.byteOffset, wide.byteLength).equals(Buffer.from(narrow.buffer, narrow.byteOffset, narrow.byteLength)), name).toBe(true);
        expect(wide.every(Number.isFinite), name).toBe(true);
      }
    });
  });

  describe('panels held as halves', () => {
    /** Values k / 1024, |k| <= 512: every one exactly an IEEE half. */
    const halves = (n: number) => rand(n).map((v) => Math.round(v * 1024) / 1024);
    const withFloatPanels = <T>(f: () => T): T => {
      process.env.SD_HALF_PANELS = '0';
      try {
        return f();
      } finally {
        delete process.env.SD_HALF_PANELS;
      }
    };
    const bytes = (a: Float32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);

    it('are used exactly when every weight is a half, at half the bytes', () => {
      const exact = kernels.packWeight(halves(40 * 24), 40, { kind: 'linear' }, null);
      expect(exact.panels).toBeInstanceOf(Uint16Array);
      const float = withFloatPanels(() => kernels.packWeight(halves(40 * 24), 40, { kind: 'linear' }, null));
      expect(float.panels).toBeInstanceOf(Float32Array);
      expect(exact.panels.byteLength * 2).toBe(float.panels.byteLength);
      const w = halves(40 * 24);
      w[517] = 0.1; // one weight that is not a half (0.1 needs more than a half's 11 bits) keeps the whole matrix float32
      expect(kernels.packWeight(w, 40, { kind: 'linear' }, null).panels).toBeInstanceOf(Float32Array);
      // a Winograd weight is the direct kernel's panels (its taps), as halves or float32 alike
      const wv = halves(40 * 24 * 9);
      const conv = { kind: 'conv', kernel: 3, winograd: true } as const;
      const wino = kernels.packWeight(wv, 40, conv, null);
      const winoFloat = withFloatPanels(() => kernels.packWeight(wv, 40, conv, null));
      expect(wino.winograd).toBe(true);
      expect(winoFloat.winograd).toBe(true);
      expect(wino.panels).toBeInstanceOf(Uint16Array);
      expect(winoFloat.panels).toBeInstanceOf(Float32Array);
      expect(wino.panels.byteLength * 2).toBe(winoFloat.panels.byteLength);
      const direct = withFloatPanels(() => kernels.packWeight(wv, 40, { kind: 'conv', kernel: 3 }, null));
      expect(bytes(winoFloat.panels as Float32Array).equals(bytes(direct.panels as Float32Array))).toBe(true);
      wv[100] = 0.1; // not a half: float32 taps, still Winograd
      const inexact = kernels.packWeight(wv, 40, conv, null);
      expect(inexact.panels).toBeInstanceOf(Float32Array);
      expect(inexact.winograd).toBe(true);
    });

    it.each([true, false])('run a Winograd weight\'s taps directly on an image under WINOGRAD_MIN_PIXELS: the direct kernel, bit for bit (halves: %s)', (asHalves) => {
      const [cin, cout] = [24, 40];
      const wv = halves(cout * cin * 9), b = rand(cout), g = { kernel: 3, stride: 1, pad: [1, 1, 1, 1] } as const;
      const pack = (winograd: boolean) => () => kernels.packWeight(wv, cout, { kind: 'conv', kernel: 3, winograd }, b);
      const wino = asHalves ? pack(true)() : withFloatPanels(pack(true));
      const direct = asHalves ? pack(false)() : withFloatPanels(pack(false));
      expect(wino.winograd).toBe(true);
      expect(wino.panels).toBeInstanceOf(asHalves ? Uint16Array : Float32Array);
      expect(direct.winograd).toBeUndefined();
      // the taps are the direct kernel's half panels, value for value
      expect(Buffer.from(wino.panels.buffer).equals(Buffer.from(direct.panels.buffer))).toBe(true);
      const run = (w: kernels.PackedWeight, shape: number[]) => {
        const x = { data: new Float32Array(shape.reduce((p, q) => p * q, 1)).map((_, i) => Math.sin(i)), shape };
        return kernels.conv2dHost(x, w, g).data;
      };
      const small = [1, 9, 11, cin]; // 99 pixels
      expect(99).toBeLessThan(WINOGRAD_MIN_PIXELS);
      expect(bytes(run(wino, small)).equals(bytes(run(direct, small)))).toBe(true);
      // over the threshold the same weight runs Winograd: close to the direct result, not the same bits
      const large = [2, 12, 11, cin]; // 264 pixels
      expect(264).toBeGreaterThanOrEqual(WINOGRAD_MIN_PIXELS);
      const [w1, d1] = [run(wino, large), run(direct, large)];
      expect(bytes(w1).equals(bytes(d1))).toBe(false);
      expect(maxRelError(w1, d1)).toBeLessThan(1e-5);
    });

    it('turn taps into U_xi in one block kept between calls: convs of other sizes between them change nothing', () => {
      const g = { kernel: 3, stride: 1, pad: [1, 1, 1, 1] } as const;
      const layer = (cin: number, cout: number) => kernels.packWeight(halves(cout * cin * 9), cout, { kind: 'conv', kernel: 3, winograd: true }, rand(cout));
      const small = layer(16, 8), large = layer(64, 48);
      const image = (cin: number) => ({ data: rand(2 * 12 * 12 * cin), shape: [2, 12, 12, cin] });
      const xs = image(16), xl = image(64);
      const first = kernels.conv2dHost(xs, small, g).data;
      kernels.conv2dHost(xl, large, g); // grows the block
      const again = kernels.conv2dHost(xs, small, g).data; // a smaller conv in the larger block
      (createRequire(import.meta.url)(kernelsPath()) as { trimHeap(): boolean }).trimHeap(); // frees it; the next call makes a new one
      const afterTrim = kernels.conv2dHost(xs, small, g).data;
      expect(bytes(again).equals(bytes(first))).toBe(true);
      expect(bytes(afterTrim).equals(bytes(first))).toBe(true);
      for (const w of [small, large]) kernels.releaseWeight(w);
    });

    it('are freed when released (a disposed layer), a view of part of a buffer left alone', () => {
      const w = kernels.packWeight(halves(40 * 24), 40, { kind: 'linear' }, null);
      const f = withFloatPanels(() => kernels.packWeight(halves(40 * 24), 40, { kind: 'linear' }, null));
      const before = process.memoryUsage().arrayBuffers;
      kernels.releaseWeight(w);
      kernels.releaseWeight(f);
      expect(w.panels.length).toBe(0);
      expect(f.panels.length).toBe(0);
      expect(process.memoryUsage().arrayBuffers).toBeLessThan(before); // at once, not at a garbage collection
      const shared = new Float32Array(64);
      kernels.releaseWeight({ k: 4, n: 4, panels: shared.subarray(16, 32), bias: null });
      expect(shared.length).toBe(64);
      kernels.trimHeap(); // harmless at any time
    });

    it.each(cpuIsas())('compute bit for bit what float32 panels compute (%s micro-kernel)', (isa) => {
      microKernel(isa);
      const cases: [string, (halfPanels: boolean) => Float32Array][] = [];
      for (const [m, k, n] of [[7, 300, 48], [13, 768, 320], [37, 50, 1283], [130, 600, 272]]) {
        const wv = halves(n * k), x = { data: rand(m * k), shape: [m, k] }, b = rand(n);
        cases.push([`linear ${m}x${k}x${n}`, (h) => {
          const w = h ? kernels.packWeight(wv, n, { kind: 'linear' }, b) : withFloatPanels(() => kernels.packWeight(wv, n, { kind: 'linear' }, b));
          expect(w.panels instanceof Uint16Array).toBe(h);
          return kernels.linearHost(x, w).data;
        }]);
      }
      const convs = [[16, 48, 3, 1, false], [300, 33, 1, 1, false], [8, 24, 3, 2, false], [24, 40, 3, 1, true], [264, 8, 3, 1, true], [16, 16, 3, 1, true]] as const;
      for (const [cin, cout, kernel, stride, winograd] of convs) {
        // 2 x 12 x 11 pixels: over WINOGRAD_MIN_PIXELS, so both kinds of panels run Winograd
        const wv = halves(cout * cin * kernel * kernel), x = { data: rand(2 * 12 * 11 * cin), shape: [2, 12, 11, cin] }, b = rand(cout);
        const pad = (kernel === 3 ? [1, 1, 1, 1] : [0, 0, 0, 0]) as [number, number, number, number];
        cases.push([`conv ${cin}->${cout} ${kernel}x${kernel}/${stride}${winograd ? ' Winograd' : ''}`, (h) => {
          const pack = () => kernels.packWeight(wv, cout, { kind: 'conv', kernel, winograd }, b);
          const w = h ? pack() : withFloatPanels(pack);
          expect(w.panels instanceof Uint16Array).toBe(h);
          return kernels.conv2dHost(x, w, { kernel, stride, pad }).data;
        }]);
      }
      for (const [name, f] of cases) expect(bytes(f(true)).equals(bytes(f(false))), name).toBe(true);
    });
  });

  describe('loading helpers', () => {
    it('widen every IEEE half to the float32 the lookup table gives (fp16 checkpoints decode through them)', () => {
      const all = new Uint16Array(65536).map((_, i) => i);
      const bytes = new Uint8Array(all.buffer);
      const native = decodeToFloat32(bytes, 'F16');
      process.env.SD_KERNELS = '0';
      let table: Float32Array;
      try {
        table = decodeToFloat32(bytes, 'F16');
      } finally {
        delete process.env.SD_KERNELS;
      }
      const widened = new Float32Array(65536);
      expect(kernels.widenHalves(all, widened)).toBe(true);
      const same = (a: number, b: number) => Object.is(a, b) || (Number.isNaN(a) && Number.isNaN(b));
      const differ = [...all].filter((h) => !same(widened[h], table[h]) || !same(native[h], table[h]));
      expect(differ).toEqual([]);
      expect(widened[0x3c00]).toBe(1);
      expect(widened[0x0001]).toBe(2 ** -24); // the smallest subnormal
    });

    it('pack weights stored as halves into the panels halvePanels makes of their float32 ones, on any number of threads', () => {
      const addon = createRequire(import.meta.url)(kernelsPath()) as Record<string, (...a: unknown[]) => unknown>;
      const halves = (n: number) => Uint16Array.from(rand(n), (v) => 0x3000 + Math.round((v + 0.5) * 0x1000)); // positive halves
      const bytes = (a: ArrayBufferView) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);
      // [K, N, layout, taps]: N past a whole panel (45 = 2 panels + 13), a Linear [N, K], OIHW 3x3 and 1x1 filters, B itself
      for (const [k, n, layout, taps] of [[37, 45, 1, 1], [9 * 24, 45, 2, 9], [24, 45, 2, 1], [37, 45, 0, 1], [1280, 16, 1, 1]]) {
        const h = halves(k * n);
        const wide = new Float32Array(h.length);
        kernels.widenHalves(h, wide);
        const want = addon.halvePanels(addon.packWeights(wide, k, n, layout, taps)) as Uint16Array;
        const f32 = bytes(addon.packWeights(wide, k, n, layout, taps) as Float32Array);
        for (const threads of [1, 2, 3]) {
          const got = addon.packWeights(h, k, n, layout, taps, false, threads) as Uint16Array;
          expect(got, `${[k, n, layout, taps, threads]}`).toBeInstanceOf(Uint16Array);
          expect(bytes(got).equals(bytes(want)), `${[k, n, layout, taps, threads]}`).toBe(true);
          expect(bytes(addon.packWeights(wide, k, n, layout, taps, false, threads) as Float32Array).equals(f32)).toBe(true);
        }
      }
      const h = halves(64);
      expect(() => addon.packWeights(h, 8, 8, 1, 1, true)).toThrow(/bf16 panels are made from float32 weights, not halves/);
      expect(() => addon.packWeights(new Int32Array(64), 8, 8, 1, 1)).toThrow(/w must be a Float32Array, or a Uint16Array of IEEE halves/);
      expect(() => addon.packWeights(h, 8, 9, 1, 1)).toThrow(/w holds 64 values, the shapes need 72/);
    });

    it('load an fp16 file\'s Linear and Conv2d weights as halves, packed as they are: the same products as from float32', () => {
      const dir = mkdtempSync(join(tmpdir(), 'sd-halves-'));
      try {
        const shapes: [string, number[]][] = [['l.weight', [40, 24]], ['l.bias', [40]], ['g.weight', [48, 24]], ['c.weight', [16, 8, 3, 3]], ['c.bias', [16]]];
        const values = new Map(shapes.map(([name, shape]) => [name, rand(shape.reduce((a, b) => a * b, 1)).map((v) => Math.round(v * 1024) / 1024)]));
        const file = join(dir, 'half.safetensors');
        writeSafetensors(file, shapes.map(([name, shape]) => [name, { dtype: 'F16', shape }]), (name) => encodeFloat16(values.get(name)!));
        const half = WeightView.root(SafetensorsFile.open(file), '', { native: true });
        const float = WeightView.root(new MemorySource(new Map(shapes.map(([name, shape]) => [name, { shape, data: values.get(name)! }]))), '', { native: true });
        const x = tf.tensor2d(rand(5 * 24), [5, 24]), img = tf.tensor4d(rand(2 * 6 * 6 * 8), [2, 6, 6, 8]);
        const run = (p: WeightView) => {
          const [l] = [Linear.load(p.child('l'), 24, 40)];
          const [g0, g1] = Linear.loadBlocks(p.child('g'), 24, 24, 2, { bias: false });
          const c = Conv2d.load(p.child('c'), 8, 16, 3);
          const outs = [l.apply(x), g0.apply(x), g1.apply(x), c.apply(img)].map((t) => { const v = t.dataSync() as Float32Array; t.dispose(); return v; });
          for (const m of [l, g0, g1, c]) m.dispose();
          return outs;
        };
        const [fromHalves, fromFloats] = [run(half), run(float)];
        fromHalves.forEach((v, i) => expect(Buffer.from(v.buffer).equals(Buffer.from(fromFloats[i].buffer)), `output ${i}`).toBe(true));
        tf.dispose([x, img]);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });

    it('pack halves in the background: the same panels, a source held until its packing is done, and every call that reads panels waits', () => {
      const addon = createRequire(import.meta.url)(kernelsPath()) as Record<string, (...a: unknown[]) => unknown>;
      const bytes = (a: ArrayBufferView) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);
      const [k, n] = [2560, 2048]; // 10 MB of halves each: still packing when the call returns
      const sources = [0, 1, 2].map(() => Uint16Array.from(rand(k * n), (v) => 0x3000 + Math.round((v + 0.5) * 0x1000)));
      const want = sources.map((h) => bytes(addon.packWeights(h, k, n, 1, 1, false, 2) as Uint16Array));
      const x = new Float32Array(rand(3 * k)), got = new Float32Array(3 * n), expected = new Float32Array(3 * n);
      addon.linear(x, 3, k, addon.packWeights(sources[2], k, n, 1, 1, false, 2), n, null, expected, 2, null);
      const later = sources.map((h) => addon.packWeights(h, k, n, 1, 1, false, 2, true) as Uint16Array);
      // linear reads the last one's panels only once they are packed: the product of the finished panels
      addon.linear(x, 3, k, later[2], n, null, got, 2, null);
      expect(bytes(got).equals(bytes(expected))).toBe(true);
      later.forEach((panels, i) => expect(bytes(panels).equals(want[i]), `${i}`).toBe(true));
      later.push(addon.packWeights(sources[1], k, n, 1, 1, false, 2, true) as Uint16Array);
      addon.awaitPacks(sources[1]);
      expect(bytes(later[3]).equals(want[1])).toBe(true);
      // freed while packing: the packing finishes first
      const h = sources[0];
      expect(addon.releasePanels(addon.packWeights(h, k, n, 1, 1, false, 2, true))).toBe(true);
      addon.awaitPacks();
    });

    it('load weights from an fp16 file into two buffers in turn while each is packed in the background: the panels of packing them one by one', () => {
      const dir = mkdtempSync(join(tmpdir(), 'sd-background-'));
      try {
        const [k, n, count] = [1024, 1536, 5]; // 3 MB each: the third reads into the first one's buffer
        const values = Array.from({ length: count }, () => rand(k * n).map((v) => Math.round(v * 1024) / 1024));
        const file = join(dir, 'half.safetensors');
        writeSafetensors(file, values.map((_, i) => [`l${i}.weight`, { dtype: 'F16', shape: [n, k] }]), (name) => encodeFloat16(values[Number(name.slice(1, -7))]));
        const src = SafetensorsFile.open(file);
        const p = WeightView.root(src, '', { native: true });
        const layers = values.map((_, i) => Linear.load(p.child(`l${i}`), k, n, { bias: false }));
        src.close();
        kernels.awaitPacks();
        const bytes = (a: ArrayBufferView) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);
        layers.forEach((l, i) => {
          const one = kernels.packWeight(Uint16Array.from(encodeFloat16(values[i])), n, { kind: 'linear' }, null);
          expect(bytes(l.packed!.panels).equals(bytes(one.panels)), `l${i}`).toBe(true);
          l.dispose();
        });
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });

    it('read a file past the page cache at any position and length, and say what the cache holds', () => {
      const dir = mkdtempSync(join(tmpdir(), 'sd-direct-'));
      try {
        const file = join(dir, 'bytes.bin');
        const data = Uint8Array.from({ length: 17 * 2 ** 20 + 4321 }, (_, i) => (i * 2654435761) >>> 24); // past two 8 MB chunks, not whole blocks
        writeFileSync(file, data);
        let fd: number;
        try {
          fd = openSync(file, constants.O_RDONLY | constants.O_DIRECT);
        } catch {
          return void console.warn('skipping the direct reads: this file system opens no file with O_DIRECT');
        }
        try {
          for (const [at, len] of [[0, 4096], [1, 100], [4095, 2], [12345, 9 * 2 ** 20], [2 ** 23 - 7, 2 ** 23 + 14], [data.length - 5000, 5000], [0, data.length]]) {
            const out = new Uint8Array(len);
            expect(kernels.readDirect(fd, at, out), `${at} + ${len}`).toBe(true);
            expect(Buffer.from(out).equals(Buffer.from(data.subarray(at, at + len))), `${at} + ${len}`).toBe(true);
          }
          expect(kernels.readDirect(fd, data.length - 10, new Uint8Array(11))).toBe(false); // past the end
          const addon = createRequire(import.meta.url)(kernelsPath()) as Record<string, (...a: unknown[]) => unknown>;
          expect(() => addon.readDirect(fd, 0, new Uint16Array(8))).toThrow(/readDirect\(fd, position, out Uint8Array\)/);
        } finally {
          closeSync(fd);
        }
        const plain = openSync(file, 'r');
        try {
          expect(kernels.pageCached(plain, 0, data.length)).toBe(true); // just written
        } finally {
          closeSync(plain);
        }
        const sparse = join(dir, 'sparse.bin');
        closeSync(openSync(sparse, 'w'));
        truncateSync(sparse, 2 ** 24); // a hole: nothing of it is cached until read
        const hole = openSync(sparse, 'r');
        try {
          expect(kernels.pageCached(hole, 2 ** 20, 2 ** 22)).toBe(false);
        } finally {
          closeSync(hole);
        }
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });

    it('ask the system to read a weights file ahead', () => {
      const fd = openSync('tests/fixtures/unet/weights.safetensors', 'r');
      try {
        expect(kernels.readAhead(fd, 0, 1 << 20)).toBe(true);
      } finally {
        closeSync(fd);
      }
    });

  });

  it('layers on the kernels leave no tensors behind', () => {
    const p = WeightView.root(source({ 'c.weight': [8, 8, 3, 3], 'c.bias': [8], 'n.weight': [8], 'n.bias': [8] }), '');
    const conv = Conv2d.load(p.child('c'), 8, 8, 3);
    const norm = GroupNorm.load(p.child('n'), 8, { eps: 1e-5, groups: 4 });
    const x = tf.tensor4d(rand(2 * 6 * 6 * 8), [2, 6, 6, 8]);
    const src = SafetensorsFile.open('tests/fixtures/unet/weights.safetensors');
    const block = ResnetBlock.load(WeightView.root(src, 'model.diffusion_model.input_blocks.3.0'), 32, 64, {
      names: OPENAI_RESNET, eps: 1e-5, timeChannels: 128,
    });
    src.close();
    const x32 = tf.tensor4d(rand(2 * 4 * 4 * 32), [2, 4, 4, 32]);
    const t = tf.tensor2d(rand(2 * 128), [2, 128]);
    const before = tf.memory().numTensors;
    for (let i = 0; i < 3; i++) tf.dispose([conv.apply(x), norm.applySilu(x), block.apply(x32, t)]);
    expect(tf.memory().numTensors).toBe(before);
    tf.dispose([x, x32, t]);
    for (const m of [conv, norm, block]) m.dispose();
  });

  it('write every element of their output (outputs are taken unzeroed): none of a NaN-filled output is left', () => {
    const addon = createRequire(import.meta.url)(kernelsPath()) as Record<string, (...a: unknown[]) => unknown>;
    const poisoned = (n: number) => new Float32Array(n).fill(Number.NaN);
    const finite = (a: Float32Array) => a.every(Number.isFinite);
    const pack = (k: number, n: number, layout: number, taps: number) => addon.packWeights(rand(n * k), k, n, layout, taps) as Float32Array;
    // odd sizes everywhere: partial micro-tiles, a last odd panel, edge tiles
    const [m, k, n] = [29, 37, 45];
    const out = poisoned(m * n);
    addon.linear(rand(m * k), m, k, pack(k, n, 1, 1), n, rand(n), out, 2, null);
    expect(finite(out)).toBe(true);
    const [b, h, w, cin, cout] = [2, 7, 9, 8, 24];
    for (const [kernel, stride, pad, ho, wo] of [[3, 1, 1, 7, 9], [3, 2, 1, 4, 5], [1, 1, 0, 7, 9]]) {
      const o = poisoned(b * ho * wo * cout);
      addon.conv2d(rand(b * h * w * cin), b, h, w, cin, pack(cin * kernel * kernel, cout, 2, kernel * kernel), cout, kernel, stride, pad, pad, ho, wo, null, o, 2, null, false);
      expect(finite(o)).toBe(true);
    }
    for (const tile of [2, 4]) {
      const wino = poisoned(b * h * w * cout);
      addon.conv3x3Winograd(rand(b * h * w * cin), b, h, w, cin, pack(9 * cin, cout, 2, 9), cout, null, wino, 2, null, false, tile);
      expect(finite(wino)).toBe(true);
    }
    const [nq, nk, heads, d] = [13, 300, 2, 40];
    const att = poisoned(b * nq * heads * d);
    addon.attention(rand(b * nq * heads * d), rand(b * nk * heads * d), rand(b * nk * heads * d), b, nq, nk, heads, d, 0.15, att, 2);
    expect(finite(att)).toBe(true);
    const gn = poisoned(b * 10 * 32);
    addon.groupNorm(rand(b * 10 * 32), b, 10, 32, 8, 1e-5, rand(32), rand(32), true, gn, 2);
    expect(finite(gn)).toBe(true);
    const ln = poisoned(11 * 20);
    addon.layerNorm(rand(11 * 20), 11, 20, 1e-5, rand(20), rand(20), ln, 2);
    expect(finite(ln)).toBe(true);
    const gg = poisoned(m * n);
    addon.linearGeglu(rand(m * k), m, k, pack(k, n, 1, 1), pack(k, n, 1, 1), n, rand(n), rand(n), gg, 2);
    expect(finite(gg)).toBe(true);
    const ge = poisoned(101);
    addon.geglu(rand(101), rand(101), ge, 101, 2);
    expect(finite(ge)).toBe(true);
    // a conv with no input channels has nothing to write with: refused, not left unwritten
    expect(() => addon.conv2d(new Float32Array(0), 1, 2, 2, 0, new Float32Array(0), 8, 1, 1, 0, 0, 2, 2, null, poisoned(32), 2, null, false)).toThrow(/Cin must be/);
  });

  it.each([[20], [1280], [1285]])('LayerNorm over rows of %i matches a double-precision reference, far from a zero mean too', (c) => {
    const addon = createRequire(import.meta.url)(kernelsPath()) as { layerNorm(...a: unknown[]): void };
    const rows = 7;
    const x = rand(rows * c).map((v, i) => v + (i < 3 * c ? 0 : 10)); // rows 3.. centred near 10: the variance is of the centred row
    const [gamma, beta] = [rand(c), rand(c)];
    const out = new Float32Array(rows * c);
    addon.layerNorm(x, rows, c, 1e-5, gamma, beta, out, 2);
    const want = new Float32Array(rows * c);
    for (let r = 0; r < rows; r++) {
      const row = Array.from(x.subarray(r * c, (r + 1) * c));
      const mean = row.reduce((a, v) => a + v, 0) / c;
      const inv = 1 / Math.sqrt(row.reduce((a, v) => a + (v - mean) ** 2, 0) / c + 1e-5);
      row.forEach((v, i) => (want[r * c + i] = (v - mean) * inv * gamma[i] + beta[i]));
    }
    expect(maxRelError(out, want)).toBeLessThan(1e-5);
  });

  it('refuses arrays shorter than the shapes say, naming the argument', () => {
    const addon = createRequire(import.meta.url)(kernelsPath()) as {
      linear(...a: unknown[]): void;
      attention(...a: unknown[]): void;
      conv3x3Winograd(...a: unknown[]): void;
    };
    const packed = new Float32Array(16 * 4);
    expect(() => addon.linear(new Float32Array(7), 2, 4, packed, 3, null, new Float32Array(6), 2)).toThrow(/x holds 7 floats, the shapes need 8/);
    expect(() => addon.linear(new Float32Array(8), 2, 4, packed, 3, null, new Float32Array(5), 2)).toThrow(/out holds 5 floats/);
    expect(() => addon.linear(new Float64Array(8), 2, 4, packed, 3, null, new Float32Array(6), 2)).toThrow(/x must be a Float32Array/);
    const f = (n: number) => new Float32Array(n);
    expect(() => addon.attention(f(80), f(80), f(79), 1, 2, 2, 1, 40, 0.1, f(80), 2)).toThrow(/v holds 79 floats/);
    expect(() => addon.attention(f(80), f(80), f(80), 1, 2, 2, 1.5, 40, 0.1, f(80), 2)).toThrow(/heads must be a non-negative integer/);
    expect(() => addon.conv3x3Winograd(f(12), 1, 2, 2, 3, f(16 * 16 * 3), 8, null, f(32), 2, null, false)).toThrow(/multiples of 8/);
    expect(() => addon.conv3x3Winograd(f(32), 1, 2, 2, 8, f(100), 8, null, f(32), 2, null, false)).toThrow(/packed holds 100 values, the shapes need 1152/);
    expect(() => addon.conv3x3Winograd(f(32), 1, 2, 2, 8, f(1152), 8, null, f(32), 2, null, false, 3)).toThrow(/tile m must be 2 or 4/);
    expect(() => addon.conv3x3Winograd(f(32), 1, 2, 2, 8, new Uint16Array(100), 8, null, f(32), 2, null, false)).toThrow(/packed holds 100 values, the shapes need 1152/);
    expect(() => addon.linear(new Float32Array(8), 2, 4, new Int32Array(64), 3, null, new Float32Array(6), 2)).toThrow(/packed must be a Float32Array, or a Uint16Array of halves/);
  });

  it('the model fixtures pass their parity checks with every layer on the kernels', async () => {
    process.env.SD_KERNELS = '1';
    const results = await runParity('tests/fixtures', { backend: 'cpu', kinds: ['clip', 'unet', 'vae', 'pipeline'] });
    const failed = results.filter((r) => !r.passed);
    expect(failed, summary(results)).toEqual([]);
    expect(results.length).toBeGreaterThan(20);
  }, 600_000);
});
