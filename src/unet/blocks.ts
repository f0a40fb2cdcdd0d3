/**
 * The UNet's blocks (CompVis / sgm openaimodel.py), each loading itself from its checkpoint names, and the loader
 * that builds them from a block plan (config.ts). Exported so that a model built from the same encoder half (a
 * ControlNet) uses the same code and the same names.
 *
 *   TimeEmbed    t -> SiLU(Linear(SiLU(Linear(timestepEmbedding(t)))) (+ label_emb(added)))   time_embed.{0,2}, label_emb.0.{0,2}
 *   ResStage     ResBlock (+ SpatialTransformer) (+ nearest Upsample and conv)                 input_blocks.N / output_blocks.N
 *   Downsample   3x3 conv, stride 2, padding 1                                                  input_blocks.N.0.op
 *   Middle       ResBlock, SpatialTransformer, ResBlock                                          middle_block.{0,1,2}
 *   OutHead      Conv3x3(SiLU(GroupNorm(h)))                                                     out.{0,2}
 */
import * as tf from '../backend/tf.js';
import { Conv2d, GroupNorm, Linear, silu, upsampleNearestTo } from '../nn/layers.js';
import { OPENAI_RESNET, ResnetBlock } from '../nn/resnet.js';
import { Held, type ResidencyPolicy } from '../nn/residency.js';
import type { WeightView } from '../nn/weight-view.js';
import type { Conditioning } from './conditioning.js';
import { unetBlockPlan, type AttentionSpec, type UNetConfig } from './config.js';
import { timestepEmbedding } from './timestep.js';
import { SpatialTransformer } from './transformer.js';

export interface Disposable {
  dispose(): void;
}

/** openaimodel.py ResBlock: GroupNorm32 (eps 1e-5), the time embedding added between the two convs. */
const RES_EPS = 1e-5;

export function loadResBlock(p: WeightView, cin: number, cout: number, timeEmbedDim: number): ResnetBlock {
  return ResnetBlock.load(p, cin, cout, { names: OPENAI_RESNET, eps: RES_EPS, timeChannels: timeEmbedDim });
}

/** The SpatialTransformer of `spec` at `p`, with the config's context width and projection kind. */
/** `policy` streamed: each of its transformer blocks is built only while it runs (SpatialTransformer.load). */
export function loadTransformer(p: WeightView, channels: number, spec: AttentionSpec, cfg: UNetConfig, policy: ResidencyPolicy = 'resident'): SpatialTransformer {
  return SpatialTransformer.load(p, { channels, ...spec, contextDim: cfg.contextDim, projection: cfg.projection }, policy);
}

/** Runs make(); if it throws, disposes `parts` (already built) first. */
export function disposeOnThrow<T>(parts: readonly Disposable[], make: () => T): T {
  try {
    return make();
  } catch (e) {
    for (const m of parts) m.dispose();
    throw e;
  }
}

/** A ResBlock, optionally followed by a SpatialTransformer and (on the way up) a nearest Upsample + conv. */
export class ResStage {
  constructor(
    readonly res: ResnetBlock,
    readonly attn: SpatialTransformer | null,
    readonly upsample: Conv2d | null,
  ) {}

  /** Builds the optional parts after the ResBlock, disposing what was built if one of them fails. */
  static load(res: ResnetBlock, attn: () => SpatialTransformer | null, upsample: () => Conv2d | null): ResStage {
    const a = disposeOnThrow([res], attn);
    const parts = a === null ? [res] : [res, a];
    return new ResStage(res, a, disposeOnThrow(parts, upsample));
  }

  /**
   * h [B, H, W, c] (on the way up: concatenated with skip [B, H, W, c'] first) -> [B, H, W, cout],
   * or [B, upsampleTo..., cout] when this stage upsamples (2x when upsampleTo is not given).
   */
  apply(h: tf.Tensor4D, embAct: tf.Tensor2D, cond: Conditioning, skip?: tf.Tensor4D, upsampleTo?: readonly [number, number]): tf.Tensor4D {
    return tf.tidy(() => {
      let y = this.res.apply(skip === undefined ? h : tf.concat([h, skip], 3), embAct);
      if (this.attn !== null) y = this.attn.apply(y, cond);
      if (this.upsample !== null) {
        const [uh, uw] = upsampleTo ?? [y.shape[1] * 2, y.shape[2] * 2];
        y = this.upsample.apply(upsampleNearestTo(y, uh, uw));
      }
      return y;
    });
  }

