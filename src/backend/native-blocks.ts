/**
 * Whole blocks on the native kernels: the ResnetBlock, the SpatialTransformer and the VAE's attention block, each
 * run on host arrays from its input to its output, so that a block reads its input tensor once and makes one tensor
 * of its result instead of crossing between TensorFlow and the host at every layer. Residuals and a ResnetBlock's
 * time embedding ride in the epilogue of the layer that ends their branch (the matrix kernel adds them as it stores).
 *
 * The blocks themselves are defined once, in their model files (nn/resnet.ts, unet/transformer.ts, vae/blocks.ts),
 * in TensorFlow.js ops: that is the readable definition. A block loaded for the native kernels (WeightView.native)
 * takes the function made here instead, chosen once at load. Each function computes exactly its block's definition;
 * tests/native-blocks.test.ts runs both on the same random weights and compares them, for every block.
 *
 * Each block runs in a scratchScope (backend/scratch.ts): the arrays its layers make are reused by the next block
 * once it has returned, instead of left to the garbage collector.
 *
 * The parts are described by what the native path needs of them (their `applyHost`), not by their classes, so this
 * room imports nothing from the layers above it.
 */
import { scratchScope } from './scratch.js';
import * as tf from './tf.js';
import { attentionHost, linearGegluHost, reshapeHost, toHost, toTensor, type ConvExtras, type Host, type PackedWeight } from './kernels.js';

/** A Linear or Conv2d loaded for the kernels; `residual` is added to its output, `imageBias` ([B, out]) to its bias. */
export interface HostLayer {
  applyHost(x: Host, extras?: ConvExtras): Host;
}

/** A Linear loaded for the kernels, whose packed weight a fused kernel can take. */
export interface HostLinear extends HostLayer {
  readonly packed: PackedWeight | null;
}

export interface HostGroupNorm {
  applyHost(x: Host, silu: boolean): Host;
}

export interface HostLayerNorm {
  applyHost(x: Host): Host;
}

export interface ResnetOnHost {
  readonly norm1: HostGroupNorm;
  readonly conv1: HostLayer;
  readonly timeProj: HostLayer | null;
  readonly norm2: HostGroupNorm;
  readonly conv2: HostLayer;
  readonly shortcut: HostLayer | null;
}

/** nn/resnet.ts ResnetBlock: x [B, H, W, cin], SiLU(temb) [B, T] -> [B, H, W, cout]. */
export function resnetOnHost(b: ResnetOnHost): (x: tf.Tensor4D, tembAct?: tf.Tensor2D) => tf.Tensor4D {
  return (x, tembAct) => {
    const xh = toHost(x);
    return toTensor(scratchScope(() => {
      const imageBias = b.timeProj !== null && tembAct !== undefined ? b.timeProj.applyHost(toHost(tembAct)).data : undefined;
      const h = b.conv1.applyHost(b.norm1.applyHost(xh, true), { imageBias });
      const skip = b.shortcut === null ? xh : b.shortcut.applyHost(xh);
      return b.conv2.applyHost(b.norm2.applyHost(h, true), { residual: skip });
    }));
  };
}

export interface AttentionOnHost {
  readonly toQ: HostLayer;
  readonly toK: HostLayer;
  readonly toV: HostLayer;
  readonly toOut: HostLayer;
  readonly heads: number;
  /** Further key/value projections, one per extra token set (IP-Adapter's to_k_ip / to_v_ip). */
  readonly extra: readonly { readonly toK: HostLayer; readonly toV: HostLayer }[];
}

export interface TransformerBlockOnHost {
  readonly norm1: HostLayerNorm;
  readonly attn1: AttentionOnHost;
  readonly norm2: HostLayerNorm;
  readonly attn2: AttentionOnHost;
  readonly norm3: HostLayerNorm;
  readonly ff: { readonly value: HostLinear; readonly gate: HostLinear; readonly out: HostLayer };
}

export interface SpatialTransformerOnHost {
  readonly norm: HostGroupNorm;
  readonly projIn: HostLayer;
  readonly blocks: readonly TransformerBlockOnHost[];
  readonly projOut: HostLayer;
}

