/**
 * An IP-Adapter file (tencent-ailab; `.safetensors` with flat keys, or the `.bin` torch.save of the nested dict
 * `{'image_proj': ..., 'ip_adapter': ...}`, which weights/ckpt.ts reads as `part.key`): its image projection
 * (ImageProjModel for the basic adapter, Resampler for Plus) and one `to_k_ip` / `to_v_ip` pair per UNet
 * cross-attention layer, numbered `ip_adapter.1, 3, 5, ...` in UNet.crossAttentions() order (diffusers'
 * attn_processors: down blocks, up blocks, mid block last; attn1 has the even numbers and no weights).
 *
 *   basic: image tokens = image_proj(image_embeds);     negative = image_proj(zeros)                  [B, 4, C]
 *   plus:  image tokens = Resampler(penultimate);       negative = Resampler(penultimate of the encoder
 *                                                       run on zero pixel values)                     [B, 16, C]
 * In the UNet each cross-attention becomes to_out(attn(q, k_text, v_text) + scale * attn(q, k_ip, v_ip)),
 * k_ip = tokens @ to_k_ip^T (unet/transformer.ts); for CFG the conditioning carries [negative, photo] tokens.
 * Every key of the file is read or the load fails. The same code serves the SDXL adapters (more layers).
 */
import * as tf from '../backend/tf.js';
import { ConfigError, ShapeError } from '../nn/errors.js';
import { Linear } from '../nn/layers.js';
import { WeightView } from '../nn/weight-view.js';
import { openWeights } from '../weights/open.js';
import { WeightsError, type TensorSource } from '../weights/types.js';
import type { UNet } from '../unet/unet.js';
import type { ExtraKeyValue } from '../unet/transformer.js';
import type { ClipVisionEncoder, ClipVisionOutput } from '../clip/vision.js';
import { ImageProjModel } from './image-proj.js';
import { Resampler } from './resampler.js';

export type IpAdapterKind = 'basic' | 'plus';

/** The encoder outputs an adapter reads: image_embeds (basic) or the penultimate hidden states (Plus). */
export type ImageFeatures = Pick<ClipVisionOutput, 'imageEmbeds'> & Partial<Pick<ClipVisionOutput, 'penultimate'>>;

/** One `ip_adapter.N` entry: the cross-attention it serves and its projections' widths [out, in]. */
export interface IpLayer {
  readonly key: string; // 'ip_adapter.N'
  readonly dim: number; // rows of to_k_ip: the attention's channels
  readonly tokenDim: number; // columns: the image tokens' width
}

const LAYER_KEY = /^ip_adapter\.(\d+)\.to_([kv])_ip\.weight$/;

export class IpAdapter {
  private attachedTo: UNet | null = null;
  private kv: ExtraKeyValue[] | null = null;

  private constructor(
    readonly path: string,
    readonly kind: IpAdapterKind,
    private readonly proj: ImageProjModel | Resampler,
    readonly layers: readonly IpLayer[],
    /** The file's tensors, kept until attach (the projections are loaded for the UNet's execution path). */
    private src: TensorSource | null,
  ) {}

  /** Opens an adapter file (.safetensors or .bin). The file is read at load and at attach, then closed. */
  static open(path: string): IpAdapter {
    return IpAdapter.load(openWeights(path));
  }

  /** Loads the image projection and lists the layers; takes `src` over (closed by attach or dispose). */
  static load(src: TensorSource): IpAdapter {
    try {
      const kind: IpAdapterKind = src.has('image_proj.latents') ? 'plus' : src.has('image_proj.proj.weight') ? 'basic' : fail(src);
      const p = WeightView.root(src, 'image_proj', { native: false });
      const proj = kind === 'plus' ? Resampler.load(p, src) : ImageProjModel.load(p, src);
      const unused = p.unused();
      const layers = listLayers(src);
      const other = [...src.keys()].filter((k) => !k.startsWith('image_proj.') && !LAYER_KEY.test(k));
      if (unused.length > 0 || other.length > 0) {
        proj.dispose();
        throw new WeightsError(`${src.path}: not an IP-Adapter file this code reads: unread tensors ${[...unused, ...other].slice(0, 4).join(', ')}`);
      }
      const tokenDim = kind === 'plus' ? (proj as Resampler).outputDim : (proj as ImageProjModel).crossDim;
      const bad = layers.find((l) => l.tokenDim !== tokenDim);
      if (bad !== undefined) {
        proj.dispose();
        throw new ShapeError(`${src.path}: ${bad.key}.to_k_ip.weight takes ${bad.tokenDim} channels, but image_proj makes tokens of ${tokenDim}`);
      }
      return new IpAdapter(src.path, kind, proj, layers, src);
    } catch (e) {
      src.close();
      throw e;
    }
  }

  /** Width of the image tokens (the UNet's cross-attention context width). */
  get tokenDim(): number {
    return this.layers[0].tokenDim;
  }

  /** Whether the adapter needs the encoder's penultimate hidden states (Plus) rather than image_embeds. */
  get needsPenultimate(): boolean {
    return this.kind === 'plus';
  }

  /** The image tokens [B, M, tokenDim] of the encoder's features. */
  imageTokens(f: ImageFeatures): tf.Tensor3D {
    if (this.proj instanceof Resampler) {
      if (f.penultimate === undefined) {
        throw new ConfigError(`${this.path}: an IP-Adapter Plus reads the image encoder's penultimate hidden states, and none were given`);
      }
      return this.proj.apply(f.penultimate);
    }
    return this.proj.apply(f.imageEmbeds);
  }

