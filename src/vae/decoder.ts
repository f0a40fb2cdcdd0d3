/**
 * VAE Decoder (CompVis model.py Decoder): z NHWC [B, h, w, zChannels] -> image [B, h*f, w*f, out], f = 2^(levels-1).
 *
 *   h = mid(conv_in(z))                                                  [B, h, w, ch * chMult[last]]
 *   for level i from the last down to 0 (the checkpoint's `up.{i}` is resolution level i, stored in that order):
 *       numResBlocks + 1 resnets (-> ch * chMult[i]), each followed by attention at attnResolutions,
 *       then an Upsample except after level 0
 *   out = conv_out(SiLU(norm_out(h)))                                    roughly [-1, 1]
 * Weights: `decoder.{conv_in, mid, up.{i}.block.{j}, up.{i}.attn.{j}, up.{i}.upsample.conv, norm_out, conv_out}.*`.
 */
import type * as tf from '../backend/tf.js';
import { Conv2d, GroupNorm } from '../nn/layers.js';
import type { WeightView } from '../nn/weight-view.js';
import { normSiluConv } from '../nn/resnet.js';
import { Level, MidBlock, Upsample, replace } from './blocks.js';
import { VAE_GN_EPS, levelResolution, type VaeConfig } from './config.js';

export class Decoder {
  private constructor(
    private readonly convIn: Conv2d,
    private readonly mid: MidBlock,
    private readonly levels: readonly Level[], // in the order they run: lowest resolution first
    private readonly normOut: GroupNorm,
    private readonly convOut: Conv2d,
  ) {}

  static load(p: WeightView, cfg: VaeConfig): Decoder {
    const top = cfg.ch * cfg.chMult[cfg.chMult.length - 1];
    let cin = top;
    const levels: Level[] = [];
    for (let i = cfg.chMult.length - 1; i >= 0; i--) {
      const cout = cfg.ch * cfg.chMult[i];
      const lp = p.child('up').child(i);
      const attention = cfg.attnResolutions.includes(levelResolution(cfg, i));
      levels.push(Level.load(lp, { cin, cout, blocks: cfg.numResBlocks + 1, attention }, i === 0 ? null : () => Upsample.load(lp.child('upsample'), cout)));
      cin = cout;
    }
    return new Decoder(
      Conv2d.load(p.child('conv_in'), cfg.zChannels, top, 3),
      MidBlock.load(p.child('mid'), top),
      levels,
      GroupNorm.load(p.child('norm_out'), cin, { eps: VAE_GN_EPS }),
      Conv2d.load(p.child('conv_out'), cin, cfg.outChannels, 3),
    );
  }

  apply(z: tf.Tensor4D): tf.Tensor4D {
    let h = replace(this.convIn.apply(z), (t) => this.mid.apply(t));
    for (const level of this.levels) h = level.apply(h);
    return replace(h, (t) => normSiluConv(this.normOut, this.convOut, t));
  }

  dispose(): void {
    this.convIn.dispose();
    this.mid.dispose();
    for (const level of this.levels) level.dispose();
    this.normOut.dispose();
    this.convOut.dispose();
  }
}
