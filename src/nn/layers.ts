/**
 * The layers every network here is built from, each loading itself from its checkpoint names
 * (`weight`, `bias`) under a WeightView prefix and holding its weights until dispose().
 *
 * Layout, fixed at load so no forward pass ever transposes a weight:
 *   Linear     checkpoint [out, in]         -> [in, out];  apply: [..., in] -> [..., out]
 *   Conv2d     checkpoint OIHW [o, i, k, k] -> HWIO;       apply: NHWC [B, H, W, i] -> [B, H', W', o]
 *   GroupNorm, LayerNorm: per-channel scale and shift, channels last.
 *   Embedding  [num, dim] unchanged;                       apply: int32 ids [...] -> [..., dim]
 * Each apply runs in its own tf.tidy, so calling one outside a tidy leaks nothing but its result.
 * On wasm a Linear or Conv2d with a large weight is split over its inputs (see `inputSplits`).
 * A Linear or Conv2d loaded from a logged view records how to load its weights again (reload.ts: per-request LoRAs).
 */
import * as tf from '../backend/tf.js';
import * as kernels from '../backend/kernels.js';
import type { WeightView } from './weight-view.js';
import { ConfigError } from './errors.js';
import { decodeToFloat32 } from '../weights/dtypes.js';

/** Keeps a tensor made at load time out of any enclosing tidy: the module owns it until dispose(). */
function own<T extends tf.Tensor>(make: () => T): T {
  return tf.keep(tf.tidy(make));
}

/**
 * Weights read through WeightView.withStored are packed in the background while the next one is read
 * (kernels.packWeight): withStored waits before it reads into a buffer a packing still reads.
 */
const BACKGROUND = { background: true } as const;

/**
 * Into how many equal slices of its input channels a Linear or Conv2d is split: one matMul or conv per slice, the
 * results summed. The same sum in another order (not PyTorch's grouped convolution, which is another operation).
 *
 * Only on wasm. XNNPACK there walks the whole reduction for each tile of outputs, so a packed weight larger than
 * the caches streams from memory for every tile: SD's layers with weights over ~8 MB ran at 36-46 GFLOP/s where
 * smaller ones ran at 55-62 (wasm, 2 threads, 2-core EPYC). With its inputs halved until each slice's weight is at
 * most WASM_SPLIT_WEIGHTS floats, a 3x3 conv 2560 -> 1280 on 8x8 went from 39 to 58 GFLOP/s, a conv 1280 -> 640
 * on 32x32 from 39 to 60, a Linear 1280 -> 5120 over 512 rows from 38 to 57. Cutting smaller weights only adds the
 * copies of the input slices (-5 to -15%), so they stay whole.
 */
export const WASM_SPLIT_WEIGHTS = 2 ** 21;

export function inputSplits(inputs: number, taps: number, outputs: number, backend = tf.getBackend()): number {
  if (backend !== 'wasm') return 1;
  let splits = 1;
  while ((inputs * taps * outputs) / splits > WASM_SPLIT_WEIGHTS && inputs % (2 * splits) === 0) splits *= 2;
  return splits;
}

/** The `index`-th of `count` equal slices of x's last axis (channels, or features). */
function channelSlice<T extends tf.Tensor>(x: T, index: number, count: number): T {
  if (count === 1) return x;
  const last = x.rank - 1;
  const width = x.shape[last] / count;
  return tf.slice(x, x.shape.map((_, a) => (a === last ? index * width : 0)), x.shape.map((d, a) => (a === last ? width : d)));
}

/** A copy of the values a Linear or Conv2d computes with: its tensors', or its packed panels and bias. */
function runValues(run: LinearRun | ConvRun): Float32Array[] {
  const widened = (panels: Float32Array | Uint16Array, bf16: boolean) =>
    panels instanceof Uint16Array
      ? decodeToFloat32(new Uint8Array(panels.buffer, panels.byteOffset, panels.byteLength), bf16 ? 'BF16' : 'F16')
      : panels.slice();
  const packed = (w: kernels.PackedWeight) => {
    kernels.awaitPacks(); // packed in the background (BACKGROUND) until then
    return [widened(w.panels, w.bf16 === true), ...(w.bias === null ? [] : [w.bias.slice()])];
  };
  const copies = (tensors: tf.Tensor[]) => tensors.map((t) => Float32Array.from(t.dataSync()));
  if ('panels' in run) return packed(run);
  if ('packed' in run) return packed(run.packed);
  if ('weights' in run) return copies(run.bias === null ? run.weights : [...run.weights, run.bias]);
  return copies([...run.filters, run.bias]);
}

