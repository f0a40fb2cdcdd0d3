/**
 * `sd serve`: the HTTP API (src/server). Listens at once and loads the model in the background
 * (/health answers 503 until it is in memory); SIGTERM/SIGINT stop it gracefully (a second signal
 * cancels the running job at once) and the process exits 0. A model that fails to load exits 1.
 * Logs are JSON lines (pino) on stdout. Without an API key on an address other machines can reach,
 * it warns at start that every route is open.
 */
import { statSync } from 'node:fs';
import type { CommandModule } from 'yargs';
import { BACKENDS, currentBackend, describeChoice, initBackend, type BackendName } from '../../backend/select.js';
import { PRECISIONS, type Precision } from '../../backend/kernels.js';
import { StableDiffusion, readPipelineConfig } from '../../pipeline/pipeline.js';
import { DEFAULT_SERVER, SdServer } from '../../server/server.js';
import type { RequestBounds } from '../../server/body.js';
import { DEFAULT_UPLOAD_LIMITS } from '../../image/upload.js';
import type { Engine } from '../../server/engine.js';
import type { ModelDirs } from '../../server/models-dir.js';
import { UsageError } from '../errors.js';
import { ENGINE_FLAGS, engineServerOptions, type EngineArgs } from './serve-engine.js';
import { QUEUE_FLAGS, queueServerOptions, type QueueArgs } from './serve-queue.js';

interface Args extends QueueArgs, EngineArgs {
  port: number;
  host: string;
  weights: string;
  config?: string;
  tokenizer?: string;
  outputs: string;
  'api-key'?: string;
  'api-auth'?: string;
  'max-queue': number;
  concurrency: number;
  'job-ttl': number;
  grace: number;
  'max-pixels'?: string;
  'max-work'?: string;
  'max-image-pixels': string;
  'max-decode-mib': number;
  backend?: BackendName;
  precision?: Precision;
  'log-level': string;
  'controlnet-dir'?: string;
  'ip-adapter-dir'?: string;
  'lora-dir'?: string;
  'image-encoder'?: string;
}

const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;

