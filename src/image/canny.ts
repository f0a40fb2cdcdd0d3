/**
 * Canny edge map, pixel for pixel what OpenCV's `cv2.Canny(img, low, high)` computes with its defaults
 * (apertureSize 3, L2gradient false). ControlNet's Canny annotator (lllyasviel, 1.0 and 1.1) calls it on the RGB
 * array itself (mode 'rgb'); mode 'gray' runs it on `cv2.cvtColor(img, COLOR_RGB2GRAY)`.
 *   1. gradients: per channel a 3x3 Sobel on integers, border replicated; m = |dx| + |dy|. With 3 channels each
 *      pixel keeps the channel of largest m (the first on ties) and that channel's dx, dy.
 *   2. thresholds: swapped when low > high, then floored.
 *   3. non-maximum suppression of pixels with m > low, with OpenCV's integer sector test (TG22).
 *   4. hysteresis: kept pixels with m > high are edges, and so is every kept pixel 8-connected to one of them
 *      through kept pixels.
 * Layout: RGB uint8 [H, W, 3] row-major in; edges uint8 [H, W], 0 or 255, out.
 * Reference: OpenCV modules/imgproc/src/canny.cpp (4.x); lllyasviel/ControlNet annotator/canny, annotator/util.py.
 */

export type CannyMode = 'rgb' | 'gray';

export interface CannyOptions {
  /** Hysteresis thresholds on |dx| + |dy|; the annotator's defaults are 100 and 200. */
  readonly low: number;
  readonly high: number;
  readonly mode: CannyMode;
}

/** A call that cannot be run (sizes that do not match, a threshold that is not a number): the message says which. */
export class CannyError extends Error {
  override name = 'CannyError';
}

/** round(tan(22.5 deg) * 2^15): canny.cpp's fixed-point tangent for the sector test. */
const TG22 = 13573;
const SHIFT = 15;

/** Labels of the padded map built by non-maximum suppression. */
const CANDIDATE = 0; // kept, m > low: an edge if connected to one
const NOT_EDGE = 1;
const EDGE = 2;

/** The per-pixel gradient of the strongest channel. `mag` has a zero border: index (y+1)*(W+2) + (x+1). */
interface Gradients {
  readonly dx: Int32Array;
  readonly dy: Int32Array;
  readonly mag: Int32Array;
}

export function canny(rgb: Uint8Array, width: number, height: number, opts: CannyOptions): Uint8Array {
  checkArguments(rgb, width, height, opts);
  const [low, high] = thresholds(opts.low, opts.high);
  const pixels = opts.mode === 'gray' ? rgbToGray(rgb, width, height) : rgb;
  const g = sobelGradients(pixels, opts.mode === 'gray' ? 1 : 3, width, height);
  const { map, strong } = suppressNonMaxima(g, width, height, low, high);
  hysteresis(map, strong, width);
  return edgeMap(map, width, height);
}

/** cvtColor(COLOR_RGB2GRAY) on uint8: (9798 R + 19235 G + 3735 B + 2^14) >> 15, exact for every colour. */
export function rgbToGray(rgb: Uint8Array, width: number, height: number): Uint8Array {
  const gray = new Uint8Array(width * height);
  for (let i = 0, j = 0; i < gray.length; i++, j += 3) {
    gray[i] = (9798 * rgb[j] + 19235 * rgb[j + 1] + 3735 * rgb[j + 2] + 16384) >> SHIFT;
  }
  return gray;
}

/** ControlNet's HWC3 of an edge map: [H, W] -> [H, W, 3], the map on every channel. */
export function edgesToRgb(edges: Uint8Array): Uint8Array {
  const rgb = new Uint8Array(edges.length * 3);
  for (let i = 0; i < edges.length; i++) rgb[3 * i] = rgb[3 * i + 1] = rgb[3 * i + 2] = edges[i];
  return rgb;
}

/** The ControlNet hint: HWC3(edges) / 255 as float NCHW [1, 3, H, W] in [0, 1] (not [-1, 1]), RGB order. */
export function controlHint(edges: Uint8Array): Float32Array {
  const plane = edges.length;
  const hint = new Float32Array(3 * plane);
  for (let i = 0; i < plane; i++) hint[i] = hint[plane + i] = hint[2 * plane + i] = edges[i] / 255;
  return hint;
}

function checkArguments(rgb: Uint8Array, width: number, height: number, opts: CannyOptions): void {
  if (!Number.isSafeInteger(width) || !Number.isSafeInteger(height) || width < 1 || height < 1) {
    throw new CannyError(`canny: width and height must be positive integers, got ${width}x${height}`);
  }
  if (rgb.length !== width * height * 3) {
    throw new CannyError(`canny: ${rgb.length} bytes is not ${width}x${height} RGB (${width * height * 3} bytes)`);
  }
  for (const [name, t] of [['low', opts.low], ['high', opts.high]] as const) {
    if (typeof t !== 'number' || !Number.isFinite(t) || t < 0) {
      throw new CannyError(`canny: threshold ${name} must be a finite number >= 0, got ${t}`);
    }
  }
  if (opts.mode !== 'rgb' && opts.mode !== 'gray') {
    throw new CannyError(`canny: mode must be 'rgb' or 'gray', got ${JSON.stringify(opts.mode)}`);
  }
}