/**
 * TensorFlow ops: the weight [in, out] as `weights` (one [in / splits, out] per slice of the inputs) and the bias; or
 * the native kernels: the weight packed with its bias.
 */
type LinearRun = { weights: tf.Tensor2D[]; bias: tf.Tensor1D | null } | kernels.PackedWeight;

/** y = x W + b, PyTorch nn.Linear. */
export class Linear {
  private constructor(
    readonly inFeatures: number,
    readonly outFeatures: number,
    private held: LinearRun | null,
  ) {}

  /** The weights in use; after dispose() none (their memory, packed panels included, is free to go). */
  private get run(): LinearRun {
    if (this.held === null) throw new Error('Linear: used after dispose()');
    return this.held;
  }

  /** From a checkpoint weight [out, in] and bias [out]. `splits`: slices of the inputs (default `inputSplits`). */
  static load(p: WeightView, inFeatures: number, outFeatures: number, opts: { bias?: boolean; splits?: number } = {}): Linear {
    return Linear.loadBlocks(p, inFeatures, outFeatures, 1, opts)[0];
  }

  /**
   * The `count` Linears whose outputs are the equal blocks of one checkpoint Linear [count * out, in] (GEGLU's
   * projection holds two). The native path reads the checkpoint weight once for all of them; a streamed host copy
   * (residency.ts) decodes only each block's part.
   */
  static loadBlocks(
    p: WeightView,
    inFeatures: number,
    outFeatures: number,
    count: number,
    opts: { bias?: boolean; splits?: number } = {},
  ): Linear[] {
    const layers = Linear.blockRuns(p, inFeatures, outFeatures, count, opts).map((run) => new Linear(inFeatures, outFeatures, run));
    p.reloadable('weight', (view) => {
      const fresh = Linear.blockRuns(view, inFeatures, outFeatures, count, opts);
      const old = layers.map((l, i) => l.swapRun(fresh[i]));
      return () => layers.forEach((l, i) => Linear.disposeRun(l.swapRun(old[i])));
    }, () => layers.flatMap((l) => runValues(l.run)));
    return layers;
  }

  /** The weights of each block as this layer computes with them: TensorFlow tensors, or the kernels' packed weight. */
  private static blockRuns(
    p: WeightView,
    inFeatures: number,
    outFeatures: number,
    count: number,
    { bias = true, splits }: { bias?: boolean; splits?: number },
  ): LinearRun[] {
    const rows = outFeatures * count;
    const blocks = Array.from({ length: count }, (_, index) => index);
    if (p.native) {
      const size = outFeatures * inFeatures;
      return p.withStored('weight', [rows, inFeatures], (w) => {
        const b = bias ? p.array('bias', [rows]) : null; // read after the weight, in the checkpoint's order
        return blocks.map((i) => {
          const blockBias = b === null ? null : b.slice(i * outFeatures, (i + 1) * outFeatures);
          return kernels.packWeight(w.subarray(i * size, (i + 1) * size), outFeatures, { kind: 'linear' }, blockBias, BACKGROUND);
        });
      });
    }
    const n = splits ?? inputSplits(inFeatures, 1, outFeatures);
    return blocks.map((index) => {
      const block = count === 1 ? [] : [{ axis: 0, index, count }];
      const weights = Array.from({ length: n }, (_, slice) =>
        own(() => p.tensor('weight', [rows, inFeatures], { perm: [1, 0], parts: [...block, { axis: 1, index: slice, count: n }] }) as tf.Tensor2D),
      );
      const b = bias ? own(() => p.tensor('bias', [rows], { parts: block }) as tf.Tensor1D) : null;
      return { weights, bias: b };
    });
  }

  /** Puts `run` in use (a reload, nn/reload.ts); returns the one in use before. */
  private swapRun(run: LinearRun): LinearRun {
    const old = this.run;
    this.held = run;
    return old;
  }

