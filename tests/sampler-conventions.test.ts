/**
 * Sampler conventions (src/scheduler/conventions.ts): diffusers' SDXL schedules exactly as the SDXL pipeline fixture
 * lists them (timesteps the UNet gets, sigmas, init_noise_sigma), the same runs against diffusers' own update
 * formulas on a synthetic eps (DPM-Solver++ 2M in its variance-preserving form), the four timestep spacings against
 * numpy's lists, CompVis uniform DDIM for step counts that do not divide 1000, DDPM's steps_offset, and reading
 * diffusers scheduler configs.
 */
import { existsSync, mkdtempSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { initBackend } from '../src/backend/select.js';
import * as tf from '../src/backend/tf.js';
import { run } from '../src/parity/samplers.js';
import {
  A1111_CONVENTIONS,
  alphasCumprod,
  alphasCumprodFloat32,
  conventionsFromSchedulerConfig,
  createSampler,
  DIFFUSERS_CONVENTIONS,
  SD15_DIFFUSERS_CONVENTIONS,
  SAMPLERS,
  SamplerError,
  sigmaTable,
  sigmaToT,
  spacedTimesteps,
  type EpsFn,
  type NoiseFn,
  type SamplerConfig,
  type SamplerConventions,
  type SamplerName,
  type SigmaConventions,
} from '../src/scheduler/index.js';
import { SigmaSampler } from '../src/scheduler/k-diffusion.js';
import { SafetensorsFile } from '../src/weights/safetensors.js';

const SDXL = 'tests/fixtures/sdxl/pipeline';
interface SdxlCase {
  readonly name: string;
  readonly sampler: 'euler' | 'euler_a' | 'dpmpp_2m_karras';
  readonly steps: number;
  readonly timesteps: number[];
  readonly timesteps_unrounded?: number[];
  readonly sigmas: number[];
  readonly init_noise_sigma: number;
  readonly x_T: string;
  readonly latent_init: string;
  readonly noise?: string[];
}
const FIXTURE = JSON.parse(readFileSync(join(SDXL, 'fixture.json'), 'utf8')) as { cases: SdxlCase[] };

/** One float32 ulp, relative: what "to float32 precision" allows. */
const ULP = 2 ** -23;
const rel = (a: number, b: number): number => (b === 0 ? Math.abs(a) : Math.abs(a - b) / Math.abs(b));

/** The samplers fixture's synthetic noise predictor, on tensors and on plain numbers. */
const f = (x: number, t: number): number => Math.tanh(x / 2) * (0.5 + t / 1000) + 0.05;
const eps: EpsFn = (x, t) => tf.tidy(() => tf.add(tf.mul(tf.tanh(tf.div(x, 2)), 0.5 + t / 1000), 0.05));
const gaussian: NoiseFn = (shape) => tf.randomNormal([...shape]);
const SHAPE: [number, number, number, number] = [1, 4, 4, 4];

/** DIFFUSERS_CONVENTIONS with one sampler family's rules changed. */
const diffusersWith = (family: 'sigma' | 'dpmSolver', patch: Partial<SigmaConventions>): SamplerConventions => ({
  ...DIFFUSERS_CONVENTIONS,
  [family]: { ...DIFFUSERS_CONVENTIONS[family], ...patch },
});

function configOf(c: SdxlCase): SamplerConfig {
  const karras = c.sampler === 'dpmpp_2m_karras';
  return { name: karras ? 'dpmpp_2m' : c.sampler, steps: c.steps, karras, conventions: DIFFUSERS_CONVENTIONS };
}

/** Runs a sampler from x (disposed), recording every t the UNet is given; returns the final latent's numbers. */
function sample(cfg: SamplerConfig, x: tf.Tensor4D, noise: NoiseFn = gaussian): { out: Float32Array; ts: number[] } {
  const ts: number[] = [];
  const sampler = createSampler(cfg);
  let cur = sampler.start(x);
  x.dispose();
  for (let i = 0; i < sampler.totalSteps; i++) {
    const next = sampler.step(i, cur, (y, t) => (ts.push(t), eps(y, t)), noise);
    cur.dispose();
    cur = next;
  }
  const out = cur.dataSync() as Float32Array;
  cur.dispose();
  sampler.dispose();
  return { out, ts };
}

/** diffusers' loops, written from the fixture's `about`, on plain numbers with the fixture's listed schedule. */
function diffusersReference(c: SdxlCase, xT: Float32Array, noise: Float32Array[]): Float64Array {
  const { sigmas: s, timesteps: ts } = c;
  if (c.sampler !== 'dpmpp_2m_karras') {
    const x = Float64Array.from(xT, (v) => v * c.init_noise_sigma);
    for (let i = 0; i < ts.length; i++) {
      const [sig, next] = [s[i], s[i + 1]];
      const up = c.sampler === 'euler_a' ? Math.sqrt((next ** 2 * (sig ** 2 - next ** 2)) / sig ** 2) : 0;
      const down = c.sampler === 'euler_a' ? Math.sqrt(next ** 2 - up ** 2) : next;
      for (let k = 0; k < x.length; k++) {
        const e = f(x[k] / Math.sqrt(sig ** 2 + 1), ts[i]);
        x[k] += e * (down - sig) + (c.sampler === 'euler_a' ? noise[i][k] * up : 0);
      }
    }
    return x;
  }
  // DPMSolverMultistepScheduler(dpmsolver++, order 2) on x_vp; init_noise_sigma 1; the UNet gets x_vp unscaled.
  const alpha = (sig: number): number => 1 / Math.sqrt(sig ** 2 + 1);
  const lambda = (sig: number): number => Math.log(alpha(sig) / (sig * alpha(sig)));
  const x = Float64Array.from(xT);
  let prev: Float64Array | null = null;
  for (let i = 0; i < ts.length; i++) {
    const [sig, next] = [s[i], s[i + 1]];
    const x0 = x.map((v) => (v - sig * alpha(sig) * f(v, ts[i])) / alpha(sig));
    if (next === 0) return x0; // the last step returns x0
    const h = lambda(next) - lambda(sig);
    const r = prev === null ? 0 : (lambda(sig) - lambda(s[i - 1])) / h;
    for (let k = 0; k < x.length; k++) {
      const d = prev === null ? x0[k] : x0[k] + (x0[k] - prev[k]) / (2 * r);
      x[k] = ((next * alpha(next)) / (sig * alpha(sig))) * x[k] - alpha(next) * (Math.exp(-h) - 1) * d;
    }
    prev = x0;
  }
  return x;
}

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: null });
});

