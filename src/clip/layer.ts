/**
 * One CLIP text transformer layer (HF CLIPEncoderLayer), pre-LayerNorm:
 *   h = x + out_proj(causal self-attention(layer_norm1(x)))      q/k/v/out projections with biases, 1/sqrt(d) scale
 *   y = h + fc2(act(fc1(layer_norm2(h))))                          act: QuickGELU in OpenAI CLIP
 * x, y: [B, N, width]. open_clip's ResidualAttentionBlock is the same layer (exact GELU in ViT-bigG); the vision
 * tower's layers (clip/vision.ts) are too, with non-causal attention (`causal: false`).
 * Weights (names.ts): `encoder.layers.{i}.{self_attn.{q,k,v,out}_proj, layer_norm1, layer_norm2, mlp.fc1, mlp.fc2}.*`
 * (HF), `transformer.resblocks.{i}.{ln_1, attn.in_proj (q; k; v), attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}` (open_clip).
 */
import * as tf from '../backend/tf.js';
import { attention } from '../nn/attention.js';
import { LayerNorm, Linear, gelu, quickGelu } from '../nn/layers.js';
import type { WeightView } from '../nn/weight-view.js';
import type { ClipConfig } from './config.js';
import { HF_CLIP_NAMES, type ClipLayerNames } from './names.js';

export class ClipEncoderLayer {
  private constructor(
    private readonly heads: number,
    private readonly act: ClipConfig['act'],
    private readonly layerNorm1: LayerNorm,
    private readonly q: Linear,
    private readonly k: Linear,
    private readonly v: Linear,
    private readonly out: Linear,
    private readonly layerNorm2: LayerNorm,
    private readonly fc1: Linear,
    private readonly fc2: Linear,
    private readonly causal: boolean,
  ) {}

  static load(
    p: WeightView,
    cfg: ClipConfig,
    names: ClipLayerNames = HF_CLIP_NAMES.layer,
    { causal = true }: { causal?: boolean } = {},
  ): ClipEncoderLayer {
    const w = cfg.width;
    const eps = { eps: cfg.layerNormEps };
    const { qkv } = names;
    const layerNorm1 = LayerNorm.load(p.child(names.layerNorm1), w, eps);
    const [q, k, v] =
      'packed' in qkv ? Linear.loadBlocks(p.child(qkv.packed), w, w, 3) : qkv.map((name) => Linear.load(p.child(name), w, w));
    return new ClipEncoderLayer(
      cfg.heads,
      cfg.act,
      layerNorm1,
      q,
      k,
      v,
      Linear.load(p.child(names.outProj), w, w),
      LayerNorm.load(p.child(names.layerNorm2), w, eps),
      Linear.load(p.child(names.fc1), w, cfg.mlpWidth),
      Linear.load(p.child(names.fc2), cfg.mlpWidth, w),
      causal,
    );
  }

  apply(x: tf.Tensor3D): tf.Tensor3D {
    return tf.tidy(() => {
      const h: tf.Tensor3D = tf.add(x, this.selfAttention(this.layerNorm1.apply(x)));
      return tf.add(h, this.mlp(this.layerNorm2.apply(h)));
    });
  }

  /** Each token attends to itself and the tokens before it (text), or to every token (vision). */
  private selfAttention(x: tf.Tensor3D): tf.Tensor3D {
    const o = attention(this.q.apply(x), this.k.apply(x), this.v.apply(x), this.heads, { causal: this.causal });
    return this.out.apply(o);
  }

  private mlp(x: tf.Tensor3D): tf.Tensor3D {
    const h = this.fc1.apply(x); // [B, N, mlpWidth]
    return this.fc2.apply(this.act === 'quick_gelu' ? quickGelu(h) : gelu(h));
  }

  dispose(): void {
    for (const m of [this.layerNorm1, this.q, this.k, this.v, this.out, this.layerNorm2, this.fc1, this.fc2]) m.dispose();
  }
}
