/**
 * The native `tensorflow` backend: @tensorflow/tfjs-node-gpu if it is installed and loads, else @tensorflow/tfjs-node.
 * Both are optional dependencies whose own install downloads libtensorflow; `sd setup-native` provides it instead
 * (src/setup/native.ts). Importing either registers the 'tensorflow' backend on the one top-level
 * @tensorflow/tfjs-core instance that ./tf.ts re-exports, and makes it current.
 * TensorFlow's C++ INFO/WARNING lines (oneDNN, CPU feature banner) are silenced unless TF_CPP_MIN_LOG_LEVEL is set.
 */
import { existsSync, readdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import * as tf from './tf.js';

const require = createRequire(import.meta.url);
export const NATIVE_PACKAGES = ['@tensorflow/tfjs-node-gpu', '@tensorflow/tfjs-node'] as const;
export type NativePackageName = (typeof NATIVE_PACKAGES)[number];

export interface NativeStatus {
  readonly package: NativePackageName;
  readonly tfVersion: string;
  readonly gpu: boolean;
}

let status: NativeStatus | null = null;

/** Which package runs the 'tensorflow' backend, once loadNative succeeded. */
export function nativeStatus(): NativeStatus | null {
  return status;
}

/** The installed package folder, or null. */
function packageDir(pkg: NativePackageName): string | null {
  try {
    return dirname(require.resolve(`${pkg}/package.json`));
  } catch {
    return null;
  }
}

/** Built binding present (lib/napi-v*\/tfjs_binding.node, where node-pre-gyp puts it). */
function hasBinding(dir: string): boolean {
  const lib = join(dir, 'lib');
  if (!existsSync(lib)) return false;
  return readdirSync(lib).some((d) => existsSync(join(lib, d, 'tfjs_binding.node')));
}

/** Why `pkg` cannot be used, without loading it; null when it looks ready. */
export function packageProblem(pkg: NativePackageName): string | null {
  const dir = packageDir(pkg);
  if (dir === null) return `${pkg} is not installed (npm drops it when its libtensorflow download fails)`;
  if (!existsSync(join(dir, 'deps', 'lib', 'libtensorflow.so'))) return `${pkg} has no libtensorflow in deps/lib`;
  if (!hasBinding(dir)) return `${pkg}'s binding is not built`;
  return null;
}

/** A package that threw half-way has registered its kernels; drop them so the next one registers cleanly. */
function forgetKernels(): void {
  for (const k of tf.getKernelsForBackend('tensorflow')) tf.unregisterKernel(k.kernelName, 'tensorflow');
  if (tf.findBackendFactory('tensorflow') !== null) tf.removeBackend('tensorflow');
}

function firstLine(e: unknown): string {
  return (e instanceof Error ? e.message : String(e)).split('\n')[0];
}

/** Load the best native package; null on success, else why none loads and what to run. */
export async function loadNative(): Promise<string | null> {
  process.env.TF_CPP_MIN_LOG_LEVEL ??= '2';
  const reasons: string[] = [];
  for (const pkg of NATIVE_PACKAGES) {
    const problem = packageProblem(pkg);
    if (problem !== null) {
      reasons.push(problem);
      continue;
    }
    try {
      await import(pkg);
      const b = tf.findBackend('tensorflow') as unknown as { binding?: { TF_Version?: string }; isUsingGpuDevice?: boolean } | null;
      status = Object.freeze({ package: pkg, tfVersion: b?.binding?.TF_Version ?? 'unknown', gpu: b?.isUsingGpuDevice === true });
      return null;
    } catch (e) {
      reasons.push(`${pkg}: ${firstLine(e)}`);
      forgetKernels();
    }
  }
  return `libtensorflow not found; run \`sd setup-native\` (${reasons.join('; ')})`;
}
