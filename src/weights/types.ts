/**
 * What every weight file looks like to the rest of the engine: named tensors with a dtype and a shape,
 * read on demand. Readers: safetensors.ts, ckpt.ts; `openWeights` in open.ts picks one.
 */
import type { DType } from './dtypes.js';

export interface TensorInfo {
  readonly dtype: DType;
  readonly shape: readonly number[];
}

export interface TensorSource {
  /** Where the tensors come from (a path), for error messages. */
  readonly path: string;
  keys(): string[];
  has(key: string): boolean;
  info(key: string): TensorInfo;
  /** The raw little-endian bytes of one tensor, read from the file now. */
  bytes(key: string): Uint8Array;
  /** One floating-point tensor decoded to float32 (F16, BF16, F64 converted). */
  float32(key: string): Float32Array;
  /** Free file handles. The source must not be used afterwards. */
  close(): void;
}

/** A weight file was refused or cannot be used: the message names the file and the problem. */
export class WeightsError extends Error {
  override name = 'WeightsError';
}
