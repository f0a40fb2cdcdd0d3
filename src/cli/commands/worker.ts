/**
 * `sd worker --queue redis://HOST:PORT --weights FILE|s3://...|https://...`: one stateless worker of a cluster. Loads
 * the model once (remote weights fetched into the local cache first, ../../storage/weights.ts), then takes the jobs
 * of that model from the Redis queue that `sd serve --queue` fills, stores each image in --outputs (a folder, or
 * s3://bucket/prefix), and reports progress into Redis (../../queue/worker.ts). The model runs in an engine worker
 * thread (../../server/engine-worker.ts), so the event loop stays free to renew the job's lock during a step. Any number may run, on any machines
 * that reach Redis and the storage. SIGTERM/SIGINT: take nothing more, finish the running job within --grace seconds
 * or put it back in line, exit 0 (a second signal puts it back at once). Logs are JSON lines (pino) on stdout.
 * The ControlNet, IP-Adapter and LoRA names of jobs resolve in this worker's --controlnet-dir, --ip-adapter-dir and
 * --lora-dir (../../queue/model-names.ts): the front holds no model folders.
 */
import * as path from 'node:path';
import type { CommandModule } from 'yargs';
import { pino, type Logger } from 'pino';
import { BACKENDS, describeChoice, initBackend, type BackendName } from '../../backend/select.js';
import { PRECISIONS, type Precision } from '../../backend/kernels.js';
import { StableDiffusion, readPipelineConfig } from '../../pipeline/pipeline.js';
import type { Engine } from '../../server/engine.js';
import { WorkerEngine } from '../../server/engine-worker.js';
import { checkRedisUrl } from '../../queue/connection.js';
import { QueueWorker } from '../../queue/worker.js';
import { openOutputs } from '../../storage/outputs.js';
import { fetchWeights, isRemoteWeights } from '../../storage/weights.js';
import { UsageError } from '../errors.js';
import { modelDirsOf } from './serve.js';

interface Args {
  queue: string;
  weights: string;
  'weights-sha256'?: string;
  'weights-cache'?: string;
  config?: string;
  tokenizer?: string;
  'model-name'?: string;
  outputs: string;
  's3-endpoint'?: string;
  grace: number;
  lock: number;
  'max-stalls': number;
  backend?: BackendName;
  precision?: Precision;
  'log-level': string;
  'log-prompts': boolean;
  'in-process': boolean;
  'controlnet-dir'?: string;
  'ip-adapter-dir'?: string;
  'lora-dir'?: string;
  'image-encoder'?: string;
}

const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;

/** The weights' file name (for a URL, its last path segment). */
export function modelFileOf(weights: string): string {
  return isRemoteWeights(weights) ? path.posix.basename(new URL(weights.split('#')[0]).pathname) : path.basename(path.resolve(weights));
}

/** A1111's name of a checkpoint: its file name without the extension. */
export function modelNameOf(weights: string): string {
  return modelFileOf(weights).replace(/\.(safetensors|ckpt|pt|pth|bin)$/i, '') || 'model';
}

