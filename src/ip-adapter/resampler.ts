/**
 * Resampler (tencent-ailab ip_adapter/resampler.py), IP-Adapter Plus's image projection: a perceiver that turns
 * the CLIP vision encoder's penultimate hidden states into `numQueries` image tokens.
 *
 *   x = proj_in(features)                                       [B, N, embeddingDim] -> [B, N, dim]
 *   latents = image_proj.latents, repeated over the batch       [B, nq, dim]
 *   per layer i:  latents += attn_i(x, latents);  latents += ff_i(latents)
 *     attn: xn = norm1(x), ln = norm2(latents); q = to_q(ln); k; v = to_kv([xn; ln] along tokens) (first half k);
 *           heads of 64, softmax(q k^T / sqrt(64)) v, to_out          (no biases)
 *     ff:   LayerNorm (.0) -> Linear dim -> 4 dim (.1) -> GELU (erf) -> Linear 4 dim -> dim (.3)   (no biases)
 *   tokens = norm_out(proj_out(latents))                        [B, nq, outputDim]
 * Sizes come from the file: dim and nq from `latents`, heads = rows(to_q) / 64, the depth from the layers present.
 * Weights: `image_proj.{latents, proj_in, proj_out, norm_out, layers.{i}.0.{norm1,norm2,to_q,to_kv,to_out},
 * layers.{i}.1.{0,1,3}}`.
 */
import * as tf from '../backend/tf.js';
import { attention } from '../nn/attention.js';
import { ShapeError } from '../nn/errors.js';
import { LayerNorm, Linear, gelu } from '../nn/layers.js';
import type { WeightView } from '../nn/weight-view.js';
import type { TensorSource } from '../weights/types.js';

const DIM_HEAD = 64;

interface PerceiverLayer {
  readonly norm1: LayerNorm;
  readonly norm2: LayerNorm;
  readonly toQ: Linear;
  readonly toK: Linear;
  readonly toV: Linear;
  readonly toOut: Linear;
  readonly ffNorm: LayerNorm;
  readonly ff1: Linear;
  readonly ff2: Linear;
}

export class Resampler {
  private constructor(
    readonly embeddingDim: number,
    readonly numQueries: number,
    readonly outputDim: number,
    private readonly heads: number,
    private readonly latents: tf.Tensor3D, // [1, nq, dim]
    private readonly projIn: Linear,
    private readonly layers: readonly PerceiverLayer[],
    private readonly projOut: Linear,
    private readonly normOut: LayerNorm,
  ) {}

  /** p: the view at `image_proj`; src: the file, for its shapes. */
  static load(p: WeightView, src: TensorSource): Resampler {
    const shape = (name: string) => src.info(p.key(name)).shape;
    const [, nq, dim] = shape('latents');
    const [, embeddingDim] = shape('proj_in.weight');
    const [outputDim] = shape('proj_out.weight');
    const [inner] = shape('layers.0.0.to_q.weight');
    if (inner % DIM_HEAD !== 0) throw new ShapeError(`${src.path}: image_proj.layers.0.0.to_q.weight has ${inner} rows, not heads of ${DIM_HEAD}`);
    let depth = 0;
    while (src.has(p.key(`layers.${depth}.0.to_q.weight`))) depth++;
    const latents = tf.keep(p.tensor('latents', [1, nq, dim]) as tf.Tensor3D);
    const layers = Array.from({ length: depth }, (_, i): PerceiverLayer => {
      const a = p.child(`layers.${i}.0`);
      const f = p.child(`layers.${i}.1`);
      const [toK, toV] = Linear.loadBlocks(a.child('to_kv'), dim, inner, 2, { bias: false });
      return {
        norm1: LayerNorm.load(a.child('norm1'), dim),
        norm2: LayerNorm.load(a.child('norm2'), dim),
        toQ: Linear.load(a.child('to_q'), dim, inner, { bias: false }),
        toK,
        toV,
        toOut: Linear.load(a.child('to_out'), inner, dim, { bias: false }),
        ffNorm: LayerNorm.load(f.child(0), dim),
        ff1: Linear.load(f.child(1), dim, 4 * dim, { bias: false }),
        ff2: Linear.load(f.child(3), 4 * dim, dim, { bias: false }),
      };
    });
    const projIn = Linear.load(p.child('proj_in'), embeddingDim, dim);
    const projOut = Linear.load(p.child('proj_out'), dim, outputDim);
    const normOut = LayerNorm.load(p.child('norm_out'), outputDim);
    return new Resampler(embeddingDim, nq, outputDim, inner / DIM_HEAD, latents, projIn, layers, projOut, normOut);
  }

  /** features [B, N, embeddingDim] (the encoder's penultimate hidden states) -> tokens [B, nq, outputDim] */
  apply(features: tf.Tensor3D): tf.Tensor3D {
    if (features.rank !== 3 || features.shape[2] !== this.embeddingDim) {
      throw new ShapeError(`ip-adapter Resampler: expected penultimate hidden states [B, N, ${this.embeddingDim}], got [${features.shape}]`);
    }
    return tf.tidy(() => {
      const b = features.shape[0];
      const x = this.projIn.apply(features);
      let latents = tf.tile(this.latents, [b, 1, 1]) as tf.Tensor3D;
      for (const l of this.layers) {
        const ln = l.norm2.apply(latents);
        const kv = tf.concat([l.norm1.apply(x), ln], 1) as tf.Tensor3D;
        const o = attention(l.toQ.apply(ln), l.toK.apply(kv), l.toV.apply(kv), this.heads);
        latents = tf.add(latents, l.toOut.apply(o));
        latents = tf.add(latents, l.ff2.apply(gelu(l.ff1.apply(l.ffNorm.apply(latents)))));
      }
      return this.normOut.apply(this.projOut.apply(latents));
    });
  }

  dispose(): void {
    this.latents.dispose();
    this.projIn.dispose();
    for (const l of this.layers) for (const m of Object.values(l)) m.dispose();
    this.projOut.dispose();
    this.normOut.dispose();
  }
}
