/**
 * WeightView: a view of a weight file (a TensorSource) under a key prefix, as the models load themselves from it.
 *
 * A module is handed `p = WeightView.root(src, 'first_stage_model').child('encoder')` and reads its own weights by
 * their checkpoint names: `p.tensor('conv_in.weight', [ch, 3, 3, 3])`. Every read checks the shape exactly
 * (a config that does not fit the checkpoint fails at load, naming the key) and is recorded, so a loader can
 * ask which keys under its root nobody read (`unused()`) and refuse a checkpoint it only half understood.
 *
 * Arrays come back in the checkpoint's (PyTorch) layout as float32; tensors in the layout their layer asks for
 * (arrangement.ts): from a host copy (residency.ts) laid out that way already, else transposed once on the backend.
 */
import * as tf from '../backend/tf.js';
import { filledTensor } from '../backend/heap.js';
import { laidOutShape, type Arrangement } from './arrangement.js';
import { HostTensors } from './residency.js';
import { awaitPacks, useKernels } from '../backend/kernels.js';
import { ShapeError } from './errors.js';
import { LoggedSource, type LayerLog } from './reload.js';

export { ConfigError, ShapeError } from './errors.js';
import { WeightsError, type TensorInfo, type TensorSource } from '../weights/types.js';

/** How the layers read from a view run: on TensorFlow.js ops, or on the native kernels (weights packed on the host). */
export interface ViewOptions {
  /** Load layers for the native kernels (src/backend/kernels.ts). Default: whether they are in use now. */
  readonly native?: boolean;
}

export class WeightView {
  private constructor(
    private readonly src: TensorSource,
    /** The full key prefix of this view, '' for the file's top level. */
    readonly prefix: string,
    private readonly rootPrefix: string,
    /** Keys read so far, shared by a root and all its children. */
    private readonly used: Set<string>,
    /**
     * Whether layers loaded from this view run on the native kernels: chosen once for a whole model, at load, so
     * that every layer and block of it takes the same path (each block's native execution: backend/native-blocks.ts).
     */
    readonly native: boolean,
    /** A probe (WeightView.probe) records each key and shape asked for and hands back empty weights. */
    private readonly probed: Map<string, readonly number[]> | null,
    /** Where layers record how to load their weights again (reload.ts): a view of a LoggedSource; else null. */
    private readonly log: LayerLog | null = null,
    /**
     * The buffers withStored reads halves into, in turn, shared by a root and all its children: one is read into
     * while the weight in the other is packed in the background.
     */
    private readonly reads: { halves: [Uint16Array, Uint16Array]; turn: 0 | 1 } = { halves: [new Uint16Array(0), new Uint16Array(0)], turn: 0 },
  ) {}

  /** A view of `src` under `prefix` (e.g. 'model.diffusion_model'; '' for the whole file). */
  static root(src: TensorSource, prefix: string, { native = useKernels() }: ViewOptions = {}): WeightView {
    return new WeightView(src, prefix, prefix, new Set(), native, null, src instanceof LoggedSource ? src.log : null);
  }

  /**
   * A view of no file: a model loaded from it reads nothing and builds empty layers (on TensorFlow ops), while the
   * probe records every key and shape the model asked for (`shapes()`). This is how each model's expected tensors
   * are derived from its loader, the one description of its weights.
   */
  static probe(prefix: string): WeightView {
    return new WeightView(EMPTY_SOURCE, prefix, prefix, new Set(), false, new Map());
  }

  /** The keys and PyTorch shapes a probe was asked for, in the order they were first read. */
  shapes(): Map<string, number[]> {
    if (this.probed === null) throw new Error('WeightView.shapes: only a probe records shapes');
    return new Map([...this.probed].map(([k, s]) => [k, [...s]]));
  }

  /** The view one level down: `${prefix}.${name}`. */
  child(name: string | number): WeightView {
    return new WeightView(this.src, this.key(String(name)), this.rootPrefix, this.used, this.native, this.probed, this.log, this.reads);
  }

