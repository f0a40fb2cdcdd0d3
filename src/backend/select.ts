/**
 * Backend choice. The engine runs on whatever TensorFlow.js backend a machine has, best first:
 *   tensorflow  native libtensorflow through @tensorflow/tfjs-node(-gpu) (optional dependency)
 *   wasm        @tensorflow/tfjs-backend-wasm, SIMD, one thread per core in Node (see wasm.ts)
 *   cpu         @tensorflow/tfjs-backend-cpu, pure JS, tiny models only
 * `--backend` / SD_BACKEND force one; the choice and why better ones were skipped are logged once.
 */
import * as tf from './tf.js';
import { guardWasmHeap } from './heap.js';
import { bf16Isa, PRECISIONS, setPrecision, type Precision } from './kernels.js';

export const BACKENDS = ['tensorflow', 'wasm', 'cpu'] as const;
export type BackendName = (typeof BACKENDS)[number];

export interface BackendOptions {
  /** Force a backend; default: SD_BACKEND, else the best that loads. */
  readonly backend?: BackendName;
  /** wasm threads; default: SD_THREADS, else one per core. */
  readonly threads?: number;
  /** Where the one-line choice is logged; default stderr. Pass null to stay silent. */
  readonly log?: ((line: string) => void) | null;
  /**
   * The native kernels' product precision (kernels.ts, Precision); default: SD_PRECISION, else float32. `bf16` is
   * an opt-in for CPUs with AMX-BF16 or AVX512-BF16, on the tensorflow backend: a BackendError elsewhere. Set before models load.
   */
  readonly precision?: Precision;
}

export interface BackendChoice {
  readonly name: BackendName;
  readonly threads: number | null;
  /** For each better backend not in use: why. */
  readonly skipped: Readonly<Record<string, string>>;
}

export class BackendError extends Error {
  override name = 'BackendError';
}

let chosen: BackendChoice | null = null;

export function isBackendName(s: string): s is BackendName {
  return (BACKENDS as readonly string[]).includes(s);
}

function fromEnv(): BackendName | undefined {
  const env = process.env.SD_BACKEND;
  if (env === undefined || env === '') return undefined;
  if (!isBackendName(env)) throw new BackendError(`SD_BACKEND=${env} is not a backend: use one of ${BACKENDS.join(', ')}`);
  return env;
}

function precisionFromEnv(): Precision | undefined {
  const env = process.env.SD_PRECISION;
  if (env === undefined || env === '') return undefined;
  if (!(PRECISIONS as readonly string[]).includes(env)) throw new BackendError(`SD_PRECISION=${env} is not a precision: use one of ${PRECISIONS.join(', ')}`);
  return env as Precision;
}

/** Sets the kernels' precision for the backend in use; bf16 only on tensorflow with the kernels and a bf16 ISA. */
function applyPrecision(p: Precision, backend: BackendName): void {
  if (p === 'bf16' && backend !== 'tensorflow') {
    throw new BackendError(`--precision bf16 runs in the tensorflow backend's native kernels; the backend in use is ${backend}`);
  }
  try {
    setPrecision(p);
  } catch (e) {
    throw new BackendError(e instanceof Error ? e.message : String(e));
  }
}

function threadsFromEnv(): number | undefined {
  const env = process.env.SD_THREADS;
  if (env === undefined || env === '') return undefined;
  const n = Number(env);
  if (!Number.isInteger(n) || n < 1) throw new BackendError(`SD_THREADS=${env} must be a positive integer`);
  return n;
}

/** Try to register one backend; returns null on success, else the reason it is unavailable. */
async function load(name: BackendName, threads: number | undefined): Promise<string | null> {
  try {
    if (name === 'tensorflow') {
      const { loadNative } = await import('./tfjs-node.js');
      const why = await loadNative();
      if (why !== null) return why;
    } else if (name === 'wasm') {
      const { loadWasm } = await import('./wasm.js');
      await loadWasm(threads);
    } else {
      // IS_TEST silences the cpu backend's console banner advertising tfjs-node; the choice is logged here instead.
      tf.env().set('IS_TEST', true);
      await import('@tensorflow/tfjs-backend-cpu');
    }
    const ok = await tf.setBackend(name);
    if (!ok) return `${name} failed to initialise`;
    await tf.ready();
    if (name === 'wasm') {
      guardWasmHeap();
      const { registerWasmKernels } = await import('./wasm-kernels.js');
      registerWasmKernels();
    }
    return null;
  } catch (e) {
    return e instanceof Error ? e.message : String(e);
  }
}

/** Pick and initialise the backend once per process; later calls return the first choice. */
export async function initBackend(opts: BackendOptions = {}): Promise<BackendChoice> {
  const want = opts.backend ?? fromEnv();
  const threads = opts.threads ?? threadsFromEnv();
  const precision = opts.precision ?? precisionFromEnv();
  if (chosen !== null) {
    if (want !== undefined && want !== chosen.name) {
      throw new BackendError(`backend ${chosen.name} is already in use; cannot switch to ${want} in the same process`);
    }
    if (precision !== undefined) applyPrecision(precision, chosen.name);
    return chosen;
  }
  const skipped: Record<string, string> = {};
  const order: readonly BackendName[] = want !== undefined ? [want] : BACKENDS;
  for (const name of order) {
    const why = await load(name, threads);
    if (why === null) {
      if (precision !== undefined) applyPrecision(precision, name);
      chosen = Object.freeze({ name, threads: name === 'wasm' ? await wasmThreads() : null, skipped });
      const log = opts.log === undefined ? (l: string) => process.stderr.write(l + '\n') : opts.log;
      log?.(describeChoice(chosen) + (precision === 'bf16' ? `, precision bf16 (${bf16Isa()})` : ''));
      return chosen;
    }
    skipped[name] = why;
  }
  const reasons = Object.entries(skipped).map(([n, w]) => `${n}: ${w}`).join('; ');
  throw new BackendError(`no TensorFlow.js backend could be started (${reasons})`);
}

async function wasmThreads(): Promise<number> {
  const { wasmStatus } = await import('./wasm.js');
  return wasmStatus()?.threads ?? 1;
}

export function describeChoice(c: BackendChoice): string {
  const threads = c.threads !== null ? `, ${c.threads} thread${c.threads === 1 ? '' : 's'}` : '';
  const why = Object.entries(c.skipped).map(([n, w]) => `${n} skipped: ${w}`);
  return `backend: ${c.name}${threads}${why.length > 0 ? ` (${why.join('; ')})` : ''}`;
}

/** The choice made by initBackend, or null before it ran. */
export function currentBackend(): BackendChoice | null {
  return chosen;
}
