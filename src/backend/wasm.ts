/**
 * The wasm backend in Node, on every core.
 *
 * @tensorflow/tfjs-backend-wasm 4.22 runs one thread in Node, for three reasons (BACKENDS.md): its flag
 * WASM_HAS_MULTITHREAD_SUPPORT is false under IS_NODE; its threaded build starts pthread workers from blob: URLs,
 * which Node's Worker refuses; and its C++ side caps the thread pool at emscripten_num_logical_cores() / 2.
 * Nothing on disk is patched and no Node flag is needed. Instead this module registers its own factory for the
 * 'wasm' backend that
 *   1. loads the threaded SIMD emscripten module (wasm-out/tfjs-backend-wasm-threaded-simd.js) with a locateFile
 *      that points the pthread workers at a real file, written once into the cache from the package's worker source;
 *   2. wraps the module's `emscripten_num_logical_cores` import when instantiating it, so the cap is not below n;
 *   3. allocates n - 1 pthread workers before start-up (the glue pre-spawns 8; more would deadlock the blocked main
 *      thread), terminates the spare ones afterwards and unref()s the running ones so the process exits by itself.
 * Threads: the `threads` argument (--threads / SD_THREADS, read by backend.ts), else os.availableParallelism().
 * One thread uses the package's own single-threaded SIMD build, and so does a threaded start that fails (reported
 * on stderr and in wasmStatus().limitedBy). Outputs are bit-identical across thread counts (tests/backend-wasm).
 */
import { createHash } from 'node:crypto';
import { mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { availableParallelism, homedir, tmpdir } from 'node:os';
import { join } from 'node:path';
import { BackendWasm, setThreadsCount, getThreadsCount, version_wasm } from '@tensorflow/tfjs-backend-wasm';
import * as tf from './tf.js';

const require = createRequire(import.meta.url);
const WASM_PRIORITY = 2; // the package's own priority for 'wasm'
const PKG = '@tensorflow/tfjs-backend-wasm';

export interface WasmStatus {
  readonly threads: number;
  readonly simd: boolean;
  /** Why fewer threads than asked for are in use (no SIMD, no shared memory, a failed start), else null. */
  readonly limitedBy: string | null;
}

interface NodeWorker {
  unref(): void;
  terminate(): unknown;
}

/** The parts of the emscripten module this file touches (the package's typings omit them). */
interface ThreadedModule {
  cwrap(name: string, ret: string | null, args: readonly string[]): (...a: number[]) => number;
  PThread: { unusedWorkers: NodeWorker[]; runningWorkers: NodeWorker[]; allocateUnusedWorker(): void };
  tfjs?: Record<string, (...a: number[]) => number>;
}

type Receive = (instance: WebAssembly.Instance, module: WebAssembly.Module) => void;

interface FactoryConfig {
  locateFile(path: string, prefix: string): string;
  instantiateWasm(imports: WebAssembly.Imports, receive: Receive): object;
  onAbort(what: unknown): void;
  PThread?: ThreadedModule['PThread'];
}

let status: WasmStatus | null = null;

/** Threads and SIMD of the wasm backend once loadWasm ran, else null. */
export function wasmStatus(): WasmStatus | null {
  return status;
}

/** WebAssembly SIMD in this Node (the module tfjs-backend-wasm's WASM_HAS_SIMD_SUPPORT flag validates). */
export function wasmSimdSupported(): boolean {
  try {
    return WebAssembly.validate(new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0, 1, 4, 1, 96, 0, 0, 3, 2, 1, 0, 10, 9, 1, 7, 0, 65, 0, 253, 15, 26, 11]));
  } catch {
    return false;
  }
}

export function defaultThreads(): number {
  return availableParallelism();
}

/** Register the 'wasm' backend with `threads` threads (default one per core); tf.setBackend('wasm') starts it. */
export async function loadWasm(threads: number | undefined): Promise<void> {
  await import(PKG); // registers the kernels and the package's single-threaded factory
  const want = threads ?? defaultThreads();
  const simd = await tf.env().getAsync('WASM_HAS_SIMD_SUPPORT') === true;
  const limitedBy = !simd ? 'this Node has no wasm SIMD' : !sharedMemory() ? 'this Node has no shared wasm memory' : null;
  if (want <= 1 || limitedBy !== null) {
    status = Object.freeze({ threads: 1, simd, limitedBy: want > 1 ? limitedBy : null });
    return;
  }
  const stock = tf.findBackendFactory('wasm');
  tf.removeBackend('wasm');
  tf.registerBackend('wasm', async () => {
    try {
      return await createBackend(want);
    } catch (e) {
      // a threaded start that fails (workers refused, a sandbox without threads) falls back to the stock build
      const why = e instanceof Error ? e.message : String(e);
      process.stderr.write(`wasm: starting ${want} threads failed (${why}); using 1 thread\n`);
      status = Object.freeze({ threads: 1, simd, limitedBy: `the threaded start failed: ${why}` });
      tf.env().set('WASM_HAS_MULTITHREAD_SUPPORT', false); // else the stock init picks its blob-worker threaded build
      if (stock === null) throw e;
      return stock();
    }
  }, WASM_PRIORITY);
  status = Object.freeze({ threads: want, simd, limitedBy: null });
}

function sharedMemory(): boolean {
  try {
    return new WebAssembly.Memory({ initial: 1, maximum: 1, shared: true }).buffer instanceof SharedArrayBuffer;
  } catch {
    return false;
  }
}

