/**
 * The native CPU kernels (native/kernels.c, built by `sd setup-native`) behind the layers whose speed decides a
 * generation: Linear, Conv2d, attention and GroupNorm(+SiLU). On the `tensorflow` backend they replace TensorFlow's
 * eager ops, which run these shapes at 60-125 GFLOP/s and attention at ~40 (BACKENDS.md): one register-blocked
 * matrix kernel does them all, attention never materialises its score matrix, and GroupNorm+SiLU is one pass
 * instead of eight ops. Tensors cross by copy (dataSync out, tf.tensor in: ~0.3 ms per MB), which is small beside
 * the work of any op routed here.
 *
 * Used only where it pays and is safe: the kernels are loaded, this CPU has AVX2 and FMA, the backend is
 * `tensorflow` (wasm and cpu keep their own kernels: wasm runs where no compiler does, and the cpu backend is the
 * plain-JavaScript reference), and SD_KERNELS is not '0'. Layers decide once, at load: a layer loaded for the
 * kernels holds its weights packed in host memory instead of as tensors.
 *
 * Using the kernels also tunes glibc's allocator (mallopt, once): by default every block over 32 MiB, and most over
 * 128 KiB once the threshold adapts, is a fresh mmap whose pages fault in zeroed on first touch. SD's feature
 * maps are 10-130 MiB and made and freed thousands of times a step; served from the heap instead, an elementwise
 * add on a 42 MB tensor went from 30 to 7 ms and a UNet step from ~23.9 to ~21.9 s before any kernel was swapped.
 */
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { availableParallelism } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { dropScratch, kernelOutput, setScratchRelease } from './scratch.js';
import * as tf from './tf.js';

/** The addon's functions (native/kernels.c documents each). Arrays are float32, row-major, channels last. */
interface Addon {
  available(): boolean;
  /** sha256 (hex) of the native/kernels.c it was built from. */
  source(): string;
  tuneAllocator(): boolean;
  trimHeap(): boolean;
  /** The micro-kernel in use ('avx2' | 'avx512'); with a name, switches to it (RangeError where the CPU lacks it). */
  microKernel(name?: string): string;
  packWeights(w: Float32Array, k: number, n: number, layout: number, taps: number, bf16?: false, threads?: number): Float32Array;
  /** Weights as IEEE halves (as an fp16 file stores them) packed into panels of halves, with no float32 copy. */
  packWeights(w: Uint16Array, k: number, n: number, layout: number, taps: number, bf16?: false, threads?: number, later?: boolean): Uint16Array;
  /** Returns once no packing in the background (packWeights with later) reads `source`; with none, once all are done. */
  awaitPacks(source?: Uint16Array): void;
  /** The same panels as bfloat16 pairs [n][K/2][16][2] (K / taps even), for the bfloat16 product. */
  packWeights(w: Float32Array, k: number, n: number, layout: number, taps: number, bf16: true): Uint16Array;
  /** The panels as IEEE halves, or null when a value is not exactly a half. */
  halvePanels(panels: Float32Array): Uint16Array | null;
  /**
   * The ISA of the bfloat16 products ('amx' | 'avx512bf16'), or null where this CPU (or its OS) runs neither; with a
   * name, switches to it (RangeError where it cannot run).
   */
  bf16(name?: string): string | null;
  linear(
    x: Float32Array, m: number, k: number, packed: Float32Array | Uint16Array, n: number, bias: Float32Array | null, out: Float32Array,
    threads: number, residual: Float32Array | null, bf16?: boolean,
  ): void;
  conv2d(
    x: Float32Array, b: number, h: number, w: number, cin: number, packed: Float32Array | Uint16Array, cout: number, kernel: number,
    stride: number, padTop: number, padLeft: number, hOut: number, wOut: number, bias: Float32Array | null,
    out: Float32Array, threads: number, residual: Float32Array | null, biasPerImage: boolean, bf16?: boolean,
  ): void;
  /** Detaches the panels' buffer, freeing it now (false, and nothing done, for a view of part of a buffer). */
  releasePanels(panels: Float32Array | Uint16Array): boolean;
  widenHalves(src: Uint16Array, out: Float32Array): void;
  readAhead(fd: number, offset: number, length: number): boolean;
  readDirect(fd: number, position: number, out: Uint8Array): boolean;
  pageCached(fd: number, position: number, length: number): boolean;
  /** taps: the direct conv's panels (packWeights layout 2, float32 or halves); tile: Winograd's m, 2 or 4. */
  conv3x3Winograd(
    x: Float32Array, b: number, h: number, w: number, cin: number, taps: Float32Array | Uint16Array, cout: number,
    bias: Float32Array | null, out: Float32Array, threads: number, residual: Float32Array | null, biasPerImage: boolean,
    tile: 2 | 4,
  ): void;
  attention(
    q: Float32Array, k: Float32Array, v: Float32Array, b: number, nq: number, nk: number, heads: number, d: number,
    scale: number, out: Float32Array, threads: number, bf16?: boolean,
  ): void;
  groupNorm(
    x: Float32Array, b: number, p: number, c: number, groups: number, eps: number, gamma: Float32Array,
    beta: Float32Array, silu: boolean, out: Float32Array, threads: number,
  ): void;
  layerNorm(x: Float32Array, m: number, c: number, eps: number, gamma: Float32Array, beta: Float32Array, out: Float32Array, threads: number): void;
  linearGeglu(
    x: Float32Array, m: number, k: number, value: Float32Array | Uint16Array, gate: Float32Array | Uint16Array, n: number,
    valueBias: Float32Array | null, gateBias: Float32Array | null, out: Float32Array, threads: number,
  ): void;
  geglu(value: Float32Array, gate: Float32Array, out: Float32Array, n: number, threads: number): void;
}

