/**
 * SpatialTransformer (CompVis / sgm ldm/modules/attention.py): NHWC [B, H, W, C] + conditioning -> [B, H, W, C]
 *   x' = proj_in(GroupNorm(x))  as tokens [B, H*W, C]             norm (32 groups, eps 1e-6), proj_in
 *   per BasicTransformerBlock:                                     transformer_blocks.{d}
 *     x' += attn1(LN(x'))             self-attention               norm1, attn1
 *     x' += attn2(LN(x'), context)    cross-attention on the text  norm2, attn2
 *     x' += ff(LN(x'))                GEGLU feed-forward, 4C wide  norm3, ff.net.0.proj, ff.net.2
 *   out = x + proj_out(x')                                         proj_out
 * proj_in / proj_out are 1x1 convs (SD 1.x) or Linears (SD 2.x, SDXL: use_linear_in_transformer): the same map of
 * the channels, applied before or after the reshape to tokens.
 * Attention: to_q/to_k/to_v without bias, to_out.0 with bias; `heads` heads of C / heads channels. Extra token sets
 * of the conditioning (IP-Adapter) are attended to by the cross-attention with their own key/value projections.
 * Weights: `input_blocks.N.1.*`, `middle_block.1.*`, `output_blocks.N.1.*`.
 * On the native kernels the whole transformer runs as backend/native-blocks.ts spatialTransformerOnHost.
 */
import * as tf from '../backend/tf.js';
import type { WeightView } from '../nn/weight-view.js';
import { Conv2d, GroupNorm, LayerNorm, Linear, gelu } from '../nn/layers.js';
import { attention } from '../nn/attention.js';
import { spatialTransformerOnHost, type HostContext } from '../backend/native-blocks.js';
import { ShapeError } from '../nn/errors.js';
import { Held, type ResidencyPolicy } from '../nn/residency.js';
import type { Conditioning, ExtraTokens } from './conditioning.js';

/** Key and value projections of one extra token set (IP-Adapter's to_k_ip / to_v_ip). */
export interface ExtraKeyValue {
  readonly toK: Linear;
  readonly toV: Linear;
}

/**
 * CompVis CrossAttention; self-attention when no context is given. [B, N, C] -> [B, N, C]
 * An adapter attaches key/value projections for its token set (attachExtra) and owns them: detachExtra gives
 * the layer back as it was loaded, and dispose leaves them to the adapter.
 */
export class CrossAttention {
  /** One per extra token set of the conditioning; none until an adapter attaches them. */
  private readonly extraKV: ExtraKeyValue[] = [];

  private constructor(
    readonly toQ: Linear,
    readonly toK: Linear,
    readonly toV: Linear,
    readonly toOut: Linear,
    readonly heads: number,
  ) {}

  get extra(): readonly ExtraKeyValue[] {
    return this.extraKV;
  }

  /** Query width (C) and context width this layer's projections take. */
  get widths(): { readonly dim: number; readonly contextDim: number } {
    return { dim: this.toQ.outFeatures, contextDim: this.toK.inFeatures };
  }

  /** Adds the projections of one more extra token set: [tokenDim] -> [C], loaded for the same execution path. */
  attachExtra(kv: ExtraKeyValue): void {
    const { dim } = this.widths;
    for (const m of [kv.toK, kv.toV]) {
      if (m.outFeatures !== dim) throw new ShapeError(`CrossAttention: extra key/value projections must give ${dim} channels, got ${m.outFeatures}`);
      if (m.native !== this.toQ.native) throw new ShapeError('CrossAttention: extra key/value projections must be loaded for the same backend path (native kernels or TensorFlow ops) as the UNet');
    }
    if (kv.toK.inFeatures !== kv.toV.inFeatures) throw new ShapeError(`CrossAttention: to_k_ip takes ${kv.toK.inFeatures} channels but to_v_ip ${kv.toV.inFeatures}`);
    this.extraKV.push(kv);
  }

  /** Removes the projections attached as `kv` (not disposed: they are the adapter's). */
  detachExtra(kv: ExtraKeyValue): void {
    const at = this.extraKV.indexOf(kv);
    if (at < 0) throw new Error('CrossAttention.detachExtra: these projections are not attached here');
    this.extraKV.splice(at, 1);
  }

  static load(p: WeightView, dim: number, contextDim: number, heads: number): CrossAttention {
    return new CrossAttention(
      Linear.load(p.child('to_q'), dim, dim, { bias: false }),
      Linear.load(p.child('to_k'), contextDim, dim, { bias: false }),
      Linear.load(p.child('to_v'), contextDim, dim, { bias: false }),
      Linear.load(p.child('to_out.0'), dim, dim),
      heads,
    );
  }

