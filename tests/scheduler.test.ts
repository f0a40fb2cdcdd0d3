/**
 * Schedules and samplers: every sampler against the k-diffusion / CompVis / DDPM reference numbers
 * (tests/fixtures/samplers), the schedule against the checkpoint's own alphas_cumprod, the img2img
 * conventions, LMS coefficients, and that no sampler leaks tensors.
 */
import { readFileSync } from 'node:fs';
import { beforeAll, describe, expect, it } from 'vitest';
import type { SamplerName } from '../src/pipeline/api.js';
import { SAMPLERS } from '../src/pipeline/api.js';
import { maxRelError } from '../src/parity/compare.js';
import { run } from '../src/parity/samplers.js';
import {
  alphasCumprod,
  createSampler,
  ddimTimesteps,
  defaultSigmas,
  karrasSigmas,
  SamplerError,
  sigmaTable,
  sigmaToT,
  torchNoise,
  TorchGenerator,
  tToSigma,
  type EpsFn,
  type NoiseFn,
} from '../src/scheduler/index.js';
import { lmsCoefficient } from '../src/scheduler/lms.js';
import { initBackend } from '../src/backend/select.js';
import * as tf from '../src/backend/tf.js';
import { SafetensorsFile } from '../src/weights/safetensors.js';

interface PipelineCase {
  readonly sampler: SamplerName;
  readonly steps: number;
  readonly karras?: boolean;
  readonly strength?: number;
  readonly timesteps?: number[];
  readonly sigmas?: number[];
}
const PIPELINE = JSON.parse(readFileSync('tests/fixtures/pipeline/fixture.json', 'utf8')) as { cases: PipelineCase[] };

const eps: EpsFn = (x, t) => tf.tidy(() => tf.add(tf.mul(tf.tanh(tf.div(x, 2)), 0.5 + t / 1000), 0.05));
const gaussian: NoiseFn = (shape) => tf.randomNormal([...shape]);
const SHAPE: [number, number, number, number] = [1, 4, 4, 4];

/** Runs a sampler to the end, recording the timestep of every eps call. */
function runAll(name: SamplerName, steps: number, opts: { karras?: boolean; strength?: number } = {}): number[] {
  const ts: number[] = [];
  const recording: EpsFn = (x, t) => {
    ts.push(t);
    return eps(x, t);
  };
  const sampler = createSampler({ name, steps, ...opts });
  const noise = tf.randomNormal(SHAPE) as tf.Tensor4D;
  const init = opts.strength === undefined ? undefined : tf.zeros(SHAPE) as tf.Tensor4D;
  let x = sampler.start(noise, init);
  tf.dispose([noise, init ?? []]);
  for (let i = 0; i < sampler.totalSteps; i++) {
    const next = sampler.step(i, x, recording, gaussian);
    x.dispose();
    x = next;
  }
  x.dispose();
  sampler.dispose();
  return ts;
}

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: null });
});

describe('samplers parity (tests/fixtures/samplers)', () => {
  it('every sampler matches the reference, walks the listed schedule and leaks nothing', async () => {
    const results = await run('tests/fixtures/samplers', { backend: 'cpu' });
    expect(results).toHaveLength(26);
    for (const r of results) expect(r, `${r.name}: ${r.detail ?? ''}`).toMatchObject({ passed: true });
  });
});

describe('schedule', () => {
  it("alphasCumprod equals the checkpoint's alphas_cumprod buffer", () => {
    const f = SafetensorsFile.open('tests/fixtures/pipeline/model.safetensors');
    const want = f.float32('alphas_cumprod');
    f.close();
    expect(maxRelError(alphasCumprod(), want)).toBeLessThan(1e-6);
  });

  it('sigmaToT inverts tToSigma, and clamps outside the table', () => {
    const table = sigmaTable();
    for (const t of [0, 0.25, 17.5, 500, 998.9, 999]) expect(sigmaToT(table, tToSigma(table, t))).toBeCloseTo(t, 6);
    expect(sigmaToT(table, 1e-4)).toBe(0);
    expect(sigmaToT(table, 1e4)).toBe(999);
  });

  it('gives the schedules the pipeline fixture lists', () => {
    const table = sigmaTable();
    for (const c of PIPELINE.cases) {
      if (c.sampler === 'ddim') expect(ddimTimesteps(c.steps)).toEqual(c.timesteps);
      if (c.sigmas === undefined) continue;
      const ours = c.karras ? karrasSigmas(table, c.steps) : defaultSigmas(table, c.steps);
      expect(maxRelError(ours, c.sigmas)).toBeLessThan(1e-6);
    }
  });

  it("DDIM's CompVis uniform spacing runs more than n steps when n does not divide 1000", () => {
    expect(ddimTimesteps(7)).toEqual([995, 853, 711, 569, 427, 285, 143, 1]);
    expect(createSampler({ name: 'ddim', steps: 7 }).totalSteps).toBe(8);
    expect(runAll('ddim', 7)).toEqual([995, 853, 711, 569, 427, 285, 143, 1]);
  });
});