/** src/backend (or dist/backend) -> the checkout's native/ folder. */
const NATIVE_DIR = join(dirname(dirname(dirname(fileURLToPath(import.meta.url)))), 'native');

/** Where `sd setup-native` puts the built kernels. */
export function kernelsPath(): string {
  return join(NATIVE_DIR, 'build', 'sd_kernels.node');
}

/** sha256 (hex) of a kernels source file: what a build records and the loader compares. */
export function kernelsSourceHash(path = join(NATIVE_DIR, 'kernels.c')): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

let addon: Addon | null | undefined;
let loadProblem = '';

/** The addon if it is built, loads, and this CPU can run it; null otherwise (why: kernelsProblem()). */
function load(): Addon | null {
  if (addon !== undefined) return addon;
  addon = null;
  const path = kernelsPath();
  if (!existsSync(path)) {
    loadProblem = `${path} is not built (\`sd setup-native\` builds it)`;
    return null;
  }
  try {
    const a = createRequire(import.meta.url)(path) as Addon;
    if (typeof a.source !== 'function' || a.source() !== kernelsSourceHash()) {
      loadProblem = `${path} was built from another version of native/kernels.c; run \`sd setup-native\` to rebuild it`;
      return null;
    }
    if (!a.available()) {
      loadProblem = 'this CPU lacks AVX2, FMA or F16C';
      return null;
    }
    const isa = process.env.SD_KERNELS_ISA;
    if (isa !== undefined && isa !== '') a.microKernel(isa);
    const bf16 = process.env.SD_KERNELS_BF16;
    if (bf16 !== undefined && bf16 !== '') a.bf16(bf16);
    addon = a;
    setScratchRelease((out) => a.releasePanels(out)); // reused outputs freed at once when dropped
  } catch (e) {
    loadProblem = `${path} does not load: ${(e as Error).message}`;
  }
  return addon;
}

let allocatorTuned = false;

/**
 * Why the native kernels are not in use, or null when they are. SD_KERNELS=0 turns them off; SD_KERNELS=1 uses
 * them on any backend (the tests run them on cpu this way).
 */
