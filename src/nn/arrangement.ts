/**
 * The arrangement a layer wants a checkpoint tensor in, and the host-side rearrangement that produces it.
 *
 * A checkpoint stores PyTorch's layouts (Linear [out, in], Conv2d OIHW); the layers here compute in another
 * (Linear [in, out], Conv2d HWIO), and some read only a block of a tensor: GEGLU's projection is two Linears,
 * the halves of one [2 * inner, in] weight, and on wasm a layer with a large weight is split over slices of its
 * input channels (layers.ts, `inputSplits`). An Arrangement names both:
 *
 *   parts  blocks to take: along `axis` (of the checkpoint shape), the `index`-th of `count` equal blocks
 *   perm   the order of the block's axes afterwards, as tf.transpose's perm: [1, 0] makes [out, in] into [in, out]
 *
 * Held in host memory in its arrangement (residency.ts stores a streamed block's weights that way), a tensor needs no
 * slicing or transposing on the backend each time it is made: `arrange` rearranges the checkpoint's bytes once
 * so that every block is contiguous and already permuted, and `blockIndex` says where a block is.
 */

import { rowMajorStrides } from '../backend/strided.js';
import { ShapeError } from './errors.js';

export interface Part {
  readonly axis: number;
  readonly index: number;
  readonly count: number;
}

export interface Arrangement {
  readonly perm?: readonly number[];
  readonly parts?: readonly Part[];
}

/** Checks `arrangement` against a tensor of `shape` and returns the shape of what it selects, in its order. */
export function laidOutShape(shape: readonly number[], arrangement: Arrangement): number[] {
  const block = [...shape];
  const seen = new Set<number>();
  for (const { axis, index, count } of arrangement.parts ?? []) {
    const fits = Number.isInteger(axis) && axis >= 0 && axis < shape.length && !seen.has(axis);
    if (!fits || !Number.isInteger(count) || count < 1 || !Number.isInteger(index) || index < 0 || index >= count || shape[axis] % count !== 0) {
      throw new ShapeError(`arrangement part ${index} of ${count} does not cut axis ${axis} of [${shape.join(', ')}] into equal blocks`);
    }
    seen.add(axis);
    block[axis] = shape[axis] / count;
  }
  const perm = arrangement.perm ?? block.map((_, i) => i);
  const sorted = [...perm].sort((a, b) => a - b);
  if (perm.length !== block.length || sorted.some((v, i) => v !== i)) {
    throw new ShapeError(`arrangement perm [${perm.join(', ')}] is not a permutation of the ${block.length} axes of [${shape.join(', ')}]`);
  }
  return perm.map((a) => block[a]);
}

/** Where the block `parts` selects lies in bytes arranged for those parts: the block's number, in row-major order. */
export function blockIndex(parts: readonly Part[]): number {
  return parts.reduce((at, { index, count }) => at * count + index, 0);
}

/**
 * The elements of a row-major tensor of `shape` (`elementBytes` each), rearranged so that every block that
 * `splits` cut out is contiguous (blocks in row-major order over the splits, as `blockIndex` numbers them) and laid
 * out in `perm`. With no splits this is a plain transpose.
 */
export function arrange(
  bytes: Uint8Array,
  elementBytes: number,
  shape: readonly number[],
  perm: readonly number[],
  splits: readonly { axis: number; count: number }[] = [],
): Uint8Array {
  // A view in which every split axis a is two axes [count, shape[a] / count]; the block axes go first.
  const view: number[] = [];
  const inner: number[] = [];
  const outer = new Map<number, number>();
  shape.forEach((d, a) => {
    const split = splits.find((s) => s.axis === a);
    if (split !== undefined) {
      outer.set(a, view.length);
      view.push(split.count);
    }
    inner.push(view.length);
    view.push(split === undefined ? d : d / split.count);
  });
  const order = [...splits.map((s) => outer.get(s.axis) as number), ...perm.map((a) => inner[a])];
  const out = new Uint8Array(bytes.byteLength);
  if ((elementBytes !== 2 && elementBytes !== 4) || bytes.byteOffset % elementBytes !== 0) {
    permuteInto(bytes, out, view, order, elementBytes);
  } else {
    const n = bytes.byteLength / elementBytes;
    const as = (b: Uint8Array) => (elementBytes === 2 ? new Uint16Array(b.buffer, b.byteOffset, n) : new Uint32Array(b.buffer, b.byteOffset, n));
    permuteInto(as(bytes), as(out), view, order, 1);
  }
  return out;
}

type Elements = Uint8Array | Uint16Array | Uint32Array;

/**
 * out (in `order` of src's axes) <- src, `width` array slots per element. The innermost output axis is walked by a
 * stride into src; the others by an odometer, so any rank works without recursion.
 */
function permuteInto(src: Elements, out: Elements, shape: readonly number[], order: readonly number[], width: number): void {
  const rank = shape.length;
  const strides = rowMajorStrides(shape).map((s) => s * width);
  const outShape = order.map((a) => shape[a]);
  const outStrides = order.map((a) => strides[a]);
  const inner = outShape[rank - 1];
  const innerStride = outStrides[rank - 1];
  const index = new Array<number>(rank - 1).fill(0);
  const total = out.length / width;
  let from = 0;
  for (let o = 0; o < total; o += inner) {
    let at = from;
    const base = o * width;
    if (width === 1) {
      for (let i = 0; i < inner; i++, at += innerStride) out[base + i] = src[at];
    } else {
      for (let i = 0; i < inner; i++, at += innerStride) {
        for (let w = 0; w < width; w++) out[base + i * width + w] = src[at + w];
      }
    }
    // Advance the odometer over the outer output axes.
    for (let a = rank - 2; a >= 0; a--) {
      from += outStrides[a];
      if (++index[a] < outShape[a]) break;
      from -= outStrides[a] * outShape[a];
      index[a] = 0;
    }
  }
}
