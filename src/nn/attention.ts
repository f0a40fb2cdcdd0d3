/**
 * Scaled dot-product attention, softmax(q k^T / sqrt(d)) v, per head, cut into slices so that no score
 * tensor ever exceeds a byte bound (a full SD 1.5 score tensor at 64x64 latents, batch 2, 8 heads is 1 GiB).
 *
 * q: [B, Nq, H*D], k, v: [B, Nk, H*D] -> [B, Nq, H*D]; heads are contiguous blocks of D channels, as in
 * CompVis `rearrange(t, 'b n (h d) -> (b h) n d')` and CLIP's `view(b, n, h, d)`.
 *
 * Work is split over (batch*head) items and query rows; each slice runs in its own tf.tidy, so its scores
 * are freed before the next slice starts. Every slice is a single head with K transposed up front on the wasm
 * backend (batched or transposed matMuls leave XNNPACK there and run 20-80x slower, see BACKENDS.md), and
 * elsewhere when a head's scores are large: on tensorflow, SD's 64x64 self-attention (16 heads of 4096x4096)
 * runs ~2x faster as one 2-D matMul per head than as batched matMuls over all heads (~1.8 s vs ~3.7 s a call,
 * measured side by side on a busy 2-core EPYC).
 * Blocks loaded for the native kernels do not come here: their attention is one flash-style call of the kernels
 * (backend/native-blocks.ts), with tiles of scores in cache, an online softmax, nothing [Nq, Nk] ever allocated.
 */
import * as tf from '../backend/tf.js';
import { ShapeError } from './errors.js';

export interface AttentionOptions {
  /** Mask keys after the query's own position (CLIP's causal self-attention). Needs Nq == Nk. */
  readonly causal?: boolean;
  /** Largest score tensor a slice may create, in bytes; default 8 MiB. */
  readonly maxScoreBytes?: number;
  /** One head per matMul with K pre-transposed; default: on wasm, and elsewhere for heads of >= 1 Mi scores. */
  readonly perHead?: boolean;
}

/**
 * Small slices stay in cache between the scores' matMul, the softmax and the matMul with V: on tensorflow one
 * 4096x4096 head took ~90-120 ms whole, ~50-90 ms in slices of 512 rows (8 MiB), quiet 2-core EPYC.
 */
export const DEFAULT_MAX_SCORE_BYTES = 8 * 2 ** 20;

/** Off wasm, heads whose score matrix has at least this many entries run one at a time (see the header). */
export const PER_HEAD_MIN_SCORES = 2 ** 20;

// A finite "minus infinity": exp() of it underflows to exactly 0 in float32, and it never makes NaN.
const MASKED = -1e30;

/** How the work is cut: `group` (batch*head) items and `rows` query rows per slice. */
export interface SlicePlan {
  readonly group: number;
  readonly rows: number;
}

/** The largest slices whose scores [group, rows, nk] (float32) fit in maxBytes; at least one row of one head. */
export function slicePlan(items: number, nq: number, nk: number, maxBytes: number, perHead: boolean): SlicePlan {
  const rowsBudget = Math.max(1, Math.floor(maxBytes / (nk * 4)));
  const maxGroup = perHead ? 1 : items;
  if (rowsBudget >= maxGroup * nq) return { group: maxGroup, rows: nq };
  if (rowsBudget >= maxGroup) return { group: maxGroup, rows: Math.floor(rowsBudget / maxGroup) };
  return { group: 1, rows: Math.min(nq, rowsBudget) };
}

export function attention(
  q: tf.Tensor3D,
  k: tf.Tensor3D,
  v: tf.Tensor3D,
  heads: number,
  opts: AttentionOptions = {},
): tf.Tensor3D {
  const [b, nq, c] = q.shape;
  const nk = k.shape[1];
  checkShapes(q, k, v, heads, opts.causal === true);
  const d = c / heads;
  const perHead = opts.perHead ?? (tf.getBackend() === 'wasm' || nq * nk >= PER_HEAD_MIN_SCORES);
  const plan = slicePlan(b * heads, nq, nk, opts.maxScoreBytes ?? DEFAULT_MAX_SCORE_BYTES, perHead);

  // [B*H, Nq, D] (scaled), [B*H, D, Nk], [B*H, Nk, D]
  const [qh, kt, vh] = tf.tidy((): tf.Tensor3D[] => [
    splitHeads(tf.mul(q, 1 / Math.sqrt(d)), heads),
    tf.reshape(tf.transpose(tf.reshape(k, [b, nk, heads, d]), [0, 2, 3, 1]), [b * heads, d, nk]),
    splitHeads(v, heads),
  ]);
  const groups: tf.Tensor3D[] = []; // each [g, Nq, D]
  try {
    for (let g0 = 0; g0 < b * heads; g0 += plan.group) {
      const g = Math.min(plan.group, b * heads - g0);
      groups.push(attendGroup(qh, kt, vh, g0, g, plan.rows, opts.causal === true));
    }
    return tf.tidy(() => mergeHeads(groups.length === 1 ? groups[0] : tf.concat(groups, 0), b, heads));
  } finally {
    tf.dispose([qh, kt, vh, ...groups]);
  }
}

