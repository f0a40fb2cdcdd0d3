/**
 * A1111's sampler and scheduler names, and their translation to the pipeline's (sampler, karras).
 *
 * A1111 1.9+ names a sampler ("DPM++ 2M") and a schedule ("karras") apart; older clients name both at once
 * ("DPM++ 2M Karras") or send k-diffusion's aliases ("k_dpmpp_2m"). All three are read here. "automatic" is the
 * sampler's own default schedule, as A1111 1.9 has it (Karras for the DPM++ family, uniform for the rest).
 * An unknown sampler falls back to A1111's API default, "Euler"; an unknown schedule to "automatic"; the
 * answered `info.sampler_name` and the image's parameters text say what actually ran.
 */
import type { SamplerName } from '../../pipeline/api.js';

export interface A1111Sampler {
  readonly name: string;
  readonly aliases: readonly string[];
  readonly sampler: SamplerName;
  /** What "automatic" means for this sampler. */
  readonly karrasByDefault: boolean;
}

/** The samplers this server runs, named and aliased as A1111's modules/sd_samplers_*.py list them. */
export const A1111_SAMPLERS: readonly A1111Sampler[] = Object.freeze([
  { name: 'DPM++ 2M', aliases: ['k_dpmpp_2m'], sampler: 'dpmpp_2m', karrasByDefault: true },
  { name: 'Euler a', aliases: ['k_euler_a', 'k_euler_ancestral'], sampler: 'euler_a', karrasByDefault: false },
  { name: 'Euler', aliases: ['k_euler'], sampler: 'euler', karrasByDefault: false },
  { name: 'LMS', aliases: ['k_lms'], sampler: 'lms', karrasByDefault: false },
  { name: 'Heun', aliases: ['k_heun'], sampler: 'heun', karrasByDefault: false },
  { name: 'DDIM', aliases: ['ddim'], sampler: 'ddim', karrasByDefault: false },
  { name: 'DDPM', aliases: ['ddpm'], sampler: 'ddpm', karrasByDefault: false },
]);

/** A1111's API default (`sampler_index: "Euler"` in modules/api/models.py). */
export const DEFAULT_A1111_SAMPLER = 'Euler';

export interface A1111Scheduler {
  readonly name: string;
  readonly label: string;
  /** true: Karras sigmas; false: the sampler's uniform spacing; null: the sampler's default. */
  readonly karras: boolean | null;
  readonly default_rho: number;
}

export const A1111_SCHEDULERS: readonly A1111Scheduler[] = Object.freeze([
  { name: 'automatic', label: 'Automatic', karras: null, default_rho: -1 },
  { name: 'uniform', label: 'Uniform', karras: false, default_rho: -1 },
  { name: 'karras', label: 'Karras', karras: true, default_rho: 7 },
]);

export interface SamplerChoice {
  readonly sampler: SamplerName;
  readonly karras: boolean;
  /** The A1111 name of what runs ("DPM++ 2M"), and the schedule ("karras"). */
  readonly name: string;
  readonly scheduler: string;
  /** Set when the request's sampler or scheduler was not known and a default was taken instead. */
  readonly fellBack: string | null;
}

const key = (s: string): string => s.trim().toLowerCase();

function findSampler(name: string): A1111Sampler | undefined {
  const k = key(name);
  return A1111_SAMPLERS.find((s) => key(s.name) === k || s.sampler === k || s.aliases.includes(k));
}

/**
 * `sampler_name` (or `sampler_index`) and `scheduler` -> what the pipeline runs. "X Karras" is X with the
 * karras schedule unless `scheduler` names another one explicitly.
 */
export function chooseSampler(samplerName: string | null, schedulerName: string | null): SamplerChoice {
  const notes: string[] = [];
  let name = samplerName ?? DEFAULT_A1111_SAMPLER;
  let karrasInName = false;
  let found = findSampler(name);
  if (found === undefined && / karras$/i.test(name.trim())) {
    found = findSampler(name.trim().replace(/ karras$/i, ''));
    karrasInName = found !== undefined;
  }
  if (found === undefined) {
    notes.push(`sampler ${JSON.stringify(name)} is not available here: ${DEFAULT_A1111_SAMPLER} instead`);
    name = DEFAULT_A1111_SAMPLER;
    found = findSampler(name) as A1111Sampler;
  }
  const asked = schedulerName === null || key(schedulerName) === '' ? 'automatic' : key(schedulerName);
  let scheduler = A1111_SCHEDULERS.find((s) => s.name === asked || key(s.label) === asked);
  if (scheduler === undefined) {
    notes.push(`scheduler ${JSON.stringify(schedulerName)} is not available here: automatic instead`);
    scheduler = A1111_SCHEDULERS[0];
  }
  if (karrasInName && scheduler.karras === null) scheduler = A1111_SCHEDULERS[2];
  const karras = scheduler.karras ?? found.karrasByDefault;
  return { sampler: found.sampler, karras, name: found.name, scheduler: scheduler.name, fellBack: notes.length > 0 ? notes.join('; ') : null };
}

/** GET /sdapi/v1/samplers: `{name, aliases, options}` as A1111 answers it. */
export function samplerList(): Record<string, unknown>[] {
  return A1111_SAMPLERS.map((s) => ({ name: s.name, aliases: [...s.aliases], options: s.karrasByDefault ? { scheduler: 'karras' } : {} }));
}

/** GET /sdapi/v1/schedulers. */
export function schedulerList(): Record<string, unknown>[] {
  return A1111_SCHEDULERS.map((s) => ({ name: s.name, label: s.label, aliases: null, default_rho: s.default_rho, need_inner_model: false }));
}
