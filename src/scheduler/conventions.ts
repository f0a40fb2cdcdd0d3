/**
 * Sampler conventions: where the tools that implement "the same sampler" differ, each difference a named value,
 * with one preset per tool. The step math of a sampler is the same in all of them; what differs is which
 * timesteps and sigmas it visits, what t the UNet is given, what the first latent is, and when noise is drawn.
 *
 *   difference               A1111_CONVENTIONS (k-diffusion, A1111,     DIFFUSERS_CONVENTIONS (diffusers with the
 *                            ComfyUI; CompVis DDIM)                     SDXL base scheduler config)
 *   precision                float64 betas (LDM's alphas_cumprod        float32 betas (torch.linspace float32);
 *                            buffer, read by k-diffusion)               sigmas and timesteps stored as float32
 *   sigma samplers' spacing  linspace: t = linspace(999, 0, n)          leading: i * (1000 // n) + steps_offset (1);
 *                                                                        SD 1.5's config (none given): linspace
 *   sigma at a spaced t      log-sigma interpolation (t_to_sigma)       np.interp of sigma itself
 *   UNet's t for a sigma     t(sigma), fractional                       the spaced t; Karras: t(sigma), fractional,
 *                                                                        DPM-Solver ROUND(t(sigma))
 *   Karras range             sigma(0) .. sigma(999)                     Euler/Heun/LMS: the spaced sigmas' ends;
 *                                                                        DPM-Solver: sigma(0) .. sigma(999)
 *   first latent             x_T * sigma_0                              x_T * sqrt(sigma_0^2 + 1) (init_noise_sigma;
 *                                                                        linspace/trailing: x_T * sigma_0); DPM-Solver:
 *                                                                        x_T itself, in variance-preserving form
 *   DPM-Solver spacing       as the others                              n + 1 points, the last dropped (never t = 0)
 *   euler_a noise            drawn while the next sigma is > 0          drawn every step (the last one times 0)
 *   DDIM                     uniform: range(0, 1000, 1000 // n) + 1     leading + steps_offset, each step to
 *                            (at most 999), each step to the next one   t - 1000 // n
 *   DDPM                     leading, offset 0 (educational sampler)    leading + steps_offset
 *
 * SD15_DIFFUSERS_CONVENTIONS is diffusers with SD 1.5's PNDM config, which names no timestep_spacing: each class
 * made from it runs its own default, leading for DDIM and DDPM, linspace (np.linspace, np.interp) for the others.
 * For n dividing 1000 DDIM's uniform and leading + 1 agree; otherwise uniform runs more than n steps.
 * Samplers whose rules are not listed (heun, lms) follow their family's; img2img is the same in every tool.
 * conventionsFromSchedulerConfig translates a diffusers scheduler_config.json into these values.
 */
import { SamplerError, type SamplerName } from './types.js';

/** Which training timesteps n steps visit (./spacing.ts has the formulas). */
export type TimestepSpacing = 'linspace' | 'leading' | 'trailing' | 'uniform';
export const TIMESTEP_SPACINGS: readonly TimestepSpacing[] = ['linspace', 'leading', 'trailing', 'uniform'];

/** What the sampler multiplies x_T by to start txt2img (img2img always starts at init + noise * sigma_0). */
export type StartScale =
  | 'sigma' // x_T * sigma_0 (k-diffusion; diffusers' Euler family with linspace/trailing spacing)
  | 'sigma-and-unit' // x_T * sqrt(sigma_0^2 + 1): diffusers' init_noise_sigma with leading spacing
  | 'variance-preserving'; // x_T itself; between steps the latent is x / sqrt(sigma^2 + 1) (diffusers' DPM-Solver)

/** The rules of one family of sigma samplers. */
export interface SigmaConventions {
  readonly spacing: TimestepSpacing;
  /** 'n+1': space n + 1 points and drop the last (diffusers' DPM-Solver; linspace and leading only). */
  readonly points: 'n' | 'n+1';
  /** Sigma at a spaced t: k-diffusion's log-sigma interpolation (and its own linspace), or diffusers' np.interp. */
  readonly interpolation: 'log-sigma' | 'sigma';
  /** 'rounded': every t the UNet gets is an integer, spaced t and t(sigma) alike (diffusers' DPM-Solver). */
  readonly timesteps: 'fractional' | 'rounded';
  /**
   * Karras sigmas span the model's whole range, or the ends of the spaced sigmas (diffusers' Euler/Heun/LMS;
   * its EulerAncestralDiscreteScheduler has no Karras option, and euler_a here follows Euler's rule).
   */
  readonly karrasRange: 'training' | 'spaced';
  readonly startScale: StartScale;
}