export function kernelsProblem(): string | null {
  if (process.env.SD_KERNELS === '0') return 'turned off by SD_KERNELS=0';
  if (load() === null) return loadProblem;
  if (process.env.SD_KERNELS !== '1' && tf.getBackend() !== 'tensorflow') {
    return `they serve the tensorflow backend (this is ${tf.getBackend()}; SD_KERNELS=1 uses them anyway)`;
  }
  if (!allocatorTuned) {
    kernels().tuneAllocator();
    allocatorTuned = true;
  }
  return null;
}

/** Whether layers loaded now should use the native kernels. */
export function useKernels(): boolean {
  return kernelsProblem() === null;
}

function kernels(): Addon {
  const a = load();
  if (a === null) throw new Error(`native kernels unavailable: ${loadProblem}`);
  return a;
}

/** The micro-kernels a CPU can have: AVX2 + FMA (the baseline), AVX-512F (chosen where present). */
export type MicroKernel = 'avx2' | 'avx512';

/**
 * The micro-kernel the native kernels use: the widest this CPU runs, unless SD_KERNELS_ISA names another when they
 * load. With a name, switches to it (tests run both; the bench measures both); a RangeError where the CPU lacks it.
 */
export function microKernel(use?: MicroKernel): MicroKernel {
  return kernels().microKernel(use) as MicroKernel;
}

const threads = (): number => Number(process.env.SD_THREADS) || availableParallelism();

/**
 * The precision of the kernels' matrix products. `float32` (the default) is the reference's arithmetic. `bf16`, an
 * explicit opt-in (`--precision bf16`, SD_PRECISION) where the CPU has AMX-BF16 (Intel Xeon from Sapphire Rapids
 * on) or AVX512-BF16 (AMD Zen 4 on, Intel Cooper Lake), rounds both inputs of every Linear, Conv2d and attention
 * product whose shared dimension allows it to bfloat16 and sums in float32 (on AMX tiles, or with VDPBF16PS):
 * faster products at a cost in the image the README measures (PSNR against float32 on the same seed). The softmax,
 * the norms and everything outside the products stay float32. Chosen before a model loads: weights are packed for it.
 */
export type Precision = 'float32' | 'bf16';
export const PRECISIONS: readonly Precision[] = ['float32', 'bf16'];
let precision: Precision = 'float32';

/** Why the bf16 product cannot run here, or null when it can. */
export function bf16Problem(): string | null {
  const why = kernelsProblem();
  if (why !== null) return `it runs in the native kernels, which are not in use (${why})`;
  if (kernels().bf16() === null) {
    return 'this CPU (or its OS) has neither AMX-BF16 nor AVX512-BF16: it needs an Intel Xeon from Sapphire Rapids on, an AMD Zen 4 on, or an Intel Cooper Lake';
  }
  return null;
}

/** The bf16 products' ISA: AMX tiles, or AVX512-BF16's VDPBF16PS (SD_KERNELS_BF16 chooses); null where bf16 cannot run. */
export type Bf16Isa = 'amx' | 'avx512bf16';
export function bf16Isa(): Bf16Isa | null {
  return bf16Problem() === null ? (kernels().bf16() as Bf16Isa) : null;
}

/** Sets the precision of the products packed from now on; a RangeError naming the reason where bf16 cannot run. */
export function setPrecision(p: Precision): void {
  if (p === 'bf16') {
    const why = bf16Problem();
    if (why !== null) throw new RangeError(`--precision bf16 is not available: ${why}`);
  }
  precision = p;
}

export function currentPrecision(): Precision {
  return precision;
}

/**
 * What is packed: a Linear weight [out, in] or a conv weight OIHW, and how. A conv asking for `winograd` (3x3,
 * stride 1, padding 1, channels in multiples of 8: winogradFits) runs as Winograd (native/kernels.c) on an image of
 * at least WINOGRAD_MIN_PIXELS; PackedWeight.winograd says it may.
 */
