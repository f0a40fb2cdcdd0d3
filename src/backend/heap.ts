/**
 * The wasm backend's heap: wasm32, at most 4 GiB - 64 KiB, and it never shrinks. Past its limit emscripten's malloc
 * returns 0 (or, near the limit, a block running past the heap's end) and tfjs would write the tensor there, silently
 * corrupting memory (BACKENDS.md). guardWasmHeap()
 * turns that into a HeapError at the allocation that failed, and wasmHeapBytes() reports how large the heap has grown.
 */
import * as tf from './tf.js';

export class HeapError extends Error {
  override name = 'HeapError';
}

const WASM32_HEAP_MAX = 4 * 2 ** 30 - 2 ** 16;

interface WasmModule {
  HEAPU8: Uint8Array;
  _malloc: (bytes: number) => number;
  _free: (at: number) => void;
  sdHeapGuard?: boolean;
}

function wasmModule(): WasmModule | null {
  if (tf.getBackend() !== 'wasm') return null;
  return (tf.backend() as unknown as { wasm: WasmModule }).wasm ?? null;
}

/** Bytes the wasm heap has grown to, or null when the backend is not wasm. */
export function wasmHeapBytes(): number | null {
  return wasmModule()?.HEAPU8.buffer.byteLength ?? null;
}

/** Make every failed heap allocation throw instead of returning offset 0. Idempotent; a no-op off wasm. */
export function guardWasmHeap(): void {
  const m = wasmModule();
  if (m === null || m.sdHeapGuard === true) return;
  // emscripten's exported _malloc is a stub that replaces itself with the raw export on its first call, which
  // would overwrite the wrapper below: call it once first.
  m._free(m._malloc(16));
  const malloc = m._malloc.bind(m);
  m._malloc = (bytes: number) => {
    // Sizes past the wasm32 limit would wrap around in malloc's 32-bit argument and "succeed" small.
    const at = bytes > WASM32_HEAP_MAX ? 0 : malloc(bytes);
    // Near the limit malloc can also hand out a block that runs past the end of the heap.
    const fits = at !== 0 && (at >>> 0) + bytes <= m.HEAPU8.buffer.byteLength;
    if (!fits && bytes > 0) {
      if (at !== 0) m._free(at);
      const heapMb = (m.HEAPU8.buffer.byteLength / 2 ** 20).toFixed(0);
      throw new HeapError(
        `wasm heap exhausted: cannot allocate ${(bytes / 2 ** 20).toFixed(1)} MiB (heap at ${heapMb} MiB of 4096): ` +
          'use a smaller image or batch, or the tensorflow backend (`sd setup-native`)',
      );
    }
    return at;
  };
  m.sdHeapGuard = true;
}

/** What the wasm backend offers beyond tfjs's KernelBackend: a tensor's memory as a view of the heap. */
export interface WasmBackendInternals {
  makeOutput(shape: number[], dtype: tf.DataType): tf.TensorInfo;
  /** Taken after any allocation: a heap that grows detaches earlier views. */
  typedArrayFromHeap(info: tf.TensorInfo): Float32Array | Int32Array | Uint8Array;
}

/**
 * A float32 tensor whose values `fill` writes. On wasm `fill` writes straight into the heap block the tensor owns
 * (no JS array is allocated and copied in: for a streamed UNet that is 3.4 GB of fresh pages a step); elsewhere
 * into a new array handed to tf.tensor. `fill` must not allocate tensors.
 */
export function filledTensor(shape: number[], fill: (out: Float32Array) => void): tf.Tensor {
  if (tf.getBackend() !== 'wasm') {
    const values = new Float32Array(shape.reduce((a, b) => a * b, 1));
    fill(values);
    return tf.tensor(values, shape, 'float32');
  }
  const backend = tf.backend() as unknown as WasmBackendInternals;
  const info = backend.makeOutput(shape, 'float32');
  const t = tf.engine().makeTensorFromTensorInfo(info);
  try {
    // The view is taken after the allocation: a heap that grew detaches earlier views.
    fill(backend.typedArrayFromHeap(info) as Float32Array);
  } catch (e) {
    t.dispose();
    throw e;
  }
  return t;
}