  private static disposeRun(run: LinearRun): void {
    if ('panels' in run) return kernels.releaseWeight(run);
    tf.dispose(run.weights);
    run.bias?.dispose();
  }

  /** Whether this layer was loaded for the native kernels (then applyHost works too). */
  get native(): boolean {
    return 'panels' in this.run;
  }

  /**
   * The kernels' packed weight in use, for a layer loaded for the native kernels (else null). Its panels may still be
   * packing in the background (BACKGROUND): the kernels' calls wait for that, JavaScript reads them after
   * kernels.awaitPacks().
   */
  get packed(): kernels.PackedWeight | null {
    return 'panels' in this.run ? this.run : null;
  }

  /** x W + b (+ residual) on the host: [..., in] -> [..., out]. Only for a layer loaded for the native kernels. */
  applyHost(x: kernels.Host, extras: kernels.ConvExtras = {}): kernels.Host {
    if (!('panels' in this.run)) throw new Error('Linear.applyHost: this layer was loaded for TensorFlow ops');
    if (extras.imageBias !== undefined) throw new Error('Linear.applyHost: a per-image bias is a conv epilogue only');
    return kernels.linearHost(x, this.run, extras.residual);
  }

  apply<T extends tf.Tensor>(x: T): T {
    const run = this.run;
    if ('panels' in run) return kernels.linear(x, run);
    return tf.tidy(() => {
      const lead = x.shape.slice(0, -1);
      const flat = tf.reshape(x, [-1, this.inFeatures]) as tf.Tensor2D;
      const { weights, bias } = run;
      let y = tf.fused.matMul({ a: channelSlice(flat, 0, weights.length), b: weights[0], bias: bias ?? undefined });
      for (let g = 1; g < weights.length; g++) y = tf.add(y, tf.matMul(channelSlice(flat, g, weights.length), weights[g]));
      return tf.reshape(y, [...lead, this.outFeatures]) as T;
    });
  }

  dispose(): void {
    if (this.held === null) return;
    Linear.disposeRun(this.held);
    this.held = null;
  }
}

/**
 * Zero padding of a Conv2d as PyTorch states it: 'same-as-torch' is kernel // 2 on every side (nn.Conv2d
 * padding=k//2); a number pads every side by it; [top, bottom, left, right] pads asymmetrically (CompVis
 * Downsample pads (0, 1, 0, 1) before a stride-2 conv).
 */
export type ConvPadding = 'same-as-torch' | number | readonly [number, number, number, number];

type TfPad = 'same' | 'valid' | [[number, number], [number, number], [number, number], [number, number]];
type Pad4 = kernels.ConvGeometry['pad'];

/** [top, bottom, left, right] */
function padSides(padding: ConvPadding, kernel: number): Pad4 {
  if (typeof padding === 'string') return [kernel >> 1, kernel >> 1, kernel >> 1, kernel >> 1];
  return typeof padding === 'number' ? [padding, padding, padding, padding] : padding;
}

/** The tfjs padding that computes the same output as PyTorch's: 'same'/'valid' where they agree, else explicit. */
function tfPadding([t, b, l, r]: Pad4, kernel: number, stride: number): TfPad {
  if (t === 0 && b === 0 && l === 0 && r === 0) return 'valid';
  // Stride 1 with an odd kernel padded k//2 on each side is exactly TensorFlow's 'same'.
  if (stride === 1 && kernel % 2 === 1 && [t, b, l, r].every((v) => v === kernel >> 1)) return 'same';
  return [[0, 0], [t, b], [l, r], [0, 0]];
}

interface ConvOptions {
  readonly stride?: number;
  readonly padding?: ConvPadding;
  readonly splits?: number;
}

/**
 * TensorFlow ops: the filter HWIO [k, k, in, out] as `filters` (one [k, k, in / splits, out] per input slice) and the
 * bias; or the native kernels: the packed weight and geometry.
 */
type ConvRun = { filters: tf.Tensor4D[]; bias: tf.Tensor1D; stride: number; pad: TfPad } | { packed: kernels.PackedWeight; geometry: kernels.ConvGeometry };

