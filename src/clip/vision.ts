/**
 * The CLIP vision encoder (transformers CLIPVisionModelWithProjection), as the `image_encoder/` folder beside
 * the IP-Adapter files holds it (OpenCLIP ViT-H/14 for the SD 1.5 adapters): normalized pixels -> image features.
 *
 *   patches  = patch_embedding(x)                 conv k = s = patch, no bias: [B, g*g, width], row-major grid
 *   h_0      = pre_layrnorm([class_embedding; patches] + position_embedding)              [B, 1 + g*g, width]
 *   h_i      = layer_i(h_{i-1})                    pre-LN transformer layers (clip/layer.ts), non-causal
 *   last     = h_L                                 last_hidden_state
 *   penultimate = h_{L-1}                          hidden_states[-2], no norm: what IP-Adapter Plus reads
 *   pooled   = post_layernorm(h_L[:, 0])           [B, width]
 *   imageEmbeds = pooled @ visual_projection^T     [B, projectionDim], no bias: what the basic IP-Adapter reads
 *
 * Input: pixel values NHWC [B, imageSize, imageSize, 3], already normalized (ip-adapter/preprocess.ts).
 * Weights: `vision_model.{embeddings.{class_embedding, patch_embedding.weight, position_embedding.weight},
 * pre_layrnorm, encoder.layers.{i}, post_layernorm}.*`, `visual_projection.weight`; the int64 buffer
 * `vision_model.embeddings.position_ids` is skipped.
 */
import * as tf from '../backend/tf.js';
import { ConfigError, ShapeError } from '../nn/errors.js';
import { LayerNorm } from '../nn/layers.js';
import { Held, HostTensors, defaultResidency, type ResidencyPolicy } from '../nn/residency.js';
import { WeightView, checkCheckpoint, probeShapes } from '../nn/weight-view.js';
import type { TensorSource } from '../weights/types.js';
import type { ClipConfig } from './config.js';
import { ClipEncoderLayer } from './layer.js';
import { HF_CLIP_NAMES } from './names.js';

export interface ClipVisionConfig {
  readonly imageSize: number; // pixels per side the encoder takes (the preprocessing's crop size)
  readonly patchSize: number;
  readonly width: number; // hidden_size
  readonly layers: number;
  readonly heads: number;
  readonly mlpWidth: number; // intermediate_size
  readonly projectionDim: number; // width of image_embeds
  readonly layerNormEps: number;
  readonly act: 'quick_gelu' | 'gelu';
}

/** OpenCLIP ViT-H/14 (laion2b) as transformers stores it: the image encoder of ip-adapter_sd15 and -plus_sd15. */
export const CLIP_VISION_H: ClipVisionConfig = Object.freeze({
  imageSize: 224,
  patchSize: 14,
  width: 1280,
  layers: 32,
  heads: 16,
  mlpWidth: 5120,
  projectionDim: 1024,
  layerNormEps: 1e-5,
  act: 'gelu',
});

export interface ClipVisionOutput {
  readonly imageEmbeds: tf.Tensor2D;
  readonly pooled: tf.Tensor2D;
  readonly lastHidden: tf.Tensor3D;
  readonly penultimate: tf.Tensor3D;
}

const BUFFERS = /\.embeddings\.position_ids$/;
const PREFIX = 'vision_model';