  /** attention(q, k, v) over the context, plus scale * attention over each extra token set. */
  apply(x: tf.Tensor3D, context: tf.Tensor3D = x, extraTokens: readonly ExtraTokens[] = []): tf.Tensor3D {
    return tf.tidy(() => {
      const q = this.toQ.apply(x);
      let o = attention(q, this.toK.apply(context), this.toV.apply(context), this.heads);
      extraTokens.forEach(({ tokens, scale }, i) => {
        const kv = this.extra[i];
        o = tf.add(o, tf.mul(attention(q, kv.toK.apply(tokens), kv.toV.apply(tokens), this.heads), scale));
      });
      return this.toOut.apply(o);
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
    readonly value: Linear,
    readonly gate: Linear,
    readonly out: Linear,
  ) {}

  static load(p: WeightView, dim: number): FeedForward {
    const [value, gate] = Linear.loadBlocks(p.child('net.0.proj'), dim, dim * 4, 2);
    return new FeedForward(value, gate, Linear.load(p.child('net.2'), dim * 4, dim));
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
    readonly norm1: LayerNorm,
    readonly attn1: CrossAttention,
    readonly norm2: LayerNorm,
    readonly attn2: CrossAttention,
    readonly norm3: LayerNorm,
    readonly ff: FeedForward,
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

  apply(x: tf.Tensor3D, cond: Conditioning): tf.Tensor3D {
    return tf.tidy(() => {
      let h: tf.Tensor3D = tf.add(x, this.attn1.apply(this.norm1.apply(x)));
      h = tf.add(h, this.attn2.apply(this.norm2.apply(h), cond.context, cond.extraTokens));
      return tf.add(h, this.ff.apply(this.norm3.apply(h)));
    });
  }

  dispose(): void {
    for (const m of [this.norm1, this.attn1, this.norm2, this.attn2, this.norm3, this.ff]) m.dispose();
  }
}

/** A channel map on NHWC maps: proj_in / proj_out, a 1x1 Conv2d or a Linear. */
type Projection = Conv2d | Linear;

export class SpatialTransformer {
  private constructor(
    private readonly norm: GroupNorm,
    private readonly projIn: Projection,
    /** Each under the UNet's residency policy: streamed ones are built at every use (SDXL's 10-deep transformers). */
    private readonly blocks: readonly Held<BasicTransformerBlock>[],
    private readonly projOut: Projection,
    /** The transformer on the native kernels (backend/native-blocks.ts), when it was loaded for them. */
    private readonly onHost: ((x: tf.Tensor4D, c: HostContext) => tf.Tensor4D) | null,
  ) {}

  /**
   * `policy` 'streamed' (the UNet's on wasm) makes each transformer block a unit of its own, built from the host copy
   * only while it runs: one block of SDXL's middle_block is 1/10 of its 1.54 GiB.
   */
  static load(
    p: WeightView,
    { channels, heads, depth, contextDim, projection }: { channels: number; heads: number; depth: number; contextDim: number; projection: 'conv' | 'linear' },
    policy: ResidencyPolicy = 'resident',
  ): SpatialTransformer {
    const project = (name: string): Projection =>
      projection === 'conv' ? Conv2d.load(p.child(name), channels, channels, 1) : Linear.load(p.child(name), channels, channels);
    const norm = GroupNorm.load(p.child('norm'), channels, { eps: 1e-6 });
    const projIn = project('proj_in');
    const blocks = Array.from({ length: depth }, (_, d) =>
      Held.load(policy, () => BasicTransformerBlock.load(p.child('transformer_blocks').child(d), channels, contextDim, heads)),
    );
    const projOut = project('proj_out');
    const resident = blocks.map((b) => b.loaded).filter((b) => b !== null);
    const onHost = p.native && resident.length === depth ? spatialTransformerOnHost({ norm, projIn, blocks: resident, projOut }) : null;
    return new SpatialTransformer(norm, projIn, blocks, projOut, onHost);
  }

  /** The cross-attention (attn2) of each transformer block, in order: where an adapter's projections attach. */
  get crossAttentions(): readonly CrossAttention[] {
    return this.blocks.map((b) => {
      if (b.loaded === null) throw new ShapeError('SpatialTransformer: its blocks are streamed; adapters attach to resident ones only');
      return b.loaded.attn2;
    });
  }

  /** x [B, H, W, C] and its conditioning (context [B, N, contextDim], extra token sets) -> [B, H, W, C] */
  apply(x: tf.Tensor4D, cond: Conditioning): tf.Tensor4D {
    const extra = cond.extraTokens?.length ?? 0;
    const slots = this.blocks[0]?.loaded?.attn2.extra.length ?? 0; // streamed blocks have no adapter attached
    if (extra !== slots) {
      throw new ShapeError(
        `SpatialTransformer: the conditioning has ${extra} extra token sets but its cross-attention has key/value projections for ${slots} (load the adapter that made them)`,
      );
    }
    if (this.onHost !== null) return this.onHost(x, cond);
    return tf.tidy(() => {
      const [b, h, w, c] = x.shape;
      // [B, H, W, C] -> [B, H*W, C]
      let tokens = tf.reshape(this.projIn.apply(this.norm.apply(x)), [b, h * w, c]) as tf.Tensor3D;
      for (const block of this.blocks) tokens = block.use((m) => m.apply(tokens, cond));
      return tf.add(x, this.projOut.apply(tf.reshape(tokens, [b, h, w, c]) as tf.Tensor4D));
    });
  }

  dispose(): void {
    this.norm.dispose();
    this.projIn.dispose();
    for (const block of this.blocks) block.dispose();
    this.projOut.dispose();
  }
}
