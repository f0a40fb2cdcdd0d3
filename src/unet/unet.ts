/**
 * The denoising UNet of SD 1.x and SDXL (CompVis / sgm `UNetModel`, use_spatial_transformer, legacy=False):
 * latent x NHWC [B, h, w, inChannels], timesteps [B], conditioning (text context [B, N, contextDim], and what else
 * the model or an adapter adds: conditioning.ts) -> predicted noise [B, h, w, outChannels].
 *
 *   emb    = Linear(SiLU(Linear(timestepEmbedding(t))))  (+ label_emb(added), SDXL)   time_embed.0 / .2, label_emb.0
 *   down   = conv_in, then per level: ResBlock (+ SpatialTransformer) x numResBlocks, Downsample  input_blocks.N
 *   middle = ResBlock, SpatialTransformer, ResBlock                 middle_block.{0,1,2}
 *   up     = per level, deepest first: [h, skip] -> ResBlock (+ SpatialTransformer), x numResBlocks + 1,
 *            Upsample at the end of every level but the top          output_blocks.N
 *   out    = Conv3x3(SiLU(GroupNorm(h)))                            out.0 / out.2
 * A ControlNet's residuals (conditioning.residuals) are added to the skips and to the middle block's output.
 * The blocks: blocks.ts; which levels attend, how deep and with how many heads: the config's block plan.
 *
 * Any latent size works: where a side is odd on the way down (60x80 -> 30x40 -> 15x20 -> 8x10), the Upsample
 * resizes to the size of the skip it is concatenated with (diffusers' `upsample_size`); for sides divisible
 * by 2^(levels-1) that is exactly CompVis' nearest 2x.
 * Memory: each block runs in its own tf.tidy and skips are disposed as soon as they are concatenated.
 * Weights: each block is a Held (src/nn/residency.ts): resident tensors, or on wasm streamed from a host copy
 * of the checkpoint (its 3.4 GB in fp32 do not fit the 4 GiB heap) and laid out just before the block runs.
 */
import * as tf from '../backend/tf.js';
import { ShapeError } from '../nn/errors.js';
import { HostTensors, defaultResidency, type ResidencyPolicy } from '../nn/residency.js';
import { WeightView, checkCheckpoint, probeShapes } from '../nn/weight-view.js';
import { WeightsError, type TensorSource } from '../weights/types.js';
import { SD1_PREFIXES } from '../weights/layout.js';
import { heldBlocks, loadUNetBlocks, ResStage, type UNetBlocks } from './blocks.js';
import type { CrossAttention, ExtraKeyValue } from './transformer.js';
import type { Conditioning } from './conditioning.js';
import { SD15_UNET, unetBlockPlan, validateConfig, type UNetConfig } from './config.js';

export interface UNetLoadOptions {
  /**
   * Where the weights live between steps (src/nn/residency.ts): 'resident' tensors, or 'streamed' from a host
   * copy of the checkpoint's bytes, one block at a time. Default: 'streamed' on wasm, else 'resident'.
   */
  readonly residency?: ResidencyPolicy;
}

export class UNet {
  private constructor(
    readonly config: UNetConfig,
    readonly residency: ResidencyPolicy,
    private readonly blocks: UNetBlocks,
    /** The streamed weights, in the checkpoint's dtype, outside the backend; null when resident. */
    private readonly host: HostTensors | null,
  ) {}

  /**
   * Loads every `${prefix}.*` weight, checking each shape against cfg; a key left unread fails the load.
   * Streamed (the default on wasm), the weights are checked, copied to host memory and laid out per block at
   * every forward pass; `src` may be closed after load either way.
   */
  static load(src: TensorSource, cfg: UNetConfig = SD15_UNET, prefix: string = SD1_PREFIXES.unet, opts: UNetLoadOptions = {}): UNet {
    const config = validateConfig(cfg);
    const policy = opts.residency ?? defaultResidency();
    if (policy === 'streamed') {
      const expected = expectedShapes(config, prefix);
      checkCheckpoint(src, expected, prefix);
      const host = HostTensors.copy(src, expected.keys());
      return new UNet(config, policy, loadUNetBlocks(WeightView.root(host, prefix), config, policy), host);
    }
    const p = WeightView.root(src, prefix);
    const blocks = loadUNetBlocks(p, config, policy);
    const unused = p.unused();
    if (unused.length > 0) {
      for (const h of heldBlocks(blocks)) h.dispose();
      throw new WeightsError(
        `${src.path}: ${unused.length} UNet weights were not used (e.g. ${unused.slice(0, 3).join(', ')}); the UNet config does not match this checkpoint`,
      );
    }
    return new UNet(config, policy, blocks, null);
  }

