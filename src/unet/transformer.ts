/**
 * SpatialTransformer (CompVis ldm/modules/attention.py, SD 1.x: 1x1 conv proj_in/proj_out):
 * NHWC [B, H, W, C] + context [B, N, contextDim] -> [B, H, W, C]
 *   x' = proj_in(GroupNorm(x))  as tokens [B, H*W, C]             norm (32 groups, eps 1e-6), proj_in
 *   per BasicTransformerBlock:                                     transformer_blocks.{d}
 *     x' += attn1(LN(x'))             self-attention               norm1, attn1
 *     x' += attn2(LN(x'), context)    cross-attention on the text  norm2, attn2
 *     x' += ff(LN(x'))                GEGLU feed-forward, 4C wide  norm3, ff.net.0.proj, ff.net.2
 *   out = x + proj_out(x')                                         proj_out
 * Attention: to_q/to_k/to_v without bias, to_out.0 with bias; heads of C / numHeads channels.
 * Weights: `input_blocks.N.1.*`, `middle_block.1.*`, `output_blocks.N.1.*`.
 */
import * as kernels from '../backend/kernels.js';
import * as tf from '../backend/tf.js';
import type { WeightView } from '../nn/weight-view.js';
import { Conv2d, GroupNorm, LayerNorm, Linear, gelu } from '../nn/layers.js';
import { attention } from '../nn/attention.js';
import { prefixed, type Shapes } from './shapes.js';

/** CompVis CrossAttention; self-attention when no context is given. [B, N, C] -> [B, N, C] */
class CrossAttention {
  private constructor(
    private readonly toQ: Linear,
    private readonly toK: Linear,
    private readonly toV: Linear,
    private readonly toOut: Linear,
    private readonly heads: number,
  ) {}

  static load(p: WeightView, dim: number, contextDim: number, heads: number): CrossAttention {
    return new CrossAttention(
      Linear.load(p.child('to_q'), dim, dim, { bias: false }),
      Linear.load(p.child('to_k'), contextDim, dim, { bias: false }),
      Linear.load(p.child('to_v'), contextDim, dim, { bias: false }),
      Linear.load(p.child('to_out.0'), dim, dim),
      heads,
    );
  }

  static shapes(dim: number, contextDim: number): Shapes {
    return [
      ['to_q.weight', [dim, dim]], ['to_k.weight', [dim, contextDim]], ['to_v.weight', [dim, contextDim]],
      ['to_out.0.weight', [dim, dim]], ['to_out.0.bias', [dim]],
    ];
  }

  /** residual + attention on the host (native layers): x [B, N, C], context [B, M, contextDim]. */
  applyHost(x: kernels.Host, context: kernels.Host, residual: kernels.Host): kernels.Host {
    const o = kernels.attentionHost(this.toQ.applyHost(x), this.toK.applyHost(context), this.toV.applyHost(context), this.heads);
    return this.toOut.applyHost(o, residual);
  }

  apply(x: tf.Tensor3D, context: tf.Tensor3D = x): tf.Tensor3D {
    return tf.tidy(() => {
      const q = this.toQ.apply(x);
      const k = this.toK.apply(context);
      const v = this.toV.apply(context);
      return this.toOut.apply(attention(q, k, v, this.heads));
    });
  }

  dispose(): void {
    for (const m of [this.toQ, this.toK, this.toV, this.toOut]) m.dispose();
  }
}

/**
 * GEGLU feed-forward: value * GELU(gate), back to C. [B, N, C] -> [B, N, C]
 * The checkpoint's ff.net.0.proj [8C, C] projects to [value, gate] at once; it is cut at load into two Linears
 * of 4C (rows [0, 4C) and [4C, 8C)), so no split of the 8C-wide activation runs per call (SplitV copies it).
 */
class FeedForward {
  private constructor(
    private readonly value: Linear,
    private readonly gate: Linear,
    private readonly out: Linear,
  ) {}

  static load(p: WeightView, dim: number): FeedForward {
    const [value, gate] = Linear.loadBlocks(p.child('net.0.proj'), dim, dim * 4, 2);
    return new FeedForward(value, gate, Linear.load(p.child('net.2'), dim * 4, dim));
  }

  static shapes(dim: number): Shapes {
    return [
      ['net.0.proj.weight', [dim * 8, dim]], ['net.0.proj.bias', [dim * 8]],
      ['net.2.weight', [dim, dim * 4]], ['net.2.bias', [dim]],
    ];
  }

  /** residual + feed-forward on the host (native layers). */
  applyHost(x: kernels.Host, residual: kernels.Host): kernels.Host {
    return this.out.applyHost(kernels.gegluHost(this.value.applyHost(x), this.gate.applyHost(x)), residual);
  }

  /** Frees each 4C-wide intermediate as soon as it is used (at 64x64, batch 2: 84 MB each). */
  apply(x: tf.Tensor3D): tf.Tensor3D {
    const gate = this.gate.apply(x);
    const act = gelu(gate);
    gate.dispose();
    const value = this.value.apply(x);
    const gated = tf.mul(value, act) as tf.Tensor3D;
    tf.dispose([value, act]);
    const out = this.out.apply(gated);
    gated.dispose();
    return out;
  }

  dispose(): void {
    for (const m of [this.value, this.gate, this.out]) m.dispose();
  }
}

