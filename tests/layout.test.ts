/**
 * Host-side rearrangement of weights (src/tensor/layout.ts, HostTensors.decodeInto) and the wasm Slice kernel's
 * block copy (src/tensor/wasm-kernels.ts), each against a naive element-by-element reference.
 */
import { describe, expect, it } from 'vitest';
import { arrange, blockIndex, copyBlock, laidOutShape } from '../src/tensor/layout.js';
import { HostTensors } from '../src/tensor/residency.js';
import { decodeToFloat32, encodeFloat16, type DType } from '../src/weights/dtypes.js';
import type { TensorSource } from '../src/weights/types.js';

const strides = (shape: readonly number[]) => shape.map((_, a) => shape.slice(a + 1).reduce((x, y) => x * y, 1));

/** Index (into a row-major tensor of `shape`) of every element of its `perm` transpose, in order. */
function transposedOrder(shape: readonly number[], perm: readonly number[]): number[] {
  const st = strides(shape);
  const outShape = perm.map((a) => shape[a]);
  const n = shape.reduce((x, y) => x * y, 1);
  const order: number[] = [];
  for (let o = 0; o < n; o++) {
    let rest = o;
    let from = 0;
    for (let a = outShape.length - 1; a >= 0; a--) {
      from += (rest % outShape[a]) * st[perm[a]];
      rest = Math.floor(rest / outShape[a]);
    }
    order.push(from);
  }
  return order;
}

const ramp = (n: number) => Float32Array.from({ length: n }, (_, i) => i * 0.25 - 3);

/** The naive reference of arrange: for each block (row-major over the splits), its elements in `perm` order. */
function arrangedOrder(shape: number[], perm: number[], splits: { axis: number; count: number }[]): number[] {
  const block = shape.map((d, a) => d / (splits.find((s) => s.axis === a)?.count ?? 1));
  const st = strides(shape);
  const order: number[] = [];
  const blocks = splits.reduce((n, s) => n * s.count, 1);
  for (let b = 0; b < blocks; b++) {
    // The block's first element: its index along each split axis, read off b in row-major order.
    let rest = b;
    const begin = shape.map(() => 0);
    for (let i = splits.length - 1; i >= 0; i--) {
      begin[splits[i].axis] = (rest % splits[i].count) * block[splits[i].axis];
      rest = Math.floor(rest / splits[i].count);
    }
    const base = begin.reduce((acc, v, a) => acc + v * st[a], 0);
    // Elements of the block in perm order, as offsets within the full tensor.
    const within = transposedOrder(block, perm).map((i) => {
      const bs = strides(block);
      return block.reduce((acc, _, a) => acc + (Math.floor(i / bs[a]) % block[a]) * st[a], 0);
    });
    order.push(...within.map((o) => base + o));
  }
  return order;
}

describe('arrange', () => {
  it.each([
    { shape: [6, 5], perm: [1, 0], splits: [] },
    { shape: [4, 3, 3, 3], perm: [2, 3, 1, 0], splits: [] },
    { shape: [8, 3], perm: [1, 0], splits: [{ axis: 0, count: 2 }] },
    { shape: [6, 2, 5], perm: [2, 0, 1], splits: [{ axis: 0, count: 3 }] },
    { shape: [4, 6, 3, 3], perm: [2, 3, 1, 0], splits: [{ axis: 1, count: 3 }] },
    { shape: [4, 6], perm: [1, 0], splits: [{ axis: 0, count: 2 }, { axis: 1, count: 3 }] },
    { shape: [7], perm: [0], splits: [] },
  ])('rearranges $shape by $perm in blocks $splits, for 1-, 2- and 4-byte elements', ({ shape, perm, splits }) => {
    const n = shape.reduce((x, y) => x * y, 1);
    const want = arrangedOrder(shape, perm, splits);
    for (const width of [1, 2, 4]) {
      const src = new Uint8Array(n * width).map((_, i) => (i * 37 + 11) & 0xff);
      const got = arrange(src, width, shape, perm, splits);
      const expected = new Uint8Array(n * width);
      want.forEach((from, o) => expected.set(src.subarray(from * width, (from + 1) * width), o * width));
      expect(Array.from(got), `width ${width}`).toEqual(Array.from(expected));
    }
  });

  it('numbers blocks row-major over the parts', () => {
    expect(blockIndex([])).toBe(0);
    expect(blockIndex([{ axis: 0, index: 1, count: 2 }, { axis: 1, index: 2, count: 3 }])).toBe(5);
  });

  it('handles a source at an unaligned offset', () => {
    const backing = new Uint8Array(1 + 6 * 4).map((_, i) => i);
    const got = arrange(backing.subarray(1), 4, [2, 3], [1, 0]);
    const src = backing.subarray(1);
    const expected = [0, 3, 1, 4, 2, 5].flatMap((e) => Array.from(src.subarray(e * 4, e * 4 + 4)));
    expect(Array.from(got)).toEqual(expected);
  });
});

