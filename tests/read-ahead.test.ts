/**
 * What a safetensors file asks the system to read ahead of its reads through the page cache
 * (SafetensorsFile.readAheadOf), and which reads go past it (readDirectly): the native readAhead, readDirect and
 * pageCached are replaced by recorders here, so what is asked for is seen whether or not the kernels are built.
 */
import { closeSync, constants, mkdtempSync, openSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeEach, describe, expect, it, vi } from 'vitest';

const asked: [number, number][] = [];
let answer = true;
/** Direct reads asked for, [position, bytes]; whether they succeed (filling out with 7s); what pageCached says. */
const direct: [number, number][] = [];
let directAnswer = true;
let cached = false;
vi.mock('../src/backend/kernels.js', async (original) => ({
  ...(await original<typeof import('../src/backend/kernels.js')>()),
  readAhead: (_fd: number, offset: number, length: number) => {
    asked.push([offset, length]);
    return answer;
  },
  readDirect: (_fd: number, position: number, out: Uint8Array) => {
    direct.push([position, out.byteLength]);
    if (directAnswer) out.fill(7);
    return directAnswer;
  },
  pageCached: () => cached,
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
    process.env.SD_DIRECT_READS = '0'; // every read through the page cache
  });
  afterAll(() => void delete process.env.SD_DIRECT_READS);

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

/** Whether this file system opens files for direct reads at all (tmpfs before Linux 6.6 does not). */
function opensDirect(): boolean {
  const probe = join(dir, 'probe');
  writeFileSync(probe, 'x');
  try {
    closeSync(openSync(probe, constants.O_RDONLY | (constants.O_DIRECT ?? 0)));
    return constants.O_DIRECT !== undefined;
  } catch {
    return false;
  }
}

describe.skipIf(!opensDirect())('a safetensors file reads large tensors past the page cache', () => {
  beforeEach(() => {
    asked.length = direct.length = 0;
    answer = directAnswer = true;
    cached = false;
  });

  it('tensors of 256 KB or more, at their place in the file, asking for no read-ahead; smaller ones through the cache', () => {
    const { path, at } = file(3, 64 * 1024); // 256 KB tensors
    const small = file(2, 1024);
    const f = SafetensorsFile.open(path);
    expect(f.bytes('t1').every((b) => b === 7)).toBe(true);
    expect(f.float32('t2').length).toBe(64 * 1024);
    f.close();
    expect(direct).toEqual([[at(1), 256 * 1024], [at(2), 256 * 1024]]);
    const g = SafetensorsFile.open(small.path);
    expect(g.float32('t1')).toEqual(new Float32Array(1024)); // the file's zeros, not the 7s
    g.close();
    expect(direct.length).toBe(2);
    expect(asked).toEqual([]);
  });

  it('not what the page cache holds', () => {
    cached = true;
    const { path } = file(2, 64 * 1024);
    const f = SafetensorsFile.open(path);
    expect(f.float32('t0')).toEqual(new Float32Array(64 * 1024));
    f.close();
    expect(direct).toEqual([]);
  });

  it('through the cache from the first refusal on, the file\'s own bytes', () => {
    directAnswer = false;
    const { path } = file(3, 64 * 1024);
    const f = SafetensorsFile.open(path);
    expect(f.float32('t0')).toEqual(new Float32Array(64 * 1024));
    expect(f.float32('t1')).toEqual(new Float32Array(64 * 1024));
    f.close();
    expect(direct.length).toBe(1);
  });

  it('not at all with SD_DIRECT_READS=0', () => {
    process.env.SD_DIRECT_READS = '0';
    try {
      const { path } = file(2, 64 * 1024);
      const f = SafetensorsFile.open(path);
      f.float32('t0');
      f.close();
    } finally {
      delete process.env.SD_DIRECT_READS;
    }
    expect(direct).toEqual([]);
  });
});