export type PackFormat = { kind: 'linear' } | { kind: 'conv'; kernel: number; winograd?: boolean };

/**
 * A weight matrix B [K, N] packed for the kernels (panels of 16 columns), with its bias. Under `--precision bf16` the
 * panels are bfloat16 pairs for the bfloat16 product (`bf16`). Otherwise they are IEEE halves
 * when every weight is exactly one (any weight read from an fp16 checkpoint): half the memory, the same products,
 * widened 256 x 32 at a time inside the kernel (native/kernels.c, gemm_block). A conv's K is taps x Cin.
 */
export interface PackedWeight {
  readonly k: number;
  readonly n: number;
  readonly panels: Float32Array | Uint16Array;
  readonly bias: Float32Array | null;
  /**
   * The conv may run as Winograd: its panels (the direct kernel's, float32 or halves) are the taps each Winograd call
   * transforms into its matrices U_xi.
   */
  readonly winograd?: boolean;
  /** The panels are bfloat16 pairs (packWeights with bf16), for the bfloat16 product. */
  readonly bf16?: boolean;
}

/**
 * Winograd F(m x m, 3x3) computes a 3x3 conv with 16/36 (m = 2) or 36/144 (m = 4) of the multiplications. Its weights
 * at rest are the direct kernel's panels, so it costs no memory: each call turns them into the (m+2)^2 matrices U_xi
 * in one block the kernels keep (210 MB for the UNet's 2560 -> 1280 conv, the largest), a cost in proportion to the
 * weights, which a small image does not earn back. Below this many output pixels (batch x height x width) a conv runs
 * its taps directly: on SD 1.5's 8x8 level (batch 2, 128 pixels) the direct conv took 0.71x Winograd's time, at
 * 16x16 (512 pixels) Winograd 0.71x the direct one's (2-core AMD EPYC, AVX-512).
 */
export const WINOGRAD_MIN_PIXELS = 256;

/**
 * F(4x4, 3x3) does 0.56x F(2x2)'s multiplications, but its 36 matrices U_xi are 2.25x F(2x2)'s 16 to make and to
 * read, and its larger tiles leave fewer rows per GEMM: it runs where the image gives at least this many 4x4 tiles
 * (batch x ceil(H/4) x ceil(W/4)) and its matrices (36 Cin Cout floats) fit in WINOGRAD_F4_MAX_MATRICES, or where
 * they do not fit and the image gives at most WINOGRAD_F4_FEW_TILES (native/kernels.c then makes them a panel pair at
 * a time where they are used, never whole).
 */
export const WINOGRAD_F4_MIN_TILES = 128;

/** The most floats F(4x4)'s matrices may take made whole: F(2x2)'s for the UNet's 2560 -> 1280 conv (210 MB), the kernels' largest. */
export const WINOGRAD_F4_MAX_MATRICES = 16 * 2560 * 1280;

/**
 * The most 4x4 tiles of a conv whose F(4x4) matrices are too large to make whole that runs F(4x4) all the same: SD's
 * 1280-channel convs at 16x16 (32 tiles, batch 2) and SDXL's at 32x32 (128), 1.4-1.6x faster than F(2x2) (2-core Zen 5
 * EPYC: 1280 -> 1280 at [2, 32, 32] 82 -> 52 ms, at [2, 16, 16] 18 -> 13 ms); at [2, 64, 64] (512 tiles) F(2x2) made
 * whole stays faster (301 against 345 ms).
 */
export const WINOGRAD_F4_FEW_TILES = 128;

/** Whether a conv of this shape and geometry can run as Winograd (conv2dHost then decides by the image's size). */
export function winogradFits(cin: number, cout: number, g: ConvGeometry): boolean {
  return g.kernel === 3 && g.stride === 1 && g.pad.every((p) => p === 1) && cin % 8 === 0 && cout % 8 === 0;
}

