/**
 * Samplers behind one interface (./types.ts), chosen by name, and the torch-compatible noise they start from.
 *   timestep samplers  ddpm, ddim                          walk integer model timesteps
 *   sigma samplers     euler, euler_a, heun, lms, dpmpp_2m   walk noise levels (k-diffusion), optionally Karras-spaced
 * Which timesteps and sigmas, and how a generation starts, follow the conventions of one tool (./conventions.ts):
 * A1111 / k-diffusion by default, or diffusers': createSampler({ ..., conventions: DIFFUSERS_CONVENTIONS }).
 */
import { SAMPLERS } from './types.js';
import { DdimSampler } from './ddim.js';
import { DdpmSampler } from './ddpm.js';
import { DpmPp2mSampler } from './dpmpp-2m.js';
import { EulerAncestralSampler, EulerSampler } from './euler.js';
import { HeunSampler } from './heun.js';
import { A1111_CONVENTIONS } from './conventions.js';
import { sliceSchedule } from './k-diffusion.js';
import { LmsSampler } from './lms.js';
import { alphasCumprod, alphasCumprodFloat32, sigmaTable, TRAIN_STEPS } from './schedule.js';
import { integerTimesteps, sigmaSchedule } from './spacing.js';
import { SamplerError, type Sampler, type SamplerConfig } from './types.js';

export type { EpsFn, NoiseFn, Sampler, SamplerConfig } from './types.js';
export { SAMPLERS, SamplerError, type SamplerName } from './types.js';
export {
  alphasCumprod,
  alphasCumprodFloat32,
  defaultSigmas,
  karrasRange,
  karrasSigmas,
  linearSigma,
  sigmaTable,
  sigmaToT,
  tToSigma,
  TRAIN_STEPS,
  type SigmaTable,
} from './schedule.js';
export {
  A1111_CONVENTIONS,
  CONVENTIONS,
  conventionsFromSchedulerConfig,
  DIFFUSERS_CONVENTIONS,
  SD15_DIFFUSERS_CONVENTIONS,
  TIMESTEP_SPACINGS,
  type DiffusersSchedulerConfig,
  type SamplerConventions,
  type SigmaConventions,
  type StartScale,
  type TimestepSpacing,
} from './conventions.js';
export {
  ddimTimesteps,
  ddpmTimesteps,
  integerTimesteps,
  roundHalfEven,
  sigmaSchedule,
  spacedTimesteps,
  type SigmaSchedule,
} from './spacing.js';
export { samplerSigmas } from './k-diffusion.js';
export { TorchGenerator } from './torch-generator.js';
export { NOISE_SOURCES, createGenerator, torchNoise, type NoiseGenerator, type NoiseSource } from './noise.js';

function validate(cfg: SamplerConfig): void {
  if (!(SAMPLERS as readonly string[]).includes(cfg.name)) {
    throw new SamplerError(`sampler: unknown "${String(cfg.name)}"; use one of ${SAMPLERS.join(', ')}`);
  }
  if (!Number.isInteger(cfg.steps) || cfg.steps < 1 || cfg.steps > TRAIN_STEPS) {
    throw new SamplerError(`steps: must be an integer in 1..${TRAIN_STEPS}, got ${cfg.steps}`);
  }
  const s = cfg.strength;
  if (s !== undefined && !(s > 0 && s <= 1)) {
    throw new SamplerError(`strength: must be in (0, 1], got ${s}`);
  }
}

/** A fresh sampler for one generation (samplers with history must not be shared between generations). */
export function createSampler(cfg: SamplerConfig): Sampler {
  validate(cfg);
  const c = cfg.conventions ?? A1111_CONVENTIONS;
  const abar = c.precision === 'float32' ? alphasCumprodFloat32() : alphasCumprod();
  const { name, steps, strength } = cfg;
  const spacing = { stepsOffset: c.stepsOffset, trainSteps: abar.length };
  if (name === 'ddpm') return new DdpmSampler(abar, integerTimesteps(c.ddpm, steps, spacing), strength);
  if (name === 'ddim') {
    const previous = c.ddim === 'uniform' ? 'listed' : { stride: Math.floor(abar.length / steps) }; // CompVis : diffusers
    return new DdimSampler(abar, integerTimesteps(c.ddim, steps, spacing), previous, strength);
  }
  const rules = name === 'dpmpp_2m' ? c.dpmSolver : c.sigma;
  const schedule = sliceSchedule(sigmaSchedule(sigmaTable(abar), steps, cfg.karras ?? false, rules, c), strength);
  switch (name) {
    case 'euler':
      return new EulerSampler(schedule, rules.startScale);
    case 'euler_a':
      return new EulerAncestralSampler(schedule, rules.startScale, c.ancestralNoise);
    case 'heun':
      return new HeunSampler(schedule, rules.startScale);
    case 'lms':
      return new LmsSampler(schedule, rules.startScale);
    case 'dpmpp_2m':
      return new DpmPp2mSampler(schedule, rules.startScale);
  }
}
