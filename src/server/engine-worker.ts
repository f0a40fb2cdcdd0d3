/**
 * WorkerEngine: the Engine of ./engine.ts run in a worker_threads worker (./engine-thread.ts), so that a step never
 * holds the server's event loop: /health, job reads and /progress answer in milliseconds while it generates.
 *
 * The worker owns the backend, the model and every tensor; this side posts the request (its bytes copied: the
 * server keeps a job's params for its record) and turns the worker's messages back into generate()'s promise and
 * callbacks, with the errors rebuilt as the same classes (ParamError, ImageError, AbortError: same HTTP statuses
 * as in process). The signal becomes an `abort` message (the worker stops between two steps), `stop` a `stop` one.
 *
 * A worker that dies (process.exit, an uncaught error, out of memory) fails the job it was running with
 * EngineWorkerStoppedError ("the engine worker stopped: ..."), and a new worker is started, reloading the model;
 * generations asked for meanwhile wait for it. Restarts back off (1 s doubling to 30 s) when it keeps dying.
 */
import { Worker } from 'node:worker_threads';
import { ImageError } from '../image/codec.js';
import { ParamError, type GenerateOptions, type GenerateParams, type GenerateResult } from '../pipeline/api.js';
import { AbortError } from '../pipeline/denoise.js';
import type { ParamLimits } from '../pipeline/params.js';
import type { Engine } from './engine.js';
import type { EngineSpec, FromWorker, ToWorker, WireError } from './engine-thread.js';

export type { EngineSpec } from './engine-thread.js';

/** The running job's worker died: the message says why; the job was not finished (the server answers 500). */
export class EngineWorkerStoppedError extends Error {
  override name = 'EngineWorkerStoppedError';
}

export interface WorkerEngineOptions {
  /** Where the worker's warnings (a prompt cut at 77 tokens, ...) and restarts go. */
  readonly log?: (level: 'info' | 'warn' | 'error', message: string) => void;
  /** Worker heap limit in MiB (tensors on the cpu/wasm backends live outside it); default: Node's. */
  readonly maxHeapMiB?: number;
}

interface Pending {
  readonly resolve: (r: GenerateResult) => void;
  readonly reject: (e: Error) => void;
  readonly o: GenerateOptions;
}

const RESTART_MS = { first: 1000, max: 30_000 };

/** The worker's entry: the compiled .js next to this file, or (running from the TypeScript sources) the .ts through tsx. */
function startWorker(spec: EngineSpec, maxHeapMiB: number | undefined): Worker {
  const here = import.meta.url;
  const resourceLimits = maxHeapMiB !== undefined ? { maxOldGenerationSizeMb: maxHeapMiB } : undefined;
  if (here.endsWith('.js')) return new Worker(new URL('./engine-thread.js', here), { workerData: spec, resourceLimits });
  const entry = new URL('./engine-thread.ts', here).href;
  const tsx = import.meta.resolve('tsx/esm/api');
  const boot = `import(${JSON.stringify(tsx)}).then((m) => { m.register(); return import(${JSON.stringify(entry)}); })`;
  return new Worker(boot, { eval: true, workerData: spec, resourceLimits });
}

export function rebuildError(w: WireError): Error {
  if (w.name === 'ParamError' && w.field !== undefined) {
    const prefix = `${w.field}: `;
    return new ParamError(w.field, w.message.startsWith(prefix) ? w.message.slice(prefix.length) : w.message);
  }
  if (w.name === 'ImageError') return new ImageError(w.message, w.field);
  if (w.name === 'AbortError') return new AbortError(w.message);
  const e = new Error(w.message);
  e.name = w.name;
  return e;
}

export class WorkerEngine implements Engine {
  private worker: Worker;
  private ready: Promise<void>;
  private limits_: ParamLimits | null = null;
  private backend_: string | null = null;
  private kernels_ = false;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private disposed = false;
  private restartMs = RESTART_MS.first;
  /** Tests only: the next generation's worker calls process.exit at this step. */
  readonly testHooks: { exitAtStep?: number } = {};

  private constructor(
    private readonly spec: EngineSpec,
    private readonly o: WorkerEngineOptions,
  ) {
    [this.worker, this.ready] = this.spawn();
  }

  /** Starts the worker and waits for its model: rejects with the load's error (the worker then ends). */
  static async start(spec: EngineSpec, o: WorkerEngineOptions = {}): Promise<WorkerEngine> {
    const engine = new WorkerEngine(spec, o);
    try {
      await engine.ready;
    } catch (e) {
      engine.dispose();
      throw e;
    }
    return engine;
  }

  get limits(): ParamLimits {
    if (this.limits_ === null) throw new Error('WorkerEngine: the model is not loaded yet');
    return this.limits_;
  }

  /** Whether the worker's layers run on the native kernels (src/backend/kernels.ts: tensorflow backend, built addon). */
  get kernels(): boolean {
    return this.kernels_;
  }

  /** The backend the worker chose ('tensorflow', 'wasm', 'cpu'). */
  get backend(): string | null {
    return this.backend_;
  }