/** Winograd's tile for a conv of Cin -> Cout on [b, h, w]: 4 where F(4x4, 3x3) pays (WINOGRAD_F4_MIN_TILES, _FEW_TILES), else 2. */
export function winogradTile(b: number, h: number, w: number, cin: number, cout: number): 2 | 4 {
  const tiles = b * Math.ceil(h / 4) * Math.ceil(w / 4);
  const whole = 36 * cin * cout <= WINOGRAD_F4_MAX_MATRICES;
  return (whole && tiles >= WINOGRAD_F4_MIN_TILES) || (!whole && tiles <= WINOGRAD_F4_FEW_TILES) ? 4 : 2;
}

/**
 * Packs a Linear's [out, in] or a Conv2d's OIHW [out, in, k, k] checkpoint weight: float32, or IEEE halves as an
 * fp16 file stores them (WeightView.withStored), which are packed as halves straight away where panels may be halves.
 * With `background`, halves are packed by a thread of the kernels' while the caller goes on (a loader reads the next
 * weight meanwhile): the caller then leaves `w` as it is until awaitPacks(w) returns, and reads the panels itself
 * only after awaitPacks() (the kernels' own calls wait for them).
 */
export function packWeight(
  w: Float32Array | Uint16Array, out: number, format: PackFormat, bias: Float32Array | null, { background = false }: { background?: boolean } = {},
): PackedWeight {
  const taps = format.kind === 'conv' ? format.kernel * format.kernel : 1;
  const layout = format.kind === 'conv' ? 2 : 1;
  const k = w.length / out;
  const bf16 = precision === 'bf16' && (k / taps) % 2 === 0;
  if (w instanceof Uint16Array && (bf16 || !halfPanels())) w = widened(w);
  if (bf16) {
    // bf16 runs a 3x3 conv directly at or above Winograd's float32 speed (AMX several times; AVX512-BF16 1.05-1.2x
    // on a Zen 5 EPYC): no Winograd under bf16
    const panels = kernels().packWeights(w as Float32Array, k, out, layout, taps, true);
    return { k, n: out, panels, bias, bf16: true };
  }
  const panels = w instanceof Uint16Array
    ? kernels().packWeights(w, k, out, layout, taps, false, threads(), background)
    : halvedIfExact(kernels().packWeights(w, k, out, layout, taps, false, threads()));
  const packed = { k, n: out, panels, bias };
  return format.kind === 'conv' && format.winograd === true && taps === 9 ? { ...packed, winograd: true } : packed;
}

/** Float32 panels as halves where every value is exactly one and halves are allowed (SD_HALF_PANELS), else as they are. */
function halvedIfExact(panels: Float32Array): Float32Array | Uint16Array {
  return (halfPanels() ? kernels().halvePanels(panels) : null) ?? panels;
}

function widened(h: Uint16Array): Float32Array {
  const out = new Float32Array(h.length);
  kernels().widenHalves(h, out);
  return out;
}

/**
 * Frees a packed weight's panels now (its layer is disposed): without this they would wait for a garbage collection,
 * and an allocation made meanwhile (the VAE decode after a oneShot generation freed the UNet) would not reuse them.
 */
export function releaseWeight(w: PackedWeight): void {
  kernels().releasePanels(w.panels);
}

/**
 * IEEE halves -> float32 with F16C when the kernels are built for this CPU (SD_KERNELS=0 aside, on any backend:
 * it is exact); false when they are not, and the caller decodes them itself.
 */
export function widenHalves(src: Uint16Array, out: Float32Array): boolean {
  const a = loadedAddon();
  a?.widenHalves(src, out);
  return a !== null;
}

/**
 * Asks the system to read [offset, offset + length) of an open file into its page cache in the background, where the
 * kernels are built (any backend): a weights file is read ahead of its decoding. False when it could not ask.
 */
export function readAhead(fd: number, offset: number, length: number): boolean {
  return loadedAddon()?.readAhead(fd, offset, length) ?? false;
}

/**
 * Returns once no packing in the background (packWeight with background) reads `source`; without one, once every
 * such packing is done. Nothing to wait for without the kernels.
 */
