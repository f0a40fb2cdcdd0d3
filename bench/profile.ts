/**
 * `npx tsx bench/profile.ts [--model sd15|sdxl] [--backend tensorflow] [--part unet|vae] [--top N] [--shapes N] [--cache DIR]`
 *
 * Where the time of one full-size UNet CFG step (batch 2; SD 1.5: 64x64 latent, context [2, 77, 768]; SDXL base:
 * 128x128, [2, 77, 2048] and the added embedding) or one VAE decode (one latent of that size) goes, op by op: every
 * kernel of the backend is wrapped in a timer (kernels run synchronously on tensorflow and cpu, so wall time per call
 * is the kernel's time), one warm-up pass runs untimed, then one timed pass. Prints the top kernels by total time with
 * their calls, share and the input shapes that cost the most, and for the native kernels' products their GFLOP/s
 * (a Winograd conv's counted as the direct conv's multiply-adds). The model's fp16 random weights come from
 * `npm run bench -- --model MODEL` (cached in DIR).
 */
import { join } from 'node:path';
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import * as tf from '../src/backend/tf.js';
import { BACKENDS, initBackend, type BackendName } from '../src/backend/select.js';
import { setKernelTimer } from '../src/backend/kernels.js';
import { SD15_UNET, UNet } from '../src/unet/index.js';
import { SD15_VAE, Vae } from '../src/vae/index.js';
import { SDXL_BASE_PIPELINE } from '../src/pipeline/pipeline.js';
import { SafetensorsFile } from '../src/weights/safetensors.js';

const args = await yargs(hideBin(process.argv))
  .option('model', { choices: ['sd15', 'sdxl'] as const, default: 'sd15' as const })
  .option('backend', { choices: BACKENDS, default: 'tensorflow' as BackendName })
  .option('part', { choices: ['unet', 'vae'] as const, default: 'unet' as const })
  .option('top', { type: 'number', default: 15 })
  .option('shapes', { type: 'number', default: 3, describe: 'input shapes listed under each kernel' })
  .option('cache', { type: 'string', default: '.cache/bench' })
  .strict()
  .parseAsync();

interface Cost {
  calls: number;
  ms: number;
  /** FLOPs of the calls that reported them (the native kernels' products). */
  flops: number;
}

interface OpStat extends Cost {
  byShape: Map<string, Cost>;
}

const stats = new Map<string, OpStat>();
let timing = false;

function record(name: string, shape: string, ms: number, flops = 0): void {
  const s = stats.get(name) ?? { calls: 0, ms: 0, flops: 0, byShape: new Map() };
  const e = s.byShape.get(shape) ?? { calls: 0, ms: 0, flops: 0 };
  for (const c of [s, e]) {
    c.calls++;
    c.ms += ms;
    c.flops += flops;
  }
  s.byShape.set(shape, e);
  stats.set(name, s);
}

/** "  312 GFLOP/s" where the calls reported their FLOPs, else "". */
function rate(c: Cost): string {
  return c.flops > 0 ? `  ${(c.flops / c.ms / 1e6).toFixed(0).padStart(4)} GFLOP/s` : '';
}

/** Re-registers every kernel of `backend` behind a timer that adds to `stats` while `timing` is on. */
function instrumentKernels(backend: string): void {
  for (const k of tf.getKernelsForBackend(backend)) {
    const inner = k.kernelFunc;
    tf.unregisterKernel(k.kernelName, backend);
    tf.registerKernel({
      ...k,
      kernelFunc: (a) => {
        if (!timing) return inner(a);
        const t0 = performance.now();
        const out = inner(a);
        const shape = Object.values(a.inputs).filter((t) => t !== undefined).map((t) => `[${(t as tf.TensorInfo).shape.join(",")}]`).join(' ');
        record(k.kernelName, shape, performance.now() - t0);
        return out;
      },
    });
  }
}

const choice = await initBackend({ backend: args.backend });
instrumentKernels(choice.name);
// The native kernels (src/backend/kernels.ts) run outside tfjs's registry: listed with a "native " prefix.
setKernelTimer((name, shape, ms, flops) => timing && record(`native ${name}`, `[${shape.join(',')}]`, ms, flops));
const src = SafetensorsFile.open(join(args.cache, `${args.model}-random-fp16.safetensors`));
const sdxl = args.model === 'sdxl' ? SDXL_BASE_PIPELINE : null;
const [unetConfig, vaeConfig] = sdxl === null ? [SD15_UNET, SD15_VAE] : [sdxl.unet, sdxl.vae];
const latent = sdxl === null ? 64 : sdxl.height / 8;

let run: () => Promise<void>;
let dispose: () => void;
if (args.part === 'unet') {
  const unet = UNet.load(src, unetConfig);
  const x = tf.randomNormal([2, latent, latent, 4]) as tf.Tensor4D;
  const context = tf.randomNormal([2, 77, unetConfig.contextDim]) as tf.Tensor3D;
  // SDXL's added embedding (pooled text and the size features): random, the UNet's cost is the same
  const added = unetConfig.addedEmbeddingDim > 0 ? (tf.randomNormal([2, unetConfig.addedEmbeddingDim]) as tf.Tensor2D) : undefined;
  run = async () => {
    const y = unet.forward(x, [500, 500], added === undefined ? { context } : { context, added });
    await y.data();
    y.dispose();
  };
  dispose = () => (unet.dispose(), tf.dispose([x, context, ...(added === undefined ? [] : [added])]));
} else {
  const vae = Vae.load(src, vaeConfig);
  const z = tf.randomNormal([1, latent, latent, 4]) as tf.Tensor4D;
  run = async () => {
    const y = vae.decode(z);
    await y.data();
    y.dispose();
  };
  dispose = () => (vae.dispose(), z.dispose());
}
src.close();

await run(); // warm-up
timing = true;
const t0 = performance.now();
await run();
const wall = performance.now() - t0;
timing = false;
dispose();

const total = [...stats.values()].reduce((a, s) => a + s.ms, 0);
const out = process.stdout;
out.write(`${args.model} ${args.part} on ${choice.name}: wall ${(wall / 1000).toFixed(2)} s, kernels ${(total / 1000).toFixed(2)} s\n`);
const ranked = [...stats.entries()].sort((a, b) => b[1].ms - a[1].ms).slice(0, args.top);
for (const [name, s] of ranked) {
  out.write(`${name.padEnd(22)} ${(s.ms / 1000).toFixed(3).padStart(7)} s ${((100 * s.ms) / wall).toFixed(1).padStart(5)}%  ${String(s.calls).padStart(5)} calls${rate(s)}\n`);
  const shapes = [...s.byShape.entries()].sort((a, b) => b[1].ms - a[1].ms).slice(0, args.shapes);
  for (const [shape, e] of shapes) out.write(`    ${(e.ms / 1000).toFixed(3)} s  ${e.calls}x ${shape}${rate(e)}\n`);
}