  /** Bytes of weights held in host memory outside the backend (streamed), else 0. */
  get hostBytes(): number {
    return this.host?.byteLength ?? 0;
  }

  /**
   * x NHWC [B, h, w, inChannels]; t one timestep per batch item (or one for all; fractional allowed);
   * cond: context [B, N, contextDim] and what else the model takes -> predicted noise NHWC [B, h, w, outChannels].
   */
  forward(x: tf.Tensor4D, t: readonly number[] | number, cond: Conditioning): tf.Tensor4D {
    const timesteps = this.checkInputs(x, t, cond);
    const { timeEmbed, input, middle, output, out } = this.blocks;
    const residuals = cond.residuals;
    return tf.tidy(() => {
      const embAct = timeEmbed.use((m) => m.apply(timesteps, this.config.modelChannels, cond.added));
      const skips: tf.Tensor4D[] = [];
      let h = x;
      for (const block of input) {
        h = block.use((m) => (m instanceof ResStage ? m.apply(h, embAct, cond) : m.apply(h)));
        skips.push(h);
      }
      h = middle.use((m) => m.apply(h, embAct, cond));
      if (residuals !== undefined) h = plus(h, residuals.middle);
      for (const stage of output) {
        const at = skips.length - 1;
        const skip = residuals === undefined ? (skips.pop() as tf.Tensor4D) : plus(skips.pop() as tf.Tensor4D, residuals.down[at]);
        const next = skips.at(-1); // what the upsample must match for the next concat
        const y = stage.use((m) => m.apply(h, embAct, cond, skip, next && [next.shape[1], next.shape[2]]));
        tf.dispose([h, skip]);
        h = y;
      }
      return out.use((m) => m.apply(h));
    });
  }

  /** Validates shapes (before any work) and returns one timestep per batch item. */
  private checkInputs(x: tf.Tensor4D, t: readonly number[] | number, cond: Conditioning): number[] {
    const cfg = this.config;
    const [b, h, w, c] = x.shape;
    const fail = (what: string) => {
      throw new ShapeError(`UNet ${what}`);
    };
    if (x.rank !== 4 || c !== cfg.inChannels) fail(`input: expected latents NHWC [B, h, w, ${cfg.inChannels}], got [${x.shape}]`);
    const { context, added, residuals } = cond;
    if (context.rank !== 3 || context.shape[0] !== b || context.shape[2] !== cfg.contextDim) {
      fail(`context: expected [${b}, tokens, ${cfg.contextDim}] (one text encoding per latent), got [${context.shape}]`);
    }
    if (cfg.addedEmbeddingDim === 0 && added !== undefined) fail('conditioning: this UNet has no label_emb, but an added embedding was given');
    if (cfg.addedEmbeddingDim > 0 && (added?.rank !== 2 || added.shape[0] !== b || added.shape[1] !== cfg.addedEmbeddingDim)) {
      fail(`added embedding: expected [${b}, ${cfg.addedEmbeddingDim}] (this UNet's label_emb), got ${added === undefined ? 'none' : `[${added.shape}]`}`);
    }
    if (residuals !== undefined) this.checkResiduals(residuals, b, h, w);
    const ts = typeof t === 'number' ? new Array<number>(b).fill(t) : [...t];
    if (ts.length !== b || ts.some((v) => !Number.isFinite(v))) {
      fail(`timesteps: expected ${b} finite numbers (one per latent), got [${ts.join(', ')}]`);
    }
    return ts;
  }

