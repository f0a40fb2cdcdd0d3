/**
 * ImageProjModel (tencent-ailab ip_adapter/ip_adapter.py), the basic IP-Adapter's image projection: the CLIP
 * vision encoder's image_embeds -> `numTokens` image tokens the UNet's cross-attention attends to.
 *
 *   tokens = LayerNorm(reshape(image_embeds @ proj.weight^T + proj.bias, [B, numTokens, crossDim]))
 *   [B, projectionDim] -> [B, numTokens, crossDim]
 * Sizes come from the file: crossDim = norm.weight's length, numTokens = rows(proj.weight) / crossDim (4 in every
 * released SD 1.5 adapter). Weights: `image_proj.proj.{weight,bias}`, `image_proj.norm.{weight,bias}`.
 */
import * as tf from '../backend/tf.js';
import { ShapeError } from '../nn/errors.js';
import { LayerNorm, Linear } from '../nn/layers.js';
import type { WeightView } from '../nn/weight-view.js';
import type { TensorSource } from '../weights/types.js';

export class ImageProjModel {
  private constructor(
    readonly embeddingDim: number,
    readonly numTokens: number,
    readonly crossDim: number,
    private readonly proj: Linear,
    private readonly norm: LayerNorm,
  ) {}

  /** p: the view at `image_proj`; src: the file, for its shapes. */
  static load(p: WeightView, src: TensorSource): ImageProjModel {
    const [rows, embeddingDim] = src.info(p.key('proj.weight')).shape;
    const [crossDim] = src.info(p.key('norm.weight')).shape;
    if (rows % crossDim !== 0) throw new ShapeError(`${src.path}: image_proj.proj.weight has ${rows} rows, not a multiple of the token width ${crossDim} (image_proj.norm.weight)`);
    const proj = Linear.load(p.child('proj'), embeddingDim, rows);
    return new ImageProjModel(embeddingDim, rows / crossDim, crossDim, proj, LayerNorm.load(p.child('norm'), crossDim));
  }

  /** image_embeds [B, embeddingDim] -> tokens [B, numTokens, crossDim] */
  apply(embeds: tf.Tensor2D): tf.Tensor3D {
    if (embeds.rank !== 2 || embeds.shape[1] !== this.embeddingDim) {
      throw new ShapeError(`ip-adapter image_proj: expected image_embeds [B, ${this.embeddingDim}], got [${embeds.shape}]`);
    }
    return tf.tidy(() => this.norm.apply(tf.reshape(this.proj.apply(embeds), [embeds.shape[0], this.numTokens, this.crossDim]) as tf.Tensor3D));
  }

  dispose(): void {
    this.proj.dispose();
    this.norm.dispose();
  }
}
