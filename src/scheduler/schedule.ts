/**
 * Noise schedules, as pure functions of plain numbers.
 *
 * SD 1.x was trained with 1000 steps of a "scaled linear" beta schedule (LDM v1-inference.yaml). Timestep
 * samplers (DDPM, DDIM) walk a subset of those integer steps; sigma samplers (k-diffusion) see the same
 * model as a denoiser over the noise level sigma_t = sqrt((1 - abar_t) / abar_t) and walk a decreasing list of
 * sigmas that ends in 0, mapping each sigma back to a fractional model timestep by log-sigma interpolation
 * (k-diffusion `DiscreteSchedule`).
 */

/** The number of training timesteps of SD 1.x. */
export const TRAIN_STEPS = 1000;

/** Scaled-linear schedule (LDM v1-inference.yaml): beta_t = lerp(sqrt(b0), sqrt(b1), t/(N-1))^2, abar_t = prod(1 - beta). */
export function alphasCumprod(n = TRAIN_STEPS, b0 = 0.00085, b1 = 0.012): Float64Array {
  const out = new Float64Array(n);
  const s0 = Math.sqrt(b0);
  const s1 = Math.sqrt(b1);
  let prod = 1;
  for (let t = 0; t < n; t++) {
    const sqrtBeta = n === 1 ? s0 : s0 + ((s1 - s0) * t) / (n - 1);
    prod *= 1 - sqrtBeta * sqrtBeta;
    out[t] = prod;
  }
  return out;
}

/**
 * The same schedule as diffusers computes it, in float32 (torch.linspace(sqrt(b0), sqrt(b1), n, dtype=float32) ** 2,
 * alphas = 1 - betas, torch.cumprod): each float32 operation is rounded as torch rounds it on the CPU, where linspace
 * counts from the start up to halfway and back from the end after, and cumprod accumulates in double. Up to
 * ~2e-5 relative from the float64 schedule above at late timesteps; the sigmas it gives are within one float32 ulp
 * of diffusers' own.
 */
export function alphasCumprodFloat32(n = TRAIN_STEPS, b0 = 0.00085, b1 = 0.012): Float64Array {
  const f = Math.fround;
  const start = f(Math.sqrt(b0));
  const end = f(Math.sqrt(b1));
  const step = n === 1 ? 0 : f(f(end - start) / (n - 1));
  const halfway = Math.floor(n / 2);
  const out = new Float64Array(n);
  let prod = 1;
  for (let t = 0; t < n; t++) {
    const sqrtBeta = t < halfway ? f(start + f(step * t)) : f(end - f(step * (n - 1 - t)));
    prod *= f(1 - f(sqrtBeta * sqrtBeta));
    out[t] = f(prod);
  }
  return out;
}

/**
 * The model's noise levels, indexed by training timestep. Like k-diffusion's `CompVisDenoiser`, they come from
 * the float32 `alphas_cumprod` buffer of the checkpoint's model, so sigmas equal the reference's to float precision.
 */
export interface SigmaTable {
  readonly sigmas: Float64Array; // increasing with t
  readonly logSigmas: Float64Array;
}

export function sigmaTable(acp: Float64Array = alphasCumprod()): SigmaTable {
  const sigmas = acp.map((a32) => {
    const a = Math.fround(a32);
    return Math.fround(Math.sqrt((1 - a) / a));
  });
  return Object.freeze({ sigmas, logSigmas: sigmas.map(Math.log) });
}

export const sigmaMin = (table: SigmaTable): number => table.sigmas[0];
export const sigmaMax = (table: SigmaTable): number => table.sigmas[table.sigmas.length - 1];

/** k-diffusion `DiscreteSchedule.sigma_to_t`: the fractional timestep whose log-sigma is log(sigma), clamped to [0, N-1]. */
export function sigmaToT(table: SigmaTable, sigma: number): number {
  const ls = table.logSigmas;
  const logSigma = Math.log(sigma);
  let count = 0; // how many log-sigmas are <= log(sigma)
  while (count < ls.length && ls[count] <= logSigma) count++;
  const low = Math.min(Math.max(count - 1, 0), ls.length - 2);
  const w = Math.min(Math.max((ls[low] - logSigma) / (ls[low] - ls[low + 1]), 0), 1);
  return (1 - w) * low + w * (low + 1);
}

/** k-diffusion `DiscreteSchedule.t_to_sigma`: exp of the log-sigmas interpolated at fractional t. */
export function tToSigma(table: SigmaTable, t: number): number {
  const low = Math.floor(t);
  const high = Math.ceil(t);
  const w = t - low;
  return Math.exp((1 - w) * table.logSigmas[low] + w * table.logSigmas[high]);
}

/** diffusers' np.interp(t, arange(N), sigmas): sigma interpolated linearly (not its log) at fractional t. */
export function linearSigma(table: SigmaTable, t: number): number {
  const s = table.sigmas;
  const low = Math.min(Math.max(Math.floor(t), 0), s.length - 1);
  if (t <= 0 || low === s.length - 1 || t === low) return s[low];
  return (s[low + 1] - s[low]) * (t - low) + s[low];
}

/** k-diffusion `get_sigmas(n)`: n sigmas at timesteps linspace(N-1, 0, n), then 0. Length n + 1. */
export function defaultSigmas(table: SigmaTable, n: number): Float64Array {
  const tMax = table.sigmas.length - 1;
  const out = new Float64Array(n + 1);
  for (let i = 0; i < n; i++) out[i] = tToSigma(table, n === 1 ? tMax : tMax - (tMax * i) / (n - 1));
  return out;
}

/**
 * Karras et al. 2022 eq. 5 (k-diffusion `get_sigmas_karras`), from sigmaHi down to sigmaLo:
 * sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho, i < n.
 */
export function karrasRange(sigmaLo: number, sigmaHi: number, n: number, rho = 7): Float64Array {
  const minInvRho = sigmaLo ** (1 / rho);
  const maxInvRho = sigmaHi ** (1 / rho);
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    const ramp = n === 1 ? 0 : i / (n - 1);
    out[i] = (maxInvRho + ramp * (minInvRho - maxInvRho)) ** rho;
  }
  return out;
}

/** Karras sigmas over the model's whole range [sigma(0), sigma(999)], then 0. Length n + 1. */
export function karrasSigmas(table: SigmaTable, n: number, rho = 7): Float64Array {
  const out = new Float64Array(n + 1);
  out.set(karrasRange(sigmaMin(table), sigmaMax(table), n, rho));
  return out;
}