describe('DIFFUSERS_CONVENTIONS: the SDXL pipeline fixture (diffusers Euler, Euler a, DPM++ 2M Karras)', () => {
  const io = SafetensorsFile.open(join(SDXL, 'io.safetensors'));
  const shapeOf = (name: string): [number, number, number, number] => io.info(name).shape as [number, number, number, number];

  it.each(FIXTURE.cases)('$name: the UNet gets exactly the listed timesteps', (c) => {
    const { ts } = sample(configOf(c), tf.zeros(SHAPE));
    expect(ts).toEqual(c.timesteps);
    expect(createSampler(configOf(c)).timesteps).toEqual(c.timesteps);
  });

  it.each(FIXTURE.cases)('$name: sigmas and init_noise_sigma to float32 precision', (c) => {
    const sampler = createSampler(configOf(c));
    expect(sampler).toBeInstanceOf(SigmaSampler);
    const sigmas = (sampler as SigmaSampler).sigmas;
    expect(sigmas).toHaveLength(c.sigmas.length);
    c.sigmas.forEach((s, i) => expect(rel(sigmas[i], s), `sigma ${i}`).toBeLessThanOrEqual(ULP));
    expect(rel(sampler.startScale, c.init_noise_sigma)).toBeLessThanOrEqual(ULP);
    // latent_init = x_T * init_noise_sigma (DPM-Solver: x_T itself, its latent being variance preserving)
    const xT = tf.tensor4d(io.float32(c.x_T), shapeOf(c.x_T));
    const start = sampler.start(xT);
    const want = io.float32(c.latent_init);
    const got = start.dataSync();
    tf.dispose([xT, start]);
    expect(Math.max(...want.map((w, k) => rel(got[k], w)))).toBeLessThanOrEqual(ULP);
  });

  it('dpmpp_2m_karras: timesteps are ROUND(t(sigma)) of the listed fractional t, over the training range', () => {
    const c = FIXTURE.cases.find((k) => k.sampler === 'dpmpp_2m_karras');
    if (c?.timesteps_unrounded === undefined) throw new Error('fixture has no dpmpp_2m_karras case');
    const table = sigmaTable(alphasCumprodFloat32());
    const sigmas = (createSampler(configOf(c)) as SigmaSampler).sigmas;
    expect(rel(sigmas[0], table.sigmas[999])).toBeLessThanOrEqual(ULP);
    c.timesteps_unrounded.forEach((u, i) => {
      expect(Math.abs(sigmaToT(table, sigmas[i]) - u)).toBeLessThan(1e-4); // diffusers' float32 log table: ~3e-5
      expect(Math.round(u)).toBe(c.timesteps[i]);
    });
  });

  it.each(FIXTURE.cases)("$name: runs diffusers' update on a synthetic eps from the listed x_T (and euler_a noise)", (c) => {
    const noiseNames = c.noise ?? [];
    const listed = noiseNames.map((n) => io.float32(n));
    let drawn = 0;
    const noise: NoiseFn = (shape) => tf.tensor(listed[drawn++], [...shape]);
    const xT = io.float32(c.x_T);
    const { out } = sample(configOf(c), tf.tensor4d(xT, shapeOf(c.x_T)), noise);
    const want = diffusersReference(c, xT, listed);
    expect(drawn).toBe(noiseNames.length); // euler_a draws at every step, the last one included
    expect(Math.max(...want.map((w, k) => Math.abs(out[k] - w) / Math.max(1, Math.abs(w))))).toBeLessThan(2e-6);
  });

  it("k-diffusion's DPM++ 2M step on x equals diffusers' VP form: started at x_T * sqrt(sigma_0^2 + 1), the same latent", () => {
    const cfg = { name: 'dpmpp_2m', steps: 8, karras: true } as const;
    const vp = sample({ ...cfg, conventions: DIFFUSERS_CONVENTIONS }, tf.randomNormal(SHAPE, 0, 1, 'float32', 3));
    const ve = sample({ ...cfg, conventions: diffusersWith('dpmSolver', { startScale: 'sigma-and-unit' }) }, tf.randomNormal(SHAPE, 0, 1, 'float32', 3));
    expect(vp.ts).toEqual(ve.ts);
    expect(Math.max(...vp.out.map((v, k) => Math.abs(v - ve.out[k])))).toBeLessThan(1e-5);
  });
});

