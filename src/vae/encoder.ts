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
import type * as tf from '../tensor/tf.js';
import { Conv2d, GroupNorm } from '../tensor/nn.js';
import type { Params } from '../tensor/params.js';
import { normSiluConv, type ResnetBlock } from '../tensor/resnet.js';
import { AttnBlock, Downsample, MidBlock, loadResnet, replace } from './blocks.js';
import { VAE_GN_EPS, levelResolution, type VaeConfig } from './config.js';

interface DownLevel {
  readonly blocks: readonly ResnetBlock[];
  readonly attns: readonly AttnBlock[]; // one after each block at attnResolutions, else none
  readonly downsample: Downsample | null;
}

export class Encoder {
  private constructor(
    private readonly convIn: Conv2d,
    private readonly levels: readonly DownLevel[],
    private readonly mid: MidBlock,
    private readonly normOut: GroupNorm,
    private readonly convOut: Conv2d,
  ) {}

  static load(p: Params, cfg: VaeConfig): Encoder {
    let cin = cfg.ch;
    const levels = cfg.chMult.map((mult, i): DownLevel => {
      const cout = cfg.ch * mult;
      const lp = p.child('down').child(i);
      const withAttn = cfg.attnResolutions.includes(levelResolution(cfg, i));
      const blocks: ResnetBlock[] = [];
      const attns: AttnBlock[] = [];
      for (let j = 0; j < cfg.numResBlocks; j++) {
        blocks.push(loadResnet(lp.child('block').child(j), cin, cout));
        if (withAttn) attns.push(AttnBlock.load(lp.child('attn').child(j), cout));
        cin = cout;
      }
      const last = i === cfg.chMult.length - 1;
      return { blocks, attns, downsample: last ? null : Downsample.load(lp.child('downsample'), cout) };
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
    for (const level of this.levels) {
      level.blocks.forEach((block, j) => {
        h = replace(h, (t) => block.apply(t));
        const attn = level.attns[j];
        if (attn !== undefined) h = replace(h, (t) => attn.apply(t));
      });
      const down = level.downsample;
      if (down !== null) h = replace(h, (t) => down.apply(t));
    }
    h = replace(h, (t) => this.mid.apply(t));
    return replace(h, (t) => normSiluConv(this.normOut, this.convOut, t));
  }

  dispose(): void {
    this.convIn.dispose();
    for (const level of this.levels) for (const m of [...level.blocks, ...level.attns, level.downsample]) m?.dispose();
    this.mid.dispose();
    this.normOut.dispose();
    this.convOut.dispose();
  }
}