export function awaitPacks(source?: Uint16Array): void {
  const a = loadedAddon();
  if (a === null) return;
  if (source === undefined) a.awaitPacks();
  else a.awaitPacks(source);
}

/**
 * Reads out.byteLength bytes at `position` of a file opened with O_DIRECT, past the page cache, where the kernels are
 * built (any backend); false when it could not (nothing is then promised about out: read it through the cache).
 */
export function readDirect(fd: number, position: number, out: Uint8Array): boolean {
  return loadedAddon()?.readDirect(fd, position, out) ?? false;
}

/** Whether most of [position, position + length) of an open file is in the page cache; false where that is unknown. */
export function pageCached(fd: number, position: number, length: number): boolean {
  return loadedAddon()?.pageCached(fd, position, length) ?? false;
}

/** The addon for loading's helpers (any backend), unless SD_KERNELS=0 or it is not built for this CPU. */
function loadedAddon(): Addon | null {
  return process.env.SD_KERNELS === '0' ? null : load();
}

/**
 * Gives the heap's free pages back to the system, after a model is freed (tuneAllocator's allocator keeps freed
 * memory for the next step otherwise), once the kernel outputs kept for reuse (scratch.ts) are freed. A no-op
 * where the kernels are not loaded.
 */
export function trimHeap(): void {
  dropScratch();
  if (addon !== undefined && addon !== null && allocatorTuned) addon.trimHeap();
}

/** Whether packed panels are kept as halves where that is exact (SD_HALF_PANELS=0 keeps them all float32). */
function halfPanels(): boolean {
  return process.env.SD_HALF_PANELS !== '0';
}

/**
 * Called after each native kernel with its name, input shape, milliseconds and, for the products, the multiply-adds'
 * FLOPs (2 per multiply-add; a Winograd conv's counted as the direct conv's) (bench/profile.ts listens).
 */
export type KernelTimer = (name: string, shape: readonly number[], ms: number, flops?: number) => void;
let timer: KernelTimer | null = null;

export function setKernelTimer(t: KernelTimer | null): void {
  timer = t;
}

function timed<R>(name: string, shape: readonly number[], f: () => R, flops?: number): R {
  if (timer === null) return f();
  const t0 = performance.now();
  const r = f();
  timer(name, shape, performance.now() - t0, flops);
  return r;
}

export interface ConvGeometry {
  readonly kernel: number;
  readonly stride: number;
  /** Zero padding [top, bottom, left, right]. */
  readonly pad: readonly [number, number, number, number];
}

/**
 * A float32 array and its shape on the host: what flows from one native kernel to the next without becoming a
 * tensor. Blocks made of several native layers (a ResnetBlock, a transformer) read their input once with toHost and
 * make one tensor of their result, instead of crossing between TensorFlow and the host at every layer.
 */
export interface Host {
  readonly data: Float32Array;
  readonly shape: readonly number[];
}

export function toHost(x: tf.Tensor): Host {
  return { data: x.dataSync() as Float32Array, shape: x.shape };
}

export function toTensor<T extends tf.Tensor>(h: Host): T {
  return tf.tensor(h.data, [...h.shape], 'float32') as T;
}

/** The same values under another shape of the same size (free). */
export function reshapeHost(h: Host, shape: readonly number[]): Host {
  if (shape.reduce((a, b) => a * b, 1) !== h.data.length) throw new RangeError(`cannot view [${h.shape}] as [${shape}]`);
  return { data: h.data, shape };
}

function checkResidual(res: Host | undefined, shape: readonly number[]): Float32Array | null {
  if (res === undefined) return null;
  if (res.shape.length !== shape.length || res.shape.some((d, i) => d !== shape[i])) {
    throw new RangeError(`residual [${res.shape}] does not match the output [${shape}]`);
  }
  return res.data;
}

