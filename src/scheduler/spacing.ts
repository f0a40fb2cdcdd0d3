/**
 * Timestep spacings: which of the 1000 training timesteps a sampler visits, as each tool picks them, and the
 * schedule a sigma sampler walks, built from a spacing under a set of conventions (./conventions.ts).
 *
 *   linspace  n evenly spaced from 999 down to 0, fractional  k-diffusion get_sigmas, A1111, ComfyUI "normal";
 *                                                               diffusers np.linspace(0, 999, n)[::-1]
 *   leading   i * (1000 // n) + steps_offset, i = n-1 .. 0     diffusers' default for SD 1.5 and SDXL
 *   trailing  round(arange(1000, 0, -1000 / n)) - 1            diffusers (Lin et al. 2023, table 2)
 *   uniform   range(0, 1000, 1000 // n) + 1, descending        CompVis DDIM (A1111's original DDIM): more than n
 *             (at most 999, as A1111 clips it)                  timesteps when n does not divide 1000
 * numpy's round (half to even), linspace and arange are reproduced, so the lists equal diffusers' exactly.
 */
import type { SamplerConventions, SigmaConventions, TimestepSpacing } from './conventions.js';
import { karrasRange, linearSigma, sigmaMax, sigmaMin, sigmaToT, tToSigma, TRAIN_STEPS, type SigmaTable } from './schedule.js';
import { SamplerError } from './types.js';

