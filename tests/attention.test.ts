/**
 * Sliced attention (src/nn/attention.ts) against the textbook formula computed in float64:
 * every way of cutting the work (whole, query-row slices, (batch*head) groups, one head at a time as on
 * wasm) must give softmax(q k^T / sqrt(d)) v, with and without CLIP's causal mask.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import * as tf from '../src/backend/tf.js';
import { initBackend } from '../src/backend/select.js';
import { attention, slicePlan, type AttentionOptions } from '../src/nn/attention.js';
import { ShapeError } from '../src/nn/errors.js';
import { maxRelError } from '../src/parity/compare.js';

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: null });
});

/** Deterministic uniform numbers in [-2, 2) (mulberry32). */
function randoms(n: number, seed: number): Float32Array {
  let s = seed >>> 0;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    out[i] = ((((t ^ (t >>> 14)) >>> 0) / 4294967296) * 4 - 2);
  }
  return out;
}

/** softmax(q k^T / sqrt(d)) v per batch item and head, in float64. q: [b, nq, c], k/v: [b, nk, c] flat. */
function naive(q: Float32Array, k: Float32Array, v: Float32Array, b: number, nq: number, nk: number, c: number, heads: number, causal: boolean): Float64Array {
  const d = c / heads;
  const out = new Float64Array(b * nq * c);
  const p = new Float64Array(nk);
  for (let bi = 0; bi < b; bi++) {
    for (let h = 0; h < heads; h++) {
      for (let i = 0; i < nq; i++) {
        let max = -Infinity;
        for (let j = 0; j < nk; j++) {
          let s = 0;
          for (let e = 0; e < d; e++) s += q[(bi * nq + i) * c + h * d + e] * k[(bi * nk + j) * c + h * d + e];
          p[j] = causal && j > i ? -Infinity : s / Math.sqrt(d);
          max = Math.max(max, p[j]);
        }
        let sum = 0;
        for (let j = 0; j < nk; j++) sum += p[j] = Math.exp(p[j] - max);
        for (let e = 0; e < d; e++) {
          let acc = 0;
          for (let j = 0; j < nk; j++) acc += (p[j] / sum) * v[(bi * nk + j) * c + h * d + e];
          out[(bi * nq + i) * c + h * d + e] = acc;
        }
      }
    }
  }
  return out;
}

interface Case {
  readonly b: number;
  readonly nq: number;
  readonly nk: number;
  readonly c: number;
  readonly heads: number;
}

/** Runs attention with opts on seeded inputs and returns its max relative error against the formula. */
function errorOf(cs: Case, opts: AttentionOptions, seed = 1): number {
  const { b, nq, nk, c, heads } = cs;
  const qd = randoms(b * nq * c, seed);
  const kd = randoms(b * nk * c, seed + 1);
  const vd = randoms(b * nk * c, seed + 2);
  const got = tf.tidy(() => {
    const q = tf.tensor3d(qd, [b, nq, c]);
    const k = tf.tensor3d(kd, [b, nk, c]);
    const v = tf.tensor3d(vd, [b, nk, c]);
    return attention(q, k, v, heads, opts);
  });
  expect(got.shape).toEqual([b, nq, c]);
  const actual = got.dataSync();
  got.dispose();
  return maxRelError(actual, naive(qd, kd, vd, b, nq, nk, c, heads, opts.causal === true));
}

const SELF: Case = { b: 2, nq: 37, nk: 37, c: 24, heads: 3 };
const CROSS: Case = { b: 2, nq: 29, nk: 11, c: 16, heads: 2 };
// A score row of SELF is 37 * 4 bytes; these bounds force the cuts named in each test.
const ROW = 37 * 4;

