/**
 * Where a model's weights live between forward passes, chosen by a residency policy:
 *
 *   'resident'  each block's weights are backend tensors for the model's whole life. On tensorflow and cpu the
 *               backend's memory is host memory: nothing is gained by anything else.
 *   'streamed'  each block's weights stay OUTSIDE the backend, as the checkpoint's bytes in host memory
 *               (HostTensors: fp16 bytes stay fp16), and become tensors just before the block runs, in the
 *               layout its layers use, and are freed right after. This is how SD 1.5's 3.4 GB fp32 UNet runs in
 *               the wasm backend's 4 GiB heap (about 3 GiB usable): at most one block (<= 0.4 GB) is on the heap.
 *
 * A model wraps each block in a `Held<M>` and runs it with `held.use((m) => m.apply(x))`; the policy decides
 * whether `use` finds the block loaded or loads it, and that is the only place the two differ.
 * Streaming costs a load of every weight per forward pass: the host copy is kept in the layout its layer reads
 * (HostTensors.decodeInto), so a load is one decode (fp16) or copy (fp32) straight into the backend's memory.
 */
import * as tf from '../backend/tf.js';
import { DTYPE_BYTES, decodeInto, decodeToFloat32, isFloatDType } from '../weights/dtypes.js';
import { arrange, blockIndex, laidOutShape, type Arrangement } from './arrangement.js';
import { WeightsError, type TensorInfo, type TensorSource } from '../weights/types.js';
import { ShapeError } from './errors.js';
import { LoggedSource } from './reload.js';

export type ResidencyPolicy = 'resident' | 'streamed';

export const RESIDENCY_POLICIES: readonly ResidencyPolicy[] = Object.freeze(['resident', 'streamed']);

/** 'streamed' on wasm (its heap cannot hold the UNet), 'resident' elsewhere. */
export function defaultResidency(): ResidencyPolicy {
  return tf.getBackend() === 'wasm' ? 'streamed' : 'resident';
}

interface Disposable {
  dispose(): void;
}

/** One block of a model under a residency policy: loaded once ('resident') or at every use ('streamed'). */
export class Held<M extends Disposable> {
  private constructor(
    private readonly make: () => M,
    private readonly resident: M | null,
  ) {}

  /** `make` builds the block (its layers read and lay out their weights); called now, or at every use. */
  static load<M extends Disposable>(policy: ResidencyPolicy, make: () => M): Held<M> {
    return policy === 'resident' ? new Held(make, make()) : new Held(make, null);
  }

  get streamed(): boolean {
    return this.resident === null;
  }

  /** The block itself when resident (built once), else null: for what must hold on to it (an adapter's attachment). */
  get loaded(): M | null {
    return this.resident;
  }

  /** Runs `fn` on the block; a streamed block's weights exist only during the call. `fn`'s result must not be a weight. */
  use<R>(fn: (m: M) => R): R {
    if (this.resident !== null) return fn(this.resident);
    const m = this.make();
    try {
      return fn(m);
    } finally {
      m.dispose();
    }
  }

  dispose(): void {
    this.resident?.dispose();
  }
}

interface HostTensor extends TensorInfo {
  bytes: Uint8Array;
  /** The layout `bytes` were rearranged into by the first decodeInto (each part contiguous); null: as in the file. */
  arranged: { perm: readonly number[]; splits: readonly { axis: number; count: number }[] } | null;
}

/**
 * Some tensors of a TensorSource copied into host memory, in the file's dtype (fp16 stays 2 bytes a weight),
 * so that blocks can be re-materialised after the file is closed. It is itself a TensorSource.
 *
 * A tensor read through `decodeInto` is rearranged, once, into the layout its layer asks for (Conv2d's HWIO,
 * Linear's [in, out], each block of parts contiguous), so that re-materialising it never transposes again. Each
 * tensor serves one layer and so one layout; `float32` and `bytes` serve those still in the file's layout.
 */
export class HostTensors implements TensorSource {
  private constructor(
    readonly path: string,
    private readonly tensors: Map<string, HostTensor>,
  ) {}

  /** Copies `keys` (all must exist) out of `src`. */
  static copy(src: TensorSource, keys: Iterable<string>): HostTensors {
    const tensors = new Map<string, HostTensor>();
    for (const key of keys) {
      if (!src.has(key)) throw new WeightsError(`${src.path}: missing tensor ${key}`);
      const { dtype, shape } = src.info(key);
      tensors.set(key, { dtype, shape, bytes: src.bytes(key), arranged: null });
    }
    const host = new HostTensors(src.path, tensors);
    if (src instanceof LoggedSource) src.log.recordHost(host); // its tensors can be served anew (per-request LoRAs)
    return host;
  }