/** transformers' `config.json` of a CLIPVisionModelWithProjection (or a CLIPVisionConfig) -> ClipVisionConfig. */
export function clipVisionConfigFromJson(json: unknown): ClipVisionConfig {
  if (typeof json !== 'object' || json === null) throw new ConfigError('clip vision config: expected a JSON object');
  const j = json as Record<string, unknown>;
  const int = (field: string): number => {
    const v = j[field];
    if (typeof v !== 'number' || !Number.isInteger(v) || v < 1) {
      throw new ConfigError(`clip vision config: "${field}" must be a positive integer, got ${JSON.stringify(v)}`);
    }
    return v;
  };
  const act = j.hidden_act ?? 'quick_gelu';
  if (act !== 'quick_gelu' && act !== 'gelu') {
    throw new ConfigError(`clip vision config: "hidden_act" must be "gelu" or "quick_gelu", got ${JSON.stringify(act)}`);
  }
  const eps = j.layer_norm_eps ?? 1e-5;
  if (typeof eps !== 'number' || !(eps > 0)) throw new ConfigError('clip vision config: "layer_norm_eps" must be a positive number');
  const cfg = {
    imageSize: int('image_size'),
    patchSize: int('patch_size'),
    width: int('hidden_size'),
    layers: int('num_hidden_layers'),
    heads: int('num_attention_heads'),
    mlpWidth: int('intermediate_size'),
    projectionDim: int('projection_dim'),
    layerNormEps: eps,
    act,
  } as const;
  if (cfg.imageSize % cfg.patchSize !== 0) throw new ConfigError(`clip vision config: image_size ${cfg.imageSize} is not a multiple of patch_size ${cfg.patchSize}`);
  if (cfg.width % cfg.heads !== 0) throw new ConfigError(`clip vision config: hidden_size ${cfg.width} is not a multiple of num_attention_heads ${cfg.heads}`);
  return Object.freeze(cfg);
}

/** Positions: the class token and one per patch. */
export const visionPositions = (cfg: ClipVisionConfig): number => (cfg.imageSize / cfg.patchSize) ** 2 + 1;

/** The shared text/vision layer takes a ClipConfig: the fields it reads. */
function layerConfig(cfg: ClipVisionConfig): ClipConfig {
  return { vocabSize: 0, width: cfg.width, layers: cfg.layers, heads: cfg.heads, contextLength: visionPositions(cfg), mlpWidth: cfg.mlpWidth, layerNormEps: cfg.layerNormEps, act: cfg.act };
}

export class ClipVisionEncoder {
  private constructor(
    readonly cfg: ClipVisionConfig,
    private readonly patchWeight: tf.Tensor2D, // [3 * patch * patch, width], rows in (channel, y, x) order
    private readonly classEmbedding: tf.Tensor1D,
    private readonly positionEmbedding: tf.Tensor2D, // [positions, width]
    private readonly preLayerNorm: LayerNorm,
    /** Each under a residency policy: streamed (wasm), a layer is built from the host copy only while it runs. */
    private readonly layers: readonly Held<ClipEncoderLayer>[],
    private readonly postLayerNorm: LayerNorm,
    private readonly projection: tf.Tensor2D, // [width, projectionDim]
    private host: HostTensors | null = null,
  ) {}

  /**
   * Checks every key and shape against cfg, then loads (transformers names, at the file's top level). Streamed (the
   * default on wasm: ViT-H's 2.5 GB of layers, with XNNPACK's packed copies, do not fit its heap), the layers' weights
   * stay in a host copy and each layer is built only while it runs; `src` may be closed after load either way.
   */
  static load(src: TensorSource, cfg: ClipVisionConfig = CLIP_VISION_H, policy: ResidencyPolicy = defaultResidency()): ClipVisionEncoder {
    const expected = expectedVisionShapes(cfg);
    checkCheckpoint(src, expected, '', { ignore: BUFFERS });
    if (policy === 'resident') return ClipVisionEncoder.loadFrom(WeightView.root(src, ''), cfg);
    const host = HostTensors.copy(src, expected.keys());
    try {
      const encoder = ClipVisionEncoder.loadFrom(WeightView.root(host, ''), cfg, 'streamed');
      encoder.host = host;
      return encoder;
    } catch (e) {
      host.close();
      throw e;
    }
  }