/** PyTorch nn.Conv2d (square kernel, with bias) on NHWC tensors. */
export class Conv2d {
  private constructor(
    readonly outChannels: number,
    private held: ConvRun | null,
  ) {}

  /** The weights in use; after dispose() none (their memory, packed panels included, is free to go). */
  private get run(): ConvRun {
    if (this.held === null) throw new Error('Conv2d: used after dispose()');
    return this.held;
  }

  static load(p: WeightView, cin: number, cout: number, kernel: number, opts: ConvOptions = {}): Conv2d {
    const layer = new Conv2d(cout, Conv2d.loadRun(p, cin, cout, kernel, opts));
    p.reloadable('weight', (view) => {
      const old = layer.swapRun(Conv2d.loadRun(view, cin, cout, kernel, opts));
      return () => Conv2d.disposeRun(layer.swapRun(old));
    }, () => runValues(layer.run));
    return layer;
  }

  private static loadRun(p: WeightView, cin: number, cout: number, kernel: number, { stride = 1, padding = 'same-as-torch', splits }: ConvOptions): ConvRun {
    const pad = padSides(padding, kernel);
    if (p.native) {
      const geometry = { kernel, stride, pad };
      const format = { kind: 'conv', kernel, winograd: kernels.winogradFits(cin, cout, geometry) } as const;
      const packed = p.withStored('weight', [cout, cin, kernel, kernel], (w) => kernels.packWeight(w, cout, format, p.array('bias', [cout]), BACKGROUND));
      return { packed, geometry };
    }
    const count = splits ?? inputSplits(cin, kernel * kernel, cout);
    const filters = Array.from({ length: count }, (_, index) =>
      own(() => p.tensor('weight', [cout, cin, kernel, kernel], { perm: [2, 3, 1, 0], parts: [{ axis: 1, index, count }] }) as tf.Tensor4D),
    );
    const bias = own(() => p.tensor('bias', [cout]) as tf.Tensor1D);
    return { filters, bias, stride, pad: tfPadding(pad, kernel, stride) };
  }

  /** Puts `run` in use (a reload, nn/reload.ts); returns the one in use before. */
  private swapRun(run: ConvRun): ConvRun {
    const old = this.run;
    this.held = run;
    return old;
  }

  private static disposeRun(run: ConvRun): void {
    if ('packed' in run) return kernels.releaseWeight(run.packed);
    tf.dispose(run.filters);
    run.bias.dispose();
  }

  /** Whether this layer was loaded for the native kernels (then applyHost works too). */
  get native(): boolean {
    return 'packed' in this.run;
  }

  /** The convolution on the host, with an optional residual or per-image bias added. Native layers only. */
  applyHost(x: kernels.Host, extras?: kernels.ConvExtras): kernels.Host {
    if (!('packed' in this.run)) throw new Error('Conv2d.applyHost: this layer was loaded for TensorFlow ops');
    return kernels.conv2dHost(x, this.run.packed, this.run.geometry, extras);
  }

  apply(x: tf.Tensor4D): tf.Tensor4D {
    const run = this.run;
    if ('packed' in run) return kernels.conv2d(x, run.packed, run.geometry);
    return tf.tidy(() => {
      const { filters, stride, pad } = run;
      let y = tf.fused.conv2d({ x: channelSlice(x, 0, filters.length), filter: filters[0], strides: stride, pad, bias: run.bias });
      for (let g = 1; g < filters.length; g++) y = tf.add(y, tf.conv2d(channelSlice(x, g, filters.length), filters[g], stride, pad));
      return y;
    });
  }

  dispose(): void {
    if (this.held === null) return;
    Conv2d.disposeRun(this.held);
    this.held = null;
  }
}

/** Largest divisor of n not above sqrt(n): splits a sum over n positions into two short ones. */
function splitFactor(n: number): number {
  for (let r = Math.floor(Math.sqrt(n)); r > 1; r--) if (n % r === 0) return r;
  return 1;
}

/** PyTorch nn.GroupNorm on channels-last input [B, ..., C]: biased variance over each group's channels and positions. */
export class GroupNorm {
  private constructor(
    readonly gamma: tf.Tensor1D,
    readonly beta: tf.Tensor1D,
    readonly groups: number,
    readonly eps: number,
    /** gamma and beta on the host when the native kernels normalise (loaded while they were in use). */
    private readonly host: { gamma: Float32Array; beta: Float32Array } | null,
  ) {}

