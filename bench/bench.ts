/**
 * `npm run bench -- [--model sd15|sdxl] [--backend tensorflow|wasm|cpu] [--json] [--runs N] [--cache DIR]
 *   [--full [--generations N] [--steps S]]`
 *
 * A full-size model on random weights (generated once by `sd random-weights`, cached in DIR). SD 1.5: load time of
 * each file format (fp32, fp16), text encoding, one UNet CFG step (batch 2, 64x64 latent), one VAE decode (64x64
 * latent -> 512x512), and a whole 512x512 txt2img at 20 steps (projected from the parts unless --full), peak RSS,
 * and the wasm heap. SDXL base: the same at 1024x1024 (both text encoders, a 128x128 latent, the added embedding),
 * loading measured on the fp16 file only (how SDXL is distributed; the fp32 one would be another 14 GB of disk);
 * `--config FILE` (a pipeline config in the fixtures' JSON format) runs it on another size, e.g. a tiny one.
 * GFLOP/s divide the configs' useful FLOPs (unetFlop, vaeDecodeFlop) by the measured time.
 * --full then loads the whole pipeline (StableDiffusion, the fp16 file) and runs N generations of S steps
 * (default 3 of 20) one after another, recording each one's time, RSS and live tensor count afterwards: the
 * measured txt2img time is the median, and the three series show whether memory grows from one to the next.
 * Prints a table, or one JSON object with --json. Progress goes to stderr.
 * --controlnet, --ip-adapter [--image-encoder-config FILE]: the adapters' parts (adapters.ts) on the same UNet.
 * --lora-switch (SD 1.5): switching a rank-32 LoCon on and off in a loaded pipeline (lora.ts).
 * The sgemm peak (peak.ts): with the native kernels in use, their `linear` on a few large shapes, the best rate given
 * as "sgemm peak (kernels' best shape)" and the UNet step's effective GFLOP/s as a share of it.
 * --peers [--peer-python PATH]: then the PyTorch and ONNX Runtime peers on the same work, one after the other, and
 * the ratios ours/peer per part and against the faster peer (peers.ts).
 */
import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { basename, join } from 'node:path';
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import * as tf from '../src/backend/tf.js';
import { BACKENDS, initBackend, type BackendName } from '../src/backend/select.js';
import { wasmHeapBytes } from '../src/backend/heap.js';
import { ClipTextEncoder, SD15_CLIP } from '../src/clip/index.js';
import { SdxlTextEncoder } from '../src/clip/sdxl-text.js';
import { SD15_UNET, UNet, type UNetConfig } from '../src/unet/index.js';
import { SD15_VAE, Vae, type VaeConfig } from '../src/vae/index.js';
import { randomModelShapes, RANDOM_MODELS, type RandomModel } from '../src/cli/commands/random-weights.js';
import { ClipTokenizer } from '../src/tokenizer/index.js';
import { SafetensorsFile } from '../src/weights/safetensors.js';
import { writeRandomCheckpoint } from '../src/weights/random.js';
import { SDXL_BASE_PIPELINE, StableDiffusion, sdxlConfigFromJson, type SdxlPipelineConfig } from '../src/pipeline/pipeline.js';
import { bf16Isa, currentPrecision, kernelsProblem, PRECISIONS, trimHeap, type Precision } from '../src/backend/kernels.js';
import { SD15_PIPELINE } from '../src/pipeline/config.js';
import { formatHeapPlan, wasmHeapPlan } from '../src/pipeline/wasm-plan.js';
import { adapterRows, benchControlNet, benchIpAdapter, type ControlNetBench, type IpAdapterBench } from './adapters.js';
import { benchLoraSwitch, loraRows } from './lora.js';
import { measureSgemmPeak, shapeName } from './peak.js';
import { peerTable, runPeers, type PeersReport } from './peers.js';

