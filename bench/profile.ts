/**
 * `npx tsx bench/profile.ts [--backend tensorflow] [--part unet|vae] [--top N] [--shapes N] [--cache DIR]`
 *
 * Where the time of one full-size UNet CFG step (batch 2, 64x64 latent, context [2, 77, 768]) or one VAE decode
 * (64x64 latent) goes, op by op: every kernel of the backend is wrapped in a timer (kernels run synchronously on
 * tensorflow and cpu, so wall time per call is the kernel's time), one warm-up pass runs untimed, then one timed
 * pass. Prints the top kernels by total time with their calls, share and the input shapes that cost the most.
 */
import { join } from 'node:path';
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import * as tf from '../src/backend/tf.js';
import { BACKENDS, initBackend, type BackendName } from '../src/backend/select.js';
import { setKernelTimer } from '../src/backend/kernels.js';
import { SD15_UNET, UNet } from '../src/unet/index.js';
import { SD15_VAE, Vae } from '../src/vae/index.js';
import { SafetensorsFile } from '../src/weights/safetensors.js';

const args = await yargs(hideBin(process.argv))
  .option('backend', { choices: BACKENDS, default: 'tensorflow' as BackendName })
  .option('part', { choices: ['unet', 'vae'] as const, default: 'unet' as const })
  .option('top', { type: 'number', default: 15 })
  .option('shapes', { type: 'number', default: 3, describe: 'input shapes listed under each kernel' })
  .option('cache', { type: 'string', default: '.cache/bench' })
  .strict()
  .parseAsync();

interface OpStat {
  calls: number;
  ms: number;
  byShape: Map<string, { calls: number; ms: number }>;
}

const stats = new Map<string, OpStat>();
let timing = false;

function record(name: string, shape: string, ms: number): void {
  const s = stats.get(name) ?? { calls: 0, ms: 0, byShape: new Map() };
  s.calls++;
  s.ms += ms;
  const e = s.byShape.get(shape) ?? { calls: 0, ms: 0 };
  e.calls++;
  e.ms += ms;
  s.byShape.set(shape, e);
  stats.set(name, s);
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
setKernelTimer((name, shape, ms) => timing && record(`native ${name}`, `[${shape.join(',')}]`, ms));
const src = SafetensorsFile.open(join(args.cache, 'sd15-random-fp16.safetensors'));

let run: () => Promise<void>;
let dispose: () => void;
if (args.part === 'unet') {
  const unet = UNet.load(src, SD15_UNET);
  const x = tf.randomNormal([2, 64, 64, 4]) as tf.Tensor4D;
  const context = tf.randomNormal([2, 77, 768]) as tf.Tensor3D;
  run = async () => {
    const y = unet.forward(x, [500, 500], { context });
    await y.data();
    y.dispose();
  };
  dispose = () => (unet.dispose(), tf.dispose([x, context]));
} else {
  const vae = Vae.load(src, SD15_VAE);
  const z = tf.randomNormal([1, 64, 64, 4]) as tf.Tensor4D;
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
out.write(`${args.part} on ${choice.name}: wall ${(wall / 1000).toFixed(2)} s, kernels ${(total / 1000).toFixed(2)} s\n`);
const ranked = [...stats.entries()].sort((a, b) => b[1].ms - a[1].ms).slice(0, args.top);
for (const [name, s] of ranked) {
  out.write(`${name.padEnd(22)} ${(s.ms / 1000).toFixed(3).padStart(7)} s ${((100 * s.ms) / wall).toFixed(1).padStart(5)}%  ${String(s.calls).padStart(5)} calls\n`);
  const shapes = [...s.byShape.entries()].sort((a, b) => b[1].ms - a[1].ms).slice(0, args.shapes);
  for (const [shape, e] of shapes) out.write(`    ${(e.ms / 1000).toFixed(3)} s  ${e.calls}x ${shape}\n`);
}