/** As canny.cpp: the pair in order, each floored (m is an integer, so m > 100.7 means m > 100). */
function thresholds(low: number, high: number): [number, number] {
  return low > high ? [Math.floor(high), Math.floor(low)] : [Math.floor(low), Math.floor(high)];
}

/**
 * 3x3 Sobel with BORDER_REPLICATE: dx = [-1 0 1; -2 0 2; -1 0 1] (x to the right), dy its transpose (y down).
 * With several channels (interleaved) a pixel keeps the channel of largest |dx| + |dy|, the first on ties.
 */
function sobelGradients(pixels: Uint8Array, channels: number, width: number, height: number): Gradients {
  const n = width * height;
  const dx = new Int32Array(n);
  const dy = new Int32Array(n);
  const mag = new Int32Array((width + 2) * (height + 2));
  const row = width * channels;
  for (let y = 0; y < height; y++) {
    const up = Math.max(y - 1, 0) * row;
    const mid = y * row;
    const down = Math.min(y + 1, height - 1) * row;
    for (let x = 0; x < width; x++) {
      const left = Math.max(x - 1, 0) * channels;
      const here = x * channels;
      const right = Math.min(x + 1, width - 1) * channels;
      let best = -1;
      let bestDx = 0;
      let bestDy = 0;
      for (let c = 0; c < channels; c++) {
        const a = pixels[up + left + c], b = pixels[up + here + c], d = pixels[up + right + c];
        const e = pixels[mid + left + c], f = pixels[mid + right + c];
        const g = pixels[down + left + c], h = pixels[down + here + c], k = pixels[down + right + c];
        const gx = d - a + 2 * (f - e) + k - g;
        const gy = g + 2 * h + k - (a + 2 * b + d);
        const m = Math.abs(gx) + Math.abs(gy);
        if (m > best) {
          best = m;
          bestDx = gx;
          bestDy = gy;
        }
      }
      const i = y * width + x;
      dx[i] = bestDx;
      dy[i] = bestDy;
      mag[(y + 1) * (width + 2) + x + 1] = best;
    }
  }
  return { dx, dy, mag };
}

/**
 * Keeps a pixel with m > low that is a maximum across its edge, in one of four sectors of the gradient angle.
 * canny.cpp's integer test, with x = |dx| and y = |dy| * 2^15: y < x * TG22 is horizontal (within 22.5 deg of the
 * x axis), y > x * TG22 + x * 2^16 vertical (x * (TG22 + 2^16) ~ x * tan(67.5 deg) * 2^15), else diagonal. Which
 * comparisons are strict is OpenCV's choice and decides ties on plateaus. Outside the image m = 0.
 * Returns the padded label map (border NOT_EDGE) and the stack of strong pixels (m > high) as padded indices.
 */
function suppressNonMaxima(g: Gradients, width: number, height: number, low: number, high: number) {
  const stride = width + 2;
  const { dx, dy, mag } = g;
  const map = new Uint8Array(stride * (height + 2)).fill(NOT_EDGE);
  const strong = new Int32Array(width * height);
  let top = 0;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const p = (y + 1) * stride + x + 1;
      const m = mag[p];
      if (m <= low) continue;
      const i = y * width + x;
      const xs = dx[i];
      const ys = dy[i];
      const ax = Math.abs(xs);
      const ay = Math.abs(ys) * (1 << SHIFT);
      const tg22x = ax * TG22;
      let keep: boolean;
      if (ay < tg22x) {
        keep = m > mag[p - 1] && m >= mag[p + 1];
      } else if (ay > tg22x + ax * (1 << (SHIFT + 1))) {
        keep = m > mag[p - stride] && m >= mag[p + stride];
      } else {
        const s = (xs < 0) !== (ys < 0) ? -1 : 1; // same signs: the up-left / down-right diagonal
        keep = m > mag[p - stride - s] && m > mag[p + stride + s];
      }
      if (!keep) continue;
      if (m > high) {
        map[p] = EDGE;
        strong[top++] = p;
      } else {
        map[p] = CANDIDATE;
      }
    }
  }
  return { map, strong: strong.subarray(0, top) };
}

/** Grows the edges into every 8-connected CANDIDATE, depth first; the padded border stops it at the image edge. */
function hysteresis(map: Uint8Array, strong: Int32Array, width: number): void {
  const stride = width + 2;
  const neighbours = [-stride - 1, -stride, -stride + 1, -1, 1, stride - 1, stride, stride + 1];
  // Every pixel enters the stack at most once (as it turns EDGE), so the stack needs one slot per pixel.
  const stack = new Int32Array(map.length);
  stack.set(strong);
  let top = strong.length;
  while (top > 0) {
    const p = stack[--top];
    for (const o of neighbours) {
      if (map[p + o] === CANDIDATE) {
        map[p + o] = EDGE;
        stack[top++] = p + o;
      }
    }
  }
}

/** Padded label map -> [H, W] of 255 (edge) and 0. */
function edgeMap(map: Uint8Array, width: number, height: number): Uint8Array {
  const stride = width + 2;
  const edges = new Uint8Array(width * height);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) edges[y * width + x] = map[(y + 1) * stride + x + 1] === EDGE ? 255 : 0;
  }
  return edges;
}