describe('timestep spacings (numpy as diffusers runs it)', () => {
  it('leading, trailing, linspace and uniform for 7 steps; DPM-Solver spaces n + 1 points', () => {
    expect(spacedTimesteps('leading', 7, { stepsOffset: 1 })).toEqual([853, 711, 569, 427, 285, 143, 1]);
    expect(spacedTimesteps('leading', 8)).toEqual([875, 750, 625, 500, 375, 250, 125, 0]);
    expect(spacedTimesteps('trailing', 7)).toEqual([999, 856, 713, 570, 428, 285, 142]);
    expect(spacedTimesteps('trailing', 3)).toEqual([999, 666, 332]);
    expect(spacedTimesteps('linspace', 7)).toEqual([999, 832.5, 666, 499.5, 333, 166.5, 0]);
    expect(spacedTimesteps('uniform', 7)).toEqual([995, 853, 711, 569, 427, 285, 143, 1]);
    expect(spacedTimesteps('uniform', 3)).toEqual([999, 667, 334, 1]); // 1000 clipped to 999, as A1111 does
    expect(spacedTimesteps('leading', 8, { stepsOffset: 1, points: 'n+1' })).toEqual([889, 778, 667, 556, 445, 334, 223, 112]);
  });

  it('timestep samplers round linspace half to even; DPM-Solver with linspace never reaches t = 0', () => {
    const ddim = { ...DIFFUSERS_CONVENTIONS, ddim: 'linspace' as const };
    expect(createSampler({ name: 'ddim', steps: 7, conventions: ddim }).timesteps).toEqual([999, 832, 666, 500, 333, 166, 0]);
    const dpm = diffusersWith('dpmSolver', { spacing: 'linspace' });
    expect(createSampler({ name: 'dpmpp_2m', steps: 8, conventions: dpm }).timesteps).toEqual([999, 874, 749, 624, 500, 375, 250, 125]);
  });

  it("diffusers' Euler with linspace: float32 fractional timesteps, np.interp sigmas, start x_T * sigma_0", () => {
    const cfg = conventionsFromSchedulerConfig({ _class_name: 'EulerDiscreteScheduler', timestep_spacing: 'linspace' });
    const sampler = createSampler({ name: 'euler', steps: 7, conventions: cfg.conventions }) as SigmaSampler;
    expect(sampler.timesteps).toEqual([999, 832.5, 666, 499.5, 333, 166.5, 0]);
    const s = sigmaTable(alphasCumprodFloat32()).sigmas;
    expect(sampler.sigmas[1]).toBe(Math.fround((s[833] - s[832]) * 0.5 + s[832]));
    expect(sampler.startScale).toBe(sampler.sigmas[0]);
  });

  it('more than n uniform steps when n does not divide 1000; step counts whose timesteps leave 0..999 are refused', () => {
    for (const n of [3, 7, 13, 30, 60, 150]) {
      expect(spacedTimesteps('uniform', n).length).toBe(Math.ceil(1000 / Math.floor(1000 / n)));
      expect(spacedTimesteps('uniform', n).length).toBeGreaterThan(n);
    }
    expect(spacedTimesteps('uniform', 40)).toHaveLength(40);
    const trailing = diffusersWith('sigma', { spacing: 'trailing' });
    expect(() => createSampler({ name: 'euler', steps: 61, conventions: trailing })).toThrow(/trailing spacing of 61 steps gives timestep -1/);
    expect(() => createSampler({ name: 'ddim', steps: 1000, conventions: DIFFUSERS_CONVENTIONS })).toThrow(SamplerError);
  });
});

