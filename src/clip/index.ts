/**
 * The CLIP text encoder of SD 1.x (HF CLIPTextModel semantics): token ids -> one context vector per token,
 * which the UNet cross-attends to.
 *
 *   h = token_embedding[ids] + position_embedding[0..N)         ids int32 [B, N] -> [B, N, width]
 *   h = layer_i(h) for i < layers - (clipSkip - 1)               causal pre-LN transformer layers (layer.ts)
 *   out = final_layer_norm(h)                                    [B, N, width]
 *
 * clipSkip 1 gives HF's last_hidden_state; 2 gives final_layer_norm of the penultimate layer's output (the
 * "clip skip 2" of some fine-tunes). No attention mask: padding tokens are attended to, as SD 1.x was trained.
 * Weights: `cond_stage_model.transformer.text_model.{embeddings, encoder.layers.{i}, final_layer_norm}.*`.
 */
import * as tf from '../backend/tf.js';
import { Embedding, LayerNorm } from '../nn/layers.js';
import { WeightView, checkCheckpoint } from '../nn/weight-view.js';
import type { TensorSource } from '../weights/types.js';
import { CLIP_PREFIX, SD15_CLIP, expectedShapes, type ClipConfig } from './config.js';
import { ClipEncoderLayer } from './layer.js';

export { CLIP_PREFIX, SD15_CLIP, clipConfigFromLdm, expectedShapes, type ClipConfig } from './config.js';

/** int64 buffer of HF checkpoints (0..76), not a weight. */
const BUFFERS = /\.embeddings\.position_ids$/;

export class ClipTextEncoder {
  private constructor(
    readonly cfg: ClipConfig,
    private readonly tokenEmbedding: Embedding,
    private readonly positionEmbedding: Embedding,
    private readonly layers: readonly ClipEncoderLayer[],
    private readonly finalLayerNorm: LayerNorm,
  ) {}

  /** Checks every key and shape under `prefix` against cfg, then loads. */
  static load(src: TensorSource, cfg: ClipConfig = SD15_CLIP, prefix = CLIP_PREFIX): ClipTextEncoder {
    checkCheckpoint(src, expectedShapes(cfg, prefix), prefix, { ignore: BUFFERS });
    const p = WeightView.root(src, prefix);
    const emb = p.child('embeddings');
    const layers: ClipEncoderLayer[] = [];
    for (let i = 0; i < cfg.layers; i++) layers.push(ClipEncoderLayer.load(p.child('encoder.layers').child(i), cfg));
    return new ClipTextEncoder(
      cfg,
      Embedding.load(emb.child('token_embedding'), cfg.vocabSize, cfg.width),
      Embedding.load(emb.child('position_embedding'), cfg.contextLength, cfg.width),
      layers,
      LayerNorm.load(p.child('final_layer_norm'), cfg.width, { eps: cfg.layerNormEps }),
    );
  }

  /** ids: int32 [B, N], N <= contextLength -> [B, N, width]; clipSkip 1 = last layer, 2 = penultimate, ... */
  forward(ids: tf.Tensor2D, clipSkip = 1): tf.Tensor3D {
    this.check(ids, clipSkip);
    return tf.tidy(() => {
      let h = this.embed(ids);
      for (const layer of this.layers.slice(0, this.layers.length - (clipSkip - 1))) {
        const next = layer.apply(h);
        h.dispose();
        h = next;
      }
      return this.finalLayerNorm.apply(h);
    });
  }

  // [B, N] -> [B, N, width]
  private embed(ids: tf.Tensor2D): tf.Tensor3D {
    return tf.tidy(() => {
      const positions = tf.range(0, ids.shape[1], 1, 'int32');
      return tf.add(this.tokenEmbedding.apply(ids), this.positionEmbedding.apply(positions)) as tf.Tensor3D;
    });
  }

  private check(ids: tf.Tensor2D, clipSkip: number): void {
    const { contextLength, layers } = this.cfg;
    if (ids.rank !== 2 || ids.shape[1] < 1 || ids.shape[1] > contextLength) {
      throw new RangeError(`clip: token ids must be [batch, 1..${contextLength}], got [${ids.shape}]`);
    }
    if (!Number.isInteger(clipSkip) || clipSkip < 1 || clipSkip > layers) {
      throw new RangeError(`clip: clipSkip must be an integer from 1 to ${layers} (the layer count), got ${clipSkip}`);
    }
  }

  dispose(): void {
    this.tokenEmbedding.dispose();
    this.positionEmbedding.dispose();
    for (const layer of this.layers) layer.dispose();
    this.finalLayerNorm.dispose();
  }
}
