/**
 * `npm run bench:precision -- [--model sd15|sdxl] [--steps N] [--seed S] [--cache DIR] [--json]`
 *
 * What `--precision bf16` buys and costs: the same txt2img (full-size random weights from the bench cache, fp16 file,
 * 512x512 for SD 1.5, 1024x1024 for SDXL, Euler, the given seed) generated in float32 and then in bf16 in one
 * process, each with its model loaded for that precision. Prints each generation's time, the speed-up, and the
 * bf16 image's PSNR (dB, peak 255) and largest difference against the float32 one. Needs the tensorflow backend
 * with the native kernels on a CPU with AMX-BF16 or AVX512-BF16 (it says so and exits 1 elsewhere). The README's figure comes from
 * here; the target is a PSNR of at least 40 dB.
 */
import { existsSync } from 'node:fs';
import { cpus } from 'node:os';
import { join } from 'node:path';
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { initBackend } from '../src/backend/select.js';
import { bf16Isa, bf16Problem, setPrecision, type Precision } from '../src/backend/kernels.js';
import { StableDiffusion } from '../src/pipeline/pipeline.js';

const args = yargs(hideBin(process.argv))
  .option('model', { choices: ['sd15', 'sdxl'] as const, default: 'sd15' as const })
  .option('steps', { type: 'number', default: 20 })
  .option('seed', { type: 'number', default: 42 })
  .option('cache', { type: 'string', default: '.cache/bench' })
  .option('json', { type: 'boolean', default: false })
  .strict()
  .parseSync();

const say = (line: string): void => void process.stderr.write(`[precision ${new Date().toISOString().slice(11, 19)}] ${line}\n`);

await initBackend({ backend: 'tensorflow' });
const why = bf16Problem();
if (why !== null) {
  process.stderr.write(`bench:precision needs the bf16 product: ${why}\n`);
  process.exit(1);
}
const weights = join(args.cache, `${args.model === 'sd15' ? 'sd15' : 'sdxl'}-random-fp16.safetensors`);
if (!existsSync(weights)) {
  process.stderr.write(`${weights} is missing: \`npm run bench -- --model ${args.model}\` writes it once\n`);
  process.exit(1);
}
const size = args.model === 'sd15' ? 512 : 1024;

interface Run {
  readonly seconds: number;
  readonly rgb: Uint8Array;
}

async function generate(precision: Precision): Promise<Run> {
  setPrecision(precision);
  say(`${precision}: loading ${weights}`);
  const sd = await StableDiffusion.load({ weights, tokenizer: 'tests/fixtures/tokenizer' });
  try {
    const t = performance.now();
    const r = await sd.generate(
      { prompt: 'a botanical illustration of a fern, ink and watercolour', seed: args.seed, steps: args.steps, width: size, height: size, sampler: 'euler' },
      { onProgress: (i, n) => i % 5 === 0 && say(`${precision}: step ${i}/${n}`) },
    );
    return { seconds: (performance.now() - t) / 1000, rgb: r.images[0].rgb };
  } finally {
    sd.dispose();
  }
}

/** PSNR (dB, peak 255) and the largest difference in 8-bit levels. */
function compare(a: Uint8Array, b: Uint8Array): { psnr: number; maxLevels: number } {
  let se = 0;
  let max = 0;
  for (let i = 0; i < a.length; i++) {
    const d = a[i] - b[i];
    se += d * d;
    max = Math.max(max, Math.abs(d));
  }
  const mse = se / a.length;
  return { psnr: mse === 0 ? Infinity : 10 * Math.log10((255 * 255) / mse), maxLevels: max };
}

const float32 = await generate('float32');
const bf16 = await generate('bf16');
setPrecision('float32');
const { psnr, maxLevels } = compare(bf16.rgb, float32.rgb);
const result = {
  model: args.model, size, steps: args.steps, seed: args.seed, cpu: cpus()[0]?.model ?? 'unknown',
  float32_s: float32.seconds, bf16_s: bf16.seconds, speedup: float32.seconds / bf16.seconds, psnr_db: psnr, max_levels: maxLevels,
};
if (args.json) process.stdout.write(JSON.stringify(result) + '\n');
else {
  const rows: [string, string][] = [
    ['txt2img', `${args.model}, ${size}x${size}, ${args.steps} Euler steps, seed ${args.seed}, on ${result.cpu}`],
    ['float32', `${float32.seconds.toFixed(1)} s`],
    [`bf16 (${bf16Isa()})`, `${bf16.seconds.toFixed(1)} s (${result.speedup.toFixed(2)}x faster)`],
    ['bf16 image vs float32', `PSNR ${psnr.toFixed(1)} dB, max |diff| ${maxLevels} levels`],
  ];
  for (const [k, v] of rows) process.stdout.write(`${k.padEnd(24)}${v}\n`);
}
