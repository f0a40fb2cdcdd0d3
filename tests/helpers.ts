/** Shared by the layer tests: float32 tensors held in memory as a TensorSource, filled from a fixed-seed LCG. */
import type { TensorInfo, TensorSource } from '../src/weights/types.js';

/** An in-memory TensorSource of float32 tensors. */
export class MemorySource implements TensorSource {
  readonly path = '<memory>';
  constructor(private readonly t: Map<string, { shape: number[]; data: Float32Array }>) {}
  keys(): string[] {
    return [...this.t.keys()];
  }
  has(k: string): boolean {
    return this.t.has(k);
  }
  info(k: string): TensorInfo {
    return { dtype: 'F32', shape: this.get(k).shape };
  }
  bytes(k: string): Uint8Array {
    return new Uint8Array(this.get(k).data.buffer.slice(0));
  }
  float32(k: string): Float32Array {
    return this.get(k).data.slice();
  }
  close(): void {}
  private get(k: string) {
    const v = this.t.get(k);
    if (v === undefined) throw new Error(`no ${k}`);
    return v;
  }
}

let seed = 1;
export function rand(n: number): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    seed = (seed * 1103515245 + 12345) % 2147483648;
    a[i] = seed / 2147483648 - 0.5;
  }
  return a;
}

export function source(shapes: Record<string, number[]>): MemorySource {
  const m = new Map<string, { shape: number[]; data: Float32Array }>();
  for (const [k, shape] of Object.entries(shapes)) m.set(k, { shape, data: rand(shape.reduce((a, b) => a * b, 1)) });
  return new MemorySource(m);
}


/** `png` with `extra` chunks (pngChunk) inserted right after IHDR, which ends at byte 33. */
export const withChunks = (png: Buffer, extra: readonly Buffer[]): Buffer => Buffer.concat([png.subarray(0, 33), ...extra, png.subarray(33)]);