/** CompVis DDIMSampler, eta 0, on plain numbers: ddim_alphas_prev = [abar_0] + abar[timesteps[:-1]] (ascending). */
function compVisDdim(n: number, xT: Float64Array): Float64Array {
  const abar = alphasCumprod().map(Math.fround);
  const c = Math.floor(1000 / n);
  const asc: number[] = [];
  for (let t = 0; t < 1000; t += c) asc.push(Math.min(t + 1, 999));
  const x = Float64Array.from(xT);
  for (let j = asc.length - 1; j >= 0; j--) {
    const [aT, aPrev] = [abar[asc[j]], j > 0 ? abar[asc[j - 1]] : abar[0]];
    for (let k = 0; k < x.length; k++) {
      const e = f(x[k], asc[j]);
      const x0 = (x[k] - Math.sqrt(1 - aT) * e) / Math.sqrt(aT);
      x[k] = Math.sqrt(aPrev) * x0 + Math.sqrt(1 - aPrev) * e;
    }
  }
  return x;
}

describe('DDIM with CompVis uniform spacing (A1111_CONVENTIONS)', () => {
  it.each([3, 7, 13, 30, 10, 25])('%i steps match CompVis DDIMSampler on a synthetic eps', (n) => {
    const xT = tf.randomNormal(SHAPE, 0, 1, 'float32', n) as tf.Tensor4D;
    const want = compVisDdim(n, Float64Array.from(xT.dataSync()));
    const { out, ts } = sample({ name: 'ddim', steps: n }, xT);
    expect(ts).toEqual(spacedTimesteps('uniform', n));
    expect(Math.max(...want.map((w, k) => Math.abs(out[k] - w)))).toBeLessThan(1e-5);
  });

  it("the samplers fixtures' cases pass (local and shared), their DDIM cases also under diffusers' leading + 1", async () => {
    // the shared set too where a checkout has it beside (CI does); a fresh clone tests its own copy
    for (const dir of ['tests/fixtures/samplers', '../shared/fixtures/samplers'].filter((d) => existsSync(d))) {
      const results = await run(dir, { backend: 'cpu' });
      for (const r of results) expect(r, `${dir} ${r.name}: ${r.detail ?? ''}`).toMatchObject({ passed: true });
      const fx = JSON.parse(readFileSync(join(dir, 'cases.json'), 'utf8')) as { cases: { sampler: string }[] };
      const tmp = mkdtempSync(join(tmpdir(), 'sampler-conventions-'));
      symlinkSync(resolve(dir, 'io.safetensors'), join(tmp, 'io.safetensors'));
      const ddim = fx.cases.filter((c) => c.sampler === 'ddim').map((c) => ({ ...c, conventions: 'diffusers' }));
      writeFileSync(join(tmp, 'cases.json'), JSON.stringify({ ...fx, cases: ddim }));
      const diffusers = await run(tmp, { backend: 'cpu' });
      expect(diffusers).toHaveLength(ddim.length);
      for (const r of diffusers) expect(r, `${r.name} (diffusers): ${r.detail ?? ''}`).toMatchObject({ passed: true });
    }
  });
});

describe('DDPM steps_offset', () => {
  it('diffusers adds steps_offset 1 and still draws noise at t = 1; A1111 (educational) ends at t = 0 without', () => {
    let draws = 0;
    const counting: NoiseFn = (shape) => (draws++, gaussian(shape));
    const d = sample({ name: 'ddpm', steps: 10, conventions: DIFFUSERS_CONVENTIONS }, tf.zeros(SHAPE), counting);
    expect(d.ts).toEqual([901, 801, 701, 601, 501, 401, 301, 201, 101, 1]);
    expect(draws).toBe(10);
    draws = 0;
    const a = sample({ name: 'ddpm', steps: 10 }, tf.zeros(SHAPE), counting);
    expect(a.ts).toEqual([900, 800, 700, 600, 500, 400, 300, 200, 100, 0]);
    expect(draws).toBe(9);
  });
});