  async generate(p: GenerateParams, o: GenerateOptions = {}): Promise<GenerateResult> {
    if (this.disposed) throw new Error('WorkerEngine.generate: the engine has been disposed');
    const aborted = (): boolean => o.signal?.aborted === true;
    if (aborted()) throw new AbortError();
    await this.ready;
    if (aborted()) throw new AbortError();
    const id = this.nextId++;
    const worker = this.worker;
    const exitAtStep = this.testHooks.exitAtStep;
    delete this.testHooks.exitAtStep;
    return new Promise<GenerateResult>((resolve, reject) => {
      const onAbort = (): void => this.post(worker, { type: 'abort', id });
      const onStop = (): void => this.post(worker, { type: 'stop', id });
      o.signal?.addEventListener('abort', onAbort, { once: true });
      o.stop?.addEventListener('abort', onStop, { once: true });
      const settle = (): void => {
        o.signal?.removeEventListener('abort', onAbort);
        o.stop?.removeEventListener('abort', onStop);
        this.pending.delete(id);
      };
      this.pending.set(id, {
        o,
        resolve: (r) => (settle(), resolve(r)),
        reject: (e) => (settle(), reject(e)),
      });
      this.post(worker, { type: 'generate', id, params: p, preview: o.preview ?? null, ...(exitAtStep !== undefined ? { exitAtStep } : {}) });
      if (o.stop?.aborted === true) onStop();
    });
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    this.failPending(new EngineWorkerStoppedError('the engine worker stopped: the engine was disposed'));
    void this.worker.terminate();
  }

  private post(worker: Worker, m: ToWorker): void {
    if (worker === this.worker) worker.postMessage(m);
  }

  /** A new worker and the promise of its model; its death fails what it was running and starts the next one. */
  private spawn(): [Worker, Promise<void>] {
    const worker = startWorker(this.spec, this.o.maxHeapMiB);
    let loaded = false;
    let lastError: string | null = null;
    const ready = new Promise<void>((resolve, reject) => {
      worker.on('message', (m: FromWorker) => {
        if (m.type === 'ready') {
          loaded = true;
          this.limits_ = m.limits;
          this.backend_ = m.backend;
          this.kernels_ = m.kernels;
          this.restartMs = RESTART_MS.first;
          this.o.log?.('info', `engine worker ready (${m.choice}${m.kernels ? ', native kernels' : ''})`);
          resolve();
        } else if (m.type === 'loadFailed') {
          reject(rebuildError(m.error));
        } else {
          this.onMessage(m);
        }
      });
      worker.on('error', (e) => {
        lastError = e.message;
        if (!loaded) reject(e);
      });
      worker.on('exit', (code) => {
        if (!loaded) reject(new EngineWorkerStoppedError(`the engine worker stopped while loading the model (exit code ${code})${lastError !== null ? `: ${lastError}` : ''}`));
        if (worker !== this.worker || this.disposed) return;
        const why = lastError ?? `exit code ${code}`;
        this.o.log?.('error', `the engine worker stopped (${why}); restarting it`);
        this.failPending(new EngineWorkerStoppedError(`the engine worker stopped (${why}); the job was not finished, the server restarts the worker: submit it again`));
        if (loaded) this.restart();
      });
    });
    ready.catch(() => {}); // read by generate() and start(); an unread rejection must not end the process
    return [worker, ready];
  }

  private restart(): void {
    const delay = this.restartMs;
    this.restartMs = Math.min(RESTART_MS.max, this.restartMs * 2);
    let go: () => void = () => {};
    const waited = new Promise<void>((resolve) => (go = resolve));
    this.ready = waited.then(() => {
      if (this.disposed) throw new EngineWorkerStoppedError('the engine worker stopped: the engine was disposed');
      const [worker, ready] = this.spawn();
      this.worker = worker;
      return ready;
    });
    this.ready.catch((e: unknown) => {
      this.o.log?.('error', `the engine worker could not be restarted: ${e instanceof Error ? e.message : String(e)}`);
    });
    // The first restart at once; one that keeps dying waits longer each time.
    setTimeout(go, delay === RESTART_MS.first ? 0 : delay).unref();
  }

  private onMessage(m: FromWorker): void {
    if (m.type === 'warn') return this.o.log?.('warn', m.message);
    if (m.type === 'ready' || m.type === 'loadFailed') return;
    const p = this.pending.get(m.id);
    if (p === undefined) return;
    switch (m.type) {
      case 'progress':
        return p.o.onProgress?.(m.step, m.total);
      case 'preview':
        return void p.o.onPreview?.(m.preview);
      case 'result': {
        const images = m.images.map((i) => ({ png: Buffer.from(i.png.buffer, i.png.byteOffset, i.png.byteLength), rgb: i.rgb, seed: i.seed }));
        return p.resolve({ images, params: m.params, ...(m.stoppedAt !== undefined ? { stoppedAt: m.stoppedAt } : {}) });
      }
      case 'error':
        return p.reject(rebuildError(m.error));
    }
  }

  private failPending(e: Error): void {
    for (const p of [...this.pending.values()]) p.reject(e);
  }
}
