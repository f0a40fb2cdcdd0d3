/**
 * Strided copies over row-major arrays: the index arithmetic that weight arrangement (nn/arrangement.ts) and the
 * wasm Slice kernel (wasm-kernels.ts) share. Pure; no tensors.
 */

/** Element strides of a row-major array of `shape`. */
export function rowMajorStrides(shape: readonly number[]): number[] {
  const strides = new Array<number>(shape.length);
  for (let a = shape.length - 1, s = 1; a >= 0; a--) {
    strides[a] = s;
    s *= shape[a];
  }
  return strides;
}

/** dst <- the block of src (row-major, `shape`) at `begin` of `size`, as runs of contiguous elements. */
export function copyBlock<T extends Float32Array | Int32Array | Uint8Array>(
  src: T,
  dst: T,
  shape: readonly number[],
  begin: readonly number[],
  size: readonly number[],
): void {
  const rank = shape.length;
  if (rank === 0) {
    dst[0] = src[0];
    return;
  }
  const strides = rowMajorStrides(shape);
  // Axes from `k` on form one contiguous run: every axis after k is taken whole.
  let k = rank - 1;
  let run = size[k];
  while (k > 0 && size[k] === shape[k]) run *= size[--k];
  let from = begin.reduce((acc, b, a) => acc + b * strides[a], 0);
  const index = new Array<number>(k).fill(0);
  for (let to = 0; to < dst.length; to += run) {
    dst.set(src.subarray(from, from + run), to);
    for (let a = k - 1; a >= 0; a--) {
      from += strides[a];
      if (++index[a] < size[a]) break;
      from -= strides[a] * size[a];
      index[a] = 0;
    }
  }
}