describe('laidOutShape', () => {
  it('gives the shape of the part, permuted', () => {
    expect(laidOutShape([320, 320, 3, 3], { perm: [2, 3, 1, 0] })).toEqual([3, 3, 320, 320]);
    expect(laidOutShape([2560, 320], { perm: [1, 0], parts: [{ axis: 0, index: 1, count: 2 }] })).toEqual([320, 1280]);
    expect(laidOutShape([1280, 2560, 3, 3], { perm: [2, 3, 1, 0], parts: [{ axis: 1, index: 3, count: 8 }] })).toEqual([3, 3, 320, 1280]);
    expect(laidOutShape([5, 4], {})).toEqual([5, 4]);
  });

  it('refuses parts that do not divide axis 0 and perms that are not permutations', () => {
    expect(() => laidOutShape([5, 4], { parts: [{ axis: 0, index: 0, count: 2 }] })).toThrow(/equal blocks/);
    expect(() => laidOutShape([4, 4], { parts: [{ axis: 0, index: 2, count: 2 }] })).toThrow(/equal blocks/);
    expect(() => laidOutShape([4, 4], { parts: [{ axis: 2, index: 0, count: 2 }] })).toThrow(/equal blocks/);
    const twice = { axis: 0, index: 0, count: 2 };
    expect(() => laidOutShape([4, 4], { parts: [twice, twice] })).toThrow(/equal blocks/);
    expect(() => laidOutShape([4, 4], { perm: [0, 0] })).toThrow(/not a permutation/);
    expect(() => laidOutShape([4, 4], { perm: [1, 0, 2] })).toThrow(/not a permutation/);
  });
});

describe('HostTensors.decodeInto', () => {
  const values = ramp(2 * 6 * 4);
  // Both dtypes hold values that fp16 represents exactly.
  const stored: Record<string, { dtype: DType; bytes: Uint8Array }> = {
    w32: { dtype: 'F32', bytes: new Uint8Array(values.buffer) },
    w16: { dtype: 'F16', bytes: new Uint8Array(encodeFloat16(values).buffer) },
  };
  const src: TensorSource = {
    path: '<memory>',
    keys: () => Object.keys(stored),
    has: (k) => k in stored,
    info: (k) => ({ dtype: stored[k].dtype, shape: [12, 4] }),
    bytes: (k) => stored[k].bytes.slice(),
    float32: (k) => decodeToFloat32(stored[k].bytes, stored[k].dtype),
    close: () => undefined,
  };

  it('writes the requested part in the requested layout, from fp32 and fp16 bytes, again and again', () => {
    const host = HostTensors.copy(src, ['w32', 'w16']);
    // The second half of the rows [6, 4], transposed to [4, 6].
    const want = Float32Array.from({ length: 24 }, (_, o) => values[(6 + (o % 6)) * 4 + Math.floor(o / 6)]);
    for (const key of ['w32', 'w16']) {
      for (let rep = 0; rep < 2; rep++) {
        const out = new Float32Array(24);
        host.decodeInto(key, { perm: [1, 0], parts: [{ axis: 0, index: 1, count: 2 }] }, out);
        expect(Array.from(out), `${key} ${rep}`).toEqual(Array.from(want));
      }
      const first = new Float32Array(24);
      host.decodeInto(key, { perm: [1, 0], parts: [{ axis: 0, index: 0, count: 2 }] }, first);
      expect(first[1]).toBe(values[4]);
    }
  });

  it('refuses a second layout for one tensor, and file-layout reads of a rearranged one', () => {
    const host = HostTensors.copy(src, ['w32']);
    host.decodeInto('w32', { perm: [1, 0] }, new Float32Array(48));
    expect(() => host.decodeInto('w32', {}, new Float32Array(48))).toThrow(/another/);
    expect(() => host.float32('w32')).toThrow(/rearranged/);
    expect(() => host.decodeInto('w32', { perm: [1, 0] }, new Float32Array(47))).toThrow(RangeError);
  });
});

describe('copyBlock (the wasm Slice kernel)', () => {
  it.each([
    { shape: [4, 5, 6], begin: [1, 2, 3], size: [2, 3, 2] },
    { shape: [4, 5, 6], begin: [2, 0, 0], size: [1, 5, 6] },
    { shape: [4, 5, 6], begin: [0, 1, 0], size: [4, 2, 6] },
    { shape: [3, 1, 4, 2], begin: [1, 0, 1, 0], size: [2, 1, 3, 2] },
    { shape: [9], begin: [4], size: [5] },
    { shape: [2, 3], begin: [1, 2], size: [1, 1] },
  ])('copies $size at $begin of $shape', ({ shape, begin, size }) => {
    const n = shape.reduce((x, y) => x * y, 1);
    const src = Float32Array.from({ length: n }, (_, i) => i);
    const st = strides(shape);
    const outN = size.reduce((x, y) => x * y, 1);
    const want: number[] = [];
    for (let o = 0; o < outN; o++) {
      let rest = o;
      let from = 0;
      for (let a = size.length - 1; a >= 0; a--) {
        from += (begin[a] + (rest % size[a])) * st[a];
        rest = Math.floor(rest / size[a]);
      }
      want.push(src[from]);
    }
    const dst = new Float32Array(outN);
    copyBlock(src, dst, shape, begin, size);
    expect(Array.from(dst)).toEqual(want);
  });
});
