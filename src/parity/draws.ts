/**
 * The random draws of a fixture case as generate() makes them: TorchGenerator(seed) through torchNoise, each draw
 * checked against the tensor the case lists for it (NCHW in io.safetensors), in order. A draw that differs, one
 * the case does not list, and (with `allListed`) a listed one never drawn become the case's problems.
 */
import * as tf from '../backend/tf.js';
import { TorchGenerator, torchNoise, type NoiseFn } from '../scheduler/index.js';
import type { TensorSource } from '../weights/types.js';
import { maxRelError } from './compare.js';

/** torch.randn and ours agree to float32 rounding of the Box-Muller transform. */
export const NOISE_TOLERANCE = 1e-6;

function nchw(x: tf.Tensor4D): Float32Array {
  return tf.tidy(() => tf.transpose(x, [0, 3, 1, 2])).dataSync() as Float32Array;
}

export function checkedTorchDraws(
  io: TensorSource,
  seed: number,
  listed: readonly string[],
  { allListed = false }: { allListed?: boolean } = {},
): { noise: NoiseFn; problems: () => string | undefined } {
  const problems: string[] = [];
  const draw = torchNoise(new TorchGenerator(seed));
  let n = 0;
  const noise: NoiseFn = (shape) => {
    const t = draw(shape) as tf.Tensor4D;
    const key = listed[n++];
    if (key === undefined) problems.push(`draw ${n - 1} has no listed noise`);
    else {
      const err = maxRelError(nchw(t), io.float32(key));
      if (err > NOISE_TOLERANCE) problems.push(`TorchGenerator(${seed}) draw ${n - 1} differs from ${key} (rel err ${err.toExponential(2)})`);
    }
    return t;
  };
  const all = () => (allListed && n !== listed.length ? [...problems, `${n} draws, the case lists ${listed.length}`] : problems);
  return { noise, problems: () => (all().length > 0 ? all().join('; ') : undefined) };
}