function checkShapes(q: tf.Tensor3D, k: tf.Tensor3D, v: tf.Tensor3D, heads: number, causal: boolean): void {
  const [b, nq, c] = q.shape;
  const fail = (why: string) => {
    throw new ShapeError(`attention: ${why} (q [${q.shape}], k [${k.shape}], v [${v.shape}], heads ${heads})`);
  };
  if (!Number.isInteger(heads) || heads < 1 || c % heads !== 0) fail(`channels ${c} must split into ${heads} equal heads`);
  if (k.shape[0] !== b || v.shape[0] !== b) fail('q, k and v must have the same batch size');
  if (k.shape[2] !== c || v.shape[2] !== c) fail('q, k and v must have the same channel count');
  if (k.shape[1] !== v.shape[1]) fail('k and v must have the same number of tokens');
  if (causal && k.shape[1] !== nq) fail('a causal mask needs as many keys as queries');
}

// [B, N, H*D] -> [B*H, N, D]
function splitHeads(x: tf.Tensor3D, heads: number): tf.Tensor3D {
  const [b, n, c] = x.shape;
  const d = c / heads;
  return tf.reshape(tf.transpose(tf.reshape(x, [b, n, heads, d]), [0, 2, 1, 3]), [b * heads, n, d]);
}

// [B*H, N, D] -> [B, N, H*D]
function mergeHeads(x: tf.Tensor3D, b: number, heads: number): tf.Tensor3D {
  const [, n, d] = x.shape;
  return tf.reshape(tf.transpose(tf.reshape(x, [b, heads, n, d]), [0, 2, 1, 3]), [b, n, heads * d]);
}

/** Attention for items [g0, g0+g) of the (batch*head) axis, `rows` queries at a time -> [g, Nq, D]. */
function attendGroup(qh: tf.Tensor3D, kt: tf.Tensor3D, vh: tf.Tensor3D, g0: number, g: number, rows: number, causal: boolean): tf.Tensor3D {
  const [items, nq, d] = qh.shape;
  const nk = kt.shape[2];
  const whole = g0 === 0 && g === items;
  const [kg, vg] = whole ? [kt, vh] : [tf.slice(kt, [g0, 0, 0], [g, d, nk]), tf.slice(vh, [g0, 0, 0], [g, nk, d])];
  const chunks: tf.Tensor3D[] = [];
  for (let r0 = 0; r0 < nq; r0 += rows) {
    const r = Math.min(rows, nq - r0);
    chunks.push(
      tf.tidy(() => {
        const qs = whole && r === nq ? qh : tf.slice(qh, [g0, r0, 0], [g, r, d]);
        let scores: tf.Tensor3D = tf.matMul(qs, kg); // [g, r, Nk]
        if (causal) scores = tf.add(scores, causalBias(r0, r, nk));
        return tf.matMul(softmax(scores), vg); // [g, r, D]
      }),
    );
  }
  if (!whole) tf.dispose([kg, vg]);
  if (chunks.length === 1) return chunks[0];
  const out = tf.concat(chunks, 1);
  tf.dispose(chunks);
  return out;
}

/** Additive mask for query rows [r0, r0+r): 0 where key j <= query i, MASKED after it. [r, Nk] */
function causalBias(r0: number, r: number, nk: number): tf.Tensor2D {
  const bias = new Float32Array(r * nk);
  for (let i = 0; i < r; i++) bias.fill(MASKED, i * nk + r0 + i + 1, (i + 1) * nk);
  return tf.tensor2d(bias, [r, nk]);
}

/**
 * Softmax over the last axis. The cpu backend composes its Softmax of broadcasting kernels that index every
 * element through generic loops (~20 s for one 4800x4800 score matrix), so there it is a plain loop over the
 * rows; other backends have a native kernel.
 */
function softmax(x: tf.Tensor3D): tf.Tensor3D {
  if (tf.getBackend() !== 'cpu') return tf.softmax(x);
  const n = x.shape[2];
  const src = x.dataSync() as Float32Array; // the cpu backend's own array: read only
  const out = new Float32Array(src.length);
  for (let row = 0; row < src.length; row += n) {
    let max = -Infinity;
    for (let j = row; j < row + n; j++) if (src[j] > max) max = src[j];
    let sum = 0;
    for (let j = row; j < row + n; j++) sum += out[j] = Math.exp(src[j] - max);
    const inv = 1 / sum;
    for (let j = row; j < row + n; j++) out[j] *= inv;
  }
  return tf.tensor3d(out, x.shape);
}
