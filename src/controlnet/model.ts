/**
 * ControlNet (Zhang et al. 2023; lllyasviel's cldm.py `ControlNet`): a trainable copy of the UNet's encoder half
 * whose outputs, through zero-initialised 1x1 convs, become residuals for the UNet's skips and middle block.
 *
 *   emb    = time_embed(t)                                   the UNet's TimeEmbed         time_embed.{0,2}
 *   h      = input_blocks.0(x) + hint_encoder(hint)          conv_in, then the hint       input_blocks.0, input_hint_block
 *   h      = input_blocks.i(h), i = 1 .. N-1                 the UNet's blocks            input_blocks.i
 *   down_i = scale * zero_convs.i(h after input_blocks.i)    1x1, one per input block     zero_convs.i.0
 *   mid    = scale * middle_block_out(middle_block(h))       1x1                          middle_block.{0,1,2}, middle_block_out.0
 * NHWC: x [B, h, w, inChannels], hint [1 or B, 8h, 8w, hintChannels] -> residuals shaped as the UNet's skips
 * (SD 1.5: 12 down + 1 middle), which UNet.forward adds when they come in `cond.residuals` (conditioning.ts).
 * The blocks are the UNet's own (unet/blocks.ts), loaded from the same names under this model's prefix
 * (`control_model` in lllyasviel's files; keys.ts maps diffusers' names onto these), each a Held under a residency
 * policy as the UNet's are.
 */
import * as tf from '../backend/tf.js';
import { Conv2d } from '../nn/layers.js';
import { ShapeError } from '../nn/errors.js';
import { HostTensors, Held, defaultResidency, type ResidencyPolicy } from '../nn/residency.js';
import { WeightView, checkCheckpoint, probeShapes } from '../nn/weight-view.js';
import { loadEncoderHalf, loadMiddle, ResStage, type Disposable, type InputBlock, type Middle, type TimeEmbed } from '../unet/blocks.js';
import type { Conditioning, UNetResiduals } from '../unet/conditioning.js';
import { unetBlockPlan } from '../unet/config.js';
import type { TensorSource } from '../weights/types.js';
import { CONTROL_PREFIX, SD15_CONTROLNET, hintDownsample, validateControlNetConfig, type ControlNetConfig } from './config.js';
import { HintEncoder } from './hint.js';

export { CONTROL_PREFIX } from './config.js';

interface ControlNetBlocks {
  readonly timeEmbed: Held<TimeEmbed>;
  readonly hint: Held<HintEncoder>;
  readonly input: readonly Held<InputBlock>[];
  readonly zeroConvs: readonly Held<Conv2d>[];
  readonly middle: Held<Middle>;
  readonly middleOut: Held<Conv2d>;
}

export interface ControlNetLoadOptions {
  /** As UNetLoadOptions.residency: 'streamed' (the default on wasm) keeps the weights outside the backend. */
  readonly residency?: ResidencyPolicy;
}

export class ControlNet {
  private constructor(
    readonly config: ControlNetConfig,
    readonly residency: ResidencyPolicy,
    private readonly blocks: ControlNetBlocks,
    private readonly held: readonly Held<Disposable>[],
    private readonly host: HostTensors | null,
  ) {}

  /**
   * Loads every `${prefix}.*` weight; the keys and shapes are checked against cfg first, and a key under the
   * prefix that the ControlNet does not read, a missing one or a misshapen one fails the load naming it.
   * `src` may be closed afterwards.
   */
  static load(src: TensorSource, cfg: ControlNetConfig = SD15_CONTROLNET, prefix: string = CONTROL_PREFIX, opts: ControlNetLoadOptions = {}): ControlNet {
    const config = validateControlNetConfig(cfg);
    const policy = opts.residency ?? defaultResidency();
    const expected = expectedControlNetShapes(config, prefix);
    checkCheckpoint(src, expected, prefix);
    const host = policy === 'streamed' ? HostTensors.copy(src, expected.keys()) : null;
    const held: Held<Disposable>[] = [];
    try {
      const blocks = loadBlocks(WeightView.root(host ?? src, prefix), config, policy, held);
      return new ControlNet(config, policy, blocks, held, host);
    } catch (e) {
      host?.close();
      throw e;
    }
  }

  /** hint NHWC [B, 8h, 8w, hintChannels] -> the hint embedding [B, h, w, modelChannels] (independent of t and text). */
  embedHint(hint: tf.Tensor4D): tf.Tensor4D {
    const { hintChannels } = this.config;
    const f = hintDownsample(this.config);
    const [, hh, hw, c] = hint.shape;
    if (hint.rank !== 4 || c !== hintChannels || hh % f !== 0 || hw % f !== 0) {
      throw new ShapeError(`ControlNet hint: expected NHWC [B, H, W, ${hintChannels}] with H and W multiples of ${f}, got [${hint.shape}]`);
    }
    return this.blocks.hint.use((m) => m.apply(hint));
  }

  /**
   * The residuals for the UNet: x NHWC [B, h, w, inChannels], t (one per batch item or one for all), cond (the
   * UNet's: text context [B, N, contextDim]), hint NHWC [1 or B, 8h, 8w, hintChannels] in [0, 1], scale (the
   * conditioning scale, applied to every residual). Returns new tensors, the caller's to dispose.
   */
  forward(x: tf.Tensor4D, t: readonly number[] | number, cond: Conditioning, hint: tf.Tensor4D, scale: number): UNetResiduals {
    const embedding = this.embedHint(hint);
    try {
      return this.forwardEmbedded(x, t, cond, embedding, scale);
    } finally {
      embedding.dispose();
    }
  }