describe('conventionsFromSchedulerConfig', () => {
  it("reads SDXL base's scheduler_config.json as DIFFUSERS_CONVENTIONS with the Euler sampler", () => {
    const json: unknown = JSON.parse(readFileSync(join(SDXL, 'diffusers/scheduler/scheduler_config.json'), 'utf8'));
    expect(conventionsFromSchedulerConfig(json)).toEqual({ conventions: DIFFUSERS_CONVENTIONS, sampler: 'euler', karras: false });
  });

  it("reads SD 1.5's PNDM config (no timestep_spacing: each class made from it runs its own default) as SD15_DIFFUSERS_CONVENTIONS, with no sampler of its own", () => {
    const sd15 = {
      _class_name: 'PNDMScheduler', _diffusers_version: '0.6.0', beta_end: 0.012, beta_schedule: 'scaled_linear',
      beta_start: 0.00085, num_train_timesteps: 1000, set_alpha_to_one: false, skip_prk_steps: true, steps_offset: 1,
      trained_betas: null, clip_sample: false,
    };
    expect(conventionsFromSchedulerConfig(sd15)).toEqual({ conventions: SD15_DIFFUSERS_CONVENTIONS, sampler: null, karras: false });
    // diffusers' from_config skips keys the config only had by default: DDIM and DDPM leading, the others linspace
    expect(SD15_DIFFUSERS_CONVENTIONS).toMatchObject({ ddim: 'leading', ddpm: 'leading', stepsOffset: 1, sigma: { spacing: 'linspace', startScale: 'sigma' } });
    expect(SD15_DIFFUSERS_CONVENTIONS.dpmSolver.spacing).toBe('linspace');
    expect(conventionsFromSchedulerConfig({ ...sd15, timestep_spacing: 'leading' }).conventions).toEqual(DIFFUSERS_CONVENTIONS); // saved again by diffusers
  });

  it('a DPM-Solver config: Karras, linspace by its class default, steps_offset 0', () => {
    const r = conventionsFromSchedulerConfig({
      _class_name: 'DPMSolverMultistepScheduler', use_karras_sigmas: true, algorithm_type: 'dpmsolver++', solver_order: 2,
    });
    expect(r).toMatchObject({ sampler: 'dpmpp_2m', karras: true });
    expect(r.conventions).toMatchObject({ name: 'diffusers', stepsOffset: 0, sigma: { spacing: 'linspace', startScale: 'sigma' } });
    expect(r.conventions.dpmSolver).toMatchObject({
      spacing: 'linspace', points: 'n+1', timesteps: 'rounded', startScale: 'variance-preserving',
    });
  });

  it('refuses what it cannot honour, naming the key', () => {
    const bad: [unknown, RegExp][] = [
      [{ prediction_type: 'v_prediction' }, /prediction_type "v_prediction".*epsilon/],
      [{ timestep_spacing: 'uniform' }, /timestep_spacing "uniform"/],
      [{ beta_schedule: 'linear' }, /beta_schedule/],
      [{ steps_offset: -1 }, /steps_offset/],
      [{ _class_name: 'FlowMatchEulerDiscreteScheduler' }, /_class_name/],
      [{ algorithm_type: 'sde-dpmsolver++' }, /algorithm_type/],
      [[], /JSON object/],
    ];
    for (const [json, msg] of bad) expect(() => conventionsFromSchedulerConfig(json)).toThrow(msg);
  });
});

describe('defaults and tensor lifetime', () => {
  it('A1111_CONVENTIONS is the default', () => {
    for (const name of SAMPLERS) {
      const a = createSampler({ name, steps: 7, karras: true });
      const b = createSampler({ name, steps: 7, karras: true, conventions: A1111_CONVENTIONS });
      expect([a.timesteps, a.startScale]).toEqual([b.timesteps, b.startScale]);
    }
  });

  it.each(SAMPLERS)('%s frees everything under DIFFUSERS_CONVENTIONS, txt2img and img2img', (name: SamplerName) => {
    const before = tf.memory().numTensors;
    for (const karras of [false, true]) sample({ name, steps: 5, karras, conventions: DIFFUSERS_CONVENTIONS }, tf.randomNormal(SHAPE));
    const sampler = createSampler({ name, steps: 10, strength: 0.5, conventions: DIFFUSERS_CONVENTIONS });
    const [noise, init] = [tf.randomNormal(SHAPE), tf.ones(SHAPE)] as tf.Tensor4D[];
    const x = sampler.start(noise, init);
    const next = sampler.step(0, x, eps, gaussian);
    tf.dispose([noise, init, x, next]);
    sampler.dispose();
    expect(tf.memory().numTensors).toBe(before);
  });
});
