/**
 * Samplers behind one interface (./types.ts), chosen by name, and the torch-compatible noise they start from.
 *   timestep samplers  ddpm, ddim                          walk integer model timesteps
 *   sigma samplers     euler, euler_a, heun, lms, dpmpp_2m   walk noise levels (k-diffusion), optionally Karras-spaced
 */
import { SAMPLERS } from './types.js';
import { DdimSampler } from './ddim.js';
import { DdpmSampler } from './ddpm.js';
import { DpmPp2mSampler } from './dpmpp-2m.js';
import { EulerAncestralSampler, EulerSampler } from './euler.js';
import { HeunSampler } from './heun.js';
import { samplerSigmas } from './k-diffusion.js';
import { LmsSampler } from './lms.js';
import { alphasCumprod, sigmaTable, TRAIN_STEPS } from './schedule.js';
import { SamplerError, type Sampler, type SamplerConfig } from './types.js';

export type { EpsFn, NoiseFn, Sampler, SamplerConfig } from './types.js';
export { SAMPLERS, SamplerError, type SamplerName } from './types.js';
export {
  alphasCumprod,
  ddimTimesteps,
  ddpmTimesteps,
  defaultSigmas,
  karrasSigmas,
  sigmaTable,
  sigmaToT,
  tToSigma,
  TRAIN_STEPS,
  type SigmaTable,
} from './schedule.js';
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
  const abar = alphasCumprod();
  const { name, steps, strength } = cfg;
  if (name === 'ddpm') return new DdpmSampler(abar, steps, strength);
  if (name === 'ddim') return new DdimSampler(abar, steps, strength);
  const table = sigmaTable(abar);
  const sigmas = samplerSigmas(table, steps, cfg.karras ?? false, strength);
  switch (name) {
    case 'euler':
      return new EulerSampler(table, sigmas);
    case 'euler_a':
      return new EulerAncestralSampler(table, sigmas);
    case 'heun':
      return new HeunSampler(table, sigmas);
    case 'lms':
      return new LmsSampler(table, sigmas);
    case 'dpmpp_2m':
      return new DpmPp2mSampler(table, sigmas);
  }
}
