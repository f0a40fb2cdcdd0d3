/**
 * The LoRA part of `npm run bench` (bench.ts's --lora-switch): what switching a LoRA costs a server that keeps one
 * SD 1.5 in memory (src/pipeline/lora-switch.ts), on full-size random weights.
 *
 * The LoRA is a random kohya LoCon for the model (src/lora/random.ts: every attention, feed-forward and ResNet
 * module of the UNet, the text encoder's attention and MLP), rank 32, fp16, written once into the bench cache. The
 * pipeline is loaded from the model's fp16 file, then `runs` times (after one warm-up): the switch on (merging each
 * module, reloading the layers it changes) and the switch off (the base layers put back), each timed, with RSS after
 * each. Reported as medians. The switch keeps the last set's file read, so only the warm-up reads it; reading it is
 * timed on its own (what a switch to a LoRA not used just before adds).
 *
 * The unmerged form (W x + m * s * up(down(x)) in every layer, the alternative lora-switch.ts decided against) is
 * not implemented in the models; its cost per UNet CFG step is given two ways: the multiply-adds it adds, from the
 * LoRA's shapes and each module's positions at this latent size, against the plain step's; and the time of those
 * extra products themselves, every UNet module's down then up on random inputs of its size (batch 2), on this
 * backend's TensorFlow.js ops (median of `runs`): what the unmerged form would add to each step at least.
 */
import { existsSync, mkdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import * as tf from '../src/backend/tf.js';
import { readLora, type LoraModule, type LoraSpec } from '../src/lora/index.js';
import { writeRandomLora } from '../src/lora/random.js';
import { StableDiffusion, type PipelineConfig } from '../src/pipeline/pipeline.js';

export interface LoraSwitchSetup {
  /** The model's checkpoint (bench.ts: the fp16 file) and its keys' shapes (what the LoRA is made for). */
  readonly weights: string;
  readonly modelShapes: ReadonlyMap<string, readonly number[]>;
  readonly config?: PipelineConfig;
  readonly tokenizer: string;
  readonly cache: string;
  /** The cached model's name: the LoRA file is named after it. */
  readonly modelName: string;
  /** Latent size of a step, and the plain UNet CFG step (its FLOPs and seconds) to set the unmerged cost against. */
  readonly latent: readonly [number, number];
  readonly unetStepFlop: number;
  readonly unetStepSeconds: number;
  readonly rank?: number;
  readonly runs: number;
  readonly say: (s: string) => void;
}

export interface LoraSwitchBench {
  readonly lora_modules: number;
  readonly lora_rank: number;
  readonly lora_file_mb: number;
  /** Reading the file alone (added to a switch on to a LoRA other than the last one). */
  readonly read_s: number;
  readonly switch_on_s: number;
  readonly switch_off_s: number;
  readonly rss_base_mb: number;
  readonly rss_on_mb: number;
  /** What the unmerged form would add to each UNet CFG step (batch 2), and that as a share of the step's FLOPs. */
  readonly unmerged_extra_tflop_per_step: number;
  readonly unmerged_extra_share: number;
  /** The share times the measured step. */
  readonly unmerged_step_cost_min_s: number;
  /** The extra products of one CFG step, timed: every UNet module's down then up at its size. */
  readonly unmerged_extra_products_s: number;
}

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 === 1 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
};

const rssMb = () => process.memoryUsage.rss() / 2 ** 20;

/** The latent level a kohya UNet module runs at (0 = full latent size), or null for a text-encoder module. */
function levelOf(id: string): number | null {
  const down = /^lora_unet_down_blocks_(\d+)_/.exec(id);
  if (down !== null) return Number(down[1]) + (id.includes('_downsamplers_') ? 1 : 0);
  const up = /^lora_unet_up_blocks_(\d+)_/.exec(id);
  if (up !== null) return 3 - Number(up[1]) - (id.includes('_upsamplers_') ? 1 : 0);
  return id.startsWith('lora_unet_mid_block_') ? 3 : null;
}

/** Multiply-adds the unmerged form adds to one UNet forward of batch `batch`: r (in*kh*kw + out) per position. */
function unmergedMacs(shapes: ReadonlyMap<string, readonly number[]>, [h, w]: readonly [number, number], batch: number, tokens = 77): number {
  let macs = 0;
  for (const [key, down] of shapes) {
    if (!key.endsWith('.lora_down.weight')) continue;
    const id = key.slice(0, -'.lora_down.weight'.length);
    const level = levelOf(id);
    if (level === null) continue; // the text encoder runs once a request, not once a step
    const up = shapes.get(`${id}.lora_up.weight`) ?? [];
    const positions = /attn2_to_[kv]$/.test(id) ? tokens : (h >> level) * (w >> level);
    macs += positions * down[0] * (down.slice(1).reduce((a, d) => a * d, 1) + up[0]);
  }
  return macs * batch;
}

/**
 * Runs the unmerged form's extra work of one UNet forward (batch `batch`): for each UNet module, its input at its
 * size through down (a matMul, or the conv of its kernel) and up (a matMul), as an unmerged layer would.
 */
