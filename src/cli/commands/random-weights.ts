/**
 * `sd random-weights --out FILE [--model sd15|sdxl] [--half] [--config FILE] [--seed N]`: a full-size checkpoint of
 * random weights in the original single-file layout, for memory and speed tests where real weights cannot be had.
 * The keys and shapes are what the loaders read (each network's expectedShapes probe): SD 1.5, or SDXL base
 * (sd_xl_base_1.0.safetensors: both text encoders, the 2,567,463,684-parameter UNet, the VAE). `--config` takes an
 * SDXL pipeline config in the fixtures' JSON format (sdxlConfigFromJson) instead of SDXL base's, e.g. a tiny one.
 * Adapters (random-adapters.ts): `--model controlnet-sd15 | ip-adapter-sd15 | ip-adapter-plus-sd15` write one
 * .safetensors file in tencent's / lllyasviel's layout, `--model clip-vision-h` the image_encoder/ folder OUT.
 * `--model lora-sd15 [--rank 32]`: a kohya LoCon for SD 1.5 (src/lora/random.ts), text encoder and UNet.
 */
import type { CommandModule } from 'yargs';
import { existsSync, readFileSync } from 'node:fs';
import { currentBackend, initBackend } from '../../backend/select.js';
import { sdxlTextShapes } from '../../clip/sdxl-text.js';
import { SDXL_BASE_PIPELINE, sdxlConfigFromJson, type SdxlPipelineConfig } from '../../pipeline/pipeline.js';
import { sd15Shapes } from '../../pipeline/shapes.js';
import { expectedShapes as unetShapes } from '../../unet/index.js';
import { expectedShapes as vaeShapes } from '../../vae/index.js';
import { writeRandomCheckpoint } from '../../weights/random.js';
import { UsageError } from '../errors.js';
import { ADAPTER_MODELS, isAdapterModel, writeRandomAdapter, type AdapterModel } from '../random-adapters.js';
import { ProgressBar } from '../progress.js';
import { writeRandomLora } from '../../lora/random.js';

/** LoRAs for a model of RANDOM_MODELS. */
export const LORA_MODELS = ['lora-sd15'] as const;
type LoraModel = (typeof LORA_MODELS)[number];

export const RANDOM_MODELS = ['sd15', 'sdxl'] as const;
export type RandomModel = (typeof RANDOM_MODELS)[number];

/** Every key an SDXL single file holds for its networks (non-weights left out), with its PyTorch shape. */
export function sdxlShapes(cfg: SdxlPipelineConfig = SDXL_BASE_PIPELINE): Map<string, number[]> {
  return new Map([...sdxlTextShapes(cfg.text), ...unetShapes(cfg.unet), ...vaeShapes(cfg.vae)]);
}

/** The tensors `sd random-weights --model` writes. */
export const randomModelShapes = (model: RandomModel, sdxl?: SdxlPipelineConfig): Map<string, number[]> =>
  model === 'sdxl' ? sdxlShapes(sdxl) : sd15Shapes();

interface Args {
  out: string;
  model: RandomModel | AdapterModel | LoraModel;
  rank: number;
  config?: string;
  half: boolean;
  seed: number;
  force: boolean;
}

