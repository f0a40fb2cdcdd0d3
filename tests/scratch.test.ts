/**
 * backend/scratch.ts: kernel outputs are reused only after the block that made them has returned, never its result,
 * never inside the block, and the free list stays under its cap.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { SCRATCH_MAX_ARRAY_BYTES, SCRATCH_MAX_BYTES, dropScratch, kernelOutput, scratchBytes, scratchScope, setScratchRelease } from '../src/backend/scratch.js';

afterEach(() => {
  dropScratch();
});

function block(lengths: number[]): { made: Float32Array[]; result: Float32Array } {
  const made: Float32Array[] = [];
  const r = scratchScope(() => {
    for (const n of lengths) made.push(kernelOutput(n));
    return { data: made[made.length - 1] };
  });
  return { made, result: r.data };
}

describe('scratch', () => {
  it('reuses a finished block\'s arrays, but not its result', () => {
    const first = block([1000, 1000, 1000]);
    expect(scratchBytes()).toBe(2 * 1000 * 4);
    const second = block([1000, 1000, 1000]);
    const reused = second.made.filter((a) => first.made.some((b) => b.buffer === a.buffer));
    expect(reused).toHaveLength(2);
    expect(second.made.some((a) => a.buffer === first.result.buffer)).toBe(false);
  });

  it('never hands out an array twice inside one block', () => {
    block([500, 500, 500, 500]);
    const { made } = block([500, 500, 500, 500, 500, 500]);
    expect(new Set(made.map((a) => a.buffer)).size).toBe(made.length);
  });

  it('serves a request from a larger array only within the slack, as a view of the requested length', () => {
    block([1000, 1]);
    const { made } = block([900, 700, 1]);
    expect(made[0].length).toBe(900);
    expect(made[0].buffer.byteLength).toBe(1000 * 4); // reused
    expect(made[1].buffer.byteLength).toBe(700 * 4); // 700 < 80% of 1000: fresh
  });

  it('passes an inner scope\'s result to the enclosing scope, reused once that ends', () => {
    let inner: Float32Array | null = null;
    scratchScope(() => {
      inner = scratchScope(() => ({ data: kernelOutput(300) })).data;
      expect(scratchBytes()).toBe(0);
      return { data: kernelOutput(10) };
    });
    expect(scratchBytes()).toBe(300 * 4);
    const { made } = block([300, 1]);
    expect(made[0].buffer).toBe(inner!.buffer);
  });

  it('gives everything back when the block throws', () => {
    expect(() =>
      scratchScope(() => {
        kernelOutput(64);
        throw new Error('layer failed');
      }),
    ).toThrow('layer failed');
    expect(scratchBytes()).toBe(64 * 4);
  });

  it('keeps at most SCRATCH_MAX_BYTES, freeing the arrays unused longest for a size it lacks', () => {
    const released: Float32Array[] = [];
    setScratchRelease((a) => released.push(a));
    try {
      const eighth = SCRATCH_MAX_BYTES / 8 / 4; // an eighth of the cap, in floats
      const first = block([...Array<number>(10).fill(eighth), 1]);
      expect(scratchBytes()).toBe(SCRATCH_MAX_BYTES);
      expect(released).toHaveLength(2); // the first two returned
      released.forEach((a, i) => expect(a.buffer === first.made[i].buffer).toBe(true));
      // a size none serves: room made beside the rest by freeing the oldest, the others still reused
      const second = block([eighth + eighth / 2, eighth, 1]);
      expect(released).toHaveLength(4);
      expect(first.made.some((a) => a.buffer === second.made[1].buffer)).toBe(true);
      expect(scratchBytes()).toBeLessThanOrEqual(SCRATCH_MAX_BYTES);
      dropScratch();
      expect(scratchBytes()).toBe(0);
      expect(released).toHaveLength(4 + 7); // the five left of the first block's, and the second's two
    } finally {
      setScratchRelease(() => undefined);
    }
  });

  it('never lends an array over SCRATCH_MAX_ARRAY_BYTES', () => {
    const big = SCRATCH_MAX_ARRAY_BYTES / 4 + 1;
    block([big, 1]);
    expect(scratchBytes()).toBe(0);
    block([big - 1, 1]);
    expect(scratchBytes()).toBe(SCRATCH_MAX_ARRAY_BYTES);
  });

  it('outside any scope allocates fresh and keeps nothing', () => {
    const a = kernelOutput(128);
    expect(a.length).toBe(128);
    expect(scratchBytes()).toBe(0);
  });
});
