/**
 * `npm run bench -- [--backend tensorflow|wasm|cpu] [--json] [--runs N] [--cache DIR] [--full [--generations N] [--steps S]]`
 *
 * Full-size SD 1.5 on random weights (generated once by `sd random-weights`, cached in DIR): load time of each file
 * format, text encoding, one UNet CFG step (batch 2, 64x64 latent), one VAE decode (64x64 latent -> 512x512), and a
 * whole 512x512 txt2img at 20 steps (projected from the parts unless --full), peak RSS, and the wasm heap.
 * --full then loads the whole pipeline (StableDiffusion, the fp16 file) and runs N generations of S steps
 * (default 3 of 20) one after another, recording each one's time, RSS and live tensor count afterwards: the
 * measured txt2img time is the median, and the three series show whether memory grows from one to the next.
 * Prints a table, or one JSON object with --json. Progress goes to stderr.
 */
import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { join } from 'node:path';
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import * as tf from '../src/backend/tf.js';
import { BACKENDS, initBackend, type BackendName } from '../src/backend/select.js';
import { wasmHeapBytes } from '../src/backend/heap.js';
import { ClipTextEncoder, SD15_CLIP } from '../src/clip/index.js';
import { SD15_UNET, UNet } from '../src/unet/index.js';
import { SD15_VAE, Vae } from '../src/vae/index.js';
import { sd15Shapes } from '../src/pipeline/shapes.js';
import { SafetensorsFile } from '../src/weights/safetensors.js';
import { writeRandomCheckpoint } from '../src/weights/random.js';
import { StableDiffusion } from '../src/pipeline/pipeline.js';
import { kernelsProblem } from '../src/backend/kernels.js';

/**
 * Useful FLOPs (multiply-adds x 2) of the measured work, SD 1.5 at 512x512: see the issue's ceiling figures. They
 * count direct convolutions, so with Winograd (native kernels) the GFLOP/s shown are effective rates.
 */
const UNET_CFG_STEP_FLOP = 1.61e12;
const VAE_DECODE_FLOP = 2.52e12;

const args = await yargs(hideBin(process.argv))
  .option('backend', { choices: BACKENDS })
  .option('json', { type: 'boolean', default: false })
  .option('runs', { type: 'number', default: 2, describe: 'timed runs of each part after one warm-up' })
  .option('cache', { type: 'string', default: '.cache/bench' })
  .option('full', { type: 'boolean', default: false, describe: 'also run whole 512x512 txt2img generations through the pipeline' })
  .option('generations', { type: 'number', default: 3, describe: 'with --full: generations in a row' })
  .option('steps', { type: 'number', default: 20, describe: 'with --full: steps per generation' })
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

