/**
 * The CLIP text encoder (HF CLIPTextModel semantics; open_clip's text tower is the same network): token ids -> one
 * feature vector per token, which the UNet cross-attends to, and the pooled feature of the whole text.
 *
 *   h_0 = token_embedding[ids] + position_embedding[0..N)         ids int32 [B, N] -> [B, N, width]
 *   h_i = layer_i(h_{i-1})                                         causal pre-LN transformer layers (layer.ts)
 *   hidden      = final_layer_norm(h_{L - (clipSkip - 1)})         [B, N, width]: what SD 1.x conditions on
 *   penultimate = h_{L-1}, without the final norm                  [B, N, width]: what SDXL conditions on
 *   pooled      = final_layer_norm(h_L) at each text's end token   [B, width] (the first highest id: <|endoftext|>)
 *   projected   = pooled @ text_projection                         [B, projectionDim] (open_clip; SDXL's text_embeds)
 *
 * clipSkip 1 gives HF's last_hidden_state; 2 gives final_layer_norm of the penultimate layer's output (the
 * "clip skip 2" of some fine-tunes). No attention mask: padding tokens are attended to, as SD 1.x was trained.
 * Weights: `cond_stage_model.transformer.text_model.{embeddings, encoder.layers.{i}, final_layer_norm}.*` (SD 1.x);
 * other prefixes and open_clip's names through a names table (names.ts, open-clip.ts).
 */
import * as tf from '../backend/tf.js';
import { ConfigError, ShapeError } from '../nn/errors.js';
import { Embedding, LayerNorm } from '../nn/layers.js';
import { WeightView, checkCheckpoint, probeShapes } from '../nn/weight-view.js';
import { SD1_PREFIXES } from '../weights/layout.js';
import type { TensorSource } from '../weights/types.js';
import { Held, type ResidencyPolicy } from '../nn/residency.js';
import { SD15_CLIP, type ClipConfig } from './config.js';
import { ClipEncoderLayer } from './layer.js';
import { HF_CLIP_NAMES, type ClipNames } from './names.js';

export { SD15_CLIP, SDXL_CLIP_G, SDXL_CLIP_L, clipConfigFromLdm, type ClipConfig } from './config.js';
export { HF_CLIP_NAMES, OPEN_CLIP_NAMES, type ClipLayerNames, type ClipNames } from './names.js';

/** What the encoder gives for a batch of texts. */
export interface ClipTextOutput {
  readonly hidden: tf.Tensor3D;
  readonly penultimate: tf.Tensor3D;
  /** Only when asked for (it needs every layer, whatever clipSkip says). */
  readonly pooled?: tf.Tensor2D;
  /** pooled @ text_projection: with pooled, for an encoder that has a projection (cfg.projectionDim). */
  readonly projected?: tf.Tensor2D;
}

/** int64 buffer of HF checkpoints (0..76), not a weight. */
const BUFFERS = /\.embeddings\.position_ids$/;

export class ClipTextEncoder {
  private constructor(
    readonly cfg: ClipConfig,
    private readonly tokenEmbedding: Embedding,
    private readonly positionEmbedding: tf.Tensor2D, // [contextLength, width]
    /** Each under a residency policy: streamed, a layer is built from the host copy only while it runs (SDXL on wasm). */
    private readonly layers: readonly Held<ClipEncoderLayer>[],
    private readonly finalLayerNorm: LayerNorm,
    private readonly textProjection: tf.Tensor2D | null, // [width, projectionDim]
  ) {}

  /** Checks every key and shape under `prefix` against cfg, then loads (HF names; open_clip's: open-clip.ts). */
  static load(src: TensorSource, cfg: ClipConfig = SD15_CLIP, prefix: string = SD1_PREFIXES.textEncoder, policy: ResidencyPolicy = 'resident'): ClipTextEncoder {
    checkCheckpoint(src, expectedShapes(cfg, prefix), prefix, { ignore: BUFFERS });
    return ClipTextEncoder.loadFrom(WeightView.root(src, prefix), cfg, HF_CLIP_NAMES, policy);
  }

