/**
 * The machine's sgemm peak as the native kernels reach it (#22): the `linear` entry of native/kernels.c (the one
 * register-blocked 6x16 micro-kernel every Linear, conv and attention product goes through) timed on a few large
 * matrix shapes, on the bench's threads, and the best of them reported as "sgemm peak (kernels' best shape)". The UNet
 * step's effective GFLOP/s is then given as a share of it: how far the model is from what the same kernel does on a
 * plain large product.
 *
 * The shapes: every dimension a whole number of the kernel's blocks (native/kernels.c: rows of 192 per block, so M a
 * multiple of 384 gives each of 2 threads whole blocks; K a multiple of KC = 256; N a multiple of 16 x 32 = 512
 * columns), so no block or micro-tile is partial, and big enough (>= 8 GFLOP each, 0.05-0.3 s) that the per-call
 * thread start-up is lost in the work; sized like SD's largest products (4096 tokens of a 64x64 latent by the
 * 1280-channel Linears, the GEGLU's 1280 -> 5120). Each is timed `reps` times after a warm-up and its best time kept
 * (the fastest run is the least disturbed); the peak is the best shape's rate, measured in every bench run rather
 * than fixed, since which shape wins differs between machines (and between runs on a busy one).
 */
import { kernelsProblem, linearHost, packWeight } from '../src/backend/kernels.js';

export interface GemmShape {
  readonly m: number;
  readonly k: number;
  readonly n: number;
}

/** The shapes timed (M x K x N). */
export const PEAK_SHAPES: readonly GemmShape[] = [
  { m: 4224, k: 1280, n: 5120 },
  { m: 4224, k: 2048, n: 2048 },
  { m: 8064, k: 768, n: 1536 },
  { m: 4224, k: 1280, n: 1536 },
  { m: 4224, k: 512, n: 2048 },
];

export interface SgemmPeak {
  /** The best shape's rate, 2 M K N FLOPs over its best time. */
  readonly gflops: number;
  readonly shape: GemmShape;
  /** The kernels' threads (SD_THREADS, else one per CPU: the bench's count on the tensorflow backend). */
  readonly threads: number;
  /** Every shape timed, with its rate. */
  readonly tried: readonly (GemmShape & { readonly gflops: number })[];
}

/** Cheap deterministic values in [-0.5, 0.5): the rate does not depend on them (no denormals, no zeros). */
function fill(n: number, seed: number): Float32Array {
  const a = new Float32Array(n);
  let s = seed >>> 0;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    a[i] = s / 2 ** 32 - 0.5;
  }
  return a;
}

/** The sgemm peak, or the reason it is not measured (the kernels are not in use on this backend or machine). */
export function measureSgemmPeak(threads: number, reps = 3, say: (s: string) => void = () => {}): SgemmPeak | string {
  const problem = kernelsProblem();
  if (problem !== null) return `n/a: the native kernels are not in use (${problem})`;
  const tried: (GemmShape & { gflops: number })[] = [];
  for (const shape of PEAK_SHAPES) {
    const { m, k, n } = shape;
    const w = packWeight(fill(k * n, 1), n, { kind: 'linear' }, null);
    const x = { data: fill(m * k, 2), shape: [m, k] };
    linearHost(x, w);
    let best = Infinity;
    for (let r = 0; r < reps; r++) {
      const t0 = performance.now();
      linearHost(x, w);
      best = Math.min(best, (performance.now() - t0) / 1000);
    }
    const gflops = (2 * m * k * n) / best / 1e9;
    tried.push({ ...shape, gflops });
    say(`sgemm peak: ${m}x${k}x${n} ${gflops.toFixed(1)} GFLOP/s (best of ${reps})`);
  }
  const top = tried.reduce((a, b) => (b.gflops > a.gflops ? b : a));
  return { gflops: top.gflops, shape: { m: top.m, k: top.k, n: top.n }, threads, tried };
}

/** "4224x1280x5120" (M x K x N). */
export function shapeName(s: GemmShape): string {
  return `${s.m}x${s.k}x${s.n}`;
}
