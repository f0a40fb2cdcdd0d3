/**
 * Child process for tests/backend-*.test.ts: starts one backend (argv[2], threads argv[3]) and runs a small
 * conv2d -> matMul -> softmax chain on fixed inputs, printing one JSON line: backend, threads, output as base64
 * float32 bytes. It never calls process.exit: the parent checks that it ends by itself.
 */
import { initBackend, isBackendName } from '../src/backend/select.js';
import * as tf from '../src/backend/tf.js';

/** Deterministic values in [-1, 1) that do not depend on any backend's random generator. */
function fixed(shape: number[], seed: number): tf.Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  const v = new Float32Array(n);
  for (let i = 0; i < n; i++) v[i] = Math.sin(seed * 12.9898 + i * 78.233) % 1;
  return tf.tensor(v, shape);
}

// [1,32,32,32] conv 3x3 32->64 -> [1024, 64] x [64, 64] -> softmax over the last axis
function chain(): tf.Tensor2D {
  return tf.tidy(() => {
    const x = fixed([1, 32, 32, 32], 1) as tf.Tensor4D;
    const w = fixed([3, 3, 32, 64], 2) as tf.Tensor4D;
    const y = tf.conv2d(x, w, 1, 'same');
    const m = tf.matMul(tf.reshape(y, [1024, 64]), fixed([64, 64], 3) as tf.Tensor2D);
    return tf.softmax(tf.mul(m, 0.05)) as tf.Tensor2D;
  });
}

/**
 * Slices of every kind (contiguous, strided, inner-axis, empty, rank 1-5, int32) flattened one after another:
 * wasm replaces tfjs's Slice kernel (src/backend/wasm-kernels.ts), and its output must equal the cpu backend's.
 */
function slices(): tf.Tensor1D {
  return tf.tidy(() => {
    const x4 = fixed([3, 5, 7, 4], 4);
    const parts = [
      tf.slice(x4, [1, 0, 0, 0], [1, 5, 7, 4]),
      tf.slice(x4, [0, 2, 0, 0], [3, 2, 7, 4]),
      tf.slice(x4, [1, 1, 3, 1], [2, 3, 4, 2]),
      tf.slice(x4, [2, 4, 6, 3], [1, 1, 1, 1]),
      tf.slice(x4, [0, 0, 0, 0], [3, 0, 7, 4]),
      tf.slice(fixed([17], 5), 3, 9),
      tf.slice(fixed([2, 3, 2, 3, 2], 6), [1, 0, 1, 1, 0], [1, 3, 1, 2, 2]),
      tf.cast(tf.slice(tf.reshape(tf.range(0, 60, 1, 'int32'), [3, 4, 5]), [0, 1, 2], [3, 2, 3]), 'float32'),
    ];
    return tf.concat(parts.map((t) => tf.reshape(t, [-1])), 0) as tf.Tensor1D;
  });
}

const name = process.argv[2] ?? 'wasm';
if (!isBackendName(name)) throw new Error(`unknown backend ${name}`);
const threads = process.argv[3] !== undefined ? Number(process.argv[3]) : undefined;
const choice = await initBackend({ backend: name, threads, log: null });
const out = chain();
const sliced = slices();
const base64 = async (t: tf.Tensor) => Buffer.from((await t.data()).buffer).toString('base64');
const result = { backend: tf.getBackend(), threads: choice.threads, output: await base64(out), slices: await base64(sliced) };
tf.dispose([out, sliced]);
process.stdout.write(JSON.stringify(result) + '\n');