  /** One residual per input block, each the shape of its block's output, and one of the middle block's. */
  private checkResiduals(r: NonNullable<Conditioning['residuals']>, b: number, h: number, w: number): void {
    const plan = unetBlockPlan(this.config);
    if (r.down.length !== plan.input.length) {
      throw new ShapeError(`UNet residuals: expected ${plan.input.length} (one per input block), got ${r.down.length}`);
    }
    let [hh, ww] = [h, w];
    const expect = (t: tf.Tensor4D, c: number, what: string) => {
      if (t.shape[0] !== b || t.shape[1] !== hh || t.shape[2] !== ww || t.shape[3] !== c) {
        throw new ShapeError(`UNet residuals: ${what} must be [${b}, ${hh}, ${ww}, ${c}], got [${t.shape}]`);
      }
    };
    plan.input.forEach((spec, i) => {
      if (spec.kind === 'down') [hh, ww] = [Math.ceil(hh / 2), Math.ceil(ww / 2)];
      expect(r.down[i], spec.kind === 'down' ? spec.ch : spec.cout, `down[${i}]`);
    });
    expect(r.middle, plan.middle.channels, 'middle');
  }

  /**
   * Every cross-attention (attn2) layer, in diffusers' `attn_processors` order, the order IP-Adapter files number
   * them (`ip_adapter.1, 3, 5, ...`): the input blocks, then the output blocks, then the middle block LAST
   * (module registration order, not data flow); within a transformer, its blocks in order. Resident UNets only:
   * a streamed block is rebuilt from the checkpoint at every use, so nothing attached to it would stay.
   */
  crossAttentions(): CrossAttention[] {
    if (this.residency === 'streamed') {
      throw new ShapeError("UNet: adapters with their own attention weights (IP-Adapter) need the UNet's weights resident; this one is streamed (wasm's default): load it with residency 'resident'");
    }
    const { input, middle, output } = this.blocks;
    const of = (m: unknown) => (m instanceof ResStage && m.attn !== null ? m.attn.crossAttentions : []);
    return [
      ...input.flatMap((h) => h.use(of)),
      ...output.flatMap((h) => h.use(of)),
      ...middle.use((m) => (m.attn === null ? [] : m.attn.crossAttentions)),
    ];
  }

  /**
   * Attaches one extra token set's key/value projections, one per cross-attention layer in crossAttentions()
   * order; the conditioning then carries that many more `extraTokens`. The projections stay the caller's.
   */
  attachExtraKeyValues(layers: readonly ExtraKeyValue[]): void {
    const targets = this.crossAttentions();
    if (layers.length !== targets.length) {
      throw new ShapeError(`UNet: ${layers.length} extra key/value projections given for its ${targets.length} cross-attention layers`);
    }
    const done: number[] = [];
    try {
      targets.forEach((a, i) => {
        a.attachExtra(layers[i]);
        done.push(i);
      });
    } catch (e) {
      for (const i of done) targets[i].detachExtra(layers[i]);
      throw e;
    }
  }

  /** Removes the projections attachExtraKeyValues attached (the same list); the UNet is then as loaded. */
  detachExtraKeyValues(layers: readonly ExtraKeyValue[]): void {
    const targets = this.crossAttentions();
    if (layers.length !== targets.length) throw new ShapeError(`UNet: ${layers.length} projections to detach from ${targets.length} layers`);
    targets.forEach((a, i) => a.detachExtra(layers[i]));
  }

  dispose(): void {
    for (const h of heldBlocks(this.blocks)) h.dispose();
    this.host?.close();
  }
}

/** a + b, freeing a (an intermediate of the forward pass). */
function plus(a: tf.Tensor4D, b: tf.Tensor4D): tf.Tensor4D {
  const sum = tf.add(a, b) as tf.Tensor4D;
  a.dispose();
  return sum;
}

/** Every checkpoint key UNet.load reads for cfg, with its PyTorch shape: the loader run against a probe. */
export function expectedShapes(cfg: UNetConfig = SD15_UNET, prefix: string = SD1_PREFIXES.unet): Map<string, number[]> {
  const config = validateConfig(cfg);
  return probeShapes(prefix, (p) => {
    const blocks = loadUNetBlocks(p, config, 'resident');
    return { dispose: () => heldBlocks(blocks).forEach((h) => h.dispose()) };
  });
}
