/**
 * The SD 1.x denoising UNet (CompVis `UNetModel`, use_spatial_transformer, legacy=False):
 * latent x NHWC [B, h, w, 4], timesteps [B], text context [B, 77, 768] -> predicted noise [B, h, w, 4].
 *
 *   emb    = Linear(SiLU(Linear(timestepEmbedding(t))))           time_embed.0 / .2
 *   down   = conv_in, then per level: ResBlock (+ SpatialTransformer) x numResBlocks, Downsample  input_blocks.N
 *   middle = ResBlock, SpatialTransformer, ResBlock                 middle_block.{0,1,2}
 *   up     = per level, deepest first: [h, skip] -> ResBlock (+ SpatialTransformer), x numResBlocks + 1,
 *            Upsample at the end of every level but the top          output_blocks.N
 *   out    = Conv3x3(SiLU(GroupNorm(h)))                            out.0 / out.2
 *
 * Any latent size works: where a side is odd on the way down (60x80 -> 30x40 -> 15x20 -> 8x10), the Upsample
 * resizes to the size of the skip it is concatenated with (diffusers' `upsample_size`); for sides divisible
 * by 2^(levels-1) that is exactly CompVis' nearest 2x.
 * Memory: each block runs in its own tf.tidy and skips are disposed as soon as they are concatenated.
 * Weights: each block is a Held (src/nn/residency.ts): resident tensors, or on wasm streamed from a host copy
 * of the checkpoint (its 3.4 GB in fp32 do not fit the 4 GiB heap) and laid out just before the block runs.
 */
import * as tf from '../backend/tf.js';
import { WeightView, checkCheckpoint } from '../nn/weight-view.js';
import { Conv2d, GroupNorm, Linear, silu, upsampleNearestTo } from '../nn/layers.js';
import { WeightsError, type TensorSource } from '../weights/types.js';
import { SD15_UNET, UNetError, unetBlockPlan, validateConfig, type UNetConfig } from './config.js';
import { OPENAI_RESNET, ResnetBlock } from '../nn/resnet.js';
import { SpatialTransformer } from './transformer.js';
import { timestepEmbedding } from './timestep.js';
import { prefixed, type Shapes } from './shapes.js';
import { Held, HostTensors, defaultResidency, type ResidencyPolicy } from '../nn/residency.js';

interface Disposable {
  dispose(): void;
}

/** openaimodel.py ResBlock: GroupNorm32 (eps 1e-5), the time embedding added between the two convs. */
const RES_EPS = 1e-5;
const loadRes = (p: WeightView, cin: number, cout: number, emb: number): ResnetBlock =>
  ResnetBlock.load(p, cin, cout, { names: OPENAI_RESNET, eps: RES_EPS, timeChannels: emb });
const resShapes = (cin: number, cout: number, emb: number): Shapes =>
  ResnetBlock.shapes(cin, cout, { names: OPENAI_RESNET, timeChannels: emb });