  static loadFrom(root: WeightView, cfg: ClipVisionConfig, policy: ResidencyPolicy = 'resident'): ClipVisionEncoder {
    const { width, patchSize: k } = cfg;
    const p = root.child(PREFIX);
    const e = p.child('embeddings');
    const keep = <T extends tf.Tensor>(make: () => T): T => tf.keep(tf.tidy(make));
    // PyTorch conv weight [width, 3, k, k] -> [3*k*k, width]: a patch flattened as (channel, y, x) times it
    const patchWeight = keep(() => {
      const w = e.tensor('patch_embedding.weight', [width, 3, k, k]);
      return (w.size === 0 ? w : tf.transpose(tf.reshape(w, [width, 3 * k * k]))) as tf.Tensor2D; // size 0: a probe
    });
    const classEmbedding = keep(() => e.tensor('class_embedding', [width]) as tf.Tensor1D);
    const positionEmbedding = keep(() => e.tensor('position_embedding.weight', [visionPositions(cfg), width]) as tf.Tensor2D);
    const eps = { eps: cfg.layerNormEps };
    const preLayerNorm = LayerNorm.load(p.child('pre_layrnorm'), width, eps);
    const layers = Array.from({ length: cfg.layers }, (_, i) =>
      Held.load(policy, () => ClipEncoderLayer.load(p.child('encoder.layers').child(i), layerConfig(cfg), HF_CLIP_NAMES.layer, { causal: false })),
    );
    const postLayerNorm = LayerNorm.load(p.child('post_layernorm'), width, eps);
    const projection = keep(() => tf.transpose(root.tensor('visual_projection.weight', [cfg.projectionDim, width])) as tf.Tensor2D);
    return new ClipVisionEncoder(cfg, patchWeight, classEmbedding, positionEmbedding, preLayerNorm, layers, postLayerNorm, projection);
  }

  /** pixels: normalized NHWC [B, imageSize, imageSize, 3]. The outputs are the caller's to dispose. */
  forward(pixels: tf.Tensor4D): ClipVisionOutput {
    const { imageSize: s, patchSize: k, width } = this.cfg;
    const [b, h, w, c] = pixels.shape;
    if (pixels.rank !== 4 || h !== s || w !== s || c !== 3) {
      throw new ShapeError(`clip vision: expected pixel values NHWC [B, ${s}, ${s}, 3], got [${pixels.shape}]`);
    }
    return tf.tidy(() => {
      const g = s / k;
      // [B, S, S, 3] -> [B, g, k, g, k, 3] -> [B, g, g, 3, k, k] -> [B, g*g, 3*k*k]
      const patches = tf.reshape(tf.transpose(tf.reshape(pixels, [b, g, k, g, k, 3]), [0, 1, 3, 5, 2, 4]), [b, g * g, 3 * k * k]);
      const embedded = tf.matMul(patches, tf.broadcastTo(this.patchWeight, [b, 3 * k * k, width])) as tf.Tensor3D;
      const cls = tf.broadcastTo(tf.reshape(this.classEmbedding, [1, 1, width]), [b, 1, width]);
      let x = this.preLayerNorm.apply(tf.add(tf.concat([cls, embedded], 1), this.positionEmbedding) as tf.Tensor3D);
      let penultimate = x;
      for (const layer of this.layers) {
        penultimate = x;
        const input = x;
        x = layer.use((l) => l.apply(input));
      }
      const pooled = tf.reshape(this.postLayerNorm.apply(tf.slice(x, [0, 0, 0], [b, 1, width])), [b, width]) as tf.Tensor2D;
      const imageEmbeds = tf.matMul(pooled, this.projection) as tf.Tensor2D;
      return { imageEmbeds, pooled, lastHidden: x, penultimate };
    });
  }

  dispose(): void {
    tf.dispose([this.patchWeight, this.classEmbedding, this.positionEmbedding, this.projection]);
    this.preLayerNorm.dispose();
    for (const l of this.layers) l.dispose();
    this.postLayerNorm.dispose();
    this.host?.close();
  }
}

/** Every key ClipVisionEncoder.loadFrom reads for cfg, with its PyTorch shape: the loader run against a probe. */
export function expectedVisionShapes(cfg: ClipVisionConfig = CLIP_VISION_H): Map<string, number[]> {
  return probeShapes('', (p) => ClipVisionEncoder.loadFrom(p, cfg));
}
