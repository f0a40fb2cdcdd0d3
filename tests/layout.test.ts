/**
 * Host-side rearrangement of weights (src/nn/arrangement.ts, HostTensors.decodeInto) and the wasm Slice kernel's
 * block copy (src/backend/wasm-kernels.ts), each against a naive element-by-element reference.
 */
import { describe, expect, it } from 'vitest';
import { arrange, blockIndex, laidOutShape } from '../src/nn/arrangement.js';
import { copyBlock } from '../src/backend/strided.js';
import { HostTensors } from '../src/nn/residency.js';
import { decodeToFloat32, encodeFloat16, type DType } from '../src/weights/dtypes.js';
import type { TensorSource } from '../src/weights/types.js';
import { ShapeError } from '../src/nn/errors.js';

const strides = (shape: readonly number[]) => shape.map((_, a) => shape.slice(a + 1).reduce((x, y) => x * y, 1));
const count = (shape: readonly number[]) => shape.reduce((x, y) => x * y, 1);

/** The coordinates of element `o` of a row-major tensor of `shape`. */
function unravel(o: number, shape: readonly number[]): number[] {
  const at = new Array<number>(shape.length);
  for (let a = shape.length - 1, rest = o; a >= 0; a--) {
    at[a] = rest % shape[a];
    rest = Math.floor(rest / shape[a]);
  }
  return at;
}

const ramp = (n: number) => Float32Array.from({ length: n }, (_, i) => i * 0.25 - 3);

/** The naive reference of arrange: for each block (row-major over the splits), its elements in `perm` order. */
function arrangedOrder(shape: number[], perm: number[], splits: { axis: number; count: number }[]): number[] {
  const block = shape.map((d, a) => d / (splits.find((s) => s.axis === a)?.count ?? 1));
  const outShape = perm.map((a) => block[a]);
  const st = strides(shape);
  const order: number[] = [];
  for (let b = 0; b < count(splits.map((s) => s.count)); b++) {
    const begin = shape.map(() => 0);
    unravel(b, splits.map((s) => s.count)).forEach((i, k) => (begin[splits[k].axis] = i * block[splits[k].axis]));
    for (let o = 0; o < count(block); o++) {
      order.push(unravel(o, outShape).reduce((from, i, a) => from + (begin[perm[a]] + i) * st[perm[a]], 0));
    }
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
    const n = count(shape);
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
    expect(() => host.decodeInto('w32', { perm: [1, 0] }, new Float32Array(47))).toThrow(ShapeError);
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
    const src = Float32Array.from({ length: count(shape) }, (_, i) => i);
    const st = strides(shape);
    const want = Array.from({ length: count(size) }, (_, o) => src[unravel(o, size).reduce((from, i, a) => from + (begin[a] + i) * st[a], 0)]);
    const dst = new Float32Array(count(size));
    copyBlock(src, dst, shape, begin, size);
    expect(Array.from(dst)).toEqual(want);
  });
});
