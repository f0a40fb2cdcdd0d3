/**
 * What every weight file looks like to the rest of the engine: named tensors with a dtype and a shape,
 * read on demand. Readers: safetensors.ts, ckpt.ts; `openWeights` in open.ts picks one.
 */
import type { DType } from './dtypes.js';
import { printable } from './printable.js';

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
  /**
   * The same bytes read into `out` (exactly their length), where a source can read in place: loading an fp16 file
   * reads every weight into one reused buffer (WeightView.withStored) instead of a fresh one each.
   */
  bytesInto?(key: string, out: Uint8Array): void;
  /** One floating-point tensor decoded to float32 (F16, BF16, F64 converted). */
  float32(key: string): Float32Array;
  /** Free file handles. The source must not be used afterwards. */
  close(): void;
}

/**
 * A weight file was refused or cannot be used: the message names the file and the problem. Names in it come from
 * the file, so the message is made printable (printable.ts): terminal escapes and bidi controls arrive escaped.
 */
export class WeightsError extends Error {
  override name = 'WeightsError';

  constructor(message: string, options?: ErrorOptions) {
    super(printable(message), options);
  }
}

/**
 * A weight file asks for more than a reader allows (a header, a pickle's objects, a tensor's bytes): `limit`
 * names the bound and `max` is its value, both also in the message. Bounds are what real checkpoints need,
 * with headroom, so a hostile file is refused in bounded time and memory instead of exhausting them.
 */
export class WeightsLimitError extends WeightsError {
  constructor(
    message: string,
    readonly limit: string,
    readonly max: number,
  ) {
    super(message);
  }
}

/** A number in a message, with thousands separators: 16,777,216. */
export const count = (n: number | bigint): string => n.toLocaleString('en-US');