export interface SamplerConventions {
  /** Which tool's rules these are, for messages and generation parameters. */
  readonly name: string;
  /** float32: betas, sigmas and timesteps as diffusers computes and stores them; float64: LDM's / k-diffusion's. */
  readonly precision: 'float64' | 'float32';
  /** diffusers `steps_offset`: added to 'leading' timesteps (uniform has CompVis' own + 1 built in). */
  readonly stepsOffset: number;
  /** euler, euler_a, heun, lms. */
  readonly sigma: SigmaConventions;
  /** dpmpp_2m. */
  readonly dpmSolver: SigmaConventions;
  /** euler_a: draw the ancestral noise only while the next sigma is > 0, or at every step. */
  readonly ancestralNoise: 'while-positive' | 'every-step';
  readonly ddim: TimestepSpacing;
  readonly ddpm: TimestepSpacing;
}

const K_DIFFUSION_SIGMA: SigmaConventions = Object.freeze({
  spacing: 'linspace',
  points: 'n',
  interpolation: 'log-sigma',
  timesteps: 'fractional',
  karrasRange: 'training',
  startScale: 'sigma',
});

/** k-diffusion's samplers (as A1111 and ComfyUI run them), CompVis DDIM, the educational DDPM: the default. */
export const A1111_CONVENTIONS: SamplerConventions = Object.freeze({
  name: 'a1111',
  precision: 'float64',
  stepsOffset: 0,
  sigma: K_DIFFUSION_SIGMA,
  dpmSolver: K_DIFFUSION_SIGMA,
  ancestralNoise: 'while-positive',
  ddim: 'uniform',
  ddpm: 'leading',
});

/**
 * Which spacing each diffusers scheduler class runs: the config's timestep_spacing when it has one, else the
 * class's own default (diffusers' from_config skips the keys a config only had by default, `_use_default_values`).
 */
interface DiffusersSpacings {
  /** EulerDiscrete, EulerAncestralDiscrete, HeunDiscrete, LMSDiscrete and DPMSolverMultistep (default linspace). */
  readonly sigma: Exclude<TimestepSpacing, 'uniform'>;
  /** DDIM and DDPM (default leading). */
  readonly timestep: Exclude<TimestepSpacing, 'uniform'>;
}

/** What diffusers' scheduler classes do with a diffusers scheduler config (its Euler family, or its DPM-Solver). */
function diffusersConventions(spacings: DiffusersSpacings, stepsOffset: number): SamplerConventions {
  const spacing = spacings.sigma;
  const euler: SigmaConventions = Object.freeze({
    spacing,
    points: 'n',
    interpolation: 'sigma',
    timesteps: 'fractional',
    karrasRange: 'spaced',
    startScale: spacing === 'leading' ? 'sigma-and-unit' : 'sigma', // EulerDiscreteScheduler.init_noise_sigma
  });
  return Object.freeze({
    name: 'diffusers',
    precision: 'float32',
    stepsOffset,
    sigma: euler,
    dpmSolver: Object.freeze({
      ...euler,
      points: 'n+1',
      timesteps: 'rounded',
      karrasRange: 'training',
      startScale: 'variance-preserving',
    }),
    ancestralNoise: 'every-step',
    ddim: spacings.timestep,
    ddpm: spacings.timestep,
  });
}

/** diffusers with SDXL base's scheduler config (timestep_spacing "leading" for every class, steps_offset 1). */
export const DIFFUSERS_CONVENTIONS: SamplerConventions = diffusersConventions({ sigma: 'leading', timestep: 'leading' }, 1);

/**
 * diffusers with SD 1.5's scheduler config (PNDM, steps_offset 1, no timestep_spacing): a scheduler made from it
 * with from_config runs its own class's default spacing, leading for DDIM and DDPM, linspace for the Euler family
 * and DPM-Solver (so x_T * sigma_0 starts Euler; a folder saved again by diffusers writes "leading" out, and then
 * every class runs leading: DIFFUSERS_CONVENTIONS).
 */
export const SD15_DIFFUSERS_CONVENTIONS: SamplerConventions = diffusersConventions({ sigma: 'linspace', timestep: 'leading' }, 1);

/** The presets by name (a `--conventions` value; 'diffusers' is SDXL's, SD 1.x models get SD15_DIFFUSERS_CONVENTIONS). */
export const CONVENTIONS: Readonly<Record<'a1111' | 'diffusers', SamplerConventions>> = Object.freeze({
  a1111: A1111_CONVENTIONS,
  diffusers: DIFFUSERS_CONVENTIONS,
});

/** What a diffusers scheduler_config.json says: the conventions, and the sampler and Karras flag it names. */
export interface DiffusersSchedulerConfig {
  readonly conventions: SamplerConventions;
  /** The sampler of its `_class_name`; null for a class without one here (PNDMScheduler, SD 1.5's default). */
  readonly sampler: SamplerName | null;
  /** `use_karras_sigmas`. */
  readonly karras: boolean;
}