  /**
   * The negative (CFG uncond) image tokens [B, M, tokenDim], as tencent and diffusers build them: basic
   * image_proj(zeros like image_embeds); Plus the Resampler on the encoder's penultimate states of zero pixels.
   */
  negativeTokens(encoder: ClipVisionEncoder, batch = 1): tf.Tensor3D {
    if (this.proj instanceof ImageProjModel) {
      const proj = this.proj;
      return tf.tidy(() => proj.apply(tf.zeros([batch, proj.embeddingDim])));
    }
    const s = encoder.cfg.imageSize;
    const zeros = tf.zeros([batch, s, s, 3]) as tf.Tensor4D;
    const out = encoder.forward(zeros);
    try {
      return this.imageTokens(out);
    } finally {
      tf.dispose([zeros, out.imageEmbeds, out.pooled, out.lastHidden, out.penultimate]);
    }
  }

  /**
   * Adds to_k_ip / to_v_ip to every cross-attention of `unet` (one extra token set), checking first that the layer
   * count and each width fit, naming the mismatch. The UNet must be resident.
   */
  attach(unet: UNet): void {
    if (this.attachedTo !== null) throw new Error(`${this.path}: this IP-Adapter is attached to a UNet already`);
    const targets = unet.crossAttentions();
    if (targets.length !== this.layers.length) {
      throw new ShapeError(
        `${this.path}: the adapter has ${this.layers.length} cross-attention layers (${this.layers[0].key} ... ${this.layers.at(-1)?.key}), the UNet ${targets.length}: it was made for another model`,
      );
    }
    targets.forEach((a, i) => {
      const l = this.layers[i];
      const { dim, contextDim } = a.widths;
      if (l.dim !== dim) throw new ShapeError(`${this.path}: ${l.key} is [${l.dim}, ${l.tokenDim}], but UNet cross-attention ${i} has ${dim} channels`);
      if (l.tokenDim !== contextDim) throw new ShapeError(`${this.path}: ${l.key} takes tokens of ${l.tokenDim}, but the UNet's context width is ${contextDim}`);
    });
    if (this.kv === null) {
      const src = this.src as TensorSource;
      const p = WeightView.root(src, 'ip_adapter', { native: targets[0].toQ.native });
      this.kv = this.layers.map((l) => {
        const n = p.child(l.key.slice('ip_adapter.'.length));
        return { toK: Linear.load(n.child('to_k_ip'), l.tokenDim, l.dim, { bias: false }), toV: Linear.load(n.child('to_v_ip'), l.tokenDim, l.dim, { bias: false }) };
      });
      src.close();
      this.src = null;
    } else if (this.kv[0].toK.native !== targets[0].toQ.native) {
      throw new ConfigError(`${this.path}: the adapter's projections were loaded for another execution path than this UNet's`);
    }
    unet.attachExtraKeyValues(this.kv);
    this.attachedTo = unet;
  }

  /** Takes the projections off the UNet again: its output is then exactly what it was before attach. */
  detach(): void {
    if (this.attachedTo === null || this.kv === null) return;
    this.attachedTo.detachExtraKeyValues(this.kv);
    this.attachedTo = null;
  }

  dispose(): void {
    this.detach();
    this.proj.dispose();
    for (const kv of this.kv ?? []) {
      kv.toK.dispose();
      kv.toV.dispose();
    }
    this.kv = null;
    this.src?.close();
    this.src = null;
  }
}

function fail(src: TensorSource): never {
  const full = src.has('image_proj.proj.0.weight') ? ' (an MLPProjModel: full-face and FaceID adapters are not supported)' : '';
  throw new WeightsError(`${src.path}: not an IP-Adapter file: no image_proj.proj.weight (basic) or image_proj.latents (Plus)${full}`);
}

/** The `ip_adapter.N` layers, by N: N must be 1, 3, 5, ... (the attn2 modules), each with to_k_ip and to_v_ip alike. */
function listLayers(src: TensorSource): IpLayer[] {
  const byN = new Map<number, { k?: readonly number[]; v?: readonly number[] }>();
  for (const key of src.keys()) {
    const m = LAYER_KEY.exec(key);
    if (m === null) continue;
    const n = Number(m[1]);
    const e = byN.get(n) ?? {};
    e[m[2] as 'k' | 'v'] = src.info(key).shape;
    byN.set(n, e);
  }
  const ns = [...byN.keys()].sort((a, b) => a - b);
  if (ns.length === 0) throw new WeightsError(`${src.path}: no ip_adapter.N.to_k_ip.weight tensors: not an IP-Adapter file`);
  return ns.map((n, i) => {
    const key = `ip_adapter.${n}`;
    if (n !== 2 * i + 1) throw new WeightsError(`${src.path}: ${key} where ip_adapter.${2 * i + 1} was expected (layers are numbered 1, 3, 5, ...)`);
    const { k, v } = byN.get(n) ?? {};
    if (k === undefined || v === undefined) throw new WeightsError(`${src.path}: ${key} has ${k === undefined ? 'no to_k_ip' : 'no to_v_ip'}.weight`);
    if (k.length !== 2 || v.length !== 2 || k[0] !== v[0] || k[1] !== v[1]) {
      throw new ShapeError(`${src.path}: ${key}: to_k_ip [${k.join(', ')}] and to_v_ip [${v.join(', ')}] must be the same [dim, tokenDim]`);
    }
    return { key, dim: k[0], tokenDim: k[1] };
  });
}
