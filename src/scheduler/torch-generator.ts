/**
 * A torch-compatible random number generator: `new TorchGenerator(seed).randn(shape)` returns the
 * float32 values of `torch.randn(shape, generator=torch.Generator('cpu').manual_seed(seed))`, and
 * successive calls continue the same stream, as successive torch calls on one generator do.
 *
 * Torch's CPU generator (CPUGeneratorImpl) is an mt19937 engine; `random()` is one 32-bit output,
 * `random64()` two of them, the first as the high word. torch.randn on a float32 tensor takes one of
 * two paths (aten/src/ATen/native/cpu/DistributionTemplates.h, `normal_kernel`):
 *   numel >= 16: `normal_fill` fills the tensor with uniform floats, then Box-Muller over each block of
 *                16, pairing element j with j + 8; when numel is not a multiple of 16, the last 16
 *                elements are drawn again and transformed again.
 *   numel <  16: one `at::normal_distribution<double>` draw per element (DistributionsHelper.h): Box-Muller
 *                over two uniform doubles that yields cos now and caches sin in the generator for the next
 *                scalar draw, which is why a second small draw depends on what the first left behind.
 */
import { Mt19937 } from './mt19937.js';
import type { NoiseGenerator } from './noise.js';

const TWO_POW_24 = 2 ** 24;
const TWO_POW_32 = 2 ** 32;
const TWO_POW_53 = 2 ** 53;
const f32 = Math.fround;

export class TorchGenerator implements NoiseGenerator {
  private readonly engine: Mt19937;
  /** The sin half of the last scalar Box-Muller pair (torch's `next_double_normal_sample_`). */
  private cachedNormal: number | null = null;

  /** Like `torch.Generator('cpu').manual_seed(seed)`: seeds are taken modulo 2^32, as torch does. */
  constructor(seed: number | bigint) {
    if (typeof seed === 'number' && !Number.isInteger(seed)) {
      throw new RangeError(`TorchGenerator: seed must be an integer, got ${seed}`);
    }
    this.engine = new Mt19937(seed);
  }

  /** Standard normal float32 values in row-major order of `shape`, as torch.randn draws them. */
  randn(shape: readonly number[]): Float32Array {
    const numel = shape.reduce((a, b) => a * b, 1);
    if (!Number.isInteger(numel) || numel < 0) {
      throw new RangeError(`TorchGenerator.randn: bad shape [${shape.join(', ')}]`);
    }
    const out = new Float32Array(numel);
    if (numel >= 16) this.normalFill(out);
    else for (let i = 0; i < numel; i++) out[i] = this.normalDouble();
    return out;
  }

  /** `uniform_real_distribution<float>(0, 1)`: the low 24 bits of one 32-bit output / 2^24. */
  private uniformFloat(): number {
    return (this.engine.nextUint32() & 0xffffff) / TWO_POW_24;
  }

  /** `uniform_real_distribution<double>(0, 1)`: the low 53 bits of random64() / 2^53. */
  private uniformDouble(): number {
    const hi = this.engine.nextUint32();
    const lo = this.engine.nextUint32();
    return ((hi & 0x1fffff) * TWO_POW_32 + lo) / TWO_POW_53;
  }

  /** `normal_fill`: uniforms for every element, then Box-Muller per 16-block; a ragged tail is redrawn. */
  private normalFill(data: Float32Array): void {
    const n = data.length;
    for (let i = 0; i < n; i++) data[i] = this.uniformFloat();
    for (let i = 0; i + 16 <= n; i += 16) boxMuller16(data, i);
    if (n % 16 !== 0) {
      for (let i = n - 16; i < n; i++) data[i] = this.uniformFloat();
      boxMuller16(data, n - 16);
    }
  }

  /** `normal_distribution<double>` with mean 0, std 1, using and refilling the cached second value. */
  private normalDouble(): number {
    if (this.cachedNormal !== null) {
      const cached = this.cachedNormal;
      this.cachedNormal = null;
      return cached;
    }
    const u1 = this.uniformDouble();
    const u2 = this.uniformDouble();
    const r = Math.sqrt(-2 * Math.log(1 - u2));
    const theta = 2 * Math.PI * u1;
    this.cachedNormal = r * Math.sin(theta);
    return r * Math.cos(theta);
  }
}

/**
 * `normal_fill_16` in float32 arithmetic: u1 = 1 - data[j] (in (0, 1], safe for log), u2 = data[j + 8].
 * theta = float(2 pi) * u2 rounded to float, as the AVX2 kernel (`normal_fill_16_AVX2`, what x86 builds of
 * torch run) computes it; this matches torch's output to about one float ulp.
 */
function boxMuller16(data: Float32Array, start: number): void {
  for (let j = start; j < start + 8; j++) {
    const u1 = f32(1 - data[j]);
    const u2 = data[j + 8];
    const radius = f32(Math.sqrt(f32(-2 * f32(Math.log(u1)))));
    const theta = f32(f32(2 * Math.PI) * u2);
    data[j] = f32(radius * f32(Math.cos(theta)));
    data[j + 8] = f32(radius * f32(Math.sin(theta)));
  }
}