async function createBackend(threads: number): Promise<BackendWasm> {
  const module = await instantiateThreaded(threads);
  const cw = (name: string, ret: string | null, args: string[] = []) => module.cwrap(name, ret, args);
  module.tfjs = {
    init: cw('init', null),
    initWithThreadsCount: cw('init_with_threads_count', null, ['number']),
    getThreadsCount: cw('get_threads_count', 'number'),
    registerTensor: cw('register_tensor', null, ['number', 'number', 'number']),
    disposeData: cw('dispose_data', null, ['number']),
    dispose: cw('dispose', null),
  };
  setThreadsCount(threads);
  const backend = new BackendWasm(module as unknown as ConstructorParameters<typeof BackendWasm>[0]);
  settleWorkers(module);
  tf.env().set('WASM_HAS_MULTITHREAD_SUPPORT', true); // what the package's flag would say if it knew Node
  const got = getThreadsCount();
  if (got !== threads) process.stderr.write(`wasm: asked for ${threads} threads, the backend started ${got}\n`);
  status = Object.freeze({ threads: got, simd: true, limitedBy: null });
  return backend;
}

/** Spare pool workers are terminated; pthreadpool's running workers no longer keep the process alive. */
function settleWorkers(module: ThreadedModule): void {
  for (const w of module.PThread.unusedWorkers.splice(0)) void w.terminate();
  for (const w of module.PThread.runningWorkers) w.unref();
}

/** Longest wait for the module and its workers to start (seconds on a busy machine; a broken worker never answers). */
const START_TIMEOUT_MS = 120_000;

async function instantiateThreaded(threads: number): Promise<ThreadedModule> {
  const factoryPath = require.resolve(`${PKG}/wasm-out/tfjs-backend-wasm-threaded-simd.js`);
  const wasmPath = require.resolve(`${PKG}/wasm-out/tfjs-backend-wasm-threaded-simd.wasm`);
  const workerPath = workerFile();
  let fail: (e: unknown) => void = () => undefined;
  const failed = new Promise<never>((_, reject) => (fail = reject));
  const config: FactoryConfig = {
    locateFile: (path, prefix) => (path.endsWith('.worker.js') ? workerPath : path.endsWith('.wasm') ? wasmPath : prefix + path),
    instantiateWasm: (imports, receive) => {
      liftThreadCap(imports, threads);
      readFile(wasmPath)
        .then((bytes) => WebAssembly.instantiate(bytes, imports))
        .then(({ instance, module }) => {
          // config is the emscripten Module: PThread is on it once the factory body has run
          for (let n = config.PThread?.unusedWorkers.length ?? 0; n < threads - 1; n++) config.PThread?.allocateUnusedWorker();
          receive(instance, module);
        })
        .catch(fail);
      return {};
    },
    onAbort: (what) => fail(new Error(`the threaded module aborted: ${String(what)}`)),
  };
  const timer = setTimeout(() => fail(new Error(`its workers did not start within ${START_TIMEOUT_MS / 1000} s`)), START_TIMEOUT_MS);
  try {
    const factory = require(factoryPath) as (c: FactoryConfig) => Promise<ThreadedModule>;
    return await Promise.race([factory(config), failed]);
  } catch (e) {
    for (const w of [...(config.PThread?.unusedWorkers ?? []), ...(config.PThread?.runningWorkers ?? [])]) void w.terminate();
    throw e;
  } finally {
    clearTimeout(timer);
  }
}

/** tfjs's C++ init takes min(n, cores / 2) threads; report at least 2n cores so n is honoured. */
function liftThreadCap(imports: WebAssembly.Imports, threads: number): void {
  const env = imports.env as Record<string, unknown>;
  const cores = env.emscripten_num_logical_cores;
  if (typeof cores !== 'function') throw new Error(`${PKG} ${version_wasm}: emscripten_num_logical_cores import not found`);
  env.emscripten_num_logical_cores = () => Math.max(Number(cores()), 2 * threads);
}

/**
 * The pthread worker script as a real file. The package ships it as a JS string (wasm-out/*.worker.js exports
 * `wasmWorkerContents`, whose "\n" escapes its template literal turned into newlines: put back as the package's
 * own init does). Content-addressed, written atomically, re-checked on every start.
 */
function workerFile(): string {
  const { wasmWorkerContents } = require(`${PKG}/wasm-out/tfjs-backend-wasm-threaded-simd.worker.js`) as { wasmWorkerContents: string };
  const source = wasmWorkerContents.replace(/\n/g, '\\n');
  const hash = createHash('sha256').update(source).digest('hex').slice(0, 16);
  const name = `tfjs-backend-wasm-${version_wasm}-threaded-simd-${hash}.worker.cjs`;
  let lastError: unknown = null;
  for (const dir of [join(cacheRoot(), 'wasm'), join(tmpdir(), `sd-tfjs-${process.getuid?.() ?? 'user'}`)]) {
    const file = join(dir, name);
    try {
      if (readFileSync(file, 'utf8') === source) return file;
    } catch {
      // absent: written below
    }
    try {
      mkdirSync(dir, { recursive: true, mode: 0o700 });
      const tmp = `${file}.${process.pid}.tmp`;
      writeFileSync(tmp, source, { mode: 0o600 });
      renameSync(tmp, file);
      return file;
    } catch (e) {
      lastError = e;
    }
  }
  throw new Error(`cannot write the wasm worker script to the cache (${lastError instanceof Error ? lastError.message : String(lastError)}); set SD_CACHE_DIR to a writable folder`);
}

/** SD_CACHE_DIR, else $XDG_CACHE_HOME/sd-tfjs, else ~/.cache/sd-tfjs. */
export function cacheRoot(): string {
  const env = process.env.SD_CACHE_DIR;
  if (env !== undefined && env !== '') return env;
  return join(process.env.XDG_CACHE_HOME || join(homedir(), '.cache'), 'sd-tfjs');
}
