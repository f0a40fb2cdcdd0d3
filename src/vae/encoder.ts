/**
 * VAE Encoder (CompVis model.py Encoder): image NHWC [B, H, W, in] -> [B, H/f, W/f, 2 * zChannels], f = 2^(levels-1).
 *
 *   h = conv_in(x)                                                       [B, H, W, ch]
 *   for level i: numResBlocks resnets (-> ch * chMult[i]), each followed by attention at attnResolutions,
 *                then a Downsample except after the last level
 *   h = mid(h)                                                           resnet, attention, resnet
 *   out = conv_out(SiLU(norm_out(h)))                                    mean and log-variance, stacked on channels
 * Weights: `encoder.{conv_in, down.{i}.block.{j}, down.{i}.attn.{j}, down.{i}.downsample.conv, mid, norm_out, conv_out}.*`.
 */
import type * as tf from '../backend/tf.js';
import { Conv2d, GroupNorm } from '../nn/layers.js';
import type { WeightView } from '../nn/weight-view.js';
import { normSiluConv } from '../nn/resnet.js';
import { Downsample, Level, MidBlock, replace } from './blocks.js';
import { VAE_GN_EPS, levelResolution, type VaeConfig } from './config.js';

export class Encoder {
  private constructor(
    private readonly convIn: Conv2d,
    private readonly levels: readonly Level[],
    private readonly mid: MidBlock,
    private readonly normOut: GroupNorm,
    private readonly convOut: Conv2d,
  ) {}

  static load(p: WeightView, cfg: VaeConfig): Encoder {
    let cin = cfg.ch;
    const levels = cfg.chMult.map((mult, i): Level => {
      const cout = cfg.ch * mult;
      const lp = p.child('down').child(i);
      const attention = cfg.attnResolutions.includes(levelResolution(cfg, i));
      const last = i === cfg.chMult.length - 1;
      const level = Level.load(lp, { cin, cout, blocks: cfg.numResBlocks, attention }, last ? null : () => Downsample.load(lp.child('downsample'), cout));
      cin = cout;
      return level;
    });
    return new Encoder(
      Conv2d.load(p.child('conv_in'), cfg.inChannels, cfg.ch, 3),
      levels,
      MidBlock.load(p.child('mid'), cin),
      GroupNorm.load(p.child('norm_out'), cin, { eps: VAE_GN_EPS }),
      Conv2d.load(p.child('conv_out'), cin, 2 * cfg.zChannels, 3),
    );
  }

  apply(x: tf.Tensor4D): tf.Tensor4D {
    let h = this.convIn.apply(x);
    for (const level of this.levels) h = level.apply(h);
    h = replace(h, (t) => this.mid.apply(t));
    return replace(h, (t) => normSiluConv(this.normOut, this.convOut, t));
  }

  dispose(): void {
    this.convIn.dispose();
    for (const level of this.levels) level.dispose();
    this.mid.dispose();
    this.normOut.dispose();
    this.convOut.dispose();
  }
}
