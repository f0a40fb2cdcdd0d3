/**
 * `sd serve`: the HTTP API (src/server). Listens at once and loads the model in the background
 * (/health answers 503 until it is in memory); SIGTERM/SIGINT stop it gracefully (a second signal
 * cancels the running job at once) and the process exits 0. A model that fails to load exits 1.
 * Logs are JSON lines (pino) on stdout.
 */
import type { CommandModule } from 'yargs';
import { BACKENDS, currentBackend, describeChoice, initBackend, type BackendName } from '../../backend/select.js';
import { StableDiffusion, readPipelineConfig } from '../../pipeline/pipeline.js';
import { DEFAULT_SERVER, SdServer } from '../../server/server.js';
import type { Engine } from '../../server/engine.js';
import { UsageError } from '../errors.js';

interface Args {
  port: number;
  host: string;
  weights: string;
  config?: string;
  tokenizer?: string;
  outputs: string;
  'api-key'?: string;
  'max-queue': number;
  concurrency: number;
  'job-ttl': number;
  grace: number;
  backend?: BackendName;
  'log-level': string;
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
      .option('max-queue', { type: 'number', default: DEFAULT_SERVER.maxQueue, describe: 'jobs that may wait, not counting running ones; beyond: 429' })
      .option('concurrency', { type: 'number', default: DEFAULT_SERVER.concurrency, describe: 'generations run at the same time' })
      .option('job-ttl', { type: 'number', default: DEFAULT_SERVER.jobTtlS, describe: 'seconds a finished job stays readable at GET /jobs/:id' })
      .option('grace', { type: 'number', default: DEFAULT_SERVER.graceS, describe: 'seconds shutdown waits for the running job before cancelling it' })
      .option('backend', { choices: BACKENDS, describe: 'TensorFlow.js backend (default: SD_BACKEND, else the best available)' })
      .option('log-level', { choices: LOG_LEVELS, default: 'info', describe: 'log level (JSON lines on stdout)' }) as never,
  handler: async (args) => {
    checkArgs(args);
    const apiKey = args['api-key'] ?? (process.env.SD_API_KEY || null);
    const server = await SdServer.start(
      {
        loadEngine: () => loadEngine(args, (line) => server.app.log.info(line)),
        outputs: args.outputs,
        apiKey,
        maxQueue: args['max-queue'],
        concurrency: args.concurrency,
        jobTtlS: args['job-ttl'],
        graceS: args.grace,
        logger: { level: args['log-level'] },
        backend: () => currentBackend()?.name ?? null,
      },
      { port: args.port, host: args.host },
    );
    server.app.log.info({ url: server.url, auth: apiKey !== null, outputs: server.outputs.dir }, 'listening; loading the model');
    stopOnSignals(server);
    server.ready().catch(() => {
      void server.shutdown({ graceS: 0 }).then(() => process.exit(1));
    });
  },
};

async function loadEngine(args: Args, log: (line: string) => void): Promise<Engine> {
  const choice = await initBackend({ backend: args.backend, log: null });
  log(describeChoice(choice));
  const config = args.config !== undefined ? readPipelineConfig(args.config) : undefined;
  return StableDiffusion.load({ weights: args.weights, config, tokenizer: args.tokenizer });
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