  /**
   * A layer that read `name` says how to read its weights again from another source (reload.ts): `load` gets a
   * view of that source at this prefix, with this view's execution (native or not); `values` copies what the layer
   * holds now. Recorded only in a logged view.
   */
  reloadable(name: string, load: (view: WeightView) => () => void, values: () => Float32Array[]): void {
    if (this.log === null) return;
    const { prefix, native } = this;
    this.log.record(this.key(name), { reload: (src) => load(WeightView.root(src, prefix, { native })), values });
  }

  /** The full checkpoint key of `name` under this view. */
  key(name: string): string {
    return this.prefix === '' ? name : `${this.prefix}.${name}`;
  }

  has(name: string): boolean {
    return this.src.has(this.key(name));
  }

  /**
   * `${prefix}.${name}` as a float32 tensor in `arrangement` (transposed, or one block of it): its checkpoint shape
   * must equal `shape`.
   */
  tensor(name: string, shape: readonly number[], arrangement: Arrangement = {}): tf.Tensor {
    const key = this.checked(name, shape);
    const outShape = laidOutShape(shape, arrangement);
    if (this.probed !== null) return tf.zeros([0]);
    const src = this.src;
    if (src instanceof HostTensors) return filledTensor(outShape, (out) => src.decodeInto(key, arrangement, out));
    return tf.tidy(() => {
      let t = tf.tensor(src.float32(key), [...shape], 'float32');
      for (const { axis, index, count } of arrangement.parts ?? []) {
        const begin = t.shape.map((_, a) => (a === axis ? index * (t.shape[a] / count) : 0));
        t = tf.slice(t, begin, t.shape.map((d, a) => (a === axis ? d / count : d)));
      }
      return arrangement.perm === undefined ? t : tf.transpose(t, [...arrangement.perm]);
    });
  }

  /** The values of `${prefix}.${name}` (float32, checkpoint layout, row-major); its shape must equal `shape`. */
  array(name: string, shape: readonly number[]): Float32Array {
    const key = this.checked(name, shape);
    return this.probed === null ? this.src.float32(key) : new Float32Array(0);
  }

  /**
   * Calls `use` with the values of `${prefix}.${name}` as the file stores them where that is IEEE halves (an fp16
   * file: a Uint16Array of the halves' bits, no decoding), else as float32; checkpoint layout, its shape must equal
   * `shape`. The kernels pack halves as they are (kernels.packWeight), so an fp16 file loads with no float32 copy.
   * Halves are read into buffers the whole model's views reuse for the weights after (where the source reads in
   * place): `use` must not keep them, and may pack them in the background (kernels.packWeight with background).
   */
  withStored<R>(name: string, shape: readonly number[], use: (values: Float32Array | Uint16Array) => R): R {
    const key = this.checked(name, shape);
    if (this.probed !== null) return use(new Float32Array(0));
    if (this.src.info(key).dtype !== 'F16') return use(this.src.float32(key));
    if (this.src.bytesInto === undefined) return use(halvesOf(this.src.bytes(key)));
    const n = shape.reduce((a, b) => a * b, 1);
    const turn = this.reads.turn;
    this.reads.turn = turn === 0 ? 1 : 0;
    if (this.reads.halves[turn].length < n) this.reads.halves[turn] = new Uint16Array(n);
    else awaitPacks(this.reads.halves[turn]); // the weight read into it last may still be packed in the background
    const halves = this.reads.halves[turn].subarray(0, n);
    this.src.bytesInto(key, new Uint8Array(halves.buffer, 0, 2 * n));
    return use(halves);
  }

  /**
   * `${prefix}.${name}` as the IEEE halves an fp16 file stores (a Uint16Array of their bits, in an array of its own
   * that the caller keeps), or null where the file stores another dtype, this is a probe, or the source is held in
   * memory already (HostTensors); checkpoint layout, its shape must equal `shape`.
   */
  storedHalves(name: string, shape: readonly number[]): Uint16Array | null {
    const key = this.checked(name, shape);
    if (this.probed !== null || this.src instanceof HostTensors || this.src.info(key).dtype !== 'F16') return null;
    if (this.src.bytesInto === undefined) return halvesOf(this.src.bytes(key)).slice();
    const halves = new Uint16Array(shape.reduce((a, b) => a * b, 1));
    this.src.bytesInto(key, new Uint8Array(halves.buffer));
    return halves;
  }

