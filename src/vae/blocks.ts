/**
 * The VAE's parts besides the ResnetBlock (src/nn/resnet.ts), from CompVis ldm/modules/diffusionmodules/model.py.
 * All NHWC; GroupNorm 32 groups, eps 1e-6.
 *
 *   AttnBlock   x + proj_out(softmax(q k^T / sqrt(C)) v), single head over all H*W positions;
 *               q, k, v, proj_out are 1x1 convs of GroupNorm(x).           [B, H, W, C] -> same
 *   MidBlock    block_1 (resnet) -> attn_1 -> block_2 (resnet)             [B, H, W, C] -> same
 *   Downsample  zero-pad right and bottom by 1, 3x3 conv stride 2         [B, H, W, C] -> [B, H/2, W/2, C]
 *   Upsample    nearest 2x, then 3x3 conv                                  [B, H, W, C] -> [B, 2H, 2W, C]
 *   Level       resnets, each followed by attention where the level has it, then a Down/Upsample:
 *               one resolution level of the encoder or the decoder         [B, H, W, cin] -> [B, H', W', cout]
 */
import { vaeAttentionOnHost } from '../backend/native-blocks.js';
import * as tf from '../backend/tf.js';
import { attention } from '../nn/attention.js';
import { Conv2d, GroupNorm, upsampleNearest2x } from '../nn/layers.js';
import type { WeightView } from '../nn/weight-view.js';
import { COMPVIS_RESNET, ResnetBlock } from '../nn/resnet.js';
import { VAE_GN_EPS } from './config.js';

/** Applies f to x and frees x: for chains of big feature maps that must not all stay alive. */
export function replace(x: tf.Tensor4D, f: (x: tf.Tensor4D) => tf.Tensor4D): tf.Tensor4D {
  const y = f(x);
  x.dispose();
  return y;
}

export function loadResnet(p: WeightView, cin: number, cout: number): ResnetBlock {
  return ResnetBlock.load(p, cin, cout, { names: COMPVIS_RESNET, eps: VAE_GN_EPS });
}

export class AttnBlock {
  private constructor(
    private readonly norm: GroupNorm,
    private readonly q: Conv2d,
    private readonly k: Conv2d,
    private readonly v: Conv2d,
    private readonly projOut: Conv2d,
    /** The block on the native kernels (backend/native-blocks.ts), when it was loaded for them. */
    private readonly onHost: ((x: tf.Tensor4D) => tf.Tensor4D) | null,
  ) {}

  static load(p: WeightView, c: number): AttnBlock {
    const conv = (name: string) => Conv2d.load(p.child(name), c, c, 1);
    const parts = { norm: GroupNorm.load(p.child('norm'), c, { eps: VAE_GN_EPS }), q: conv('q'), k: conv('k'), v: conv('v'), projOut: conv('proj_out') };
    return new AttnBlock(parts.norm, parts.q, parts.k, parts.v, parts.projOut, p.native ? vaeAttentionOnHost(parts) : null);
  }

  apply(x: tf.Tensor4D): tf.Tensor4D {
    if (this.onHost !== null) return this.onHost(x);
    return tf.tidy(() => {
      const [b, h, w, c] = x.shape;
      const normed = this.norm.apply(x);
      const tokens = (conv: Conv2d) => tf.reshape(conv.apply(normed), [b, h * w, c]) as tf.Tensor3D; // [B, H*W, C]
      const attended = attention(tokens(this.q), tokens(this.k), tokens(this.v), 1);
      return tf.add(x, this.projOut.apply(tf.reshape(attended, [b, h, w, c]))) as tf.Tensor4D;
    });
  }

  dispose(): void {
    for (const m of [this.norm, this.q, this.k, this.v, this.projOut]) m.dispose();
  }
}

export class MidBlock {
  private constructor(
    private readonly block1: ResnetBlock,
    private readonly attn1: AttnBlock,
    private readonly block2: ResnetBlock,
  ) {}