/** Pre-LayerNorm transformer block: self-attention, cross-attention, GEGLU, each residual. [B, N, C] */
class BasicTransformerBlock {
  private constructor(
    private readonly norm1: LayerNorm,
    private readonly attn1: CrossAttention,
    private readonly norm2: LayerNorm,
    private readonly attn2: CrossAttention,
    private readonly norm3: LayerNorm,
    private readonly ff: FeedForward,
  ) {}

  static load(p: WeightView, dim: number, contextDim: number, heads: number): BasicTransformerBlock {
    return new BasicTransformerBlock(
      LayerNorm.load(p.child('norm1'), dim),
      CrossAttention.load(p.child('attn1'), dim, dim, heads),
      LayerNorm.load(p.child('norm2'), dim),
      CrossAttention.load(p.child('attn2'), dim, contextDim, heads),
      LayerNorm.load(p.child('norm3'), dim),
      FeedForward.load(p.child('ff'), dim),
    );
  }

  static shapes(dim: number, contextDim: number): Shapes {
    const norm = (n: string): Shapes => [[`${n}.weight`, [dim]], [`${n}.bias`, [dim]]];
    return [
      ...norm('norm1'), ...prefixed('attn1', CrossAttention.shapes(dim, dim)),
      ...norm('norm2'), ...prefixed('attn2', CrossAttention.shapes(dim, contextDim)),
      ...norm('norm3'), ...prefixed('ff', FeedForward.shapes(dim)),
    ];
  }

  /** The block on the host (native layers): each residual is added by the layer that ends its branch. */
  applyHost(x: kernels.Host, context: kernels.Host): kernels.Host {
    const n1 = this.norm1.applyHost(x);
    let h = this.attn1.applyHost(n1, n1, x);
    h = this.attn2.applyHost(this.norm2.applyHost(h), context, h);
    return this.ff.applyHost(this.norm3.applyHost(h), h);
  }

  apply(x: tf.Tensor3D, context: tf.Tensor3D): tf.Tensor3D {
    return tf.tidy(() => {
      let h: tf.Tensor3D = tf.add(x, this.attn1.apply(this.norm1.apply(x)));
      h = tf.add(h, this.attn2.apply(this.norm2.apply(h), context));
      return tf.add(h, this.ff.apply(this.norm3.apply(h)));
    });
  }

  dispose(): void {
    for (const m of [this.norm1, this.attn1, this.norm2, this.attn2, this.norm3, this.ff]) m.dispose();
  }
}

export class SpatialTransformer {
  private constructor(
    private readonly norm: GroupNorm,
    private readonly projIn: Conv2d,
    private readonly blocks: readonly BasicTransformerBlock[],
    private readonly projOut: Conv2d,
  ) {}

  static load(p: WeightView, channels: number, heads: number, depth: number, contextDim: number): SpatialTransformer {
    const blocks = Array.from({ length: depth }, (_, d) =>
      BasicTransformerBlock.load(p.child('transformer_blocks').child(d), channels, contextDim, heads),
    );
    return new SpatialTransformer(
      GroupNorm.load(p.child('norm'), channels, { eps: 1e-6 }),
      Conv2d.load(p.child('proj_in'), channels, channels, 1),
      blocks,
      Conv2d.load(p.child('proj_out'), channels, channels, 1),
    );
  }

  static shapes(channels: number, depth: number, contextDim: number): Shapes {
    const c = channels;
    const blocks = Array.from({ length: depth }, (_, d) =>
      prefixed(`transformer_blocks.${d}`, BasicTransformerBlock.shapes(c, contextDim)),
    );
    return [
      ['norm.weight', [c]], ['norm.bias', [c]],
      ['proj_in.weight', [c, c, 1, 1]], ['proj_in.bias', [c]],
      ...blocks.flat(),
      ['proj_out.weight', [c, c, 1, 1]], ['proj_out.bias', [c]],
    ];
  }

  /** x [B, H, W, C], context [B, N, contextDim] -> [B, H, W, C] */
  apply(x: tf.Tensor4D, context: tf.Tensor3D): tf.Tensor4D {
    if (this.projIn.native) return this.applyNative(x, context);
    return tf.tidy(() => {
      const [b, h, w, c] = x.shape;
      // [B, H, W, C] -> [B, H*W, C]
      let tokens = tf.reshape(this.projIn.apply(this.norm.apply(x)), [b, h * w, c]) as tf.Tensor3D;
      for (const block of this.blocks) tokens = block.apply(tokens, context);
      return tf.add(x, this.projOut.apply(tf.reshape(tokens, [b, h, w, c])));
    });
  }

  /** The same on the native kernels, on the host from end to end: x and the context are read once, one tensor made. */
  private applyNative(x: tf.Tensor4D, context: tf.Tensor3D): tf.Tensor4D {
    const [b, h, w, c] = x.shape;
    const xh = kernels.toHost(x);
    const ctx = kernels.toHost(context);
    let tokens = kernels.reshapeHost(this.projIn.applyHost(this.norm.applyHost(xh, false)), [b, h * w, c]);
    for (const block of this.blocks) tokens = block.applyHost(tokens, ctx);
    return kernels.toTensor(this.projOut.applyHost(kernels.reshapeHost(tokens, [b, h, w, c]), { residual: xh }));
  }

  dispose(): void {
    this.norm.dispose();
    this.projIn.dispose();
    for (const block of this.blocks) block.dispose();
    this.projOut.dispose();
  }
}