/**
 * Useful FLOPs (2 x multiply-adds of the convolutions, linears and attention products; norms, activations and the
 * time embedding left out) of one UNet forward and one VAE decode, from the configs: what "GFLOP/s effective" divides.
 * They count direct convolutions, so with Winograd (native kernels) the rates shown are effective ones. SD 1.5 gives
 * 1.61e12 for a CFG step at 512x512 (batch 2) and 2.52e12 for a decode, the figures this bench used before.
 */
function unetFlop(cfg: UNetConfig, h: number, w: number, batch: number, tokens = 77): number {
  let macs = 0;
  const conv = (k: number, cin: number, cout: number, n: number) => (macs += k * k * cin * cout * n);
  const resnet = (cin: number, c: number, n: number) => {
    conv(3, cin, c, n);
    conv(3, c, c, n);
    if (cin !== c) conv(1, cin, c, n);
  };
  // proj_in/out, then per block: q,k,v,out (self) + q,out (cross) + GEGLU (c -> 8c, 4c -> c): 18 c^2 a token,
  // the scores and weighted sums of both attentions, and the cross-attention k, v of the text tokens
  const transformer = (c: number, depth: number, n: number) => {
    if (depth === 0) return;
    macs += 2 * c * c * n + depth * (18 * n * c * c + 2 * n * n * c + 2 * n * tokens * c + 2 * tokens * cfg.contextDim * c);
  };
  const ch = cfg.channelMult.map((m) => m * cfg.modelChannels);
  const levels = ch.length;
  const area = (i: number) => (h >> i) * (w >> i);
  conv(3, cfg.inChannels, cfg.modelChannels, area(0));
  const skips = [cfg.modelChannels];
  let cin = cfg.modelChannels;
  for (let i = 0; i < levels; i++) {
    for (let j = 0; j < cfg.numResBlocks; j++) {
      resnet(cin, ch[i], area(i));
      transformer(ch[i], cfg.transformerDepth[i], area(i));
      cin = ch[i];
      skips.push(cin);
    }
    if (i < levels - 1) {
      conv(3, cin, cin, area(i + 1));
      skips.push(cin);
    }
  }
  const last = levels - 1;
  resnet(cin, cin, area(last));
  transformer(cin, cfg.middleTransformerDepth, area(last));
  resnet(cin, cin, area(last));
  for (let i = last; i >= 0; i--) {
    for (let j = 0; j <= cfg.numResBlocks; j++) {
      resnet(cin + (skips.pop() ?? 0), ch[i], area(i));
      transformer(ch[i], cfg.transformerDepth[i], area(i));
      cin = ch[i];
    }
    if (i > 0) conv(3, cin, cin, area(i - 1));
  }
  conv(3, cfg.modelChannels, cfg.outChannels, area(0));
  return 2 * macs * batch;
}

function vaeDecodeFlop(cfg: VaeConfig, h: number, w: number): number {
  let macs = 0;
  let n = h * w;
  const conv = (k: number, cin: number, cout: number) => (macs += k * k * cin * cout * n);
  const resnet = (cin: number, c: number) => {
    conv(3, cin, c);
    conv(3, c, c);
    if (cin !== c) conv(1, cin, c);
  };
  const ch = cfg.chMult.map((m) => m * cfg.ch);
  let c = ch[ch.length - 1];
  conv(1, cfg.embedDim, cfg.embedDim);
  conv(3, cfg.zChannels, c);
  resnet(c, c);
  macs += 4 * c * c * n + 2 * n * n * c; // the mid block's single-head attention
  resnet(c, c);
  for (let i = ch.length - 1; i >= 0; i--) {
    for (let j = 0; j <= cfg.numResBlocks; j++) {
      resnet(c, ch[i]);
      c = ch[i];
    }
    if (i > 0) {
      n *= 4;
      conv(3, c, c);
    }
  }
  conv(3, c, cfg.outChannels);
  return 2 * macs;
}

/** What differs between the models: the networks' configs and the image size. */
interface BenchModel {
  readonly unet: UNetConfig;
  readonly vae: VaeConfig;
  /** SDXL's pipeline config (its text encoders; the UNet and VAE above are its own). */
  readonly sdxl?: SdxlPipelineConfig;
  readonly width: number;
  readonly height: number;
  /** The files whose reading is timed. */
  readonly dtypes: readonly ('fp32' | 'fp16')[];
}