/** x [..., K] W + b (+ residual) -> [..., N]. */
export function linearHost(x: Host, w: PackedWeight, residual?: Host): Host {
  const m = x.data.length / w.k;
  return timed(w.bf16 === true ? 'linear bf16' : 'linear', x.shape, () => {
    const shape = [...x.shape.slice(0, -1), w.n];
    const out = kernelOutput(m * w.n);
    kernels().linear(x.data, m, w.k, w.panels, w.n, w.bias, out, threads(), checkResidual(residual, shape), w.bf16 === true);
    return { data: out, shape };
  }, 2 * m * w.k * w.n);
}

export interface ConvExtras {
  /** Added to the output (the same shape). */
  readonly residual?: Host;
  /** [B, Cout], added to image b's output channels besides the conv's bias (a ResnetBlock's time embedding). */
  readonly imageBias?: Float32Array;
}

/** NHWC conv2d: [B, H, W, Cin] -> [B, H', W', Cout]. */
export function conv2dHost(x: Host, w: PackedWeight, g: ConvGeometry, extras: ConvExtras = {}): Host {
  const [b, h, wd, cin] = x.shape;
  const [t, bottom, l, r] = g.pad;
  const hOut = Math.floor((h + t + bottom - g.kernel) / g.stride) + 1;
  const wOut = Math.floor((wd + l + r - g.kernel) / g.stride) + 1;
  const shape = [b, hOut, wOut, w.n];
  let bias = w.bias;
  if (extras.imageBias !== undefined) {
    if (extras.imageBias.length !== b * w.n) throw new RangeError(`imageBias has ${extras.imageBias.length} values, not [${b}, ${w.n}]`);
    bias = extras.imageBias.map((v, i) => v + (w.bias?.[i % w.n] ?? 0));
  }
  const residual = checkResidual(extras.residual, shape);
  const perImage = extras.imageBias !== undefined;
  const flops = 2 * b * hOut * wOut * w.k * w.n;
  if (w.winograd === true && (!winogradFits(cin, w.n, g) || w.k !== 9 * cin)) {
    throw new RangeError(`a Winograd weight [${w.k / 9} -> ${w.n}] cannot run this conv (input [${x.shape}])`);
  }
  if (w.winograd === true && b * hOut * wOut >= WINOGRAD_MIN_PIXELS) {
    const tile = winogradTile(b, h, wd, cin, w.n);
    return timed(`conv2d 3x3/1 winograd F(${tile}x${tile})`, x.shape, () => {
      const out = kernelOutput(b * hOut * wOut * w.n);
      kernels().conv3x3Winograd(x.data, b, h, wd, cin, w.panels, w.n, bias, out, threads(), residual, perImage, tile);
      return { data: out, shape };
    }, flops);
  }
  return timed(`conv2d ${g.kernel}x${g.kernel}/${g.stride}${w.bf16 === true ? ' bf16' : ''}`, x.shape, () => {
    const out = kernelOutput(b * hOut * wOut * w.n);
    kernels().conv2d(
      x.data, b, h, wd, cin, w.panels, w.n, g.kernel, g.stride, t, l, hOut, wOut, bias, out, threads(), residual, perImage,
      w.bf16 === true,
    );
    return { data: out, shape };
  }, flops);
}

/** softmax(q k^T / sqrt(D)) v per head: q [B, Nq, H*D], k, v [B, Nk, H*D] -> [B, Nq, H*D]. */
export function attentionHost(q: Host, k: Host, v: Host, heads: number): Host {
  const [b, nq, c] = q.shape;
  const d = c / heads;
  return timed(precision === 'bf16' ? 'attention bf16' : 'attention', [...q.shape, k.shape[1]], () => {
    const out = kernelOutput(b * nq * c);
    kernels().attention(q.data, k.data, v.data, b, nq, k.shape[1], heads, d, 1 / Math.sqrt(d), out, threads(), precision === 'bf16');
    return { data: out, shape: q.shape };
  }, 4 * b * nq * k.shape[1] * c);
}