describe('slicePlan', () => {
  it('keeps everything in one slice when it fits', () => {
    expect(slicePlan(16, 4096, 4096, 2 ** 30, false)).toEqual({ group: 16, rows: 4096 });
  });
  it('cuts SD 1.5 self-attention at 64x64 (batch 2, 8 heads) into 128 MiB slices', () => {
    const plan = slicePlan(16, 4096, 4096, 128 * 2 ** 20, false);
    expect(plan).toEqual({ group: 16, rows: 512 });
    expect(plan.group * plan.rows * 4096 * 4).toBeLessThanOrEqual(128 * 2 ** 20);
  });
  it('one head at a time when perHead', () => {
    expect(slicePlan(16, 4096, 4096, 2 ** 30, true)).toEqual({ group: 1, rows: 4096 });
    expect(slicePlan(16, 4096, 4096, 8 * 2 ** 20, true)).toEqual({ group: 1, rows: 512 });
  });
  it('slices query rows across all heads while one row of every head fits, else one head at a time', () => {
    expect(slicePlan(6, 37, 37, ROW * 37 * 2, false)).toEqual({ group: 6, rows: 12 });
    expect(slicePlan(6, 37, 37, ROW * 4, false)).toEqual({ group: 1, rows: 4 });
  });
  it('never plans an empty slice', () => {
    expect(slicePlan(4, 10, 1000, 1, false)).toEqual({ group: 1, rows: 1 });
  });
});

describe('attention equals softmax(q k^T / sqrt(d)) v', () => {
  const cuts: [string, AttentionOptions][] = [
    ['whole (batched heads)', { perHead: false }],
    ['query-row slices, all heads', { perHead: false, maxScoreBytes: ROW * 6 * 10 }],
    ['one head at a time, 4 rows', { perHead: false, maxScoreBytes: ROW * 4 }],
    ['one row of one head at a time', { perHead: false, maxScoreBytes: 1 }],
    ['per head, 2-D matMuls (the wasm path)', { perHead: true }],
    ['per head, query-row slices', { perHead: true, maxScoreBytes: ROW * 8 }],
  ];
  for (const [name, opts] of cuts) {
    it(`self-attention: ${name}`, () => {
      expect(errorOf(SELF, opts)).toBeLessThan(1e-5);
    });
    it(`causal self-attention: ${name}`, () => {
      expect(errorOf(SELF, { ...opts, causal: true }, 7)).toBeLessThan(1e-5);
    });
    it(`cross-attention (Nk != Nq): ${name}`, () => {
      expect(errorOf(CROSS, { ...opts, maxScoreBytes: opts.maxScoreBytes === undefined ? undefined : 1 }, 3)).toBeLessThan(1e-5);
    });
  }

  it('the causal mask hides later keys: query 0 sees only value 0', () => {
    const [b, n, c] = [1, 5, 4];
    const q = tf.tensor3d(randoms(b * n * c, 11), [b, n, c]);
    const k = tf.tensor3d(randoms(b * n * c, 12), [b, n, c]);
    const v = tf.tensor3d(randoms(b * n * c, 13), [b, n, c]);
    const out = attention(q, k, v, 2, { causal: true });
    const first = tf.slice(out, [0, 0, 0], [1, 1, c]).dataSync();
    const v0 = tf.slice(v, [0, 0, 0], [1, 1, c]).dataSync();
    expect(maxRelError(first, v0)).toBeLessThan(1e-6);
    // and without the mask the first query mixes all values
    const open = attention(q, k, v, 2);
    expect(maxRelError(tf.slice(open, [0, 0, 0], [1, 1, c]).dataSync(), v0)).toBeGreaterThan(1e-3);
    tf.dispose([q, k, v, out, open]);
  });

  it('leaves no tensors behind, sliced or not', () => {
    const q = tf.tensor3d(randoms(2 * 37 * 24, 5), [2, 37, 24]);
    const before = tf.memory().numTensors;
    for (const opts of [{}, { maxScoreBytes: 1 }, { perHead: true, maxScoreBytes: ROW * 8, causal: true }]) {
      attention(q, q, q, 3, opts).dispose();
    }
    expect(tf.memory().numTensors).toBe(before);
    q.dispose();
  });

  it('refuses shapes that do not fit, saying which', () => {
    const q = tf.zeros([1, 4, 6]) as tf.Tensor3D;
    const k = tf.zeros([1, 3, 6]) as tf.Tensor3D;
    expect(() => attention(q, q, q, 4)).toThrow(ShapeError);
    expect(() => attention(q, k, q, 2)).toThrow(/same number of tokens/);
    expect(() => attention(q, k, k, 2, { causal: true })).toThrow(/causal/);
    tf.dispose([q, k]);
  });
});