export const serveCommand: CommandModule<object, Args> = {
  command: 'serve',
  describe: 'serve the HTTP API (POST /inference, /jobs, GET /health) with one model in memory',
  builder: (y) =>
    y
      .option('port', { type: 'number', default: 8000, describe: 'TCP port (0: any free port)' })
      .option('host', { type: 'string', default: '127.0.0.1', describe: 'address to listen on (0.0.0.0 in a container)' })
      .option('weights', { type: 'string', default: 'weights/v1-5-pruned-emaonly.safetensors', describe: '.safetensors / .ckpt file or diffusers folder' })
      .option('config', { type: 'string', describe: 'pipeline config JSON (LDM names); default: SD 1.5' })
      .option('tokenizer', { type: 'string', describe: 'tokenizer file or folder; default: next to the weights, then ./weights' })
      .option('outputs', { type: 'string', default: 'outputs', describe: 'folder for <uid>.png + <uid>.json of every result' })
      .option('api-key', { type: 'string', describe: 'require Authorization: Bearer KEY on every route but /health (default: SD_API_KEY)' })
      .option('api-auth', { type: 'string', describe: "A1111's user:pass[,user2:pass2]: accept HTTP Basic too (default: SD_API_AUTH)" })
      .option('max-queue', { type: 'number', default: DEFAULT_SERVER.maxQueue, describe: 'jobs that may wait, not counting running ones; beyond: 429' })
      .option('concurrency', { type: 'number', default: DEFAULT_SERVER.concurrency, describe: 'generations run at the same time' })
      .option('job-ttl', { type: 'number', default: DEFAULT_SERVER.jobTtlS, describe: 'seconds a finished job stays readable at GET /jobs/:id' })
      .option('grace', { type: 'number', default: DEFAULT_SERVER.graceS, describe: 'seconds shutdown waits for the running job before cancelling it' })
      .option('max-pixels', { type: 'string', describe: 'largest width*height a request may ask for, e.g. 1024x1024 (default: 1024x1024 for SD 1.x)' })
      .option('max-work', { type: 'string', describe: 'largest steps*width*height of a request, e.g. 150x1024x1024 (default: 150 steps at --max-pixels)' })
      .option('max-image-pixels', { type: 'string', default: String(DEFAULT_UPLOAD_LIMITS.maxPixels), describe: 'largest width*height of an uploaded image' })
      .option('max-decode-mib', { type: 'number', default: DEFAULT_UPLOAD_LIMITS.maxDecodeBytes / 2 ** 20, describe: 'MiB the uploaded images of one request may decode to' })
      .option('backend', { choices: BACKENDS, describe: 'TensorFlow.js backend (default: SD_BACKEND, else the best available)' })
      .option('precision', { choices: PRECISIONS, describe: 'native kernels\' matrix products: float32 (default: SD_PRECISION, else float32) or bf16, an opt-in for CPUs with AMX-BF16 or AVX512-BF16 (faster, a slightly different image)' })
      .option('log-level', { choices: LOG_LEVELS, default: 'info', describe: 'log level (JSON lines on stdout)' })
      .options(QUEUE_FLAGS) // --queue, --model, --s3-endpoint, --log-prompts: ./serve-queue.ts
      .options(ENGINE_FLAGS) // --in-process, --preview, --preview-every, --webhook-secret: ./serve-engine.ts
      .option('controlnet-dir', { type: 'string', describe: 'folder of ControlNet files / diffusers folders requests name (controlnet[].model, A1111 alwayson_scripts.controlnet)' })
      .option('ip-adapter-dir', { type: 'string', describe: 'folder of IP-Adapter files requests name (ip_adapter.model)' })
      .option('lora-dir', { type: 'string', describe: 'folder of LoRA files requests name (loras[].name, <lora:NAME:W> prompt tags)' })
      .option('image-encoder', { type: 'string', describe: "IP-Adapter's CLIP vision encoder folder (image_encoder/); default: looked for next to the adapter" }) as never,
  handler: async (args) => {
    checkArgs(args);
    const bounds = boundsOf(args);
    const models = modelDirsOf(args);
    const apiKey = args['api-key'] ?? (process.env.SD_API_KEY || null);
    const apiAuth = args['api-auth'] ?? (process.env.SD_API_AUTH || null);
    const server = await SdServer.start(
      {
        loadEngine: () => loadEngine(args, (line) => server.app.log.info(line), (line) => server.app.log.warn(line)),
        outputs: args.outputs,
        apiKey,
        apiAuth,
        weights: args.weights,
        maxQueue: args['max-queue'],
        concurrency: args.concurrency,
        jobTtlS: args['job-ttl'],
        graceS: args.grace,
        bounds,
        models,
        logger: { level: args['log-level'] },
        backend: () => currentBackend()?.name ?? null,
        ...engineServerOptions(args, (level, line) => server.app.log[level](line)), // the engine worker (./serve-engine.ts)
        ...queueServerOptions(args),
      },
      { port: args.port, host: args.host },
    );
    server.app.log.info({ url: server.url, auth: apiKey !== null, outputs: server.outputs.dir }, 'listening; loading the model');
    const warning = noAuthWarning(args.host, apiKey ?? apiAuth);
    if (warning !== null) server.app.log.warn({ host: args.host }, warning);
    stopOnSignals(server);
    server.ready().catch(() => {
      void server.shutdown({ graceS: 0 }).then(() => process.exit(1));
    });
  },
};

/** `warn`: the model's warnings (a prompt cut at 77 tokens, LoRA tags the server does not apply) go to the log. */
async function loadEngine(args: Args, log: (line: string) => void, warn: (line: string) => void): Promise<Engine> {
  const choice = await initBackend({ backend: args.backend, precision: args.precision, log: null });
  log(describeChoice(choice));
  const config = args.config !== undefined ? readPipelineConfig(args.config) : undefined;
  return StableDiffusion.load({ weights: args.weights, config, tokenizer: args.tokenizer, warn });
}