function benchModel(name: RandomModel, sdxl: SdxlPipelineConfig = SDXL_BASE_PIPELINE): BenchModel {
  if (name === 'sd15') return { unet: SD15_UNET, vae: SD15_VAE, width: 512, height: 512, dtypes: ['fp32', 'fp16'] };
  return { unet: sdxl.unet, vae: sdxl.vae, sdxl, width: sdxl.width, height: sdxl.height, dtypes: ['fp16'] };
}

const args = await yargs(hideBin(process.argv))
  .option('model', { choices: RANDOM_MODELS, default: 'sd15' as RandomModel })
  .option('config', { type: 'string', describe: 'with --model sdxl: a pipeline config JSON (the fixtures\' format), e.g. a tiny one to try the bench' })
  .option('backend', { choices: BACKENDS })
  .option('precision', { choices: PRECISIONS, describe: "the native kernels' products: float32 (default) or bf16 (AMX-BF16 or AVX512-BF16 CPUs; the peers stay float32)" })
  .option('json', { type: 'boolean', default: false })
  .option('runs', { type: 'number', default: 2, describe: 'timed runs of each part after one warm-up' })
  .option('cache', { type: 'string', default: '.cache/bench' })
  .option('full', { type: 'boolean', default: false, describe: 'also run whole txt2img generations (512x512; SDXL 1024x1024) through the pipeline' })
  .option('generations', { type: 'number', default: 3, describe: 'with --full: generations in a row' })
  .option('steps', { type: 'number', default: 20, describe: 'with --full: steps per generation' })
  .option('controlnet', { type: 'boolean', default: false, describe: 'also time a UNet + ControlNet CFG step (random ControlNet for this UNet)' })
  .option('ip-adapter', { type: 'boolean', default: false, describe: 'also time the image encoder (ViT-H/14), the IP-Adapter tokens and a UNet step with them' })
  .option('lora-switch', { type: 'boolean', default: false, describe: 'SD 1.5: also time switching a random rank-32 LoCon on and off in the loaded pipeline' })
  .option('image-encoder-config', { type: 'string', describe: 'with --ip-adapter: a transformers image encoder config.json instead of ViT-H/14 (e.g. a tiny one)' })
  .option('peers', { type: 'boolean', default: false, describe: 'then time the PyTorch and ONNX Runtime peers on the same work and print ours/peer' })
  .option('peer-python', { type: 'string', describe: 'with --peers: the Python with torch, onnxruntime, onnx, numpy (default $SD_PEER_PYTHON, /tmp/peer/bin/python, python3)' })
  .strict()
  .parseAsync();

