/**
 * The CUDA (Philox) generator: the Philox4x32 block function against Random123's known answers and a BigInt
 * restatement, then torch.randn parity on every fixture case, the offset stream, seeds, and the one place
 * (createGenerator, torchNoise) where the pipeline picks its noise source.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { initBackend } from '../src/backend/select.js';
import { maxRelError } from '../src/parity/compare.js';
import { run } from '../src/parity/rng-philox.js';
import { createGenerator, NOISE_SOURCES, torchNoise, type NoiseSource } from '../src/scheduler/noise.js';
import { philox4x32, philoxRandn, PhiloxGenerator } from '../src/scheduler/philox.js';
import { TorchGenerator } from '../src/scheduler/torch-generator.js';
import { SafetensorsFile } from '../src/weights/safetensors.js';

const DIR = 'tests/fixtures/rng-philox';

function fixture(key: string): Float32Array {
  const f = SafetensorsFile.open(`${DIR}/randn.safetensors`);
  try {
    return f.float32(key);
  } finally {
    f.close();
  }
}

type Block = [number, number, number, number];

/** Random123 `kat_vectors`, the philox4x32 lines: rounds, counter, key -> output. */
const KAT: [number, Block, [number, number], Block][] = [
  [10, [0, 0, 0, 0], [0, 0], [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]],
  [10, [0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff], [0xffffffff, 0xffffffff], [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]],
  [10, [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0], [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]],
  [7, [0, 0, 0, 0], [0, 0], [0x5f6fb709, 0x0d893f64, 0x4f121f81, 0x4f730a48]],
  [7, [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0], [0x4dfccaba, 0x190a87f0, 0xc47362ba, 0xb6b5242a]],
];

/** Philox4x32 with exact 64-bit products (BigInt), straight from the paper's round function. */
function philoxBigInt(counter: Block, key: [number, number], rounds: number): Block {
  const mask = 0xffffffffn;
  let [c0, c1, c2, c3] = counter.map(BigInt);
  let [k0, k1] = key.map(BigInt);
  for (let r = 0; r < rounds; r++) {
    if (r > 0) [k0, k1] = [(k0 + 0x9e3779b9n) & mask, (k1 + 0xbb67ae85n) & mask];
    const p0 = c0 * 0xd2511f53n;
    const p1 = c2 * 0xcd9e8d57n;
    [c0, c1, c2, c3] = [(p1 >> 32n) ^ c1 ^ k0, p1 & mask, (p0 >> 32n) ^ c3 ^ k1, p0 & mask];
  }
  return [c0, c1, c2, c3].map(Number) as Block;
}

describe('philox4x32', () => {
  it.each(KAT)('matches the Random123 known answer (%i rounds, counter %j, key %j)', (rounds, ctr, key, want) => {
    expect(philox4x32(ctr, key, rounds)).toEqual(want);
  });

  it('agrees with an exact BigInt restatement on words whose products exceed 2^53', () => {
    let s = 0x12345678;
    const word = () => (s = (Math.imul(s, 1664525) + 1013904223) >>> 0);
    for (let n = 0; n < 500; n++) {
      const ctr: Block = [word(), word(), word(), word()];
      const key: [number, number] = [word(), word()];
      expect(philox4x32(ctr, key)).toEqual(philoxBigInt(ctr, key, 10));
    }
  });

  it('refuses words that are not 32-bit unsigned integers', () => {
    expect(() => philox4x32([2 ** 32, 0, 0, 0], [0, 0])).toThrow(RangeError);
    expect(() => philox4x32([0, 0, 0, 0], [-1, 0])).toThrow(RangeError);
  });
});

