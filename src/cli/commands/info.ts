/**
 * `sd info [--backend B] [--threads N] [--json]`: which TensorFlow.js backend this machine runs and how
 * (tfjs version, threads, wasm SIMD), and for each better backend not in use why, and the command that enables it.
 */
import { readFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import type { CommandModule } from 'yargs';
import { UsageError } from '../errors.js';
import { BACKENDS, initBackend, type BackendChoice, type BackendName } from '../../backend/select.js';
import { bf16Isa, bf16Problem, kernelsProblem, microKernel } from '../../backend/kernels.js';
import { NATIVE_PACKAGES, nativeStatus, packageProblem, type NativeStatus } from '../../backend/tfjs-node.js';
import * as tf from '../../backend/tf.js';
import { wasmSimdSupported, wasmStatus, type WasmStatus } from '../../backend/wasm.js';

interface Args {
  backend?: BackendName;
  threads?: number;
  json: boolean;
}

/** Everything `sd info` reports, gathered once the backend is up. */
export interface InfoFacts {
  readonly choice: BackendChoice;
  readonly tfjsVersion: string;
  readonly native: NativeStatus | null;
  readonly wasm: WasmStatus | null;
  readonly simd: boolean;
  readonly cpu: string;
  readonly cores: number;
  readonly node: string;
  /** Each backend better than the one in use: why it is not used, and what enables it. */
  readonly notUsed: readonly NotUsed[];
  /** Why the native kernels (src/backend/kernels.ts) are not in use, or null when they are. */
  readonly kernels: string | null;
  /** The kernels' micro-kernel ('avx2' | 'avx512') when they are in use. */
  readonly microKernel?: string;
  /** Why --precision bf16 cannot run here, or null when it can (undefined: the kernels are not in use). */
  readonly bf16?: string | null;
  /** The ISA the bf16 products run on where they can ('amx' | 'avx512bf16'). */
  readonly bf16Isa?: string | null;
}

export interface NotUsed {
  readonly name: BackendName;
  readonly why: string;
  readonly fix: string;
}

/** What enables each backend when it could not be used. */
export const ENABLE: Readonly<Record<BackendName, string>> = Object.freeze({
  tensorflow: 'sd setup-native   (with CUDA: sd setup-native --gpu)',
  wasm: 'npm ci   (@tensorflow/tfjs-backend-wasm is a regular dependency)',
  cpu: 'npm ci',
});

function cpuName(): string {
  try {
    const m = /^model name\s*:\s*(.+)$/m.exec(readFileSync('/proc/cpuinfo', 'utf8'));
    if (m !== null) return m[1].trim();
  } catch {
    // not Linux
  }
  return 'unknown CPU';
}

function backendLine(f: InfoFacts): string {
  const { name } = f.choice;
  if (name === 'tensorflow' && f.native !== null) {
    return `tensorflow (${f.native.package}, TensorFlow ${f.native.tfVersion}, ${f.native.gpu ? 'GPU' : 'CPU'})`;
  }
  if (name === 'wasm') return 'wasm (@tensorflow/tfjs-backend-wasm, XNNPACK)';
  return `${name}${name === 'cpu' ? ' (pure JavaScript: tiny models only)' : ''}`;
}

function threadsLine(f: InfoFacts): string {
  if (f.choice.name === 'tensorflow') return `TensorFlow's own thread pool (${f.cores} logical cores)`;
  if (f.choice.name === 'wasm') {
    const n = f.wasm?.threads ?? f.choice.threads ?? 1;
    const limit = f.wasm?.limitedBy != null ? ` (${f.wasm.limitedBy})` : '';
    return `${n} of ${f.cores} logical cores${limit}; --threads N or SD_THREADS=N to change`;
  }
  return '1 (the cpu backend runs on the main thread)';
}

/** The report, one "label  value" per line; better backends that were skipped come last with their fix. */
function microKernelLine(m: string | undefined): string {
  if (m === 'avx512') return 'AVX-512 12x32 micro-kernel; SD_KERNELS_ISA=avx2 for the AVX2 one';
  return m === 'avx2' ? 'AVX2 6x16 micro-kernel' : 'micro-kernel unknown';
}

const BF16_ISA_NAMES: Record<string, string> = { amx: 'AMX tiles', avx512bf16: 'AVX512-BF16 (VDPBF16PS)' };

export function infoLines(f: InfoFacts): string[] {
  const lines: [string, string][] = [
    ['backend', backendLine(f)],
    ['tfjs', `${f.tfjsVersion} (@tensorflow/tfjs-core)`],
    ['threads', threadsLine(f)],
    ['wasm SIMD', f.simd ? 'yes' : 'no (the wasm backend falls back to its slower scalar build)'],
    ['native kernels', f.kernels === null ? `in use (native/kernels.c: matrix products, convolutions with Winograd for most 3x3, attention, norms; ${microKernelLine(f.microKernel)})` : `not in use: ${f.kernels}`],
    ['machine', `${f.cpu}, ${f.cores} logical cores, Node ${f.node}`],
  ];
  if (f.bf16 !== undefined) lines.splice(5, 0, ['bf16', f.bf16 === null ? `available on ${BF16_ISA_NAMES[f.bf16Isa ?? ''] ?? f.bf16Isa}: --precision bf16 (opt-in; faster, a slightly different image)` : `not available: ${f.bf16}`]);
  for (const n of f.notUsed) lines.push([`not ${n.name}`, n.why], ['  enable with', n.fix]);
  if (f.notUsed.length === 0) lines.push(['better', 'none: this is the fastest backend the engine has']);
  const width = Math.max(...lines.map(([k]) => k.length)) + 2;
  return lines.map(([k, v]) => k.padEnd(width) + v);
}

/**
 * Better backends than `choice`: the reason initBackend recorded, or, when --backend / SD_BACKEND forced a backend
 * and the better ones were never tried, what can be told without loading them.
 */
function notUsed(choice: BackendChoice): NotUsed[] {
  const forced = 'available, but --backend / SD_BACKEND chose another';
  return BACKENDS.slice(0, BACKENDS.indexOf(choice.name)).map((name) => {
    const recorded = choice.skipped[name];
    if (recorded !== undefined) return { name, why: recorded, fix: ENABLE[name] };
    if (name === 'tensorflow') {
      const problems = NATIVE_PACKAGES.map(packageProblem);
      if (problems.every((p) => p !== null)) return { name, why: problems.join('; '), fix: ENABLE[name] };
    }
    return { name, why: forced, fix: `drop --backend / SD_BACKEND, or --backend ${name}` };
  });
}

export async function gatherInfo(args: { backend?: BackendName; threads?: number }): Promise<InfoFacts> {
  if (args.threads !== undefined && (!Number.isInteger(args.threads) || args.threads < 1)) {
    throw new UsageError(`--threads ${args.threads}: give a positive whole number`);
  }
  const choice = await initBackend({ backend: args.backend, threads: args.threads, log: null });
  return Object.freeze({
    choice,
    tfjsVersion: tf.version_core,
    native: nativeStatus(),
    wasm: wasmStatus(),
    simd: wasmSimdSupported(),
    cpu: cpuName(),
    cores: availableParallelism(),
    node: process.versions.node,
    notUsed: notUsed(choice),
    kernels: kernelsProblem(),
    microKernel: kernelsProblem() === null ? microKernel() : undefined,
    bf16: kernelsProblem() === null ? bf16Problem() : undefined,
    bf16Isa: kernelsProblem() === null ? bf16Isa() : undefined,
  });
}

export const infoCommand: CommandModule<object, Args> = {
  command: 'info',
  describe: 'show the TensorFlow.js backend in use, its version, threads and SIMD, and how to enable a faster one',
  builder: (y) =>
    y
      .option('backend', { choices: BACKENDS, describe: 'start this backend instead of the best available' })
      .option('threads', { type: 'number', describe: 'wasm threads (default: SD_THREADS, else one per core)' })
      .option('json', { type: 'boolean', default: false, describe: 'print the facts as JSON' }) as never,
  handler: async (args) => {
    const facts = await gatherInfo(args);
    process.stdout.write(args.json ? JSON.stringify(facts, null, 2) + '\n' : infoLines(facts).join('\n') + '\n');
  },
};
