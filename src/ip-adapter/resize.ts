/**
 * Pillow's BICUBIC resize of a uint8 image (libImaging/Resample.c, ImagingResample), bit for bit: what
 * CLIPImageProcessor runs before the CLIP vision encoder, so the image tokens start from the same pixels.
 *
 *   separable: the horizontal pass first, then the vertical; a pass whose size does not change is skipped
 *   each pass: scale = in / out (a C float), support = 2 * max(1, scale) (it antialiases when shrinking)
 *     output i: center = (i + 0.5) * scale, taps j in [int(center - support + 0.5), int(center + support + 0.5))
 *     clamped to [0, in), weight k((j - center + 0.5) / max(1, scale)), normalized to sum 1, then fixed point
 *     with 22 fraction bits (rounded half away from zero); out = clip((sum w_j p_j + 2^21) >> 22, 0, 255)
 *   k: the cubic convolution kernel with a = -0.5
 * Rounding and clipping to uint8 between the passes is part of the result: a one-pass float resize differs by
 * up to 15 levels next to saturated edges.
 * Layout: row-major HWC, any channel count.
 */

const PRECISION_BITS = 32 - 8 - 2;
const ONE = 2 ** PRECISION_BITS;

/** Keys' cubic convolution kernel, a = -0.5 (Resample.c bicubic_filter). */
function bicubic(x: number): number {
  const a = -0.5;
  const t = Math.abs(x);
  if (t < 1) return ((a + 2) * t - (a + 3)) * t * t + 1;
  if (t < 2) return (((t - 5) * t + 8) * t - 4) * a;
  return 0;
}

interface Taps {
  readonly first: Int32Array; // first input index of each output
  readonly count: Int32Array;
  readonly ksize: number;
  readonly weights: Int32Array; // [out, ksize] fixed point
}

/** Resample.c precompute_coeffs + normalize_coeffs_8bpc for one axis. */
function taps(inSize: number, outSize: number): Taps {
  const scale = Math.fround(inSize / outSize); // (float)(in1 - in0) / outSize: float arithmetic in C
  const filterScale = Math.max(1, scale);
  const support = 2 * filterScale;
  const ksize = Math.ceil(support) * 2 + 1;
  const first = new Int32Array(outSize);
  const count = new Int32Array(outSize);
  const weights = new Int32Array(outSize * ksize);
  const k = new Float64Array(ksize);
  for (let i = 0; i < outSize; i++) {
    const center = (i + 0.5) * scale;
    const lo = Math.max(0, Math.trunc(center - support + 0.5));
    const hi = Math.min(inSize, Math.trunc(center + support + 0.5));
    let sum = 0;
    for (let j = 0; j < hi - lo; j++) {
      k[j] = bicubic((j + lo - center + 0.5) / filterScale);
      sum += k[j];
    }
    for (let j = 0; j < hi - lo; j++) {
      const w = sum === 0 ? k[j] : k[j] / sum;
      weights[i * ksize + j] = w < 0 ? Math.trunc(-0.5 + w * ONE) : Math.trunc(0.5 + w * ONE);
    }
    first[i] = lo;
    count[i] = hi - lo;
  }
  return { first, count, ksize, weights };
}

const clip8 = (ss: number): number => (ss >= ONE * 256 ? 255 : ss <= 0 ? 0 : Math.floor(ss / ONE));

/** One pass along an axis: `stride` elements between neighbours on it, `lines` x `inner` elements across it. */
function pass(src: Uint8Array, shape: [h: number, w: number, c: number], axis: 0 | 1, outSize: number): Uint8Array {
  const [h, w, c] = shape;
  const t = taps(axis === 0 ? h : w, outSize);
  const oh = axis === 0 ? outSize : h;
  const ow = axis === 1 ? outSize : w;
  const out = new Uint8Array(oh * ow * c);
  for (let y = 0; y < oh; y++) {
    for (let x = 0; x < ow; x++) {
      const i = axis === 0 ? y : x;
      const lo = t.first[i];
      const n = t.count[i];
      for (let ch = 0; ch < c; ch++) {
        let ss = ONE / 2;
        for (let j = 0; j < n; j++) {
          const at = axis === 0 ? ((lo + j) * w + x) * c + ch : (y * w + lo + j) * c + ch;
          ss += src[at] * t.weights[i * t.ksize + j];
        }
        out[(y * ow + x) * c + ch] = clip8(ss);
      }
    }
  }
  return out;
}

/** Pillow `Image.resize((outW, outH), Image.BICUBIC)` of a uint8 HWC image. */
export function resizeBicubicPillow(src: Uint8Array, h: number, w: number, c: number, outH: number, outW: number): Uint8Array {
  if (src.length !== h * w * c) throw new RangeError(`resizeBicubicPillow: ${src.length} bytes is not ${h}x${w}x${c}`);
  if (!(outH >= 1 && outW >= 1 && Number.isInteger(outH) && Number.isInteger(outW))) {
    throw new RangeError(`resizeBicubicPillow: output size must be positive integers, got ${outW}x${outH}`);
  }
  const horizontal = outW === w ? src : pass(src, [h, w, c], 1, outW);
  return outH === h ? horizontal : pass(horizontal, [h, outW, c], 0, outH);
}