/** diffusers scheduler classes that a config may name, and our sampler of each. */
const DIFFUSERS_CLASSES: Readonly<Record<string, { sampler: SamplerName | null }>> = {
  EulerDiscreteScheduler: { sampler: 'euler' },
  EulerAncestralDiscreteScheduler: { sampler: 'euler_a' },
  HeunDiscreteScheduler: { sampler: 'heun' },
  LMSDiscreteScheduler: { sampler: 'lms' },
  DPMSolverMultistepScheduler: { sampler: 'dpmpp_2m' },
  DDIMScheduler: { sampler: 'ddim' },
  DDPMScheduler: { sampler: 'ddpm' },
  PNDMScheduler: { sampler: null },
};

/** Keys whose value must be one of these (or absent): the alternatives change the math and are not implemented. */
const SUPPORTED: Readonly<Record<string, readonly unknown[]>> = {
  prediction_type: ['epsilon'],
  beta_schedule: ['scaled_linear'],
  beta_start: [0.00085],
  beta_end: [0.012],
  num_train_timesteps: [1000],
  trained_betas: [null],
  interpolation_type: ['linear'],
  timestep_type: ['discrete'],
  final_sigmas_type: ['zero'],
  use_exponential_sigmas: [false],
  use_beta_sigmas: [false],
  use_lu_lambdas: [false],
  use_flow_sigmas: [false],
  rescale_betas_zero_snr: [false],
  thresholding: [false],
  clip_sample: [false],
  set_alpha_to_one: [false],
  sigma_min: [null],
  sigma_max: [null],
  variance_type: [null, 'fixed_small'],
  algorithm_type: ['dpmsolver++'],
  solver_order: [2],
  solver_type: ['midpoint'],
};

/**
 * A diffusers `scheduler/scheduler_config.json` (parsed) as conventions, for the scheduler class of each sampler
 * made from it with `<Class>.from_config(config)`, as a diffusers user switches schedulers. A missing
 * timestep_spacing is each target class's own default, not the config class's: diffusers' from_config drops keys
 * the loaded config only had by default, so SD 1.5's PNDM config runs DDIM and DDPM leading but Euler, Euler a,
 * Heun, LMS and DPM-Solver linspace (SD15_DIFFUSERS_CONVENTIONS); a missing steps_offset is 0. A value this project cannot honour (v-prediction, other betas, thresholding, ...)
 * is a SamplerError naming the key, the value and what is supported.
 */
export function conventionsFromSchedulerConfig(json: unknown): DiffusersSchedulerConfig {
  if (typeof json !== 'object' || json === null || Array.isArray(json)) {
    throw new SamplerError('scheduler_config.json: expected a JSON object');
  }
  const cfg = json as Record<string, unknown>;
  const className = cfg._class_name;
  const known = typeof className === 'string' ? DIFFUSERS_CLASSES[className] : undefined;
  if (className !== undefined && known === undefined) {
    const classes = Object.keys(DIFFUSERS_CLASSES).join(', ');
    throw new SamplerError(`scheduler_config.json: _class_name "${String(className)}" is not one of ${classes}`);
  }
  for (const [key, allowed] of Object.entries(SUPPORTED)) {
    const v = cfg[key];
    if (v !== undefined && !allowed.includes(v)) {
      const why = key === 'prediction_type' ? ' (the samplers take an epsilon-predicting UNet)' : '';
      const want = allowed.map((a) => JSON.stringify(a)).join(' or ');
      throw new SamplerError(`scheduler_config.json: ${key} ${JSON.stringify(v)} is not supported${why}; use ${want}`);
    }
  }
  const spacing = cfg.timestep_spacing;
  if (spacing !== undefined && spacing !== 'linspace' && spacing !== 'leading' && spacing !== 'trailing') {
    throw new SamplerError(`scheduler_config.json: timestep_spacing ${JSON.stringify(spacing)}; use "linspace", "leading" or "trailing"`);
  }
  const spacings: DiffusersSpacings = spacing === undefined ? { sigma: 'linspace', timestep: 'leading' } : { sigma: spacing, timestep: spacing };
  const offset = cfg.steps_offset ?? 0;
  if (typeof offset !== 'number' || !Number.isInteger(offset) || offset < 0) {
    throw new SamplerError(`scheduler_config.json: steps_offset must be a non-negative integer, got ${JSON.stringify(offset)}`);
  }
  const karras = cfg.use_karras_sigmas ?? false;
  if (typeof karras !== 'boolean') {
    throw new SamplerError(`scheduler_config.json: use_karras_sigmas must be true or false, got ${JSON.stringify(karras)}`);
  }
  return Object.freeze({ conventions: diffusersConventions(spacings, offset), sampler: known?.sampler ?? null, karras });
}
