/**
 * Full-size checkpoints of random weights, for measuring memory and speed where real weights cannot be had.
 * Same key names and shapes as a real SD 1.x checkpoint (the models' expectedShapes), values chosen so that
 * activations stay in a sane range through the whole network: normalisation weights 1 (every 1-D `.weight`: only
 * norms have one, whatever their key is called, e.g. a ResBlock's `in_layers.0` or a Resampler's `layers.0.1.0`)
 * and biases 0, other weights N(0, 1/fan_in) (fan_in = product of all dims but the first), so each layer roughly keeps its
 * input's scale. Deterministic for a seed.
 */
import { encodeFloat16 } from './dtypes.js';
import { writeSafetensors } from './safetensors.js';
import type { TensorInfo } from './types.js';

function fillNormal(out: Float32Array, std: number, seed: number): void {
  // mulberry32, seeded per tensor from its key, and Box-Muller: fast enough for 1e9 values.
  let a = seed >>> 0;
  const u = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  for (let i = 0; i < out.length; i += 2) {
    const r = Math.sqrt(-2 * Math.log(1 - u())) * std;
    const th = 2 * Math.PI * u();
    out[i] = r * Math.cos(th);
    if (i + 1 < out.length) out[i + 1] = r * Math.sin(th);
  }
}

function hashKey(key: string, seed: number): number {
  let h = 2166136261 ^ seed;
  for (let i = 0; i < key.length; i++) h = Math.imul(h ^ key.charCodeAt(i), 16777619);
  return h >>> 0;
}

/** The value of one random tensor, from its name and shape. */
export function randomTensor(key: string, shape: readonly number[], seed = 0): Float32Array {
  const n = shape.reduce((a, d) => a * d, 1);
  const out = new Float32Array(n);
  const isNorm = shape.length === 1 && (/norm|ln_|layer_norm/.test(key) || key.endsWith('.weight'));
  if (isNorm) {
    if (key.endsWith('.weight')) out.fill(1);
    return out;
  }
  if (key.endsWith('.bias')) return out;
  const fanIn = shape.length > 1 ? n / shape[0] : shape[0];
  // Embedding tables are looked up, not multiplied: give them unit-ish scale.
  const std = /embedding/.test(key) ? 0.02 : 1 / Math.sqrt(fanIn);
  fillNormal(out, std, hashKey(key, seed));
  return out;
}

/** Write every key of `shapes` as random weights, fp32 or fp16, one tensor in memory at a time. */
export function writeRandomCheckpoint(
  path: string,
  shapes: ReadonlyMap<string, readonly number[]>,
  opts: { half?: boolean; seed?: number; onTensor?: (done: number, total: number) => void } = {},
): void {
  const dtype = opts.half === true ? 'F16' : 'F32';
  const infos: [string, TensorInfo][] = [...shapes].map(([k, shape]) => [k, { dtype, shape }]);
  let done = 0;
  writeSafetensors(
    path,
    infos,
    (key) => {
      const values = randomTensor(key, shapes.get(key) ?? [], opts.seed ?? 0);
      opts.onTensor?.(++done, infos.length);
      return dtype === 'F16' ? encodeFloat16(values) : values;
    },
    { format: 'pt', generator: 'sd-tfjs random-weights (not a trained model)' },
  );
}