export const workerCommand: CommandModule<object, Args> = {
  command: 'worker',
  describe: 'take jobs from a Redis queue (filled by `sd serve --queue`) with one model in memory',
  builder: (y) =>
    y
      .option('queue', { type: 'string', demandOption: true, describe: 'Redis URL, redis://HOST:PORT[/DB] (default: SD_QUEUE)', default: process.env.SD_QUEUE })
      .option('weights', { type: 'string', default: 'weights/v1-5-pruned-emaonly.safetensors', describe: 'file or diffusers folder, or s3://bucket/key or https:// URL (fetched once into the cache)' })
      .option('weights-sha256', { type: 'string', describe: "the remote weights' expected sha256 (or #sha256=HEX at the end of the URL)" })
      .option('weights-cache', { type: 'string', describe: 'folder for downloaded weights (default: SD_WEIGHTS_CACHE, else ~/.cache/sd-tfjs/weights)' })
      .option('config', { type: 'string', describe: 'pipeline config JSON (LDM names); default: SD 1.5' })
      .option('tokenizer', { type: 'string', describe: 'tokenizer file or folder; default: next to the weights, then ./weights' })
      .option('model-name', { type: 'string', describe: "the name jobs ask for (A1111's sd_model_checkpoint); default: the weights' file name without extension" })
      .option('outputs', { type: 'string', default: 'outputs', describe: 'folder, or s3://bucket/prefix, for <uid>.png + <uid>.json' })
      .option('s3-endpoint', { type: 'string', describe: 'S3-compatible server (MinIO, R2, ...) for s3:// outputs and weights; default: AWS (credentials: the AWS_* variables)' })
      .option('grace', { type: 'number', default: 20, describe: 'seconds SIGTERM waits for the running job before putting it back in line' })
      .option('lock', { type: 'number', default: 60, describe: "seconds without a heartbeat after which a worker is taken for dead and its job re-queued" })
      .option('max-stalls', { type: 'number', default: 2, describe: 'times a job may be re-queued after its worker died; then it fails' })
      .option('backend', { choices: BACKENDS, describe: 'TensorFlow.js backend (default: SD_BACKEND, else the best available)' })
      .option('precision', { choices: PRECISIONS, describe: 'native kernels\' matrix products: float32 (default: SD_PRECISION, else float32) or bf16, an opt-in for CPUs with AMX-BF16 or AVX512-BF16 (faster, a slightly different image)' })
      .option('log-level', { choices: LOG_LEVELS, default: 'info', describe: 'log level (JSON lines on stdout)' })
      .option('log-prompts', { type: 'boolean', default: false, describe: 'log prompts at info level (they are not logged otherwise)' })
      .option('in-process', { type: 'boolean', default: false, describe: "run the model on the main thread (default: an engine worker thread, so the job's lock is renewed during a step)" })
      .option('controlnet-dir', { type: 'string', describe: "folder the ControlNet names of jobs resolve in (as sd serve's; the front needs none)" })
      .option('ip-adapter-dir', { type: 'string', describe: 'folder the IP-Adapter names of jobs resolve in' })
      .option('lora-dir', { type: 'string', describe: 'folder the LoRA names of jobs (loras[].name, <lora:NAME:W> tags) resolve in' })
      .option('image-encoder', { type: 'string', describe: "IP-Adapter's CLIP vision encoder folder (image_encoder/); default: looked for next to the adapter" }) as never,
  handler: async (args) => {
    const url = checkUrl(args.queue);
    if (!(args.lock > 0) || !(args.grace >= 0) || !Number.isInteger(args['max-stalls']) || args['max-stalls'] < 0) {
      throw new UsageError('--lock must be > 0 seconds, --grace >= 0 seconds and --max-stalls an integer >= 0');
    }
    const models = modelDirsOf(args); // checked before the model loads
    const log = pino({ level: args['log-level'], base: { pid: process.pid, role: 'worker' } });
    const s3 = args['s3-endpoint'] !== undefined ? { endpoint: args['s3-endpoint'] } : {};
    const outputs = await openOutputs(args.outputs, s3);
    const started = Date.now();
    const weights = await fetchWeights(args.weights, {
      cacheDir: args['weights-cache'],
      sha256: args['weights-sha256'],
      s3,
      onProgress: (received, total) => log.info({ received, total }, `downloading ${args.weights}`),
    });
    const engine = await loadEngine(args, weights, log);
    const name = args['model-name'] ?? modelNameOf(args.weights);
    log.info({ ms: Date.now() - started, model: name, weights }, 'model loaded');
    const worker = await QueueWorker.start({
      url,
      model: { name, file: modelFileOf(args.weights), engine },
      outputs,
      log,
      logPrompts: args['log-prompts'],
      lockMs: args.lock * 1000,
      maxStalls: args['max-stalls'],
      models,
    });
    let signals = 0;
    const stop = (signal: NodeJS.Signals): void => {
      signals += 1;
      log.info({ signal }, signals === 1 ? 'stopping: finishing the running job' : 'stopping now: the running job goes back in line');
      void worker.stop(signals === 1 ? args.grace : 0).then(() => process.exit(0));
    };
    process.on('SIGTERM', stop);
    process.on('SIGINT', stop);
  },
};

/** The model in an engine worker thread (../../server/engine-worker.ts), or with --in-process on this thread. */
async function loadEngine(args: Args, weights: string, log: Logger): Promise<Engine> {
  if (!args['in-process']) {
    const engine = await WorkerEngine.start({ weights, config: args.config, tokenizer: args.tokenizer, backend: args.backend, precision: args.precision }, { log: (level, line) => log[level](line) });
    log.info(`engine thread: backend ${engine.backend ?? '?'}`);
    return engine;
  }
  const choice = await initBackend({ backend: args.backend, precision: args.precision, log: null });
  log.info(describeChoice(choice));
  const config = args.config !== undefined ? readPipelineConfig(args.config) : undefined;
  return StableDiffusion.load({ weights, config, tokenizer: args.tokenizer, warn: (line) => log.warn(line) });
}

function checkUrl(url: string | undefined): string {
  if (url === undefined || url === '') throw new UsageError('--queue redis://HOST:PORT is required (or set SD_QUEUE)');
  try {
    return checkRedisUrl(url);
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
}
