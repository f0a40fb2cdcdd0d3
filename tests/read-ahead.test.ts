/**
 * What a safetensors file asks the system to read ahead of its reads (SafetensorsFile.readAheadOf): the native
 * readAhead is replaced by a recorder here, so the ranges asked for are seen whether or not the kernels are built.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeEach, describe, expect, it, vi } from 'vitest';

const asked: [number, number][] = [];
let answer = true;
vi.mock('../src/backend/kernels.js', async (original) => ({
  ...(await original<typeof import('../src/backend/kernels.js')>()),
  readAhead: (_fd: number, offset: number, length: number) => {
    asked.push([offset, length]);
    return answer;
  },
}));
const { SafetensorsFile, writeSafetensors } = await import('../src/weights/safetensors.js');

const dir = mkdtempSync(join(tmpdir(), 'sd-read-ahead-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A file of `n` F32 tensors t0..t{n-1} of `floats` each, in that order; the offset of each tensor's data. */
function file(n: number, floats: number): { path: string; at: (i: number) => number; size: number } {
  const path = join(dir, `f${n}-${floats}.safetensors`);
  const names = Array.from({ length: n }, (_, i) => `t${i}`);
  writeSafetensors(path, names.map((name) => [name, { dtype: 'F32', shape: [floats] }]), () => new Float32Array(floats));
  const f = SafetensorsFile.open(path);
  const size = (f as unknown as { size: number }).size, start = (f as unknown as { dataStart: number }).dataStart;
  f.close();
  asked.length = 0;
  return { path, at: (i) => start + i * floats * 4, size };
}

describe('a safetensors file reads ahead', () => {
  beforeEach(() => {
    asked.length = 0;
    answer = true;
  });

  it('from the first tensor on open, then 128 MB past each read, asking again once a quarter of that (or the rest of the file) is wanted', () => {
    const MB = 2 ** 20;
    const { path, at, size } = file(12, 4 * MB); // 16 MB tensors, 192 MB in all
    const f = SafetensorsFile.open(path);
    expect(asked).toEqual([[at(0), 128 * MB]]);
    for (let i = 0; i < 12; i++) f.float32(`t${i}`);
    f.close();
    for (let i = 1; i < asked.length; i++) expect(asked[i][0]).toBe(asked[i - 1][0] + asked[i - 1][1]); // contiguous
    const last = asked.at(-1)!;
    expect(last[0] + last[1]).toBe(size);
    // t1 wants 32 MB past what was asked (t1's end + 128 MB); t3 the rest of the file, 16 MB short of a quarter
    expect(asked.map(([, length]) => length / MB)).toEqual([128, 32, 32]);
  });

  it('again from where a read lands outside what was asked for (a model\'s own order, not the file\'s)', () => {
    const MB = 2 ** 20;
    const { path, at, size } = file(12, 4 * MB);
    const f = SafetensorsFile.open(path);
    f.float32('t10'); // past the first 128 MB: from t10, to the end
    f.float32('t11'); // within what was asked: nothing new
    f.float32('t0'); // before it: from t0 again
    f.bytes('t1');
    f.close();
    expect(asked).toEqual([[at(0), 128 * MB], [at(10), size - at(10)], [at(0), 144 * MB]]);
  });

  it('no more once the system says it takes no such advice', () => {
    answer = false;
    const { path } = file(4, 256);
    const f = SafetensorsFile.open(path);
    f.float32('t2');
    f.float32('t0');
    f.close();
    expect(asked.length).toBe(1);
  });
});