  static load(p: WeightView, channels: number, { groups = 32, eps }: { groups?: number; eps: number }): GroupNorm {
    if (channels % groups !== 0) {
      throw new ConfigError(`${p.prefix}: GroupNorm over ${channels} channels cannot make ${groups} equal groups`);
    }
    const gamma = p.array('weight', [channels]);
    const beta = p.array('bias', [channels]);
    return new GroupNorm(
      own(() => tf.tensor1d(gamma)), own(() => tf.tensor1d(beta)), groups, eps, p.native ? { gamma, beta } : null,
    );
  }

  /** GroupNorm (then SiLU when `silu`) on the host. Native layers only. */
  applyHost(x: kernels.Host, silu: boolean): kernels.Host {
    if (this.host === null) throw new Error('GroupNorm.applyHost: this layer was loaded for TensorFlow ops');
    return kernels.groupNormHost(x, this.groups, this.eps, this.host.gamma, this.host.beta, silu);
  }

  /** SiLU(GroupNorm(x)): one pass of the native kernels, or the two in turn. */
  applySilu<T extends tf.Tensor>(x: T): T {
    if (this.host !== null) return kernels.groupNorm(x, this.groups, this.eps, this.host.gamma, this.host.beta, true);
    const normed = this.apply(x);
    const act = silu(normed);
    normed.dispose();
    return act;
  }

  /**
   * Statistics per channel first, then per group: means over positions are taken in two short stages (less float32
   * rounding than one long sum: 1.5e-7 against 2.5e-4 for tf.moments on a 512x512x128 map, and about twice as fast),
   * the variance centred as mean((x - mean)^2). The affine is folded into one scale and shift per (batch, channel),
   * so only two full-size tensors are made: at 512x512 with 128 channels each is 128 MiB.
   */
  apply<T extends tf.Tensor>(x: T): T {
    if (this.host !== null) return kernels.groupNorm(x, this.groups, this.eps, this.host.gamma, this.host.beta, false);
    return tf.tidy(() => {
      const c = x.shape[x.rank - 1];
      const b = x.shape[0];
      const g = this.groups;
      const flat = tf.reshape(x, [b, -1, c]) as tf.Tensor3D; // [B, P, C]
      const p = flat.shape[1];
      const r = splitFactor(p);
      // [B, P, C] -> per-channel mean over positions [B, C]
      const channelMean = (t: tf.Tensor) => tf.mean(tf.mean(tf.reshape(t, [b, r, p / r, c]), 2), 1);
      // [B, C] -> the mean over each group's channels, broadcast back to its channels [B, 1, C]
      const perGroup = (t: tf.Tensor) =>
        tf.reshape(tf.tile(tf.mean(tf.reshape(t, [b, g, 1, c / g]), 3, true), [1, 1, 1, c / g]), [b, 1, c]);
      const mean = perGroup(channelMean(flat));
      const variance = tf.tidy(() => perGroup(channelMean(tf.square(tf.sub(flat, mean)))));
      const scale = tf.mul(tf.rsqrt(tf.add(variance, this.eps)), this.gamma);
      const shift = tf.sub(this.beta, tf.mul(mean, scale));
      return tf.reshape(tf.add(tf.mul(flat, scale), shift), x.shape) as T;
    });
  }

  dispose(): void {
    this.gamma.dispose();
    this.beta.dispose();
  }
}

/** PyTorch nn.LayerNorm over the last axis (biased variance). */
export class LayerNorm {
  private constructor(
    readonly gamma: tf.Tensor1D,
    readonly beta: tf.Tensor1D,
    readonly eps: number,
    /** gamma and beta on the host when loaded for the native kernels. */
    private readonly host: { gamma: Float32Array; beta: Float32Array } | null,
  ) {}

  static load(p: WeightView, dim: number, { eps = 1e-5 }: { eps?: number } = {}): LayerNorm {
    const gamma = p.array('weight', [dim]);
    const beta = p.array('bias', [dim]);
    return new LayerNorm(own(() => tf.tensor1d(gamma)), own(() => tf.tensor1d(beta)), eps, p.native ? { gamma, beta } : null);
  }

