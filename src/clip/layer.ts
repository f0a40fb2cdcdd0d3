/**
 * One CLIP text transformer layer (HF CLIPEncoderLayer), pre-LayerNorm:
 *   h = x + out_proj(causal self-attention(layer_norm1(x)))      q/k/v/out projections with biases, 1/sqrt(d) scale
 *   y = h + fc2(act(fc1(layer_norm2(h))))                          act: QuickGELU in OpenAI CLIP
 * x, y: [B, N, width].
 * Weights: `encoder.layers.{i}.{self_attn.{q,k,v,out}_proj, layer_norm1, layer_norm2, mlp.fc1, mlp.fc2}.*`.
 */
import * as tf from '../backend/tf.js';
import { attention } from '../nn/attention.js';
import { LayerNorm, Linear, gelu, quickGelu } from '../nn/layers.js';
import type { WeightView } from '../nn/weight-view.js';
import type { ClipConfig } from './config.js';

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
  ) {}

  static load(p: WeightView, cfg: ClipConfig): ClipEncoderLayer {
    const w = cfg.width;
    const eps = { eps: cfg.layerNormEps };
    const attn = p.child('self_attn');
    return new ClipEncoderLayer(
      cfg.heads,
      cfg.act,
      LayerNorm.load(p.child('layer_norm1'), w, eps),
      Linear.load(attn.child('q_proj'), w, w),
      Linear.load(attn.child('k_proj'), w, w),
      Linear.load(attn.child('v_proj'), w, w),
      Linear.load(attn.child('out_proj'), w, w),
      LayerNorm.load(p.child('layer_norm2'), w, eps),
      Linear.load(p.child('mlp').child('fc1'), w, cfg.mlpWidth),
      Linear.load(p.child('mlp').child('fc2'), cfg.mlpWidth, w),
    );
  }

  apply(x: tf.Tensor3D): tf.Tensor3D {
    return tf.tidy(() => {
      const h: tf.Tensor3D = tf.add(x, this.selfAttention(this.layerNorm1.apply(x)));
      return tf.add(h, this.mlp(this.layerNorm2.apply(h)));
    });
  }

  /** Each token attends to itself and the tokens before it. */
  private selfAttention(x: tf.Tensor3D): tf.Tensor3D {
    const o = attention(this.q.apply(x), this.k.apply(x), this.v.apply(x), this.heads, { causal: true });
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
