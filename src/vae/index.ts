/**
 * The SD 1.x VAE (CompVis AutoencoderKL, kl-f8): images <-> latents, NHWC.
 *
 *   encode: image [B, H, W, 3] in [-1, 1] -> moments = quant_conv(Encoder(image))   [B, H/f, W/f, 2 * embedDim]
 *           mean, logvar = the two halves of the channels (logvar clamped to [-30, 20], as ldm does)
 *   decode: z [B, h, w, embedDim] -> Decoder(post_quant_conv(z))                      [B, h*f, w*f, 3], roughly [-1, 1]
 * f = 2^(levels - 1) = 8. The latent scale factor 0.18215 is the pipeline's, not applied here.
 * Weights: `first_stage_model.{encoder, decoder, quant_conv, post_quant_conv}.*`.
 */
import * as tf from '../backend/tf.js';
import { Conv2d } from '../nn/layers.js';
import { WeightView, checkCheckpoint, probeShapes } from '../nn/weight-view.js';
import { SD1_PREFIXES } from '../weights/layout.js';
import type { TensorSource } from '../weights/types.js';
import { SD15_VAE, downsampleFactor, type VaeConfig } from './config.js';
import { Decoder } from './decoder.js';
import { Encoder } from './encoder.js';
import { ShapeError } from '../nn/errors.js';
import { decodeTiled, needsTiles } from './tiled.js';

export { SD15_VAE, downsampleFactor, vaeConfigFromLdm, type VaeConfig } from './config.js';

/** Training-only tensors some checkpoints carry next to the VAE (the LPIPS/discriminator loss). */
const TRAINING_ONLY = /^first_stage_model\.loss\./;

export class Vae {
  private constructor(
    readonly cfg: VaeConfig,
    private readonly encoder: Encoder,
    private readonly quantConv: Conv2d,
    private readonly postQuantConv: Conv2d,
    private readonly decoder: Decoder,
  ) {}

  /** Checks every key and shape under `prefix` against cfg, then loads. */
  static load(src: TensorSource, cfg: VaeConfig = SD15_VAE, prefix: string = SD1_PREFIXES.vae): Vae {
    checkCheckpoint(src, expectedShapes(cfg, prefix), prefix, { ignore: TRAINING_ONLY });
    return Vae.loadFrom(WeightView.root(src, prefix), cfg);
  }

  /** Builds the VAE from a view, without the checks `load` makes first (expectedShapes runs it on a probe). */
  static loadFrom(p: WeightView, cfg: VaeConfig): Vae {
    return new Vae(
      cfg,
      Encoder.load(p.child('encoder'), cfg),
      Conv2d.load(p.child('quant_conv'), 2 * cfg.zChannels, 2 * cfg.embedDim, 1),
      Conv2d.load(p.child('post_quant_conv'), cfg.embedDim, cfg.zChannels, 1),
      Decoder.load(p.child('decoder'), cfg),
    );
  }

  /** How many image pixels one latent pixel covers along each side (8 for SD 1.x). */
  get factor(): number {
    return downsampleFactor(this.cfg);
  }

  /** image NHWC [B, H, W, 3] in [-1, 1], H and W multiples of the factor -> the latent distribution's mean and log-variance. */
  encode(image: tf.Tensor4D): { mean: tf.Tensor4D; logvar: tf.Tensor4D } {
    this.checkInput('encode: image', image, this.cfg.inChannels, this.factor);
    const h = this.encoder.apply(image);
    const moments = this.quantConv.apply(h); // [B, h, w, 2 * embedDim]
    h.dispose();
    const [mean, logvar] = tf.tidy(() => {
      const [m, lv] = tf.split(moments, 2, 3) as [tf.Tensor4D, tf.Tensor4D];
      return [m, tf.clipByValue(lv, -30, 20)];
    });
    moments.dispose();
    return { mean, logvar };
  }

  /**
   * z NHWC [B, h, w, embedDim], unscaled -> image NHWC [B, h*f, w*f, 3]. On wasm a latent whose decode would not fit
   * the heap in one piece (SDXL's 1024x1024) is decoded in overlapping tiles (tiled.ts), an approximation.
   */
  decode(z: tf.Tensor4D): tf.Tensor4D {
    this.checkInput('decode: z', z, this.cfg.embedDim, 1);
    const [b, h, w] = z.shape;
    if (b === 1 && needsTiles(h * w * this.factor ** 2)) return decodeTiled(z, this.factor, (t) => this.decodeWhole(t));
    return this.decodeWhole(z);
  }

  private decodeWhole(z: tf.Tensor4D): tf.Tensor4D {
    const h = this.postQuantConv.apply(z);
    const out = this.decoder.apply(h);
    h.dispose();
    return out;
  }

  private checkInput(what: string, x: tf.Tensor4D, channels: number, multiple: number): void {
    const [, h, w, c] = x.shape;
    if (x.rank !== 4 || c !== channels || h % multiple !== 0 || w % multiple !== 0 || h === 0 || w === 0) {
      throw new ShapeError(`vae ${what} must be NHWC [B, H, W, ${channels}] with H and W multiples of ${multiple}, got [${x.shape}]`);
    }
  }

  dispose(): void {
    this.encoder.dispose();
    this.quantConv.dispose();
    this.postQuantConv.dispose();
    this.decoder.dispose();
  }
}

/** Every checkpoint key Vae.load reads for cfg, with its PyTorch shape: the loader run against a probe. */
export function expectedShapes(cfg: VaeConfig = SD15_VAE, prefix: string = SD1_PREFIXES.vae): Map<string, number[]> {
  return probeShapes(prefix, (p) => Vae.loadFrom(p, cfg));
}