  /**
   * Serves `values` (float32, in the file's layout) as tensor `key` from now on; the function returned puts the
   * tensor held before back as it was, bytes and layout (per-request LoRAs on a streamed model: reload.ts).
   */
  swap(key: string, values: Float32Array): () => void {
    const old = this.entry(key);
    if (values.length !== old.shape.reduce((a, d) => a * d, 1)) {
      throw new ShapeError(`${this.path}: tensor ${key} [${old.shape.join(', ')}] cannot be served from ${values.length} values`);
    }
    const fresh: HostTensor = { dtype: 'F32', shape: old.shape, bytes: new Uint8Array(values.buffer, values.byteOffset, values.byteLength), arranged: null };
    this.tensors.set(key, fresh);
    return () => {
      if (this.tensors.get(key) === fresh) this.tensors.set(key, old);
    };
  }

  /** A copy of the bytes held for `key`, in the layout they are held in (for comparing what is held). */
  heldBytes(key: string): Uint8Array {
    return this.entry(key).bytes.slice();
  }

  /** Bytes held, for memory reports. */
  get byteLength(): number {
    let n = 0;
    for (const t of this.tensors.values()) n += t.bytes.byteLength;
    return n;
  }

  keys(): string[] {
    return [...this.tensors.keys()];
  }

  has(key: string): boolean {
    return this.tensors.has(key);
  }

  info(key: string): TensorInfo {
    const { dtype, shape } = this.entry(key);
    return { dtype, shape };
  }

  bytes(key: string): Uint8Array {
    return this.inFileLayout(key).bytes;
  }

  float32(key: string): Float32Array {
    const t = this.inFileLayout(key);
    return decodeToFloat32(t.bytes, this.floatDType(key, t));
  }

  /**
   * Writes tensor `key` in `arrangement` as float32 into `out` (laidOutShape(shape, arrangement) elements). The first call
   * rearranges the held bytes into that arrangement; later calls are one decode or copy.
   */
  decodeInto(key: string, arrangement: Arrangement, out: Float32Array): void {
    const t = this.entry(key);
    const dtype = this.floatDType(key, t);
    const size = laidOutShape(t.shape, arrangement).reduce((a, b) => a * b, 1); // throws on a arrangement that does not fit
    if (out.length !== size) throw new ShapeError(`${this.path}: tensor ${key} in this arrangement has ${size} values, not ${out.length}`);
    const perm = arrangement.perm ?? t.shape.map((_, i) => i);
    const parts = arrangement.parts ?? [];
    const splits = parts.map(({ axis, count }) => ({ axis, count }));
    if (t.arranged === null) {
      t.bytes = arrange(t.bytes, DTYPE_BYTES[dtype], t.shape, perm, splits);
      t.arranged = { perm, splits };
    } else if (!sameArrangement(t.arranged, { perm, splits })) {
      throw new Error(`${this.path}: tensor ${key} is held in one arrangement and was asked for in another`);
    }
    const blockBytes = size * DTYPE_BYTES[dtype];
    const at = blockIndex(parts) * blockBytes;
    decodeInto(t.bytes.subarray(at, at + blockBytes), dtype, out);
  }

  close(): void {
    this.tensors.clear();
  }

  private floatDType(key: string, t: HostTensor): TensorInfo['dtype'] {
    if (!isFloatDType(t.dtype)) throw new WeightsError(`${this.path}: tensor ${key} is ${t.dtype}, not floating point`);
    return t.dtype;
  }

  private inFileLayout(key: string): HostTensor {
    const t = this.entry(key);
    if (t.arranged !== null) throw new Error(`${this.path}: tensor ${key} is held rearranged for its layer, not as in the file`);
    return t;
  }

  private entry(key: string): HostTensor {
    const t = this.tensors.get(key);
    if (t === undefined) throw new WeightsError(`${this.path}: tensor ${key} is not in the host copy (closed, or not copied)`);
    return t;
  }
}

function sameArrangement(a: NonNullable<HostTensor['arranged']>, b: NonNullable<HostTensor['arranged']>): boolean {
  return (
    a.perm.every((v, i) => v === b.perm[i]) &&
    a.splits.length === b.splits.length &&
    a.splits.every((s, i) => s.axis === b.splits[i].axis && s.count === b.splits[i].count)
  );
}
