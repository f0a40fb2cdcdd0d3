import { beforeAll, describe, expect, it } from 'vitest';
import * as tf from '../src/backend/tf.js';
import { initBackend } from '../src/backend/select.js';
import { HeapError, wasmHeapBytes } from '../src/backend/heap.js';

type Malloc = { _malloc: (n: number) => number; _free: (p: number) => void };
const wasm = () => (tf.backend() as unknown as { wasm: Malloc }).wasm;

beforeAll(async () => {
  await initBackend({ backend: 'wasm', threads: 1, log: null });
});

describe('wasm heap guard', () => {
  it('reports the heap size', () => {
    expect(wasmHeapBytes()).toBeGreaterThan(0);
  });

  it('refuses sizes that would wrap around in malloc\'s 32-bit argument', () => {
    expect(() => wasm()._malloc(5e9)).toThrow(/wasm heap exhausted: cannot allocate 4768\.4 MiB/);
  });

  it('turns malloc failing (offset 0) into a HeapError, leaving existing tensors intact', () => {
    const keep = tf.tensor1d([1, 2, 3]);
    // Untouched pages cost no RAM: the first 3.9 GB fits the heap, the second cannot.
    const first = wasm()._malloc(3.9e9);
    expect(first).not.toBe(0);
    let second: unknown;
    try {
      second = wasm()._malloc(3.9e9);
    } catch (e) {
      second = e;
    }
    expect(second, `first at ${first}, second ${String(second)}`).toBeInstanceOf(HeapError);
    wasm()._free(first);
    expect(Array.from(keep.dataSync())).toEqual([1, 2, 3]);
    keep.dispose();
  });
});
