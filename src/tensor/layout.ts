/**
 * The layout a layer wants a checkpoint tensor in, and the host-side rearrangement that produces it.
 *
 * A checkpoint stores PyTorch's layouts (Linear [out, in], Conv2d OIHW); the layers here compute in another
 * (Linear [in, out], Conv2d HWIO), and a few read only a block of a tensor (GEGLU's projection is two Linears,
 * the halves of one [2 * inner, in] weight). A Layout names both:
 *
 *   perm   the order of the (part's) axes, as tf.transpose's perm: [1, 0] makes [out, in] into [in, out]
 *   part   [i, n]: only the i-th of n equal blocks along axis 0, taken before `perm`
 *
 * Held in host memory in its layout (residency.ts stores a streamed block's weights that way), a tensor needs no
 * transpose on the backend each time it is made: see `arrange`, which rearranges the checkpoint's bytes once.
 */

export interface Layout {
  readonly perm?: readonly number[];
  readonly part?: readonly [index: number, count: number];
}

/** Checks `layout` against a tensor of `shape` and returns the shape of what it selects, in its order. */
export function laidOutShape(shape: readonly number[], layout: Layout): number[] {
  const [index, count] = layout.part ?? [0, 1];
  if (!Number.isInteger(count) || count < 1 || !Number.isInteger(index) || index < 0 || index >= count || shape[0] % count !== 0) {
    throw new RangeError(`layout part [${index}, ${count}] does not cut axis 0 of [${shape.join(', ')}] into equal blocks`);
  }
  const partShape = [shape[0] / count, ...shape.slice(1)];
  const perm = layout.perm ?? partShape.map((_, i) => i);
  const sorted = [...perm].sort((a, b) => a - b);
  if (perm.length !== partShape.length || sorted.some((v, i) => v !== i)) {
    throw new RangeError(`layout perm [${perm.join(', ')}] is not a permutation of the ${partShape.length} axes of [${shape.join(', ')}]`);
  }
  return perm.map((a) => partShape[a]);
}

/**
 * The elements of a row-major tensor of `shape` (`elementBytes` each), rearranged so that every part of `parts`
 * equal blocks along axis 0 is contiguous and laid out in `perm`: the order of a view [parts, shape0/parts, ...]
 * permuted by [0, ...perm + 1]. With parts = 1 this is a plain transpose.
 */
export function arrange(bytes: Uint8Array, elementBytes: number, shape: readonly number[], perm: readonly number[], parts = 1): Uint8Array {
  const view = [parts, shape[0] / parts, ...shape.slice(1)];
  const order = [0, ...perm.map((a) => a + 1)];
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
  const strides = new Array<number>(rank);
  for (let a = rank - 1, s = width; a >= 0; a--) {
    strides[a] = s;
    s *= shape[a];
  }
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