/** GroupNorm over channels-last x [B, ..., C] (biased variance per group), then SiLU when `silu`. */
export function groupNormHost(x: Host, groups: number, eps: number, gamma: Float32Array, beta: Float32Array, silu: boolean): Host {
  const b = x.shape[0];
  const c = x.shape[x.shape.length - 1];
  return timed(silu ? 'groupNorm+silu' : 'groupNorm', x.shape, () => {
    const out = kernelOutput(x.data.length);
    kernels().groupNorm(x.data, b, x.data.length / (b * c), c, groups, eps, gamma, beta, silu, out, threads());
    return { data: out, shape: x.shape };
  });
}

/** LayerNorm over the last axis. */
export function layerNormHost(x: Host, eps: number, gamma: Float32Array, beta: Float32Array): Host {
  const c = x.shape[x.shape.length - 1];
  return timed('layerNorm', x.shape, () => {
    const out = kernelOutput(x.data.length);
    kernels().layerNorm(x.data, x.data.length / c, c, eps, gamma, beta, out, threads());
    return { data: out, shape: x.shape };
  });
}

/** value * GELU(gate) (erf GELU), elementwise. */
export function gegluHost(value: Host, gate: Host): Host {
  if (value.data.length !== gate.data.length) throw new RangeError(`geglu: value [${value.shape}] and gate [${gate.shape}] differ`);
  return timed('geglu', value.shape, () => {
    const out = kernelOutput(value.data.length);
    kernels().geglu(value.data, gate.data, out, out.length, threads());
    return { data: out, shape: value.shape };
  });
}

/**
 * The GEGLU projection (x Wv + bv) * GELU(x Wg + bg): [..., K] -> [..., N], made block by block without the two
 * [..., N] products in memory (native/kernels.c, linearGeglu; the same bits as linearHost twice and gegluHost where N
 * is a multiple of 8). bf16 panels take those three calls instead.
 */
export function linearGegluHost(x: Host, value: PackedWeight, gate: PackedWeight): Host {
  if (value.k !== gate.k || value.n !== gate.n) throw new RangeError(`linearGeglu: value [${value.k} -> ${value.n}] and gate [${gate.k} -> ${gate.n}] differ`);
  if (value.bf16 === true || gate.bf16 === true) return gegluHost(linearHost(x, value), linearHost(x, gate));
  const m = x.data.length / value.k;
  return timed('linear+geglu', x.shape, () => {
    const out = kernelOutput(m * value.n);
    kernels().linearGeglu(x.data, m, value.k, value.panels, gate.panels, value.n, value.bias, gate.bias, out, threads());
    return { data: out, shape: [...x.shape.slice(0, -1), value.n] };
  }, 4 * m * value.k * value.n);
}

/** x [..., K] W + b -> [..., N]. */
export function linear<T extends tf.Tensor>(x: T, w: PackedWeight): T {
  return toTensor(linearHost(toHost(x), w));
}

/** NHWC conv2d with the weight packed from OIHW: [B, H, W, Cin] -> [B, H', W', Cout]. */
export function conv2d(x: tf.Tensor4D, w: PackedWeight, g: ConvGeometry): tf.Tensor4D {
  return toTensor(conv2dHost(toHost(x), w, g));
}

/** softmax(q k^T / sqrt(D)) v per head: q [B, Nq, H*D], k, v [B, Nk, H*D] -> [B, Nq, H*D]. */
export function attention(q: tf.Tensor3D, k: tf.Tensor3D, v: tf.Tensor3D, heads: number): tf.Tensor3D {
  return toTensor(attentionHost(toHost(q), toHost(k), toHost(v), heads));
}

/** GroupNorm over channels-last x [B, ..., C], then SiLU when `silu`. */
export function groupNorm<T extends tf.Tensor>(x: T, groups: number, eps: number, gamma: Float32Array, beta: Float32Array, silu: boolean): T {
  return toTensor(groupNormHost(toHost(x), groups, eps, gamma, beta, silu));
}