export const randomWeightsCommand: CommandModule<object, Args> = {
  command: 'random-weights',
  describe: 'write a full-size SD 1.5 or SDXL base checkpoint of random weights (original key names) for memory and speed tests',
  builder: (y) =>
    y
      .option('out', { type: 'string', demandOption: true, describe: 'the .safetensors file to write (clip-vision-h: the image_encoder folder)' })
      .option('model', {
        choices: [...RANDOM_MODELS, ...ADAPTER_MODELS, ...LORA_MODELS],
        default: 'sd15' as RandomModel,
        describe: 'SD 1.5, SDXL base 1.0 (~10.3 GB of UNet in fp32), or an adapter: ControlNet SD 1.5 (1.4 GB), CLIP ViT-H/14 image encoder (2.5 GB), IP-Adapter SD 1.5 basic or Plus',
      })
      .option('config', { type: 'string', describe: 'with --model sdxl: a pipeline config JSON (the fixtures\' format) instead of SDXL base\'s' })
      .option('rank', { type: 'number', default: 32, describe: 'with --model lora-sd15: the rank of every module' })
      .option('half', { type: 'boolean', default: false, describe: 'store fp16 instead of fp32' })
      .option('seed', { type: 'number', default: 0 })
      .option('force', { type: 'boolean', default: false, describe: 'overwrite OUT if it exists' }) as never,
  handler: async (args) => {
    if (existsSync(args.out) && !args.force) throw new UsageError(`${args.out} exists: pass --force to overwrite it`);
    if (args.config !== undefined && args.model !== 'sdxl') throw new UsageError('--config is for --model sdxl');
    // the shape probes build their (empty) models on a backend: the lightest, unless one is in use already
    if (currentBackend() === null) await initBackend({ backend: 'cpu', log: null });
    if (isAdapterModel(args.model)) return writeAdapter(args.model, args);
    if (args.model === 'lora-sd15') return writeLora(args);
    const sdxl = args.config === undefined ? undefined : sdxlConfigFromJson(JSON.parse(readFileSync(args.config, 'utf8')) as unknown, args.config);
    const shapes = randomModelShapes(args.model, sdxl);
    const bar = new ProgressBar('random weights (tensors)', shapes.size);
    writeRandomCheckpoint(args.out, shapes, { half: args.half, seed: args.seed, onTensor: (done) => bar.update(done) });
    bar.finish();
    const params = [...shapes.values()].reduce((a, s) => a + s.reduce((x, d) => x * d, 1), 0);
    process.stdout.write(`${args.out}: ${args.model}, ${shapes.size} tensors, ${(params / 1e6).toFixed(1)} M parameters, ${args.half ? 'fp16' : 'fp32'}\n`);
  },
};

/** `--model` an adapter: its file (or the image encoder's folder) in the layout people download. */
function writeAdapter(model: AdapterModel, args: Args): void {
  let bar: ProgressBar | null = null;
  const { file, shapes } = writeRandomAdapter(model, args.out, {
    half: args.half,
    seed: args.seed,
    onTensor: (done, total) => {
      bar ??= new ProgressBar('random weights (tensors)', total);
      bar.update(done);
    },
  });
  (bar as ProgressBar | null)?.finish();
  const params = [...shapes.values()].reduce((a, s) => a + s.reduce((x, d) => x * d, 1), 0);
  process.stdout.write(`${file}: ${model}, ${shapes.size} tensors, ${(params / 1e6).toFixed(1)} M parameters, ${args.half ? 'fp16' : 'fp32'}\n`);
}

/** `--model lora-sd15`: a random rank-r LoCon for SD 1.5's text encoder and UNet. */
function writeLora(args: Args): void {
  if (!Number.isInteger(args.rank) || args.rank < 1) throw new UsageError(`--rank ${args.rank}: a positive integer`);
  let bar: ProgressBar | null = null;
  const onTensor = (done: number, total: number) => (bar ??= new ProgressBar('random LoRA (tensors)', total)).update(done);
  const shapes = writeRandomLora(args.out, randomModelShapes('sd15'), { rank: args.rank, half: args.half, seed: args.seed, onTensor });
  (bar as ProgressBar | null)?.finish();
  const params = [...shapes.values()].reduce((a, s) => a + s.reduce((x, d) => x * d, 1), 0);
  process.stdout.write(`${args.out}: lora-sd15 (kohya LoCon, rank ${args.rank}), ${shapes.size / 3} modules, ${(params / 1e6).toFixed(1)} M parameters, ${args.half ? 'fp16' : 'fp32'}\n`);
}