/** numpy / torch round: halves go to the even neighbour (np.round(0.5) = 0, np.round(499.5) = 500). */
export function roundHalfEven(x: number): number {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** np.linspace(start, stop, num): start + k * ((stop - start) / (num - 1)), the last exactly stop. */
export function numpyLinspace(start: number, stop: number, num: number): number[] {
  if (num === 1) return [start];
  const step = (stop - start) / (num - 1);
  return Array.from({ length: num }, (_, k) => (k === num - 1 ? stop : k * step + start));
}

/** np.arange(start, stop, step) for floats: ceil((stop - start) / step) values start + i * delta, delta = (start + step) - start. */
export function numpyArange(start: number, stop: number, step: number): number[] {
  const length = Math.max(0, Math.ceil((stop - start) / step));
  const delta = start + step - start;
  return Array.from({ length }, (_, i) => (i === 0 ? start : start + i * delta));
}

export interface SpacingOptions {
  /** diffusers `steps_offset`, added to 'leading' timesteps only (as diffusers does). Default 0. */
  readonly stepsOffset?: number;
  /** 'n+1': space n + 1 points and drop the last (diffusers' DPM-Solver, linspace and leading only). Default 'n'. */
  readonly points?: 'n' | 'n+1';
  readonly trainSteps?: number;
}

/** The model timesteps of a spacing, descending (fractional for linspace); refuses any outside 0..trainSteps-1. */
export function spacedTimesteps(spacing: TimestepSpacing, n: number, o: SpacingOptions = {}): number[] {
  const T = o.trainSteps ?? TRAIN_STEPS;
  const offset = o.stepsOffset ?? 0;
  const m = o.points === 'n+1' && (spacing === 'linspace' || spacing === 'leading') ? n + 1 : n;
  const dropLast = m > n;
  let ts: number[];
  switch (spacing) {
    case 'linspace':
      ts = numpyLinspace(0, T - 1, m).reverse();
      break;
    case 'leading': {
      const ratio = Math.floor(T / m);
      ts = Array.from({ length: m }, (_, i) => (m - 1 - i) * ratio);
      break;
    }
    case 'trailing':
      ts = numpyArange(T, 0, -T / n).map((t) => roundHalfEven(t) - 1);
      break;
    case 'uniform': {
      const c = Math.floor(T / n);
      ts = numpyArange(0, T, c).map((t) => Math.min(t + 1, T - 1)).reverse(); // CompVis would index past the table
      break;
    }
  }
  if (dropLast) ts = ts.slice(0, -1);
  if (spacing === 'leading') ts = ts.map((t) => t + offset);
  const bad = ts.find((t) => !(t >= 0 && t <= T - 1));
  if (bad !== undefined) {
    const extra = spacing === 'leading' ? ` + steps_offset ${offset}` : '';
    throw new SamplerError(
      `steps: ${spacing}${extra} spacing of ${n} steps gives timestep ${bad}, outside 0..${T - 1}; choose another step count`,
    );
  }
  return ts;
}

/** The integer timesteps of DDIM and DDPM: linspace rounded half to even (diffusers' np.linspace(...).round()). */
export const integerTimesteps = (spacing: TimestepSpacing, n: number, o: SpacingOptions = {}): number[] =>
  spacedTimesteps(spacing, n, o).map(roundHalfEven);

/** CompVis DDIM "uniform" timesteps, descending: range(0, 1000, 1000 // n) + 1, at most 999 (more than n when n does not divide 1000). */
export const ddimTimesteps = (n: number, trainSteps = TRAIN_STEPS): number[] => spacedTimesteps('uniform', n, { trainSteps });

/** The educational DDPM sampler's timesteps, descending: (arange(n) * (1000 // n))[::-1] ('leading', offset 0). */
export const ddpmTimesteps = (n: number, trainSteps = TRAIN_STEPS): number[] => spacedTimesteps('leading', n, { trainSteps });

/** What a sigma sampler walks: sigmas[i] -> sigmas[i + 1], asking the UNet for eps at timesteps[i]. */
export interface SigmaSchedule {
  /** Decreasing, ending in 0; length steps + 1. */
  readonly sigmas: Float64Array;
  /** The model timestep the UNet is given at sigmas[i]; length steps. */
  readonly timesteps: Float64Array;
}

/** k-diffusion get_sigmas' timesteps: torch.linspace(999, 0, n) (n = 1: 999). */
const kDiffusionLinspace = (n: number, tMax: number): number[] =>
  Array.from({ length: n }, (_, i) => (n === 1 ? tMax : tMax - (tMax * i) / (n - 1)));

/**
 * The full schedule of a sigma sampler (img2img slices it) under `rules`:
 *   1. timesteps from the spacing (k-diffusion's own linspace when interpolating log sigma), rounded if asked;
 *   2. the sigma at each: log-sigma interpolation (k-diffusion t_to_sigma) or np.interp of sigma (diffusers);
 *   3. Karras: rho-7 sigmas over the training range or over the spaced sigmas' ends, timesteps t(sigma);
 *   4. the UNet's t: k-diffusion derives t(sigma) for every sigma; diffusers passes the spaced t (Karras: t(sigma));
 *   5. float32 precision stores sigmas and timesteps as float32, as diffusers does; then the final 0.
 */
export function sigmaSchedule(
  table: SigmaTable,
  steps: number,
  karras: boolean,
  rules: SigmaConventions,
  c: Pick<SamplerConventions, 'stepsOffset' | 'precision'>,
): SigmaSchedule {
  const tMax = table.sigmas.length - 1;
  const kDiffusion = rules.interpolation === 'log-sigma';
  const round = (t: number): number => (rules.timesteps === 'rounded' ? roundHalfEven(t) : t);
  const f32 = (x: number): number => (c.precision === 'float32' ? Math.fround(x) : x);
  const spaced = (kDiffusion && rules.spacing === 'linspace'
    ? kDiffusionLinspace(rules.points === 'n+1' ? steps + 1 : steps, tMax).slice(0, steps)
    : spacedTimesteps(rules.spacing, steps, { stepsOffset: c.stepsOffset, points: rules.points, trainSteps: tMax + 1 })
  ).map((t) => f32(round(t)));
  let sigmas = spaced.map((t) => (kDiffusion ? tToSigma(table, t) : linearSigma(table, t)));
  let timesteps = kDiffusion ? sigmas.map((s) => sigmaToT(table, s)) : spaced;
  if (karras) {
    const [lo, hi] = rules.karrasRange === 'training' ? [sigmaMin(table), sigmaMax(table)] : [sigmas[sigmas.length - 1], sigmas[0]];
    sigmas = Array.from(karrasRange(lo, hi, steps));
    timesteps = sigmas.map((s) => round(sigmaToT(table, s)));
  }
  return {
    sigmas: Float64Array.from([...sigmas.map(f32), 0]),
    timesteps: Float64Array.from(timesteps.map(f32)),
  };
}