describe('PhiloxGenerator', () => {
  it('matches torch.randn on a CUDA generator for every fixture draw', async () => {
    const results = await run(DIR, { backend: 'cpu' });
    expect(results).toHaveLength(6);
    for (const r of results) expect(r, `${r.name}: ${r.detail ?? ''}`).toMatchObject({ passed: true });
  });

  it('reproduces the fixture bit for bit (double Box-Muller on float32 constants, as A1111 computes it)', () => {
    const gen = new PhiloxGenerator(42);
    expect(maxRelError(gen.randn([1, 4, 64, 64]), fixture('seed42_draw0'))).toBe(0);
    expect(maxRelError(gen.randn([1, 4, 8, 8]), fixture('seed42_draw1'))).toBe(0);
  });

  it('is deterministic, and different seeds give different noise', () => {
    expect(philoxRandn(7, [2, 3, 5])).toEqual(philoxRandn(7, [2, 3, 5]));
    expect(maxRelError(philoxRandn(7, 64), philoxRandn(8, 64))).toBeGreaterThan(0.1);
  });

  it('each call runs at the next offset; a value depends only on seed, offset and index', () => {
    const gen = new PhiloxGenerator(0);
    expect(gen.offset).toBe(0);
    gen.randn([3, 4]);
    expect(gen.offset).toBe(1);
    expect(gen.randn([3, 4])).toEqual(fixture('seed0_draw1'));
    expect(philoxRandn(0, [3, 4], 1)).toEqual(fixture('seed0_draw1'));
    // the shape matters only through its size, and a smaller draw is a prefix of a larger one at the same offset
    expect(philoxRandn(42, [16, 16])).toEqual(fixture('seed42_draw0').slice(0, 256));
    expect(philoxRandn(42, 256, 1)).toEqual(fixture('seed42_draw1'));
    expect(maxRelError(philoxRandn(42, 256, 0), philoxRandn(42, 256, 1))).toBeGreaterThan(0.1);
  });

  it('takes seeds modulo 2^64 and uses the high word as the key, unlike the CPU generator', () => {
    const want = fixture('seed4294967295_draw0');
    expect(new PhiloxGenerator(4294967295n).randn([1, 4, 8, 8])).toEqual(want);
    expect(new PhiloxGenerator(2n ** 64n + 4294967295n).randn([1, 4, 8, 8])).toEqual(want);
    expect(new PhiloxGenerator(-1n).randn([8])).toEqual(new PhiloxGenerator(2n ** 64n - 1n).randn([8]));
    expect(maxRelError(philoxRandn(2 ** 32 + 42, 64), philoxRandn(42, 64))).toBeGreaterThan(0.1);
  });

  it('refuses a fractional seed, a bad offset and a bad shape', () => {
    expect(() => new PhiloxGenerator(1.5)).toThrow(RangeError);
    expect(() => philoxRandn(0, 4, -1)).toThrow(RangeError);
    expect(() => philoxRandn(0, 4, 0.5)).toThrow(RangeError);
    expect(() => philoxRandn(0, [2, -3])).toThrow(RangeError);
  });
});

describe('createGenerator and torchNoise', () => {
  beforeAll(async () => {
    await initBackend({ backend: 'cpu', log: null });
  });

  it('picks the CPU (mt19937) or the CUDA (Philox) generator', () => {
    expect(NOISE_SOURCES).toEqual(['cpu', 'gpu']);
    expect(createGenerator('cpu', 42)).toBeInstanceOf(TorchGenerator);
    expect(createGenerator('gpu', 42)).toBeInstanceOf(PhiloxGenerator);
    expect(createGenerator('cpu', 42).randn([1, 4, 8, 8])).toEqual(new TorchGenerator(42).randn([1, 4, 8, 8]));
    expect(() => createGenerator('tpu' as NoiseSource, 42)).toThrow(/use one of cpu, gpu/);
  });

  it('start noise and a later step noise come from one generator at offsets 0 and 1, NCHW handed over as NHWC', () => {
    const noise = torchNoise(createGenerator('gpu', 42));
    const start = noise([1, 64, 64, 4]);
    const step = noise([1, 8, 8, 4]);
    const toNhwc = (nchw: Float32Array, hw: number) => {
      const out = new Float32Array(nchw.length);
      for (let c = 0; c < 4; c++) for (let p = 0; p < hw; p++) out[p * 4 + c] = nchw[c * hw + p];
      return out;
    };
    expect(start.shape).toEqual([1, 64, 64, 4]);
    expect(start.dataSync()).toEqual(toNhwc(fixture('seed42_draw0'), 64 * 64));
    expect(step.dataSync()).toEqual(toNhwc(fixture('seed42_draw1'), 8 * 8));
    start.dispose();
    step.dispose();
  });
});
