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
import { WeightsError, type TensorSource } from '../weights/types.js';

/** A weight's shape differs from what the config says it must be, or the checkpoint lacks or adds tensors. */
export class ShapeError extends Error {
  override name = 'ShapeError';
}

/** A model config (ours or a foreign format being translated) is malformed: the message names the field. */
export class ConfigError extends Error {
  override name = 'ConfigError';
}

export class WeightView {
  private constructor(
    private readonly src: TensorSource,
    /** The full key prefix of this view, '' for the file's top level. */
    readonly prefix: string,
    private readonly rootPrefix: string,
    /** Keys read so far, shared by a root and all its children. */
    private readonly used: Set<string>,
  ) {}

  /** A view of `src` under `prefix` (e.g. 'model.diffusion_model'; '' for the whole file). */
  static root(src: TensorSource, prefix: string): WeightView {
    return new WeightView(src, prefix, prefix, new Set());
  }

  /** The view one level down: `${prefix}.${name}`. */
  child(name: string | number): WeightView {
    return new WeightView(this.src, this.key(String(name)), this.rootPrefix, this.used);
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
    return this.src.float32(this.checked(name, shape));
  }

  /** The full key of `name`, after checking that it exists with exactly `shape`; records it as read. */
  private checked(name: string, shape: readonly number[]): string {
    const key = this.key(name);
    if (!this.src.has(key)) {
      throw new WeightsError(
        `${this.src.path}: missing tensor ${key} [${shape.join(', ')}]; is this a Stable Diffusion 1.x checkpoint with the original key names?`,
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
