/**
 * The VAE decode in overlapping tiles, for images whose feature maps do not fit wasm's 4 GiB heap in one piece: the
 * decoder needs ~5.1 KiB of heap per output pixel (src/pipeline/wasm-plan.ts), 5.1 GiB for SDXL's 1024x1024.
 *
 *   the latent [1, h, w, c] is cut into tiles of at most `tile` latent pixels a side, neighbours overlapping by
 *   `overlap`; each tile is decoded on its own; the image is the average of the decoded tiles, each weighted by a
 *   linear ramp over the overlap (1 inside, falling towards an edge that borders another tile), so seams blend.
 * An approximation, as diffusers' enable_vae_tiling and A1111's Tiled VAE are: the decoder's GroupNorms see a tile's
 * statistics, not the whole image's, and its convolutions no context beyond the tile. Used only where the whole
 * decode would not fit (`needsTiles`); everywhere else the decode is exact.
 */
import * as tf from '../backend/tf.js';

export interface TileOptions {
  readonly tile: number; // latent pixels a side (64: 512x512 image pixels)
  readonly overlap: number; // latent pixels shared by neighbouring tiles
}

/** On wasm: tiles of 64 latent pixels (a 512x512 decode, ~1.3 GiB of feature maps) overlapping by 16. */
export const WASM_TILES: TileOptions = Object.freeze({ tile: 64, overlap: 16 });

/** The decoder's heap per output pixel on wasm (measured, see pipeline/wasm-plan.ts). */
export const VAE_DECODE_BYTES_PER_PIXEL = 5.1 * 1024;
/** Feature maps a decode in one piece may take on wasm: SD 1.x's 512x512 (1.27 GiB) and a bit more. */
export const WASM_MAX_DECODE_BYTES = 1.6 * 2 ** 30;

/** Whether a decode of `pixels` output pixels must be tiled on this backend (only wasm's heap is bounded). */
export function needsTiles(pixels: number): boolean {
  return tf.getBackend() === 'wasm' && pixels * VAE_DECODE_BYTES_PER_PIXEL > WASM_MAX_DECODE_BYTES;
}

/** Tile starts along one axis of `size`: cover [0, size) with tiles of `tile`, neighbours overlapping by `overlap`. */
export function tileStarts(size: number, { tile, overlap }: TileOptions): number[] {
  if (size <= tile) return [0];
  const stride = tile - overlap;
  const n = Math.ceil((size - tile) / stride) + 1;
  return Array.from({ length: n }, (_, i) => Math.min(i * stride, size - tile));
}

/** Weights of one tile's pixels along one axis: a ramp over `ramp` pixels at each side that borders another tile. */
function axisWeights(length: number, ramp: number, rampStart: boolean, rampEnd: boolean): Float32Array {
  const w = new Float32Array(length);
  for (let i = 0; i < length; i++) {
    let v = 1;
    if (rampStart) v = Math.min(v, (i + 0.5) / ramp);
    if (rampEnd) v = Math.min(v, (length - i - 0.5) / ramp);
    w[i] = v;
  }
  return w;
}

/**
 * z [1, h, w, c] -> image [1, h*f, w*f, out] by `decode` tile by tile (decode: a latent tile -> its image, f times
 * larger). Each tile's tensors are freed before the next; the result is the caller's.
 */
export function decodeTiled(z: tf.Tensor4D, factor: number, decode: (z: tf.Tensor4D) => tf.Tensor4D, opts: TileOptions = WASM_TILES): tf.Tensor4D {
  const [b, h, w, c] = z.shape;
  if (b !== 1) throw new RangeError(`decodeTiled: one latent at a time, got a batch of ${b}`);
  const ys = tileStarts(h, opts);
  const xs = tileStarts(w, opts);
  const [H, W] = [h * factor, w * factor];
  let channels = 0;
  let out = new Float32Array(0);
  const weight = new Float32Array(H * W);
  const ramp = opts.overlap * factor;
  for (const y0 of ys) {
    for (const x0 of xs) {
      const [th, tw] = [Math.min(opts.tile, h), Math.min(opts.tile, w)];
      const piece = tf.tidy(() => decode(tf.slice(z, [0, y0, x0, 0], [1, th, tw, c])));
      const values = piece.dataSync();
      const [, ph, pw, pc] = piece.shape;
      piece.dispose();
      if (channels === 0) {
        channels = pc;
        out = new Float32Array(H * W * pc);
      }
      const wy = axisWeights(ph, ramp, y0 > 0, y0 + th < h);
      const wx = axisWeights(pw, ramp, x0 > 0, x0 + tw < w);
      for (let i = 0; i < ph; i++) {
        const row = (y0 * factor + i) * W + x0 * factor;
        for (let j = 0; j < pw; j++) {
          const k = wy[i] * wx[j];
          weight[row + j] += k;
          for (let ch = 0; ch < pc; ch++) out[(row + j) * pc + ch] += k * values[(i * pw + j) * pc + ch];
        }
      }
    }
  }
  for (let p = 0; p < H * W; p++) for (let ch = 0; ch < channels; ch++) out[p * channels + ch] /= weight[p];
  return tf.tensor4d(out, [1, H, W, channels]);
}