/** First signal: graceful shutdown; a second one: cancel the running job now. Exit 0 once stopped. */
function stopOnSignals(server: SdServer): void {
  let signals = 0;
  const stop = (signal: NodeJS.Signals): void => {
    signals += 1;
    server.app.log.info({ signal }, signals === 1 ? 'stopping: finishing the running job' : 'stopping now: cancelling the running job');
    void server.shutdown(signals === 1 ? {} : { graceS: 0 }).then(() => process.exit(0));
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

function checkArgs(a: Args): void {
  const int = (name: string, v: number, min: number, max = Number.MAX_SAFE_INTEGER): void => {
    if (!Number.isInteger(v) || v < min || v > max) throw new UsageError(`--${name} must be an integer in ${min}..${max}, got ${v}`);
  };
  int('port', a.port, 0, 65535);
  int('max-queue', a['max-queue'], 0);
  int('concurrency', a.concurrency, 1);
  for (const [name, v] of [['job-ttl', a['job-ttl']], ['grace', a.grace]] as const) {
    if (!Number.isFinite(v) || v < 0) throw new UsageError(`--${name} must be a number of seconds >= 0, got ${v}`);
  }
}

/** 127.0.0.0/8, ::1 (also IPv4-mapped and bracketed) and the name localhost: only this machine can connect. */
export function isLoopbackHost(host: string): boolean {
  const h = host.trim().toLowerCase().replace(/^\[(.*)\]$/, '$1');
  return h === 'localhost' || h === '::1' || /^(::ffff:)?127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(h);
}

/** The warning `sd serve` logs at start when it listens beyond loopback with no API key; null when there is none to give. */
export function noAuthWarning(host: string, apiKey: string | null): string | null {
  if (apiKey !== null || isLoopbackHost(host)) return null;
  return (
    `no authentication: listening on ${host}, which other machines can reach, and every route is open to them; ` +
    'set SD_API_KEY (or --api-key) to require Authorization: Bearer KEY'
  );
}

/** "1024x1024" or "1048576" (and "150x1024x1024" for --max-work): the product of positive integers. */
export function parseProduct(name: string, v: string): number {
  const parts = v.trim().toLowerCase().split(/\s*[x*]\s*/);
  const n = parts.reduce((p, s) => (/^[1-9]\d*$/.test(s) ? p * Number(s) : NaN), 1);
  if (!Number.isSafeInteger(n)) throw new UsageError(`--${name} must be a positive integer or a product like 1024x1024, got ${JSON.stringify(v)}`);
  return n;
}

/** The request bounds the flags set; those left out follow the model family once it is loaded. */
function boundsOf(a: Args): Partial<RequestBounds> {
  if (!Number.isFinite(a['max-decode-mib']) || a['max-decode-mib'] <= 0) {
    throw new UsageError(`--max-decode-mib must be a number of MiB > 0, got ${a['max-decode-mib']}`);
  }
  return {
    ...(a['max-pixels'] !== undefined ? { maxPixels: parseProduct('max-pixels', a['max-pixels']) } : {}),
    ...(a['max-work'] !== undefined ? { maxWork: parseProduct('max-work', a['max-work']) } : {}),
    maxImagePixels: parseProduct('max-image-pixels', a['max-image-pixels']),
    maxDecodeBytes: Math.round(a['max-decode-mib'] * 2 ** 20),
  };
}

/** The model folders of the flags, each checked to be a folder now rather than at the first request. */
export function modelDirsOf(a: Pick<Args, 'controlnet-dir' | 'ip-adapter-dir' | 'lora-dir' | 'image-encoder'>): ModelDirs {
  const folder = (flag: string, v: string | undefined): string | null => {
    if (v === undefined || v === '') return null;
    const isDir = ((): boolean => {
      try {
        return statSync(v).isDirectory();
      } catch {
        throw new UsageError(`--${flag} ${v}: no such folder`);
      }
    })();
    if (!isDir) throw new UsageError(`--${flag} ${v}: not a folder`);
    return v;
  };
  return {
    controlnet: folder('controlnet-dir', a['controlnet-dir']),
    ipAdapter: folder('ip-adapter-dir', a['ip-adapter-dir']),
    lora: folder('lora-dir', a['lora-dir']),
    imageEncoder: folder('image-encoder', a['image-encoder']),
  };
}