function ensureWeights(half: boolean): string {
  mkdirSync(args.cache, { recursive: true });
  const path = join(args.cache, `sd15-random-${half ? 'fp16' : 'fp32'}.safetensors`);
  if (!existsSync(path)) {
    say(`writing ${path} (once; cached for later runs)`);
    writeRandomCheckpoint(path, sd15Shapes(), {
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

const choice = await initBackend({ backend: args.backend as BackendName | undefined });
const fp32 = ensureWeights(false);
const fp16 = ensureWeights(true);

say('load: reading every tensor of each file');
const readFp32 = readAll(fp32);
const readFp16 = readAll(fp16);

const loadPeakRss = peakRssMb();
if (typeof globalThis.gc === 'function') globalThis.gc();
resetPeakRss();

const src = SafetensorsFile.open(fp16);
const ids = tf.tensor2d([...Array(2)].flatMap(() => [49406, 320, 1125, 49407, ...Array(73).fill(49407)]), [2, 77], 'int32');

say('text encoder');
let t0 = performance.now();
const clip = ClipTextEncoder.load(src, SD15_CLIP);
const clipLoad = (performance.now() - t0) / 1000;
const encoded = clip.forward(ids);
encoded.penultimate.dispose();
const context = encoded.hidden;
const textEncode = await time('text encode (batch 2)', args.runs, async () => {
  const y = clip.forward(ids);
  await y.hidden.data();
  tf.dispose([y.hidden, y.penultimate]);
});
clip.dispose();

say('UNet');
t0 = performance.now();
const unet = UNet.load(src, SD15_UNET);
const unetLoad = (performance.now() - t0) / 1000;
const unetHostBytes = unet.hostBytes;
say(`UNet weights ${unet.residency}${unet.residency === 'streamed' ? ` from ${(unetHostBytes / 1e9).toFixed(2)} GB of host memory` : ''}`);
const x = tf.randomNormal([2, 64, 64, 4]) as tf.Tensor4D;
const unetStep = await time('UNet CFG step (batch 2, 64x64)', args.runs, async () => {
  const y = unet.forward(x, [500, 500], { context });
  await y.data();
  y.dispose();
});
unet.dispose();

say('VAE');
t0 = performance.now();
const vae = Vae.load(src, SD15_VAE);
const vaeLoad = (performance.now() - t0) / 1000;
const z = tf.randomNormal([1, 64, 64, 4]) as tf.Tensor4D;
const vaeDecode = await time('VAE decode (64x64 latent)', args.runs, async () => {
  const y = vae.decode(z);
  await y.data();
  y.dispose();
});
vae.dispose();
src.close();
tf.dispose([ids, context, x, z]);

/** One generation after another on the whole pipeline: time, then RSS and live tensors once it is done. */
interface Generation {
  readonly seconds: number;
  readonly rss_mb: number;
  readonly tensors: number;
  readonly tensor_mb: number;
}

async function fullGenerations(): Promise<Generation[]> {
  say(`full: loading the pipeline from ${fp16}`);
  const sd = await StableDiffusion.load({ weights: fp16, tokenizer: 'tests/fixtures/tokenizer' });
  const out: Generation[] = [];
  try {
    for (let g = 0; g < args.generations; g++) {
      const t = performance.now();
      await sd.generate(
        { prompt: 'a lighthouse on a cliff at dawn', negativePrompt: 'blurry', seed: 1 + g, steps: args.steps, width: 512, height: 512 },
        { onProgress: (i, n) => i % 5 === 0 && say(`full: generation ${g + 1}/${args.generations} step ${i}/${n}`) },
      );
      const m = tf.memory();
      out.push({ seconds: (performance.now() - t) / 1000, rss_mb: process.memoryUsage.rss() / 2 ** 20, tensors: m.numTensors, tensor_mb: m.numBytes / 2 ** 20 });
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
const result = {
  backend: choice.name,
  threads: choice.threads ?? cpus().length,
  cpu,
  text_encode_s: textEncode,
  unet_cfg_step_s: unetStep,
  unet_gflops: UNET_CFG_STEP_FLOP / unetStep / 1e9,
  vae_decode_s: vaeDecode,
  vae_gflops: VAE_DECODE_FLOP / vaeDecode / 1e9,
  native_kernels: kernelsProblem() ?? 'in use',
  txt2img_512_20_steps_s: measured !== null && args.steps === 20 ? measured : textEncode + 20 * unetStep + vaeDecode,
  txt2img_projected: measured === null || args.steps !== 20,
  generations,
  model_load_s: { clip: clipLoad, unet: unetLoad, vae: vaeLoad },
  load_mb_per_s: readFp32.mbPerS,
  load_fp32_s: readFp32.seconds,
  load_fp16_mb_per_s: readFp16.mbPerS,
  load_fp16_s: readFp16.seconds,
  unet_residency: unet.residency,
  unet_host_mb: unetHostBytes / 2 ** 20,
  peak_rss_mb: peakRssMb(),
  peak_rss_reading_files_mb: loadPeakRss,
  peak_wasm_heap_mb: choice.name === 'wasm' ? peakHeap / 2 ** 20 : null,
};

if (args.json) {
  process.stdout.write(JSON.stringify(result) + '\n');
} else {
  const rows: [string, string][] = [
    ['backend', `${result.backend} (${result.threads} threads) on ${cpu}`],
    ['text encode (batch 2)', `${textEncode.toFixed(2)} s`],
    ['UNet CFG step (batch 2, 64x64)', `${unetStep.toFixed(2)} s (${result.unet_gflops.toFixed(0)} GFLOP/s effective)`],
    ['VAE decode (64x64 latent)', `${vaeDecode.toFixed(2)} s (${result.vae_gflops.toFixed(0)} GFLOP/s effective)`],
    ['native kernels', result.native_kernels],
    [`txt2img 512x512, 20 steps${result.txt2img_projected ? ' (projected)' : ' (measured, median)'}`, `${result.txt2img_512_20_steps_s.toFixed(1)} s`],
    ...generations.map((g, i): [string, string] => [
      `  generation ${i + 1} (${args.steps} steps)`,
      `${g.seconds.toFixed(1)} s; after it: RSS ${g.rss_mb.toFixed(0)} MB, ${g.tensors} tensors (${g.tensor_mb.toFixed(0)} MB)`,
    ]),
    ['read fp32 file (every tensor to float32)', `${readFp32.seconds.toFixed(1)} s, ${readFp32.mbPerS.toFixed(0)} MB/s`],
    ['read fp16 file (every tensor to float32)', `${readFp16.seconds.toFixed(1)} s, ${readFp16.mbPerS.toFixed(0)} MB/s`],
    ['UNet weights', result.unet_residency === 'streamed' ? `streamed per block from ${(unetHostBytes / 1e9).toFixed(2)} GB host copy` : 'resident'],
    ['model load clip / unet / vae (fp16 file)', `${clipLoad.toFixed(1)} / ${unetLoad.toFixed(1)} / ${vaeLoad.toFixed(1)} s`],
    ['peak RSS (models; reading files)', `${result.peak_rss_mb.toFixed(0)} MB; ${loadPeakRss.toFixed(0)} MB`],
  ];
  if (result.peak_wasm_heap_mb !== null) rows.push(['peak wasm heap', `${result.peak_wasm_heap_mb.toFixed(0)} MB`]);
  const w = Math.max(...rows.map(([k]) => k.length));
  for (const [k, v] of rows) process.stdout.write(`${k.padEnd(w)}  ${v}\n`);
}