/** A ResBlock, optionally followed by a SpatialTransformer and (on the way up) a nearest Upsample + conv. */
class ResStage {
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
  apply(h: tf.Tensor4D, embAct: tf.Tensor2D, context: tf.Tensor3D, skip?: tf.Tensor4D, upsampleTo?: readonly [number, number]): tf.Tensor4D {
    return tf.tidy(() => {
      let y = this.res.apply(skip === undefined ? h : tf.concat([h, skip], 3), embAct);
      if (this.attn !== null) y = this.attn.apply(y, context);
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
type InputBlock = Conv2d | ResStage;

/** time_embed: sinusoidal embedding -> Linear -> SiLU -> Linear, then the SiLU every ResBlock's emb_layers starts with. */
class TimeEmbed {
  constructor(readonly l1: Linear, readonly l2: Linear) {}

  /** t [B] -> SiLU(emb) [B, timeEmbedDim] */
  apply(timesteps: readonly number[], modelChannels: number): tf.Tensor2D {
    return tf.tidy(() => silu(this.l2.apply(silu(this.l1.apply(timestepEmbedding(timesteps, modelChannels))))));
  }

  dispose(): void {
    this.l1.dispose();
    this.l2.dispose();
  }
}

/** middle_block: ResBlock, SpatialTransformer, ResBlock. */
class Middle {
  constructor(readonly res1: ResnetBlock, readonly attn: SpatialTransformer, readonly res2: ResnetBlock) {}

  apply(h: tf.Tensor4D, embAct: tf.Tensor2D, context: tf.Tensor3D): tf.Tensor4D {
    return tf.tidy(() => this.res2.apply(this.attn.apply(this.res1.apply(h, embAct), context), embAct));
  }

  dispose(): void {
    for (const m of [this.res1, this.attn, this.res2]) m.dispose();
  }
}

/** out: Conv3x3(SiLU(GroupNorm(h))). */
class OutHead {
  constructor(readonly norm: GroupNorm, readonly conv: Conv2d) {}

  apply(h: tf.Tensor4D): tf.Tensor4D {
    return tf.tidy(() => this.conv.apply(this.norm.applySilu(h)));
  }

  dispose(): void {
    this.norm.dispose();
    this.conv.dispose();
  }
}

export interface UNetLoadOptions {
  /**
   * Where the weights live between steps (src/nn/residency.ts): 'resident' tensors, or 'streamed' from a host
   * copy of the checkpoint's bytes, one block at a time. Default: 'streamed' on wasm, else 'resident'.
   */
  readonly residency?: ResidencyPolicy;
}

/**
 * Builds every block of the UNet; each is a Held under `policy`, so a streamed block runs this code again at
 * every use. Blocks already built are disposed when a later one fails.
 */
function loadBlocks(p: WeightView, config: UNetConfig, policy: ResidencyPolicy) {
  const layout = unetBlockPlan(config);
  const { numHeads: heads, transformerDepth: depth, contextDim } = config;
  const emb = layout.timeEmbedDim;
  const held: Held<Disposable>[] = [];
  const hold = <M extends Disposable>(make: () => M): Held<M> => {
    const h = Held.load(policy, make);
    held.push(h);
    return h;
  };
  const transformer = (q: WeightView, ch: number) => SpatialTransformer.load(q, ch, heads, depth, contextDim);
  try {
    const timeEmbed = hold(() => new TimeEmbed(
      Linear.load(p.child('time_embed.0'), config.modelChannels, emb),
      Linear.load(p.child('time_embed.2'), emb, emb),
    ));
    const input = layout.input.map((spec, n) => hold((): InputBlock => {
      const q = p.child('input_blocks').child(n).child(0);
      if (spec.kind === 'conv_in') return Conv2d.load(q, config.inChannels, spec.cout, 3);
      if (spec.kind === 'down') return Conv2d.load(q.child('op'), spec.ch, spec.ch, 3, { stride: 2, padding: 1 });
      const attn = () => (spec.attention ? transformer(p.child('input_blocks').child(n).child(1), spec.cout) : null);
      return ResStage.load(loadRes(q, spec.cin, spec.cout, emb), attn, () => null);
    }));
    const mid = layout.middleChannels;
    const m = p.child('middle_block');
    const middle = hold(() => {
      const res1 = loadRes(m.child(0), mid, mid, emb);
      return disposeOnThrow([res1], () => new Middle(res1, transformer(m.child(1), mid), loadRes(m.child(2), mid, mid, emb)));
    });
    const output = layout.output.map((spec, n) => hold(() => {
      const q = p.child('output_blocks').child(n);
      return ResStage.load(
        loadRes(q.child(0), spec.cin, spec.cout, emb),
        () => spec.attention ? transformer(q.child(1), spec.cout) : null,
        () => spec.upsample ? Conv2d.load(q.child(spec.attention ? 2 : 1).child('conv'), spec.cout, spec.cout, 3) : null,
      );
    }));
    const out = hold(() => new OutHead(
      GroupNorm.load(p.child('out.0'), config.modelChannels, { eps: 1e-5 }),
      Conv2d.load(p.child('out.2'), config.modelChannels, config.outChannels, 3),
    ));
    return { timeEmbed, input, middle, output, out };
  } catch (e) {
    for (const h of held) h.dispose();
    throw e;
  }
}

/** Runs make(); if it throws, disposes `parts` (already built) first. */
function disposeOnThrow<T>(parts: readonly Disposable[], make: () => T): T {
  try {
    return make();
  } catch (e) {
    for (const m of parts) m.dispose();
    throw e;
  }
}

export class UNet {
  private constructor(
    readonly config: UNetConfig,
    readonly residency: ResidencyPolicy,
    private readonly timeEmbed: Held<TimeEmbed>,
    private readonly input: readonly Held<InputBlock>[],
    private readonly middle: Held<Middle>,
    private readonly output: readonly Held<ResStage>[],
    private readonly out: Held<OutHead>,
    /** The streamed weights, in the checkpoint's dtype, outside the backend; null when resident. */
    private readonly host: HostTensors | null,
  ) {}

  /**
   * Loads every `${prefix}.*` weight, checking each shape against cfg; a key left unread fails the load.
   * Streamed (the default on wasm), the weights are checked, copied to host memory and laid out per block at
   * every forward pass; `src` may be closed after load either way.
   */
  static load(src: TensorSource, cfg: UNetConfig = SD15_UNET, prefix = 'model.diffusion_model', opts: UNetLoadOptions = {}): UNet {
    const config = validateConfig(cfg);
    const policy = opts.residency ?? defaultResidency();
    if (policy === 'streamed') {
      const expected = expectedShapes(config, prefix);
      checkCheckpoint(src, expected, prefix);
      const host = HostTensors.copy(src, expected.keys());
      const b = loadBlocks(WeightView.root(host, prefix), config, policy);
      return new UNet(config, policy, b.timeEmbed, b.input, b.middle, b.output, b.out, host);
    }
    const p = WeightView.root(src, prefix);
    const b = loadBlocks(p, config, policy);
    const unused = p.unused();
    if (unused.length > 0) {
      for (const h of [b.timeEmbed, ...b.input, b.middle, ...b.output, b.out]) h.dispose();
      throw new WeightsError(
        `${src.path}: ${unused.length} UNet weights were not used (e.g. ${unused.slice(0, 3).join(', ')}); the UNet config does not match this checkpoint`,
      );
    }
    return new UNet(config, policy, b.timeEmbed, b.input, b.middle, b.output, b.out, null);
  }

  /** Bytes of weights held in host memory outside the backend (streamed), else 0. */
  get hostBytes(): number {
    return this.host?.byteLength ?? 0;
  }

  /**
   * x NHWC [B, h, w, inChannels]; t one timestep per batch item (or one for all; fractional allowed);
   * context [B, N, contextDim] -> predicted noise NHWC [B, h, w, outChannels].
   */
  forward(x: tf.Tensor4D, t: readonly number[] | number, context: tf.Tensor3D): tf.Tensor4D {
    const timesteps = this.checkInputs(x, t, context);
    return tf.tidy(() => {
      const embAct = this.timeEmbed.use((m) => m.apply(timesteps, this.config.modelChannels));
      const skips: tf.Tensor4D[] = [];
      let h = x;
      for (const block of this.input) {
        h = block.use((m) => (m instanceof ResStage ? m.apply(h, embAct, context) : m.apply(h)));
        skips.push(h);
      }
      h = this.middle.use((m) => m.apply(h, embAct, context));
      for (const stage of this.output) {
        const skip = skips.pop() as tf.Tensor4D;
        const next = skips.at(-1); // what the upsample must match for the next concat
        const y = stage.use((m) => m.apply(h, embAct, context, skip, next && [next.shape[1], next.shape[2]]));
        tf.dispose([h, skip]);
        h = y;
      }
      return this.out.use((m) => m.apply(h));
    });
  }

  /** Validates shapes (before any work) and returns one timestep per batch item. */
  private checkInputs(x: tf.Tensor4D, t: readonly number[] | number, context: tf.Tensor3D): number[] {
    const cfg = this.config;
    const [b, , , c] = x.shape;
    if (x.rank !== 4 || c !== cfg.inChannels) {
      throw new UNetError(`UNet input: expected latents NHWC [B, h, w, ${cfg.inChannels}], got [${x.shape}]`);
    }
    if (context.rank !== 3 || context.shape[0] !== b || context.shape[2] !== cfg.contextDim) {
      throw new UNetError(`UNet context: expected [${b}, tokens, ${cfg.contextDim}] (one text encoding per latent), got [${context.shape}]`);
    }
    const ts = typeof t === 'number' ? new Array<number>(b).fill(t) : [...t];
    if (ts.length !== b || ts.some((v) => !Number.isFinite(v))) {
      throw new UNetError(`UNet timesteps: expected ${b} finite numbers (one per latent), got [${ts.join(', ')}]`);
    }
    return ts;
  }

  dispose(): void {
    for (const h of [this.timeEmbed, ...this.input, this.middle, ...this.output, this.out]) h.dispose();
    this.host?.close();
  }
}

/** Every checkpoint key UNet.load reads for cfg, with its PyTorch shape. */
export function expectedShapes(cfg: UNetConfig = SD15_UNET, prefix = 'model.diffusion_model'): Map<string, number[]> {
  const config = validateConfig(cfg);
  const layout = unetBlockPlan(config);
  const emb = layout.timeEmbedDim;
  const { transformerDepth: depth, contextDim } = config;
  const conv = (cin: number, cout: number, k: number): Shapes => [['weight', [cout, cin, k, k]], ['bias', [cout]]];
  const linear = (cin: number, cout: number): Shapes => [['weight', [cout, cin]], ['bias', [cout]]];
  const s: Shapes = [...prefixed('time_embed.0', linear(config.modelChannels, emb)), ...prefixed('time_embed.2', linear(emb, emb))];
  layout.input.forEach((spec, n) => {
    const at = `input_blocks.${n}`;
    if (spec.kind === 'conv_in') s.push(...prefixed(`${at}.0`, conv(config.inChannels, spec.cout, 3)));
    else if (spec.kind === 'down') s.push(...prefixed(`${at}.0.op`, conv(spec.ch, spec.ch, 3)));
    else {
      s.push(...prefixed(`${at}.0`, resShapes(spec.cin, spec.cout, emb)));
      if (spec.attention) s.push(...prefixed(`${at}.1`, SpatialTransformer.shapes(spec.cout, depth, contextDim)));
    }
  });
  const mid = layout.middleChannels;
  s.push(
    ...prefixed('middle_block.0', resShapes(mid, mid, emb)),
    ...prefixed('middle_block.1', SpatialTransformer.shapes(mid, depth, contextDim)),
    ...prefixed('middle_block.2', resShapes(mid, mid, emb)),
  );
  layout.output.forEach((spec, n) => {
    const at = `output_blocks.${n}`;
    s.push(...prefixed(`${at}.0`, resShapes(spec.cin, spec.cout, emb)));
    if (spec.attention) s.push(...prefixed(`${at}.1`, SpatialTransformer.shapes(spec.cout, depth, contextDim)));
    if (spec.upsample) s.push(...prefixed(`${at}.${spec.attention ? 2 : 1}.conv`, conv(spec.cout, spec.cout, 3)));
  });
  s.push(
    ...prefixed('out.0', [['weight', [config.modelChannels]], ['bias', [config.modelChannels]]]),
    ...prefixed('out.2', conv(config.modelChannels, config.outChannels, 3)),
  );
  return new Map(prefixed(prefix, s));
}