  static load(p: WeightView, c: number): MidBlock {
    return new MidBlock(loadResnet(p.child('block_1'), c, c), AttnBlock.load(p.child('attn_1'), c), loadResnet(p.child('block_2'), c, c));
  }

  apply(x: tf.Tensor4D): tf.Tensor4D {
    const h = this.block1.apply(x);
    return replace(replace(h, (t) => this.attn1.apply(t)), (t) => this.block2.apply(t));
  }

  dispose(): void {
    this.block1.dispose();
    this.attn1.dispose();
    this.block2.dispose();
  }
}

/** CompVis Downsample(with_conv=True): torch pads (0, 1, 0, 1), i.e. right and bottom only, then convolves stride 2. */
export class Downsample {
  private constructor(private readonly conv: Conv2d) {}

  static load(p: WeightView, c: number): Downsample {
    return new Downsample(Conv2d.load(p.child('conv'), c, c, 3, { stride: 2, padding: [0, 1, 0, 1] }));
  }

  apply(x: tf.Tensor4D): tf.Tensor4D {
    return this.conv.apply(x);
  }

  dispose(): void {
    this.conv.dispose();
  }
}

export class Upsample {
  private constructor(private readonly conv: Conv2d) {}

  static load(p: WeightView, c: number): Upsample {
    return new Upsample(Conv2d.load(p.child('conv'), c, c, 3));
  }

  apply(x: tf.Tensor4D): tf.Tensor4D {
    return replace(upsampleNearest2x(x), (t) => this.conv.apply(t));
  }

  dispose(): void {
    this.conv.dispose();
  }
}

/** What ends a level: Downsample in the encoder, Upsample in the decoder. */
export interface Resample {
  apply(x: tf.Tensor4D): tf.Tensor4D;
  dispose(): void;
}

export interface LevelShape {
  readonly cin: number;
  readonly cout: number;
  /** Resnets in the level: numResBlocks in the encoder, numResBlocks + 1 in the decoder. */
  readonly blocks: number;
  /** Whether the level's resolution is one of attnResolutions: then an AttnBlock follows each resnet. */
  readonly attention: boolean;
}

/**
 * One resolution level of the encoder or decoder: resnets (cin -> cout, then cout -> cout), each followed by an
 * AttnBlock where the level has attention, then the resample `loadResample` gives (none after the last level run).
 * [B, H, W, cin] -> [B, H', W', cout]. Weights under the level: `block.{j}.*`, `attn.{j}.*`, and the resample's.
 */
export class Level {
  private constructor(
    private readonly blocks: readonly ResnetBlock[],
    private readonly attns: readonly AttnBlock[], // one after each block when the level has attention, else none
    private readonly resample: Resample | null,
  ) {}

  static load(p: WeightView, shape: LevelShape, loadResample: (() => Resample) | null): Level {
    const blocks: ResnetBlock[] = [];
    const attns: AttnBlock[] = [];
    for (let j = 0; j < shape.blocks; j++) {
      blocks.push(loadResnet(p.child('block').child(j), j === 0 ? shape.cin : shape.cout, shape.cout));
      if (shape.attention) attns.push(AttnBlock.load(p.child('attn').child(j), shape.cout));
    }
    return new Level(blocks, attns, loadResample === null ? null : loadResample());
  }

  /** Runs the level on x and frees x. */
  apply(x: tf.Tensor4D): tf.Tensor4D {
    let h = x;
    this.blocks.forEach((block, j) => {
      h = replace(h, (t) => block.apply(t));
      const attn = this.attns[j];
      if (attn !== undefined) h = replace(h, (t) => attn.apply(t));
    });
    const resample = this.resample;
    return resample === null ? h : replace(h, (t) => resample.apply(t));
  }

  dispose(): void {
    for (const m of [...this.blocks, ...this.attns, this.resample]) m?.dispose();
  }
}
