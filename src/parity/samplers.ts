/**
 * Parity of every sampler (tests/fixtures/samplers) on the fixture's synthetic noise predictor
 * eps(x, t) = tanh(x / 2) * (0.5 + t / 1000) + 0.05, from the listed start and noise tensors.
 * Each case also checks the schedule the sampler walks (listed sigmas or timesteps); ddpm cases with a seed
 * add a case checking that TorchGenerator(seed) draws the listed noise tensors. A case may name the conventions
 * it follows (`"conventions": "a1111" | "diffusers"`, src/scheduler/conventions.ts); the default is a1111
 * (k-diffusion, CompVis DDIM with uniform spacing, the educational DDPM), as the fixture's `about` states.
 * Latents stay in the fixture's NCHW layout: every sampler operation is elementwise, so the layout does not matter.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { SamplerName } from '../pipeline/api.js';
import { CONVENTIONS, createSampler, TorchGenerator, type EpsFn, type NoiseFn, type Sampler } from '../scheduler/index.js';
import { SigmaSampler } from '../scheduler/k-diffusion.js';
import * as tf from '../backend/tf.js';
import { SafetensorsFile } from '../weights/safetensors.js';
import { maxRelError, withinTolerance } from './compare.js';
import type { CaseResult, KindRunner } from './types.js';

/** Listed sigmas are float32 values; ours are computed in float64 (Karras in torch's float32 pow differs ~1e-6). */
const SCHEDULE_TOLERANCE = 1e-5;
/** The rng fixture's tolerance. */
const RNG_TOLERANCE = 1e-6;

interface SamplerCase {
  readonly sampler: SamplerName;
  readonly steps: number;
  readonly karras?: boolean;
  readonly conventions?: keyof typeof CONVENTIONS;
  readonly sigmas?: number[];
  readonly timesteps?: number[];
  readonly seed?: number;
  readonly expected: string;
  readonly noise?: string[];
}

interface SamplersFixture {
  readonly tolerance: number;
  readonly shape: number[];
  readonly cases: SamplerCase[];
}

const syntheticEps: EpsFn = (x, t) => tf.tidy(() => tf.add(tf.mul(tf.tanh(tf.div(x, 2)), 0.5 + t / 1000), 0.05));

function samplerFor(c: SamplerCase): Sampler {
  const conventions = CONVENTIONS[c.conventions ?? 'a1111'];
  if (conventions === undefined) throw new Error(`conventions "${String(c.conventions)}": use ${Object.keys(CONVENTIONS).join(' or ')}`);
  return createSampler({ name: c.sampler, steps: c.steps, karras: c.karras, conventions });
}

/** Largest elementwise relative difference between the schedule the sampler walks and the listed one (0 == 0). */
function scheduleError(c: SamplerCase): number {
  const sampler = samplerFor(c);
  const ours = c.sigmas !== undefined && sampler instanceof SigmaSampler ? sampler.sigmas : sampler.timesteps;
  sampler.dispose();
  const listed = c.sigmas ?? c.timesteps ?? [];
  if (ours.length !== listed.length) return Infinity;
  let worst = 0;
  listed.forEach((e, i) => {
    worst = Math.max(worst, e === 0 ? Math.abs(ours[i]) : Math.abs(ours[i] - e) / Math.abs(e));
  });
  return worst;
}

/** A NoiseFn handing out the listed tensors in order; it records how many were drawn. */
function listedNoise(io: SafetensorsFile, names: readonly string[]): NoiseFn & { drawn: () => number } {
  let next = 0;
  const fn = (shape: readonly number[]): tf.Tensor => {
    if (next >= names.length) throw new Error(`drew noise #${next + 1} but only ${names.length} are listed`);
    const name = names[next++];
    const want = io.info(name).shape;
    if (want.join() !== shape.join()) throw new Error(`${name} is [${want}], the sampler asked for [${shape}]`);
    return tf.tensor(io.float32(name), [...shape]);
  };
  return Object.assign(fn, { drawn: () => next });
}

function sample(c: SamplerCase, io: SafetensorsFile, shape: number[]): Float32Array {
  const noise = listedNoise(io, c.noise ?? []);
  const sampler = samplerFor(c);
  const xT = c.sampler === 'ddpm' ? noise(shape) : tf.tensor(io.float32('x_T'), shape);
  let x = sampler.start(xT as tf.Tensor4D);
  xT.dispose();
  try {
    for (let i = 0; i < sampler.totalSteps; i++) {
      const next = sampler.step(i, x, syntheticEps, noise);
      x.dispose();
      x = next;
    }
    return x.dataSync() as Float32Array;
  } finally {
    x.dispose();
    sampler.dispose();
  }
}

function runCase(c: SamplerCase, io: SafetensorsFile, fx: SamplersFixture): CaseResult {
  const base = { kind: 'samplers', name: c.expected, tolerance: fx.tolerance };
  try {
    const before = tf.memory().numTensors;
    const out = sample(c, io, fx.shape);
    const leaked = tf.memory().numTensors - before;
    const r = withinTolerance(out, io.float32(c.expected), fx.tolerance);
    const schedErr = scheduleError(c);
    const what = c.sigmas !== undefined ? 'sigmas' : 'timesteps';
    const problems = [
      schedErr <= SCHEDULE_TOLERANCE ? null : `${what} differ from the listed ones (max rel err ${schedErr.toExponential(2)})`,
      leaked === 0 ? null : `leaked ${leaked} tensors`,
    ].filter((p) => p !== null);
    const detail = [`${what} max rel err ${schedErr.toExponential(2)}`, ...problems].join('; ');
    return { ...base, passed: r.passed && problems.length === 0, maxRelError: r.maxRelError, detail };
  } catch (e) {
    return { ...base, passed: false, detail: e instanceof Error ? e.message : String(e) };
  }
}

/** TorchGenerator(seed) must draw the case's listed noise tensors, in order. */
function runSeedCase(c: SamplerCase & { seed: number }, io: SafetensorsFile, shape: number[]): CaseResult {
  const names = c.noise ?? [];
  const base = { kind: 'samplers', name: `${c.expected} noise from seed ${c.seed}`, tolerance: RNG_TOLERANCE };
  try {
    const gen = new TorchGenerator(c.seed);
    const err = Math.max(...names.map((n) => maxRelError(gen.randn(shape), io.float32(n))));
    return { ...base, passed: err <= RNG_TOLERANCE, maxRelError: err, detail: `${names.length} draws of [${shape}]` };
  } catch (e) {
    return { ...base, passed: false, detail: e instanceof Error ? e.message : String(e) };
  }
}

export const run: KindRunner = async (dir) => {
  const fx = JSON.parse(readFileSync(join(dir, 'cases.json'), 'utf8')) as SamplersFixture;
  const io = SafetensorsFile.open(join(dir, 'io.safetensors'));
  try {
    return fx.cases.flatMap((c) => {
      const r = runCase(c, io, fx);
      return c.seed === undefined ? [r] : [r, runSeedCase({ ...c, seed: c.seed }, io, fx.shape)];
    });
  } finally {
    io.close();
  }
};