const say = (s: string) => process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${s}\n`);

let peakHeap = 0;
const sampleHeap = () => {
  peakHeap = Math.max(peakHeap, wasmHeapBytes() ?? 0);
};

/** Resets the kernel's peak-RSS mark (VmHWM), so the models' peak is not the file-reading phase's. */
function resetPeakRss(): void {
  try {
    writeFileSync('/proc/self/clear_refs', '5');
  } catch {
    // not Linux, or not allowed: the peak then covers the whole run
  }
}

function peakRssMb(): number {
  const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'));
  return m !== null ? Number(m[1]) / 1024 : process.memoryUsage().rss / 2 ** 20;
}

if (args.config !== undefined && args.model !== 'sdxl') throw new Error('--config is for --model sdxl');
if (args.loraSwitch && args.model !== 'sd15') throw new Error('--lora-switch is for --model sd15 (LoRAs are SD 1.x only)');
const sdxlConfig = args.config === undefined ? undefined : sdxlConfigFromJson(JSON.parse(readFileSync(args.config, 'utf8')) as unknown, args.config);
const model = benchModel(args.model, sdxlConfig);
const { width, height } = model;
const [lh, lw] = [height / 8, width / 8];
const latentSize = `${lh}x${lw}`;
/** The cached file's name: the model, or the config file it was made from. */
const weightsName = args.config === undefined ? args.model : `${args.model}-${basename(args.config, '.json')}`;

function ensureWeights(half: boolean): string {
  mkdirSync(args.cache, { recursive: true });
  const path = join(args.cache, `${weightsName}-random-${half ? 'fp16' : 'fp32'}.safetensors`);
  if (!existsSync(path)) {
    say(`writing ${path} (once; cached for later runs)`);
    writeRandomCheckpoint(path, randomModelShapes(args.model, model.sdxl), {
      half,
      onTensor: (d, n) => {
        if (d % 200 === 0 || d === n) say(`  ${d}/${n} tensors`);
      },
    });
  }
  return path;
}

/** Median seconds of `runs` timed calls after one warm-up; `fn` must await its result's data. */
async function time(label: string, runs: number, fn: () => Promise<void>): Promise<number> {
  say(`${label}: warm-up`);
  await fn();
  sampleHeap();
  const times: number[] = [];
  for (let i = 0; i < runs; i++) {
    const t0 = performance.now();
    await fn();
    times.push((performance.now() - t0) / 1000);
    sampleHeap();
    say(`${label}: run ${i + 1}/${runs} ${times.at(-1)?.toFixed(2)} s`);
  }
  times.sort((a, b) => a - b);
  const mid = times.length / 2;
  return Number.isInteger(mid) ? (times[mid - 1] + times[mid]) / 2 : times[Math.floor(mid)];
}

/** Reading every tensor of a file as float32 (what loading costs before the model's own layout work). */
function readAll(path: string): { seconds: number; mbPerS: number } {
  const t0 = performance.now();
  const f = SafetensorsFile.open(path);
  for (const k of f.keys()) if (f.info(k).dtype !== 'I64') f.float32(k);
  f.close();
  const seconds = (performance.now() - t0) / 1000;
  return { seconds, mbPerS: statSync(path).size / 1e6 / seconds };
}

const choice = await initBackend({ backend: args.backend as BackendName | undefined, precision: args.precision as Precision | undefined });
kernelsProblem(); // where the kernels are in use this tunes the allocator, as loading a model does before it reads
const fp32 = model.dtypes.includes('fp32') ? ensureWeights(false) : null;
const fp16 = ensureWeights(true);

say('load: reading every tensor of each file');
const readFp32 = fp32 === null ? null : readAll(fp32);
const readFp16 = readAll(fp16);

const loadPeakRss = peakRssMb();
if (typeof globalThis.gc === 'function') globalThis.gc();
resetPeakRss();

const src = SafetensorsFile.open(fp16);

const tokenizer = ClipTokenizer.fromFile('tests/fixtures/tokenizer');
const prompts = ['a lighthouse on a cliff at dawn', 'blurry'];

say('text encoder');
let t0 = performance.now();
let clipLoad: number;
let context: tf.Tensor3D;
let added: tf.Tensor2D | undefined;
let textEncode: number;
if (model.sdxl !== undefined) {
  const text = SdxlTextEncoder.load(src, tokenizer, model.sdxl.text);
  clipLoad = (performance.now() - t0) / 1000;
  const first = text.encode(prompts);
  context = first.context;
  // the pooled text and 6 x 256 Fourier features of the sizes: random here, the UNet's cost is the same
  added = tf.tidy(() => tf.concat([first.pooled, tf.randomNormal([2, model.unet.addedEmbeddingDim - first.pooled.shape[1]])], 1) as tf.Tensor2D);
  first.pooled.dispose();
  textEncode = await time('text encode (both encoders, batch 2)', args.runs, async () => {
    const y = text.encode(prompts);
    await y.context.data();
    tf.dispose([y.context, y.pooled]);
  });
  text.dispose();
} else {
  const ids = tf.tensor2d(prompts.flatMap((p) => tokenizer.encode(p)), [2, 77], 'int32');
  const clip = ClipTextEncoder.load(src, SD15_CLIP);
  clipLoad = (performance.now() - t0) / 1000;
  const encoded = clip.forward(ids);
  encoded.penultimate.dispose();
  context = encoded.hidden;
  textEncode = await time('text encode (batch 2)', args.runs, async () => {
    const y = clip.forward(ids);
    await y.hidden.data();
    tf.dispose([y.hidden, y.penultimate]);
  });
  clip.dispose();
  ids.dispose();
}

say('UNet');
t0 = performance.now();
const unet = UNet.load(src, model.unet);
const unetLoad = (performance.now() - t0) / 1000;
const unetHostBytes = unet.hostBytes;
say(`UNet weights ${unet.residency}${unet.residency === 'streamed' ? ` from ${(unetHostBytes / 1e9).toFixed(2)} GB of host memory` : ''}`);
const x = tf.randomNormal([2, lh, lw, 4]) as tf.Tensor4D;
const unetStep = await time(`UNet CFG step (batch 2, ${latentSize})`, args.runs, async () => {
  const y = unet.forward(x, [500, 500], added === undefined ? { context } : { context, added });
  await y.data();
  y.dispose();
});
let controlNetPart: ControlNetBench | null = null;
let ipAdapterPart: IpAdapterBench | null = null;
if (args.controlnet || args.ipAdapter) {
  const setup = {
    unet, x, cond: added === undefined ? { context } : { context, added }, plainStep: unetStep, cache: args.cache, modelName: weightsName,
    imageEncoderConfig: args.imageEncoderConfig, runs: args.runs, time, say,
  };
  if (args.controlnet) controlNetPart = await benchControlNet(setup);
  if (args.ipAdapter) ipAdapterPart = await benchIpAdapter(setup);
}
unet.dispose();
trimHeap(); // as the pipeline does before its decode: the UNet's pages and reused outputs back before the VAE allocates

say('VAE');
t0 = performance.now();
const vae = Vae.load(src, model.vae);
const vaeLoad = (performance.now() - t0) / 1000;
const z = tf.randomNormal([1, lh, lw, 4]) as tf.Tensor4D;
const vaeDecode = await time(`VAE decode (${latentSize} latent)`, args.runs, async () => {
  const y = vae.decode(z);
  await y.data();
  y.dispose();
});
vae.dispose();
src.close();
tf.dispose([context, x, z, ...(added === undefined ? [] : [added])]);

/** One generation after another on the whole pipeline: time, then RSS and live tensors once it is done. */
interface Generation {
  readonly seconds: number;
  readonly rss_mb: number;
  readonly tensors: number;
  readonly tensor_mb: number;
}

async function fullGenerations(): Promise<Generation[]> {
  say(`full: loading the pipeline from ${fp16}`);
  // the family from the keys; a --config's sizes from it
  const sd = await StableDiffusion.load({ weights: fp16, tokenizer: 'tests/fixtures/tokenizer', ...(sdxlConfig === undefined ? {} : { config: sdxlConfig }) });
  const out: Generation[] = [];
  try {
    for (let g = 0; g < args.generations; g++) {
      const t = performance.now();
      await sd.generate(
        { prompt: prompts[0], negativePrompt: prompts[1], seed: 1 + g, steps: args.steps, width, height },
        { onProgress: (i, n) => i % 5 === 0 && say(`full: generation ${g + 1}/${args.generations} step ${i}/${n}`) },
      );
      const m = tf.memory();
      out.push({ seconds: (performance.now() - t) / 1000, rss_mb: process.memoryUsage.rss() / 2 ** 20, tensors: m.numTensors, tensor_mb: m.numBytes / 2 ** 20 });
      sampleHeap();
      say(`full: generation ${g + 1} ${out.at(-1)?.seconds.toFixed(1)} s, RSS ${out.at(-1)?.rss_mb.toFixed(0)} MB, ${m.numTensors} tensors`);
    }
  } finally {
    sd.dispose();
  }
  return out;
}

const generations = args.full ? await fullGenerations() : [];
const measured = generations.length > 0 ? generations.map((g) => g.seconds).sort((a, b) => a - b)[generations.length >> 1] : null;

const cpu = cpus()[0]?.model ?? 'unknown';
const unetFlops = unetFlop(model.unet, lh, lw, 2);
const vaeFlops = vaeDecodeFlop(model.vae, lh, lw);
const loraPart = !args.loraSwitch ? null : await benchLoraSwitch({
  weights: fp16, modelShapes: randomModelShapes(args.model), tokenizer: 'tests/fixtures/tokenizer', cache: args.cache, modelName: weightsName,
  latent: [lh, lw], unetStepFlop: unetFlops, unetStepSeconds: unetStep, runs: args.runs, say,
});
const threads = choice.threads ?? cpus().length;
say('sgemm peak: the kernels\' linear on large shapes');
const peak = measureSgemmPeak(threads, 5, say);
const unetGflops = unetFlops / unetStep / 1e9;
let peers: PeersReport | null = null;
if (args.peers) {
  if (args.config !== undefined) say('peers: skipped (they time the full-size models, not a --config)');
  else {
    // our models are freed by now; their heap pages go back to the system, or the peers (SDXL's ONNX export needs
    // ~16 GB) would find them still held by this process
    trimHeap();
    peers = await runPeers({ model: args.model, size: width, runs: args.runs, threads, cache: args.cache, python: args.peerPython, say }, { unet: unetStep, vae: vaeDecode });
  }
}
const result = {
  model: args.model,
  config: args.config ?? null,
  width,
  height,
  backend: choice.name,
  threads,
  cpu,
  text_encode_s: textEncode,
  unet_cfg_step_s: unetStep,
  unet_cfg_step_tflop: unetFlops / 1e12,
  unet_gflops: unetGflops,
  vae_decode_s: vaeDecode,
  vae_decode_tflop: vaeFlops / 1e12,
  vae_gflops: vaeFlops / vaeDecode / 1e9,
  native_kernels: kernelsProblem() ?? 'in use',
  precision: currentPrecision(),
  bf16_isa: currentPrecision() === 'bf16' ? bf16Isa() : null,
  /** The kernels' linear at its best of a few large shapes (peak.ts); a string when not measured (why). */
  sgemm_peak: peak,
  /** The UNet step's effective GFLOP/s over the sgemm peak. */
  unet_of_sgemm_peak: typeof peak === 'string' ? null : unetGflops / peak.gflops,
  /** txt2img at the model's size (512x512 for SD 1.5, 1024x1024 for SDXL), 20 steps. */
  txt2img_20_steps_s: measured !== null && args.steps === 20 ? measured : textEncode + 20 * unetStep + vaeDecode,
  txt2img_projected: measured === null || args.steps !== 20,
  generations,
  model_load_s: { clip: clipLoad, unet: unetLoad, vae: vaeLoad },
  load_mb_per_s: readFp32?.mbPerS ?? null,
  load_fp32_s: readFp32?.seconds ?? null,
  load_fp16_mb_per_s: readFp16.mbPerS,
  load_fp16_s: readFp16.seconds,
  unet_residency: unet.residency,
  unet_host_mb: unetHostBytes / 2 ** 20,
  peak_rss_mb: peakRssMb(),
  peak_rss_reading_files_mb: loadPeakRss,
  peak_wasm_heap_mb: choice.name === 'wasm' ? peakHeap / 2 ** 20 : null,
  /** On wasm: the heap plan of a whole generation at this size, projected from the configs (src/pipeline/wasm-plan.ts). */
  wasm_heap_plan: choice.name === 'wasm' ? wasmHeapPlan(model.sdxl ?? SD15_PIPELINE, width, height) : null,
  controlnet: controlNetPart,
  ip_adapter: ipAdapterPart,
  lora_switch: loraPart,
  /** --peers: the PyTorch and ONNX Runtime peers' timings of the same parts, and ours/peer. */
  peers,
};

if (args.json) {
  process.stdout.write(JSON.stringify(result) + '\n');
} else {
  const rows: [string, string][] = [
    ['model', `${args.model === 'sdxl' ? `SDXL${args.config === undefined ? ' base' : ` (${args.config})`}` : 'SD 1.5'} (random weights), ${width}x${height}`],
    ['backend', `${result.backend} (${result.threads} threads) on ${cpu}`],
    [args.model === 'sdxl' ? 'text encode (both encoders, batch 2)' : 'text encode (batch 2)', `${textEncode.toFixed(2)} s`],
    [`UNet CFG step (batch 2, ${latentSize})`, `${unetStep.toFixed(2)} s (${result.unet_cfg_step_tflop.toFixed(2)} TFLOP, ${result.unet_gflops.toFixed(0)} GFLOP/s effective)`],
    [`VAE decode (${latentSize} latent)`, `${vaeDecode.toFixed(2)} s (${result.vae_decode_tflop.toFixed(2)} TFLOP, ${result.vae_gflops.toFixed(0)} GFLOP/s effective)`],
    ['native kernels', result.precision === 'bf16' ? `${result.native_kernels}, products in bf16 (${result.bf16_isa})` : result.native_kernels],
    [result.precision === 'bf16' ? "bf16 GEMM peak (kernels' best shape)" : "sgemm peak (kernels' best shape)", typeof peak === 'string' ? peak : `${peak.gflops.toFixed(1)} GFLOP/s (linear ${shapeName(peak.shape)}, M x K x N, ${peak.threads} threads)`],
    [result.precision === 'bf16' ? 'UNet step effective / bf16 GEMM peak' : 'UNet step effective / sgemm peak', result.unet_of_sgemm_peak === null ? 'n/a' : `${(100 * result.unet_of_sgemm_peak).toFixed(0)}%`],
    [`txt2img ${width}x${height}, 20 steps${result.txt2img_projected ? ' (projected from the parts)' : ' (measured, median)'}`, `${result.txt2img_20_steps_s.toFixed(1)} s`],
    ...generations.map((g, i): [string, string] => [
      `  generation ${i + 1} (${args.steps} steps)`,
      `${g.seconds.toFixed(1)} s; after it: RSS ${g.rss_mb.toFixed(0)} MB, ${g.tensors} tensors (${g.tensor_mb.toFixed(0)} MB)`,
    ]),
    ...(readFp32 === null ? [] : [['read fp32 file (every tensor to float32)', `${readFp32.seconds.toFixed(1)} s, ${readFp32.mbPerS.toFixed(0)} MB/s`] as [string, string]]),
    ['read fp16 file (every tensor to float32)', `${readFp16.seconds.toFixed(1)} s, ${readFp16.mbPerS.toFixed(0)} MB/s`],
    ['UNet weights', result.unet_residency === 'streamed' ? `streamed per block from ${(unetHostBytes / 1e9).toFixed(2)} GB host copy` : 'resident'],
    ['model load text / unet / vae (fp16 file)', `${clipLoad.toFixed(1)} / ${unetLoad.toFixed(1)} / ${vaeLoad.toFixed(1)} s`],
    ['peak RSS (models; reading files)', `${result.peak_rss_mb.toFixed(0)} MB; ${loadPeakRss.toFixed(0)} MB`],
  ];
  if (result.peak_wasm_heap_mb !== null) rows.push(['peak wasm heap', `${result.peak_wasm_heap_mb.toFixed(0)} MB`]);
  rows.push(...adapterRows(controlNetPart, ipAdapterPart, unetStep));
  rows.push(...loraRows(loraPart));
  if (result.wasm_heap_plan !== null) rows.push(...formatHeapPlan(result.wasm_heap_plan).map((l): [string, string] => ['wasm heap plan (projected)', l]));
  const w = Math.max(...rows.map(([k]) => k.length));
  for (const [k, v] of rows) process.stdout.write(`${k.padEnd(w)}  ${v}\n`);
  if (peers !== null) {
    process.stdout.write(`\npeers, same run, on ${cpu}:\n`);
    for (const l of peerTable(peers, { unet: `UNet CFG step (batch 2, ${latentSize})`, vae: `VAE decode (${latentSize} latent)` })) process.stdout.write(`${l}\n`);
  }
}
