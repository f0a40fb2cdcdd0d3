/**
 * torch's CUDA random numbers, restated on the CPU: `new PhiloxGenerator(seed).randn(shape)` returns the float32
 * values of `torch.randn(shape, generator=torch.Generator('cuda').manual_seed(seed))` as NVIDIA GPUs compute them
 * (A1111's "NV" noise source, `modules/rng_philox.py`; curand's Philox4_32_10 + `_curand_box_muller`), and
 * successive calls continue the same stream, as successive torch calls on one generator do.
 *
 * Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel Random Numbers: As Easy as 1, 2, 3", SC11, sec. 5) is
 * counter-based: the output is 10 rounds of a bijection of a 128-bit counter c0..c3 under a 64-bit key k0, k1.
 *   round: (hi0, lo0) = M0 * c0, (hi1, lo1) = M1 * c2 (32x32 -> 64-bit products, M0 = 0xD2511F53, M1 = 0xCD9E8D57)
 *          c = [hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0]
 *   between rounds the key is bumped by the Weyl constants: k0 += 0x9E3779B9, k1 += 0xBB67AE85 (mod 2^32).
 *
 * Element i of the generator's call number `offset` (0 for the first randn call, then 1, 2, ...):
 *   [x0, x1, x2, x3] = philox(counter [offset, 0, i, 0], key [seed mod 2^32, seed >> 32])
 *   u = x0 c + c / 2,  v = x1 c2pi + c2pi / 2      (in (0, 1) and (0, 2 pi); c = 2^-32, c2pi = float32(2 pi 2^-32))
 *   value = float32(sqrt(-2 ln u) sin v)             (Box-Muller; x2, x3 and the cos half are unused)
 * So a value depends only on (seed, offset, i): the shape of a draw matters only through its size.
 *
 * Precision: the constants are float32 (curand's CURAND_2POW32_INV and CURAND_2POW32_INV_2PI) but the arithmetic
 * is double, rounded to float32 once at the end: NumPy, in which A1111 states this, promotes uint32 x float32
 * arrays to float64. That reproduces A1111's numbers (tests/fixtures/rng-philox) bit for bit; float32 arithmetic
 * throughout, as curand does it on the GPU, differs from them by a few float32 ulps (4e-7 of the largest value).
 */
import type { NoiseGenerator } from './noise.js';

const M0 = 0xd2511f53;
const M1 = 0xcd9e8d57;
const W0 = 0x9e3779b9;
const W1 = 0xbb67ae85;
const TWO_POW_32 = 2 ** 32;
const f32 = Math.fround;
/** curand's CURAND_2POW32_INV and CURAND_2POW32_INV_2PI (A1111's `two_pow32_inv`, `two_pow32_inv_2pi`), float32. */
const U_SCALE = 2 ** -32;
const V_SCALE = f32(f32(2 * Math.PI) * U_SCALE);

/**
 * The high 32 bits of a * m for 32-bit unsigned a, m. a * m can exceed 2^53, so m is split into 16-bit halves:
 * a * m = a * mHi * 2^16 + a * mLo, both products below 2^48 and exact in a double, and
 * floor(a m / 2^32) = floor((a * mHi + floor(a * mLo / 2^16)) / 2^16).
 */
function mulHi32(a: number, m: number): number {
  const carry = Math.floor((a * (m & 0xffff)) / 0x10000);
  return Math.floor((a * (m >>> 16) + carry) / 0x10000);
}

/** Philox4x32 rounds on c (the counter in, the output out) under key k0, k1; the key bump follows every round but the last. */
function philoxRounds(c: Uint32Array, k0: number, k1: number, rounds: number): void {
  for (let r = 0; r < rounds; r++) {
    if (r > 0) {
      k0 = (k0 + W0) >>> 0;
      k1 = (k1 + W1) >>> 0;
    }
    const c0 = c[0];
    const c2 = c[2];
    const hi0 = mulHi32(c0, M0);
    const hi1 = mulHi32(c2, M1);
    c[0] = hi1 ^ c[1] ^ k0;
    c[1] = Math.imul(c2, M1);
    c[2] = hi0 ^ c[3] ^ k1;
    c[3] = Math.imul(c0, M0);
  }
}

function checkUint32(name: string, x: number): void {
  if (!Number.isInteger(x) || x < 0 || x >= TWO_POW_32) throw new RangeError(`philox: ${name} must be a 32-bit unsigned integer, got ${x}`);
}

/** The Philox4x32-R block function (Random123's `philox4x32_R`): four 32-bit outputs of a counter and key. */
export function philox4x32(
  counter: readonly [number, number, number, number],
  key: readonly [number, number],
  rounds = 10,
): [number, number, number, number] {
  [...counter, ...key].forEach((x, j) => checkUint32(j < 4 ? `counter[${j}]` : `key[${j - 4}]`, x));
  const c = Uint32Array.from(counter);
  philoxRounds(c, key[0], key[1], rounds);
  return [c[0], c[1], c[2], c[3]];
}

/** A seed as torch.Generator('cuda').manual_seed takes it (modulo 2^64), split into the Philox key [low, high]. */
function philoxKey(seed: number | bigint): [number, number] {
  if (typeof seed === 'number' && !Number.isInteger(seed)) throw new RangeError(`philox: seed must be an integer, got ${seed}`);
  const s = BigInt.asUintN(64, BigInt(seed));
  return [Number(s & 0xffffffffn), Number(s >> 32n)];
}

function numelOf(shape: readonly number[] | number): number {
  const n = typeof shape === 'number' ? shape : shape.reduce((a, b) => a * b, 1);
  if (!Number.isInteger(n) || n < 0 || n > TWO_POW_32) {
    throw new RangeError(`philoxRandn: bad shape ${typeof shape === 'number' ? shape : `[${shape.join(', ')}]`}`);
  }
  return n;
}

/**
 * The `offset`-th torch.randn call of a CUDA generator seeded with `seed` (every earlier call counts one, whatever
 * its size): standard normal float32 values in row-major order of `shape`, or `count` of them.
 */
export function philoxRandn(seed: number | bigint, shape: readonly number[] | number, offset = 0): Float32Array {
  const [k0, k1] = philoxKey(seed);
  checkUint32('offset', offset);
  const out = new Float32Array(numelOf(shape));
  const c = new Uint32Array(4);
  for (let i = 0; i < out.length; i++) {
    c[0] = offset;
    c[1] = 0;
    c[2] = i;
    c[3] = 0;
    philoxRounds(c, k0, k1, 10);
    const u = c[0] * U_SCALE + U_SCALE / 2;
    const v = c[1] * V_SCALE + V_SCALE / 2;
    out[i] = Math.sqrt(-2 * Math.log(u)) * Math.sin(v); // rounded to float32 on store
  }
  return out;
}

/** A CUDA torch.Generator: each randn call draws with the next offset, as A1111's `rng_philox.Generator` does. */
export class PhiloxGenerator implements NoiseGenerator {
  /** How many randn calls this generator has made (the Philox counter's first word for the next one). */
  private calls = 0;

  /** Like `torch.Generator('cuda').manual_seed(seed)`: seeds are taken modulo 2^64. */
  constructor(private readonly seed: number | bigint) {
    philoxKey(seed);
  }

  get offset(): number {
    return this.calls;
  }

  randn(shape: readonly number[]): Float32Array {
    const out = philoxRandn(this.seed, shape, this.calls);
    this.calls++;
    return out;
  }
}