  dispose(): void {
    this.res.dispose();
    this.attn?.dispose();
    this.upsample?.dispose();
  }
}

/** input_blocks.N: the stem conv or a Downsample (3x3 stride 2, padding 1), or a ResStage. */
export type InputBlock = Conv2d | ResStage;

/**
 * time_embed: sinusoidal embedding -> Linear -> SiLU -> Linear; plus label_emb (Linear -> SiLU -> Linear) of the
 * added embedding where the UNet has one (SDXL); then the SiLU every ResBlock's emb_layers starts with.
 */
export class TimeEmbed {
  constructor(
    readonly l1: Linear,
    readonly l2: Linear,
    readonly label: { readonly l1: Linear; readonly l2: Linear } | null,
  ) {}

  static load(p: WeightView, cfg: UNetConfig, timeEmbedDim: number): TimeEmbed {
    const l1 = Linear.load(p.child('time_embed.0'), cfg.modelChannels, timeEmbedDim);
    const l2 = disposeOnThrow([l1], () => Linear.load(p.child('time_embed.2'), timeEmbedDim, timeEmbedDim));
    if (cfg.addedEmbeddingDim === 0) return new TimeEmbed(l1, l2, null);
    const q = p.child('label_emb.0');
    const m1 = disposeOnThrow([l1, l2], () => Linear.load(q.child(0), cfg.addedEmbeddingDim, timeEmbedDim));
    const m2 = disposeOnThrow([l1, l2, m1], () => Linear.load(q.child(2), timeEmbedDim, timeEmbedDim));
    return new TimeEmbed(l1, l2, { l1: m1, l2: m2 });
  }

  /** t [B] (and the added embedding [B, addedDim]) -> SiLU(emb) [B, timeEmbedDim] */
  apply(timesteps: readonly number[], modelChannels: number, added?: tf.Tensor2D): tf.Tensor2D {
    return tf.tidy(() => {
      let emb = this.l2.apply(silu(this.l1.apply(timestepEmbedding(timesteps, modelChannels))));
      if (this.label !== null && added !== undefined) emb = tf.add(emb, this.label.l2.apply(silu(this.label.l1.apply(added))));
      return silu(emb);
    });
  }

  dispose(): void {
    for (const m of [this.l1, this.l2, this.label?.l1, this.label?.l2]) m?.dispose();
  }
}

/** middle_block: ResBlock, SpatialTransformer (where the config has one), ResBlock. */
export class Middle {
  constructor(readonly res1: ResnetBlock, readonly attn: SpatialTransformer | null, readonly res2: ResnetBlock) {}

  apply(h: tf.Tensor4D, embAct: tf.Tensor2D, cond: Conditioning): tf.Tensor4D {
    return tf.tidy(() => {
      const y = this.res1.apply(h, embAct);
      return this.res2.apply(this.attn === null ? y : this.attn.apply(y, cond), embAct);
    });
  }

  dispose(): void {
    for (const m of [this.res1, this.attn, this.res2]) m?.dispose();
  }
}

/** out: Conv3x3(SiLU(GroupNorm(h))). */
export class OutHead {
  constructor(readonly norm: GroupNorm, readonly conv: Conv2d) {}

  apply(h: tf.Tensor4D): tf.Tensor4D {
    return tf.tidy(() => this.conv.apply(this.norm.applySilu(h)));
  }

  dispose(): void {
    this.norm.dispose();
    this.conv.dispose();
  }
}