  /** The full key of `name`, after checking that it exists with exactly `shape`; records it as read. */
  private checked(name: string, shape: readonly number[]): string {
    const key = this.key(name);
    if (this.probed !== null) {
      if (!this.probed.has(key)) this.probed.set(key, [...shape]);
      return key;
    }
    if (!this.src.has(key)) {
      throw new WeightsError(
        `${this.src.path}: missing tensor ${key} [${shape.join(', ')}]; the checkpoint does not hold the model the config describes (its family, its size, or the original key names)`,
      );
    }
    const got = this.src.info(key).shape;
    if (got.length !== shape.length || got.some((d, i) => d !== shape[i])) {
      throw new ShapeError(
        `${this.src.path}: ${key}: expected [${shape.join(', ')}], got [${got.join(', ')}]; the model config does not match this checkpoint`,
      );
    }
    this.used.add(key);
    return key;
  }

  /** Keys under the root prefix that nothing read, except those matching `ignore` (buffers such as position_ids). */
  unused(ignore?: RegExp): string[] {
    const under = this.rootPrefix === '' ? '' : `${this.rootPrefix}.`;
    return this.src
      .keys()
      .filter((k) => k.startsWith(under) && !this.used.has(k) && !(ignore?.test(k) ?? false))
      .sort();
  }
}

/**
 * Checks a checkpoint against a model's expected keys and shapes before anything is loaded, so a mismatch fails
 * with every problem listed (up to `maxListed`) and no half-built model is left holding tensors.
 * Keys under `prefix` that the model does not read are refused unless they match `ignore`.
 */
export function checkCheckpoint(
  src: TensorSource,
  expected: ReadonlyMap<string, readonly number[]>,
  prefix: string,
  { ignore, maxListed = 8 }: { ignore?: RegExp; maxListed?: number } = {},
): void {
  const problems: string[] = [];
  for (const [key, shape] of expected) {
    if (!src.has(key)) {
      problems.push(`missing ${key} [${shape.join(', ')}]`);
      continue;
    }
    const got = src.info(key).shape;
    if (got.length !== shape.length || got.some((d, i) => d !== shape[i])) {
      problems.push(`${key}: expected [${shape.join(', ')}], got [${got.join(', ')}]`);
    }
  }
  const under = prefix === '' ? '' : `${prefix}.`;
  for (const key of src.keys()) {
    if (key.startsWith(under) && !expected.has(key) && !(ignore?.test(key) ?? false)) problems.push(`unexpected ${key}`);
  }
  if (problems.length === 0) return;
  const listed = problems.slice(0, maxListed).join('; ');
  const more = problems.length > maxListed ? `; and ${problems.length - maxListed} more` : '';
  throw new ShapeError(
    `${src.path}: the tensors under '${prefix}' do not match the model config (${listed}${more}); check that the config fits this checkpoint`,
  );
}

/** The file behind a probe: it holds nothing, and nothing is read from it. */
const EMPTY_SOURCE: TensorSource = {
  path: '(probe)',
  keys: () => [],
  has: () => false,
  info: (key: string): TensorInfo => {
    throw new Error(`probe: no tensor ${key}`);
  },
  bytes: (key: string): Uint8Array => {
    throw new Error(`probe: no tensor ${key}`);
  },
  float32: (key: string): Float32Array => {
    throw new Error(`probe: no tensor ${key}`);
  },
  close: () => undefined,
};

/**
 * Every checkpoint key (under `prefix`) a model's loader reads, with its PyTorch shape: the loader run against a
 * probe. The model it builds holds only empty tensors and is disposed at once.
 */
export function probeShapes(prefix: string, load: (p: WeightView) => { dispose(): void }): Map<string, number[]> {
  const probe = WeightView.probe(prefix);
  load(probe).dispose();
  return probe.shapes();
}

/** A tensor's raw bytes as the halves they hold (copied where they do not start at an even byte). */
function halvesOf(raw: Uint8Array): Uint16Array {
  return raw.byteOffset % 2 === 0 ? new Uint16Array(raw.buffer, raw.byteOffset, raw.byteLength / 2) : new Uint16Array(raw.slice().buffer);
}