/** The token sets a transformer attends to besides its input: the text, and any extra sets with their scales. */
export interface HostContext {
  readonly context: tf.Tensor3D;
  readonly extraTokens?: readonly { readonly tokens: tf.Tensor3D; readonly scale: number }[];
}

/** residual + attention(x, context) (+ scale * attention on each extra token set), all on the host. */
function attendOnHost(a: AttentionOnHost, x: Host, context: Host, extra: readonly { tokens: Host; scale: number }[], residual: Host): Host {
  const q = a.toQ.applyHost(x);
  let o = attentionHost(q, a.toK.applyHost(context), a.toV.applyHost(context), a.heads);
  extra.forEach(({ tokens, scale }, i) => {
    const e = attentionHost(q, a.extra[i].toK.applyHost(tokens), a.extra[i].toV.applyHost(tokens), a.heads);
    const sum = new Float32Array(o.data.length);
    for (let j = 0; j < sum.length; j++) sum[j] = o.data[j] + scale * e.data[j];
    o = { data: sum, shape: o.shape };
  });
  return a.toOut.applyHost(o, { residual });
}

/** value(x) * GELU(gate(x)) in one kernel (linearGegluHost). */
function gatedOnHost(ff: { readonly value: HostLinear; readonly gate: HostLinear }, x: Host): Host {
  const [value, gate] = [ff.value.packed, ff.gate.packed];
  if (value === null || gate === null) throw new Error('spatialTransformerOnHost: the feed-forward was not loaded for the native kernels');
  return linearGegluHost(x, value, gate);
}

/** One BasicTransformerBlock: self-attention, cross-attention, the gated feed-forward, each with its residual. */
function transformerBlockOnHost(block: TransformerBlockOnHost, tokens: Host, context: Host, extra: readonly { tokens: Host; scale: number }[]): Host {
  const n1 = block.norm1.applyHost(tokens);
  let y = attendOnHost(block.attn1, n1, n1, [], tokens);
  y = attendOnHost(block.attn2, block.norm2.applyHost(y), context, extra, y);
  const n3 = block.norm3.applyHost(y);
  return block.ff.out.applyHost(gatedOnHost(block.ff, n3), { residual: y });
}

/** unet/transformer.ts SpatialTransformer: x [B, H, W, C] and its context -> [B, H, W, C]. */
export function spatialTransformerOnHost(t: SpatialTransformerOnHost): (x: tf.Tensor4D, c: HostContext) => tf.Tensor4D {
  return (x, c) => {
    const [b, h, w, ch] = x.shape;
    const xh = toHost(x);
    const context = toHost(c.context);
    const extra = (c.extraTokens ?? []).map(({ tokens, scale }) => ({ tokens: toHost(tokens), scale }));
    return toTensor(scratchScope(() => {
      // proj_in is a 1x1 conv or a Linear: the same map of the channels, on [B, H, W, C] either way
      let tokens = reshapeHost(t.projIn.applyHost(t.norm.applyHost(xh, false)), [b, h * w, ch]);
      for (const block of t.blocks) tokens = scratchScope(() => transformerBlockOnHost(block, tokens, context, extra));
      return t.projOut.applyHost(reshapeHost(tokens, [b, h, w, ch]), { residual: xh });
    }));
  };
}

export interface VaeAttentionOnHost {
  readonly norm: HostGroupNorm;
  readonly q: HostLayer;
  readonly k: HostLayer;
  readonly v: HostLayer;
  readonly projOut: HostLayer;
}

/** vae/blocks.ts AttnBlock: one head over all H*W positions, [B, H, W, C] -> same. */
export function vaeAttentionOnHost(a: VaeAttentionOnHost): (x: tf.Tensor4D) => tf.Tensor4D {
  return (x) => {
    const [b, h, w, c] = x.shape;
    const xh = toHost(x);
    return toTensor(scratchScope(() => {
      const normed = a.norm.applyHost(xh, false);
      const tokens = (conv: HostLayer) => reshapeHost(conv.applyHost(normed), [b, h * w, c]); // [B, H*W, C]
      const attended = attentionHost(tokens(a.q), tokens(a.k), tokens(a.v), 1);
      return a.projOut.applyHost(reshapeHost(attended, [b, h, w, c]), { residual: xh });
    }));
  };
}
