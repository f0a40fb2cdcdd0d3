/**
 * Element types of weight files (the safetensors names) and their decoding to float32.
 * Computation is always float32; fp16 and bf16 are storage formats only.
 */

import { widenHalves } from '../backend/kernels.js';

export const DTYPE_BYTES = {
  BOOL: 1, U8: 1, I8: 1, F8_E5M2: 1, F8_E4M3: 1,
  I16: 2, U16: 2, F16: 2, BF16: 2,
  I32: 4, U32: 4, F32: 4,
  I64: 8, U64: 8, F64: 8,
} as const;

export type DType = keyof typeof DTYPE_BYTES;

export function isDType(s: unknown): s is DType {
  return typeof s === 'string' && Object.hasOwn(DTYPE_BYTES, s);
}

/** dtypes that decode to float32 for computation. */
export const FLOAT_DTYPES: readonly DType[] = ['F32', 'F16', 'BF16', 'F64'];

export function isFloatDType(d: DType): boolean {
  return FLOAT_DTYPES.includes(d);
}

// IEEE half -> float32 through a 64 Ki-entry table: one lookup per value, exact for every input.
let halfTable: Float32Array | null = null;
/** From this many values up, halves are widened by the native kernels when they are there (a call costs ~1 us). */
const NATIVE_HALVES_FROM = 4096;

function halfToFloatTable(): Float32Array {
  if (halfTable !== null) return halfTable;
  const t = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const sign = h & 0x8000 ? -1 : 1;
    const exp = (h >> 10) & 0x1f;
    const frac = h & 0x3ff;
    if (exp === 0) t[h] = sign * frac * 2 ** -24; // subnormal
    else if (exp === 31) t[h] = frac === 0 ? sign * Infinity : NaN;
    else t[h] = sign * (1 + frac / 1024) * 2 ** (exp - 15);
  }
  halfTable = t;
  return t;
}

/** Little-endian bytes of `dtype` -> float32. `bytes` may be unaligned. */
export function decodeToFloat32(bytes: Uint8Array, dtype: DType): Float32Array {
  const out = new Float32Array(bytes.byteLength / DTYPE_BYTES[dtype]);
  decodeInto(bytes, dtype, out);
  return out;
}

/** Little-endian bytes of `dtype` -> `out` (as many elements as `bytes` holds), with no allocation when aligned. */
export function decodeInto(bytes: Uint8Array, dtype: DType, out: Float32Array): void {
  const n = bytes.byteLength / DTYPE_BYTES[dtype];
  if (out.length !== n) throw new RangeError(`decodeInto: ${n} ${dtype} values do not fill ${out.length} floats`);
  const aligned = bytes.byteOffset % DTYPE_BYTES[dtype] === 0 ? bytes : bytes.slice();
  switch (dtype) {
    case 'F32':
      out.set(new Float32Array(aligned.buffer, aligned.byteOffset, n));
      return;
    case 'F16': {
      const src = new Uint16Array(aligned.buffer, aligned.byteOffset, n);
      if (n >= NATIVE_HALVES_FROM && widenHalves(src, out)) return; // F16C, where the native kernels are built
      const table = halfToFloatTable();
      for (let i = 0; i < n; i++) out[i] = table[src[i]];
      return;
    }
    case 'BF16': {
      // bfloat16 is the top half of a float32.
      const src = new Uint16Array(aligned.buffer, aligned.byteOffset, n);
      const bits = new Uint32Array(out.buffer, out.byteOffset, n);
      for (let i = 0; i < n; i++) bits[i] = src[i] << 16;
      return;
    }
    case 'F64':
      out.set(new Float64Array(aligned.buffer, aligned.byteOffset, n));
      return;
    default:
      throw new TypeError(`cannot decode ${dtype} as floating point`);
  }
}

/** float32 -> IEEE half, round to nearest even (what torch's .half() does). */
export function encodeFloat16(src: Float32Array): Uint16Array {
  const f = new Float32Array(1);
  const u = new Uint32Array(f.buffer);
  const out = new Uint16Array(src.length);
  for (let i = 0; i < src.length; i++) {
    f[0] = src[i];
    const x = u[0];
    const sign = (x >>> 16) & 0x8000;
    const exp = (x >>> 23) & 0xff;
    let mant = x & 0x7fffff;
    if (exp === 0xff) {
      out[i] = sign | 0x7c00 | (mant !== 0 ? 0x200 : 0);
      continue;
    }
    const e = exp - 127 + 15;
    if (e >= 31) {
      out[i] = sign | 0x7c00;
      continue;
    }
    if (e <= 0) {
      if (e < -10) {
        out[i] = sign;
        continue;
      }
      mant |= 0x800000;
      const shift = 14 - e;
      let half = mant >>> shift;
      const rem = mant & ((1 << shift) - 1);
      const mid = 1 << (shift - 1);
      if (rem > mid || (rem === mid && (half & 1) === 1)) half++;
      out[i] = sign | half;
      continue;
    }
    let half = (e << 10) | (mant >>> 13);
    const rem = mant & 0x1fff;
    if (rem > 0x1000 || (rem === 0x1000 && (half & 1) === 1)) half++;
    out[i] = sign | half;
  }
  return out;
}

/** Little-endian int64 bytes -> numbers; throws if a value is outside the exactly representable range. */
export function decodeInt64(bytes: Uint8Array): number[] {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out: number[] = [];
  for (let i = 0; i < bytes.byteLength; i += 8) {
    const v = view.getBigInt64(i, true);
    if (v > BigInt(Number.MAX_SAFE_INTEGER) || v < BigInt(Number.MIN_SAFE_INTEGER)) {
      throw new RangeError(`int64 value ${v} does not fit a JavaScript number`);
    }
    out.push(Number(v));
  }
  return out;
}