  /** LayerNorm on the host. Native layers only. */
  applyHost(x: kernels.Host): kernels.Host {
    if (this.host === null) throw new Error('LayerNorm.applyHost: this layer was loaded for TensorFlow ops');
    return kernels.layerNormHost(x, this.eps, this.host.gamma, this.host.beta);
  }

  apply<T extends tf.Tensor>(x: T): T {
    return tf.tidy(() => {
      const { mean, variance } = tf.moments(x, -1, true);
      const normed = tf.mul(tf.sub(x, mean), tf.rsqrt(tf.add(variance, this.eps)));
      return tf.add(tf.mul(normed, this.gamma), this.beta) as T;
    });
  }

  dispose(): void {
    this.gamma.dispose();
    this.beta.dispose();
  }
}

/**
 * PyTorch nn.Embedding: a lookup table [num, dim]. From an fp16 file the table stays the file's halves on the host
 * and the rows asked for are widened (exactly) as they are looked up: CLIP's 49408 x 768 table is then 76 MB
 * instead of a 152 MB float32 tensor (SDXL's two: 203 MB instead of 405), and loading it no longer touches a decoded
 * copy and TensorFlow's copy of that on the way (~300 MB of fresh memory for SD 1.5). Either way the same values.
 */
export class Embedding {
  private constructor(
    private readonly table: tf.Tensor2D | null,
    private readonly halves: Uint16Array | null,
    readonly num: number,
    readonly dim: number,
  ) {}

  static load(p: WeightView, num: number, dim: number): Embedding {
    const halves = p.storedHalves('weight', [num, dim]);
    if (halves !== null) return new Embedding(null, halves, num, dim);
    return new Embedding(own(() => p.tensor('weight', [num, dim]) as tf.Tensor2D), null, num, dim);
  }

  /** int32 ids [...] -> [..., dim]. */
  apply(ids: tf.Tensor): tf.Tensor {
    if (this.halves === null) return tf.tidy(() => tf.gather(this.table as tf.Tensor2D, tf.cast(ids, 'int32')));
    const at = ids.dataSync(), dim = this.dim;
    const rows = new Uint16Array(at.length * dim);
    for (let i = 0; i < at.length; i++) {
      const id = Math.trunc(at[i]);
      if (!(id >= 0 && id < this.num)) throw new RangeError(`Embedding: id ${at[i]} is not in [0, ${this.num - 1}]`);
      rows.set(this.halves.subarray(id * dim, (id + 1) * dim), i * dim);
    }
    return tf.tensor(decodeToFloat32(new Uint8Array(rows.buffer), 'F16'), [...ids.shape, dim], 'float32');
  }

  dispose(): void {
    this.table?.dispose();
  }
}

/** SiLU (swish): x * sigmoid(x). */
export function silu<T extends tf.Tensor>(x: T): T {
  return tf.tidy(() => tf.mul(x, tf.sigmoid(x)) as T);
}

/** GELU with the exact erf, as torch.nn.functional.gelu by default: x/2 * (1 + erf(x / sqrt 2)). */
export function gelu<T extends tf.Tensor>(x: T): T {
  return tf.tidy(() => tf.mul(tf.mul(x, 0.5), tf.add(1, tf.erf(tf.mul(x, Math.SQRT1_2)))) as T);
}

// QuickGELU, the activation OpenAI's CLIP was trained with: x * sigmoid(1.702 x)
export function quickGelu<T extends tf.Tensor>(x: T): T {
  return tf.tidy(() => tf.mul(x, tf.sigmoid(tf.mul(x, 1.702))) as T);
}

/** torch F.interpolate(scale_factor=2, mode='nearest') on NHWC: each pixel becomes a 2x2 block. */
export function upsampleNearest2x(x: tf.Tensor4D): tf.Tensor4D {
  return upsampleNearestTo(x, x.shape[1] * 2, x.shape[2] * 2);
}

/** torch F.interpolate(size=(h, w), mode='nearest') on NHWC: source index floor(dst * in / out). */
export function upsampleNearestTo(x: tf.Tensor4D, h: number, w: number): tf.Tensor4D {
  return tf.image.resizeNearestNeighbor(x, [h, w], false, false);
}
