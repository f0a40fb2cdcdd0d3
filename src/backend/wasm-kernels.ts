/**
 * Kernels the wasm backend runs slowly, replaced through tf.registerKernel.
 *
 * Slice: tfjs-backend-wasm 4.22 reads its input with backend.readSync, which copies the WHOLE input tensor out of
 * the heap before copying the slice out of the copy. Attention on wasm slices one head's queries, keys and values
 * out of [B*H, N, D] tensors (10 MiB at 64x64): 800 slices a UNet step, 8 GB of copying, 2.0 s of a 53 s step
 * (2-core EPYC). This one reads the input through a view of the heap and copies only the slice: contiguous runs
 * of the innermost axes with one TypedArray.set each.
 */
import * as tf from './tf.js';
import type { WasmBackendInternals } from './heap.js';
import { copyBlock } from './strided.js';

let registered = false;

/** Replaces the wasm backend's Slice (see the header). Idempotent. */
export function registerWasmKernels(): void {
  if (registered) return;
  const original = tf.getKernel('Slice', 'wasm');
  if (original === undefined) return;
  tf.unregisterKernel('Slice', 'wasm');
  tf.registerKernel({
    kernelName: 'Slice',
    backendName: 'wasm',
    kernelFunc: (args) => {
      const x = args.inputs.x as tf.TensorInfo;
      if (x.dtype === 'string') return original.kernelFunc(args);
      const { begin, size } = args.attrs as unknown as { begin: number | number[]; size?: number | number[] };
      const [b, s] = tf.slice_util.parseSliceParams(x as tf.Tensor, begin, size);
      return sliceFromHeap(args.backend as unknown as WasmBackendInternals, x, b, s);
    },
  });
  registered = true;
}

function sliceFromHeap(backend: WasmBackendInternals, x: tf.TensorInfo, begin: number[], size: number[]): tf.TensorInfo {
  const out = backend.makeOutput(size, x.dtype);
  if (size.some((d) => d === 0)) return out;
  // Views after the allocation: a heap that grew detaches views taken before it.
  const src = backend.typedArrayFromHeap(x);
  const dst = backend.typedArrayFromHeap(out);
  copyBlock(src, dst, x.shape, begin, size);
  return out;
}