/** The UNet's blocks, each a Held under the residency policy. */
export interface UNetBlocks {
  readonly timeEmbed: Held<TimeEmbed>;
  readonly input: readonly Held<InputBlock>[];
  readonly middle: Held<Middle>;
  readonly output: readonly Held<ResStage>[];
  readonly out: Held<OutHead>;
}

export function heldBlocks(b: UNetBlocks): Held<Disposable>[] {
  return [b.timeEmbed, ...b.input, b.middle, ...b.output, b.out];
}

/**
 * `time_embed` (+ `label_emb`) and `input_blocks`: the encoder half, which a ControlNet copies. Each block is a Held
 * under `policy`, so a streamed block runs this code again at every use; `hold` records each for the caller.
 */
export function loadEncoderHalf(p: WeightView, cfg: UNetConfig, hold: <M extends Disposable>(make: () => M) => Held<M>, policy: ResidencyPolicy = 'resident') {
  const plan = unetBlockPlan(cfg);
  const emb = plan.timeEmbedDim;
  const timeEmbed = hold(() => TimeEmbed.load(p, cfg, emb));
  const input = plan.input.map((spec, n) => hold((): InputBlock => {
    const q = p.child('input_blocks').child(n);
    if (spec.kind === 'conv_in') return Conv2d.load(q.child(0), cfg.inChannels, spec.cout, 3);
    if (spec.kind === 'down') return Conv2d.load(q.child(0).child('op'), spec.ch, spec.ch, 3, { stride: 2, padding: 1 });
    const attn = spec.attention;
    return ResStage.load(loadResBlock(q.child(0), spec.cin, spec.cout, emb), () => (attn === null ? null : loadTransformer(q.child(1), spec.cout, attn, cfg, policy)), () => null);
  }));
  return { timeEmbed, input };
}

/** `middle_block`. */
export function loadMiddle(p: WeightView, cfg: UNetConfig, policy: ResidencyPolicy = 'resident'): Middle {
  const plan = unetBlockPlan(cfg);
  const { channels: ch, attention } = plan.middle;
  const m = p.child('middle_block');
  const emb = plan.timeEmbedDim;
  const res1 = loadResBlock(m.child(0), ch, ch, emb);
  const attn = disposeOnThrow([res1], () => (attention === null ? null : loadTransformer(m.child(1), ch, attention, cfg, policy)));
  const parts = attn === null ? [res1] : [res1, attn];
  return disposeOnThrow(parts, () => new Middle(res1, attn, loadResBlock(m.child(attention === null ? 1 : 2), ch, ch, emb)));
}

/** Every block of the UNet. Blocks already built are disposed when a later one fails. */
export function loadUNetBlocks(p: WeightView, cfg: UNetConfig, policy: ResidencyPolicy): UNetBlocks {
  const plan = unetBlockPlan(cfg);
  const emb = plan.timeEmbedDim;
  const held: Held<Disposable>[] = [];
  const hold = <M extends Disposable>(make: () => M): Held<M> => {
    const h = Held.load(policy, make);
    held.push(h);
    return h;
  };
  try {
    const { timeEmbed, input } = loadEncoderHalf(p, cfg, hold, policy);
    const middle = hold(() => loadMiddle(p, cfg, policy));
    const output = plan.output.map((spec, n) => hold(() => {
      const q = p.child('output_blocks').child(n);
      const attn = spec.attention;
      return ResStage.load(
        loadResBlock(q.child(0), spec.cin, spec.cout, emb),
        () => (attn === null ? null : loadTransformer(q.child(1), spec.cout, attn, cfg, policy)),
        () => (spec.upsample ? Conv2d.load(q.child(attn === null ? 1 : 2).child('conv'), spec.cout, spec.cout, 3) : null),
      );
    }));
    const out = hold(() => new OutHead(
      GroupNorm.load(p.child('out.0'), cfg.modelChannels, { eps: 1e-5 }),
      Conv2d.load(p.child('out.2'), cfg.modelChannels, cfg.outChannels, 3),
    ));
    return { timeEmbed, input, middle, output, out };
  } catch (e) {
    for (const h of held) h.dispose();
    throw e;
  }
}