  /** forward with the hint embedding (embedHint's output, [1 or B, h, w, modelChannels]) computed already. */
  forwardEmbedded(x: tf.Tensor4D, t: readonly number[] | number, cond: Conditioning, hintEmbedding: tf.Tensor4D, scale: number): UNetResiduals {
    const timesteps = this.checkInputs(x, t, cond, hintEmbedding, scale);
    const { timeEmbed, input, zeroConvs, middle, middleOut } = this.blocks;
    const mc = this.config.unet.modelChannels;
    const all = tf.tidy(() => {
      const embAct = timeEmbed.use((m) => m.apply(timesteps, mc, cond.added));
      const out: tf.Tensor4D[] = [];
      let h = x;
      input.forEach((block, i) => {
        h = block.use((m) => (m instanceof ResStage ? m.apply(h, embAct, cond) : m.apply(h)));
        if (i === 0) h = tf.add(h, hintEmbedding); // the hint joins after conv_in (cldm.py: h += guided_hint)
        const z = h;
        out.push(tf.mul(zeroConvs[i].use((c) => c.apply(z)), scale));
      });
      const m = middle.use((b) => b.apply(h, embAct, cond));
      out.push(tf.mul(middleOut.use((c) => c.apply(m)), scale));
      return out;
    });
    return { down: all.slice(0, -1), middle: all[all.length - 1] };
  }

  /** Validates shapes (before any work) and returns one timestep per batch item. */
  private checkInputs(x: tf.Tensor4D, t: readonly number[] | number, cond: Conditioning, e: tf.Tensor4D, scale: number): number[] {
    const cfg = this.config.unet;
    const [b, h, w, c] = x.shape;
    const fail = (what: string): never => {
      throw new ShapeError(`ControlNet ${what}`);
    };
    if (x.rank !== 4 || c !== cfg.inChannels) fail(`input: expected latents NHWC [B, h, w, ${cfg.inChannels}], got [${x.shape}]`);
    if (e.rank !== 4 || (e.shape[0] !== 1 && e.shape[0] !== b) || e.shape[1] !== h || e.shape[2] !== w || e.shape[3] !== cfg.modelChannels) {
      const f = hintDownsample(this.config);
      fail(`hint: a latent [${b}, ${h}, ${w}] needs a hint [1 or ${b}, ${h * f}, ${w * f}, ${this.config.hintChannels}] (embedding [${b}, ${h}, ${w}, ${cfg.modelChannels}]), got an embedding [${e.shape}]`);
    }
    const { context } = cond;
    if (context.rank !== 3 || context.shape[0] !== b || context.shape[2] !== cfg.contextDim) {
      fail(`context: expected [${b}, tokens, ${cfg.contextDim}], got [${context.shape}]`);
    }
    if (!Number.isFinite(scale)) fail(`scale: expected a finite number, got ${scale}`);
    const ts = typeof t === 'number' ? new Array<number>(b).fill(t) : [...t];
    if (ts.length !== b || ts.some((v) => !Number.isFinite(v))) fail(`timesteps: expected ${b} finite numbers, got [${ts.join(', ')}]`);
    return ts;
  }

  /** Bytes of weights held in host memory outside the backend (streamed), else 0. */
  get hostBytes(): number {
    return this.host?.byteLength ?? 0;
  }

  dispose(): void {
    for (const h of this.held) h.dispose();
    this.host?.close();
  }
}

/** The blocks, each recorded in `held` (so a failure part-way frees those built). */
function loadBlocks(p: WeightView, cfg: ControlNetConfig, policy: ResidencyPolicy, held: Held<Disposable>[]): ControlNetBlocks {
  const hold = <M extends Disposable>(make: () => M): Held<M> => {
    const h = Held.load(policy, make);
    held.push(h);
    return h;
  };
  const plan = unetBlockPlan(cfg.unet);
  try {
    const { timeEmbed, input } = loadEncoderHalf(p, cfg.unet, hold, policy);
    const hint = hold(() => HintEncoder.load(p.child('input_hint_block'), cfg));
    const zeroConvs = plan.input.map((spec, i) => {
      const ch = spec.kind === 'down' ? spec.ch : spec.cout;
      return hold(() => Conv2d.load(p.child('zero_convs').child(i).child(0), ch, ch, 1));
    });
    const middle = hold(() => loadMiddle(p, cfg.unet, policy));
    const mc = plan.middle.channels;
    const middleOut = hold(() => Conv2d.load(p.child('middle_block_out.0'), mc, mc, 1));
    return { timeEmbed, hint, input, zeroConvs, middle, middleOut };
  } catch (e) {
    for (const h of held) h.dispose();
    throw e;
  }
}

/** Every checkpoint key ControlNet.load reads for cfg, with its PyTorch shape: the loader run against a probe. */
export function expectedControlNetShapes(cfg: ControlNetConfig = SD15_CONTROLNET, prefix: string = CONTROL_PREFIX): Map<string, number[]> {
  const config = validateControlNetConfig(cfg);
  return probeShapes(prefix, (p) => {
    const held: Held<Disposable>[] = [];
    loadBlocks(p, config, 'resident', held);
    return { dispose: () => held.forEach((h) => h.dispose()) };
  });
}