  /**
   * Builds the encoder from a view, the parts named by `names`, without the checks `load` makes first
   * (expectedShapes runs it on a probe). `policy` 'streamed': the transformer layers are built at each use (from a
   * host copy, residency.ts), the embeddings, final norm and projection at load.
   */
  static loadFrom(p: WeightView, cfg: ClipConfig, names: ClipNames = HF_CLIP_NAMES, policy: ResidencyPolicy = 'resident'): ClipTextEncoder {
    const { width, projectionDim } = cfg;
    if (projectionDim !== undefined && names.textProjection === null) {
      throw new ConfigError(`clip: the config asks for a text projection (projectionDim ${projectionDim}) that this naming has none of`);
    }
    const tokenEmbedding = Embedding.load(p.child(names.tokenEmbedding), cfg.vocabSize, width);
    const positionEmbedding = tf.keep(p.tensor(names.positionEmbedding, [cfg.contextLength, width]) as tf.Tensor2D);
    const layers: Held<ClipEncoderLayer>[] = [];
    for (let i = 0; i < cfg.layers; i++) layers.push(Held.load(policy, () => ClipEncoderLayer.load(p.child(names.layers).child(i), cfg, names.layer)));
    const finalLayerNorm = LayerNorm.load(p.child(names.finalLayerNorm), width, { eps: cfg.layerNormEps });
    const projection =
      projectionDim === undefined ? null : tf.keep(p.tensor(names.textProjection as string, [width, projectionDim]) as tf.Tensor2D);
    return new ClipTextEncoder(cfg, tokenEmbedding, positionEmbedding, layers, finalLayerNorm, projection);
  }

  /** ids: int32 [B, N], N <= contextLength; clipSkip 1 = last layer, 2 = penultimate, ... */
  forward(ids: tf.Tensor2D, { clipSkip = 1, pooled = false }: { clipSkip?: number; pooled?: boolean } = {}): ClipTextOutput {
    this.check(ids, clipSkip);
    const last = this.layers.length;
    const hiddenAt = last - (clipSkip - 1); // layers to run for `hidden`
    const run = pooled ? last : Math.max(hiddenAt, last - 1);
    const out: { hidden?: tf.Tensor3D; penultimate?: tf.Tensor3D; pooled?: tf.Tensor2D; projected?: tf.Tensor2D } = {};
    tf.tidy(() => {
      let h = this.embed(ids);
      for (let i = 1; i <= run; i++) {
        const x = h;
        const next = this.layers[i - 1].use((layer) => layer.apply(x));
        h.dispose();
        h = next;
        if (i === last - 1) out.penultimate = tf.keep(tf.clone(h));
        if (i === hiddenAt) out.hidden = tf.keep(this.finalLayerNorm.apply(h));
        if (i === last && pooled) out.pooled = tf.keep(endTokens(i === hiddenAt ? (out.hidden as tf.Tensor3D) : this.finalLayerNorm.apply(h), ids));
      }
      if (last === 1) out.penultimate = tf.keep(this.embed(ids)); // one layer: the embeddings come before it
      if (out.pooled !== undefined && this.textProjection !== null) {
        out.projected = tf.keep(tf.matMul(out.pooled, this.textProjection) as tf.Tensor2D); // x @ P, P as stored
      }
    });
    return out as ClipTextOutput;
  }

  // [B, N] -> [B, N, width]
  private embed(ids: tf.Tensor2D): tf.Tensor3D {
    return tf.tidy(() => {
      const positions = tf.slice(this.positionEmbedding, [0, 0], [ids.shape[1], this.cfg.width]);
      return tf.add(this.tokenEmbedding.apply(ids), positions) as tf.Tensor3D;
    });
  }

  private check(ids: tf.Tensor2D, clipSkip: number): void {
    const { contextLength, layers } = this.cfg;
    if (ids.rank !== 2 || ids.shape[1] < 1 || ids.shape[1] > contextLength) {
      throw new ShapeError(`clip: token ids must be [batch, 1..${contextLength}], got [${ids.shape}]`);
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
    this.textProjection?.dispose();
  }
}

/** The feature at each text's end token: the first position of its highest id (<|endoftext|>), as HF pools. */
function endTokens(h: tf.Tensor3D, ids: tf.Tensor2D): tf.Tensor2D {
  const [b, n, width] = h.shape;
  const values = ids.dataSync();
  const rows = new Int32Array(b);
  for (let i = 0; i < b; i++) {
    let at = 0;
    for (let j = 1; j < n; j++) if (values[i * n + j] > values[i * n + at]) at = j;
    rows[i] = i * n + at;
  }
  return tf.tidy(() => tf.gather(tf.reshape(h, [b * n, width]), tf.tensor1d(rows, 'int32')) as tf.Tensor2D);
}

/** Every checkpoint key ClipTextEncoder.loadFrom reads for cfg, with its PyTorch shape: the loader run against a probe. */
export function expectedShapes(
  cfg: ClipConfig = SD15_CLIP,
  prefix: string = SD1_PREFIXES.textEncoder,
  names: ClipNames = HF_CLIP_NAMES,
): Map<string, number[]> {
  return probeShapes(prefix, (p) => ClipTextEncoder.loadFrom(p, cfg, names));
}