describe('img2img', () => {
  it('ddpm keeps the last int(n * strength) timesteps, as the pipeline fixture lists', () => {
    const c = PIPELINE.cases.find((k) => k.strength !== undefined && k.sampler === 'ddpm');
    expect(c).toBeDefined();
    if (c === undefined) return;
    expect(runAll('ddpm', c.steps, { strength: c.strength })).toEqual(c.timesteps);
  });

  it('ddpm and ddim noise the init latent to the first kept timestep (q_sample)', () => {
    const abar = alphasCumprod();
    for (const [name, t0] of [['ddpm', 400], ['ddim', 401]] as const) {
      const sampler = createSampler({ name, steps: 10, strength: 0.5 });
      expect(sampler.totalSteps).toBe(5);
      const init = tf.fill(SHAPE, 2) as tf.Tensor4D;
      const noise = tf.fill(SHAPE, -1) as tf.Tensor4D;
      const x = sampler.start(noise, init);
      expect(x.dataSync()[0]).toBeCloseTo(2 * Math.sqrt(abar[t0]) - Math.sqrt(1 - abar[t0]), 5);
      tf.dispose([init, noise, x]);
    }
  });

  it('sigma samplers keep the last int(n * strength) + 1 sigmas and start at init + noise * sigma', () => {
    const table = sigmaTable();
    const sigmas = karrasSigmas(table, 20);
    const ts = runAll('euler', 20, { karras: true, strength: 0.3 });
    expect(ts).toHaveLength(6);
    expect(ts[0]).toBeCloseTo(sigmaToT(table, sigmas[14]), 9);
    const sampler = createSampler({ name: 'heun', steps: 20, karras: true, strength: 0.3 });
    const init = tf.fill(SHAPE, 0.5) as tf.Tensor4D;
    const noise = tf.ones(SHAPE) as tf.Tensor4D;
    const x = sampler.start(noise, init);
    expect(x.dataSync()[0]).toBeCloseTo(0.5 + sigmas[14], 4);
    tf.dispose([init, noise, x]);
  });

  it('runs at least one step for a tiny strength', () => {
    expect(createSampler({ name: 'ddim', steps: 10, strength: 0.01 }).totalSteps).toBe(1);
  });
});

describe('LMS coefficients', () => {
  it('sum to the step size (the Lagrange basis sums to 1) and order 1 is Euler', () => {
    const s = karrasSigmas(sigmaTable(), 10);
    for (let i = 0; i < 9; i++) {
      const order = Math.min(i + 1, 4);
      let sum = 0;
      for (let j = 0; j < order; j++) sum += lmsCoefficient(order, s, i, j);
      expect(sum).toBeCloseTo(s[i + 1] - s[i], 12);
    }
    expect(lmsCoefficient(1, s, 0, 0)).toBeCloseTo(s[1] - s[0], 12);
  });

  it('integrate the order-2 basis exactly', () => {
    const s = [3, 2, 1.5];
    // integral over [2, 1.5] of (tau - 3) / (2 - 3) dtau
    expect(lmsCoefficient(2, s, 1, 0)).toBeCloseTo(-((1.5 - 3) ** 2 - (2 - 3) ** 2) / 2, 12);
  });
});

describe('tensor lifetime', () => {
  it.each(SAMPLERS)('%s frees everything after a full run', (name) => {
    const before = tf.memory().numTensors;
    runAll(name, 5, { karras: true });
    expect(tf.memory().numTensors).toBe(before);
  });

  it.each(['lms', 'dpmpp_2m'] as const)('%s frees its history when a run is cut short', (name) => {
    const before = tf.memory().numTensors;
    const sampler = createSampler({ name, steps: 6 });
    const noise = tf.randomNormal(SHAPE) as tf.Tensor4D;
    let x = sampler.start(noise);
    for (let i = 0; i < 3; i++) {
      const next = tf.tidy(() => sampler.step(i, x, eps, gaussian)); // a tidy around the step must not free history
      x.dispose();
      x = next;
    }
    tf.dispose([noise, x]);
    sampler.dispose();
    expect(tf.memory().numTensors).toBe(before);
  });
});

describe('validation', () => {
  it('refuses bad configs and out-of-order steps with SamplerError', () => {
    expect(() => createSampler({ name: 'euler', steps: 0 })).toThrow(SamplerError);
    expect(() => createSampler({ name: 'euler', steps: 10, strength: 1.5 })).toThrow(/strength/);
    expect(() => createSampler({ name: 'plms' as SamplerName, steps: 10 })).toThrow(/unknown/);
    const lms = createSampler({ name: 'lms', steps: 4 });
    const x = tf.zeros(SHAPE) as tf.Tensor4D;
    expect(() => lms.step(2, x, eps, gaussian)).toThrow(/in order/);
    expect(() => createSampler({ name: 'euler', steps: 4 }).step(4, x, eps, gaussian)).toThrow(SamplerError);
    x.dispose();
  });
});

describe('torchNoise', () => {
  it('draws NCHW like torch and hands it over as NHWC', () => {
    const f = SafetensorsFile.open('tests/fixtures/rng/randn.safetensors');
    const nchw = f.float32('seed42_1x4x8x8_first');
    f.close();
    const t = torchNoise(new TorchGenerator(42))([1, 8, 8, 4]);
    expect(t.shape).toEqual([1, 8, 8, 4]);
    const got = t.dataSync();
    t.dispose();
    const want = new Float32Array(256);
    for (let c = 0; c < 4; c++) for (let hw = 0; hw < 64; hw++) want[hw * 4 + c] = nchw[c * 64 + hw];
    expect(maxRelError(got, want)).toBeLessThan(1e-6);
  });
});