function unmergedProducts(modules: readonly LoraModule[], [h, w]: readonly [number, number], batch: number, tokens = 77): { run: () => Promise<void>; dispose: () => void } {
  const parts = modules.flatMap((m) => {
    const level = levelOf(m.id);
    if (level === null) return [];
    const [r, cin, kh = 1] = m.down.shape;
    const out = m.up.shape[0];
    const up = tf.tidy(() => tf.transpose(tf.tensor2d(m.up.data, [out, r]))); // [r, out]
    const cross = /attn2_to_[kv]$/.test(m.id);
    const [ph, pw] = cross ? [1, tokens] : [h >> level, w >> level];
    const down = tf.tidy(() => m.down.shape.length === 4
      ? tf.transpose(tf.tensor4d(m.down.data, [r, cin, kh, kh]), [2, 3, 1, 0]) // HWIO
      : tf.transpose(tf.tensor2d(m.down.data, [r, cin]))); // [in, r]
    return [{ down, up, shape: [batch, ph, pw, cin] as [number, number, number, number] }];
  });
  const run = async () => {
    for (const { down, up, shape } of parts) {
      const y = tf.tidy(() => {
        const x = tf.randomNormal(shape);
        const d = down.rank === 4 ? tf.conv2d(x as tf.Tensor4D, down as tf.Tensor4D, 1, 'same') : tf.matMul(tf.reshape(x, [-1, shape[3]]) as tf.Tensor2D, down as tf.Tensor2D);
        return tf.matMul(tf.reshape(d, [-1, d.shape[d.rank - 1]]) as tf.Tensor2D, up);
      });
      await y.data();
      y.dispose();
    }
  };
  return { run, dispose: () => tf.dispose(parts.flatMap((p) => [p.down, p.up])) };
}

export async function benchLoraSwitch(o: LoraSwitchSetup): Promise<LoraSwitchBench> {
  const rank = o.rank ?? 32;
  mkdirSync(o.cache, { recursive: true });
  const path = join(o.cache, `${o.modelName}-lora-r${rank}-fp16.safetensors`);
  if (!existsSync(path)) {
    o.say(`lora: writing ${path} (once; cached for later runs)`);
    writeRandomLora(path, o.modelShapes, { rank, half: true });
  }
  let t = performance.now();
  const lora = readLora(path);
  const readS = (performance.now() - t) / 1000;
  const modules = lora.modules.length;
  const shapes = new Map(lora.modules.flatMap((m) => [[`${m.id}.lora_down.weight`, m.down.shape], [`${m.id}.lora_up.weight`, m.up.shape]] as const));
  o.say(`lora: ${modules} modules, read in ${readS.toFixed(2)} s; loading the pipeline from ${o.weights}`);
  const sd = await StableDiffusion.load({ weights: o.weights, tokenizer: o.tokenizer, ...(o.config === undefined ? {} : { config: o.config }) });
  const spec: LoraSpec[] = [{ path, te: 1, unet: 1 }];
  const on: number[] = [];
  const off: number[] = [];
  const rssBase = rssMb();
  let rssOn = rssBase;
  try {
    for (let i = 0; i <= o.runs; i++) {
      t = performance.now();
      sd.loras.use(spec)();
      const onS = (performance.now() - t) / 1000;
      rssOn = Math.max(rssOn, rssMb());
      t = performance.now();
      sd.loras.use([])();
      const offS = (performance.now() - t) / 1000;
      o.say(`lora: ${i === 0 ? 'warm-up' : `run ${i}/${o.runs}`}: on ${onS.toFixed(2)} s, off ${offS.toFixed(3)} s`);
      if (i === 0 && o.runs > 0) continue;
      on.push(onS);
      off.push(offS);
    }
  } finally {
    sd.dispose();
  }
  o.say('lora: the unmerged form\'s extra products of one CFG step');
  const products = unmergedProducts(lora.modules, o.latent, 2);
  const productTimes: number[] = [];
  try {
    for (let i = 0; i <= o.runs; i++) {
      t = performance.now();
      await products.run();
      if (i > 0 || o.runs === 0) productTimes.push((performance.now() - t) / 1000);
    }
  } finally {
    products.dispose();
  }
  const extra = 2 * unmergedMacs(shapes, o.latent, 2);
  const share = extra / o.unetStepFlop;
  return {
    lora_modules: modules,
    lora_rank: rank,
    lora_file_mb: statSync(path).size / 1e6,
    read_s: readS,
    switch_on_s: median(on),
    switch_off_s: median(off),
    rss_base_mb: rssBase,
    rss_on_mb: rssOn,
    unmerged_extra_tflop_per_step: extra / 1e12,
    unmerged_extra_share: share,
    unmerged_step_cost_min_s: share * o.unetStepSeconds,
    unmerged_extra_products_s: median(productTimes),
  };
}

/** The table rows of the part. */
export function loraRows(b: LoraSwitchBench | null): [string, string][] {
  if (b === null) return [];
  return [
    [`LoRA switch on (rank ${b.lora_rank} LoCon, ${b.lora_modules} modules, ${b.lora_file_mb.toFixed(0)} MB fp16)`, `${b.switch_on_s.toFixed(2)} s (+ ${b.read_s.toFixed(2)} s to read a file not used just before); RSS ${b.rss_base_mb.toFixed(0)} -> ${b.rss_on_mb.toFixed(0)} MB`],
    ['LoRA switch off (base weights back)', `${b.switch_off_s.toFixed(3)} s`],
    ['unmerged LoRA instead (not used), per CFG step', `+${b.unmerged_extra_tflop_per_step.toFixed(3)} TFLOP (${(100 * b.unmerged_extra_share).toFixed(1)}% of the step, ${b.unmerged_step_cost_min_s.toFixed(2)} s at its rate); the products alone took ${b.unmerged_extra_products_s.toFixed(2)} s`],
  ];
}
