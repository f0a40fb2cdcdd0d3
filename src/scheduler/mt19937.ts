/**
 * MT19937, the 32-bit Mersenne Twister (Matsumoto & Nishimura 1998), seeded as PyTorch's
 * `at::mt19937` (aten/src/ATen/core/MT19937RNGEngine.h) seeds it: state[0] = the low 32 bits of
 * the seed, state[j] = 1812433253 * (state[j-1] ^ (state[j-1] >> 30)) + j. Same stream as std::mt19937.
 */

const N = 624;
const M = 397;
const MATRIX_A = 0x9908b0df;
const UPPER_MASK = 0x80000000;
const LOWER_MASK = 0x7fffffff;

export class Mt19937 {
  private readonly state = new Uint32Array(N);
  private next = N; // index of the next word to temper; N = regenerate first

  /** Only the low 32 bits of the seed are used, as in torch. */
  constructor(seed: number | bigint) {
    const s = this.state;
    s[0] = Number(BigInt.asUintN(32, BigInt(seed)));
    for (let j = 1; j < N; j++) {
      const prev = s[j - 1];
      s[j] = (Math.imul(1812433253, prev ^ (prev >>> 30)) + j) >>> 0;
    }
  }

  /** The next 32-bit output, as an unsigned integer. */
  nextUint32(): number {
    if (this.next >= N) this.twist();
    let y = this.state[this.next++];
    y ^= y >>> 11;
    y ^= (y << 7) & 0x9d2c5680;
    y ^= (y << 15) & 0xefc60000;
    y ^= y >>> 18;
    return y >>> 0;
  }

  /** Regenerates all 624 words of state. */
  private twist(): void {
    const s = this.state;
    for (let k = 0; k < N; k++) {
      const y = (s[k] & UPPER_MASK) | (s[(k + 1) % N] & LOWER_MASK);
      s[k] = s[(k + M) % N] ^ (y >>> 1) ^ (y & 1 ? MATRIX_A : 0);
    }
    this.next = 0;
  }
}
