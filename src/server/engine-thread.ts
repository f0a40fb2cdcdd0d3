/**
 * The engine worker's side (a worker_threads entry; ./engine-worker.ts starts it and speaks for it to the server):
 * it picks the backend as the main process would (src/backend/select.ts: the option, else SD_BACKEND, else the best
 * available), loads the model, and then runs one message at a time. It owns every tensor; only plain data and bytes
 * cross the thread boundary (params in, progress, previews and PNG bytes out), so the server's event loop never waits
 * for a step.
 *
 *   main -> worker   generate {id, params, preview, exitAtStep?}   abort {id}   stop {id}
 *   worker -> main   ready {limits, backend}   progress {id, step, total}   preview {id, ...StepPreview}
 *                    result {id, images, params, stoppedAt?}   error {id, error}   warn {message}   loadFailed {error}
 *
 * Errors travel as {name, message, field?} and are rebuilt as the same classes on the other side (ParamError,
 * ImageError, AbortError), so the server maps them to the same statuses as in process.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { describeChoice, initBackend, type BackendName } from '../backend/select.js';
import { useKernels, type Precision } from '../backend/kernels.js';
import { ImageError } from '../image/codec.js';
import { ParamError, type GenerateParams, type PreviewOptions, type ResolvedParams, type StepPreview } from '../pipeline/api.js';
import type { ParamLimits } from '../pipeline/params.js';
import { StableDiffusion, readPipelineConfig } from '../pipeline/pipeline.js';
import type { AnyPipelineConfig } from '../pipeline/config.js';

/** What the worker loads: StableDiffusion.load's options, as data. */
export interface EngineSpec {
  readonly weights: string;
  /** A config object, or the path of a --config file. */
  readonly config?: AnyPipelineConfig | string;
  readonly tokenizer?: string;
  readonly backend?: BackendName;
  /** tfjs threads (wasm), as initBackend takes them. */
  readonly threads?: number;
  /** The native kernels' product precision, as initBackend takes it. */
  readonly precision?: Precision;
}

export interface WireError {
  readonly name: string;
  readonly message: string;
  readonly field?: string;
}

export interface WireImage {
  readonly png: Uint8Array;
  readonly rgb: Uint8Array;
  readonly seed: number;
}

export type ToWorker =
  | { readonly type: 'generate'; readonly id: number; readonly params: GenerateParams; readonly preview: PreviewOptions | null; readonly exitAtStep?: number }
  | { readonly type: 'abort' | 'stop'; readonly id: number };

export type FromWorker =
  | { readonly type: 'ready'; readonly limits: ParamLimits; readonly backend: string; readonly choice: string; readonly kernels: boolean }
  | { readonly type: 'loadFailed'; readonly error: WireError }
  | { readonly type: 'progress'; readonly id: number; readonly step: number; readonly total: number }
  | { readonly type: 'preview'; readonly id: number; readonly preview: StepPreview }
  | { readonly type: 'result'; readonly id: number; readonly images: readonly WireImage[]; readonly params: ResolvedParams; readonly stoppedAt?: number }
  | { readonly type: 'error'; readonly id: number; readonly error: WireError }
  | { readonly type: 'warn'; readonly message: string };

export function toWire(e: unknown): WireError {
  if (e instanceof ParamError) return { name: e.name, message: e.message, field: e.field };
  if (e instanceof ImageError) return { name: e.name, message: e.message, ...(e.field !== undefined ? { field: e.field } : {}) };
  if (e instanceof Error) return { name: e.name, message: e.message };
  return { name: 'Error', message: String(e) };
}

interface Running {
  readonly abort: AbortController;
  readonly stop: AbortController;
}

async function main(): Promise<void> {
  const port = parentPort;
  if (port === null) throw new Error('engine-thread.ts runs as a worker thread (see engine-worker.ts)');
  const post = (m: FromWorker, transfer: ArrayBuffer[] = []): void => port.postMessage(m, transfer);
  const spec = workerData as EngineSpec;
  let sd: StableDiffusion;
  let choice: string;
  try {
    const chosen = await initBackend({ backend: spec.backend, threads: spec.threads, precision: spec.precision, log: null });
    choice = describeChoice(chosen);
    const config = typeof spec.config === 'string' ? readPipelineConfig(spec.config) : spec.config;
    sd = await StableDiffusion.load({ weights: spec.weights, config, tokenizer: spec.tokenizer, warn: (message) => post({ type: 'warn', message }) });
    post({ type: 'ready', limits: sd.limits, backend: chosen.name, choice, kernels: useKernels() });
  } catch (e) {
    post({ type: 'loadFailed', error: toWire(e) });
    return;
  }
  const running = new Map<number, Running>();
  // One generation at a time: the server's queue already serialises them; a second message waits its turn here.
  let chain: Promise<void> = Promise.resolve();
  port.on('message', (m: ToWorker) => {
    if (m.type !== 'generate') {
      const r = running.get(m.id);
      (m.type === 'abort' ? r?.abort : r?.stop)?.abort();
      return;
    }
    const r: Running = { abort: new AbortController(), stop: new AbortController() };
    running.set(m.id, r);
    chain = chain.then(() => generate(sd, m, r, post)).finally(() => running.delete(m.id));
  });
}

async function generate(sd: StableDiffusion, m: Extract<ToWorker, { type: 'generate' }>, r: Running, post: (m: FromWorker, t?: ArrayBuffer[]) => void): Promise<void> {
  const { id } = m;
  try {
    const result = await sd.generate(m.params, {
      signal: r.abort.signal,
      stop: r.stop.signal,
      onProgress: (step, total) => {
        if (m.exitAtStep !== undefined && step >= m.exitAtStep) process.exit(3); // tests: a worker dying mid-job
        post({ type: 'progress', id, step, total });
      },
      ...(m.preview !== null ? { preview: m.preview, onPreview: (p: StepPreview) => post({ type: 'preview', id, preview: p }, [p.rgb.buffer as ArrayBuffer]) } : {}),
    });
    const images = result.images.map((i) => ({ png: new Uint8Array(i.png), rgb: i.rgb, seed: i.seed })); // png copied: sharp's may share a pool
    const transfer = images.flatMap((i) => [i.png.buffer as ArrayBuffer, i.rgb.buffer as ArrayBuffer]);
    post({ type: 'result', id, images, params: result.params, ...(result.stoppedAt !== undefined ? { stoppedAt: result.stoppedAt } : {}) }, transfer);
  } catch (e) {
    post({ type: 'error', id, error: toWire(e) });
  }
}

await main();
