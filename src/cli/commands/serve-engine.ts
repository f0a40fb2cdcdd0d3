/**
 * `sd serve`'s flags for where generations run and what they show, apart from serve.ts: by default the model lives in
 * an engine worker thread (src/server/engine-worker.ts), so the server answers while a step runs and survives the
 * worker's crash; `--in-process` keeps it on the server's thread. `--preview approx|vae|none` and `--preview-every N`
 * choose the live previews (GET /jobs/:id/preview.png, A1111's current_image); `--webhook-secret` signs webhooks.
 */
import type { Options } from 'yargs';
import type { BackendName } from '../../backend/select.js';
import type { Precision } from '../../backend/kernels.js';
import { PREVIEW_DECODERS, type PreviewOptions } from '../../pipeline/api.js';
import { WorkerEngine } from '../../server/engine-worker.js';
import type { ServerOptions } from '../../server/server.js';
import { UsageError } from '../errors.js';

export interface EngineArgs {
  weights: string;
  config?: string;
  tokenizer?: string;
  backend?: BackendName;
  precision?: Precision;
  'in-process': boolean;
  preview: string;
  'preview-every': number;
  'webhook-secret'?: string;
}

export const ENGINE_FLAGS: Readonly<Record<string, Options>> = Object.freeze({
  'in-process': { type: 'boolean', default: false, describe: "run generations on the server's own thread instead of an engine worker (the server then answers slowly during a step)" },
  preview: { choices: [...PREVIEW_DECODERS, 'none'], default: 'approx', describe: "live previews of running jobs: 'approx' (latent to RGB, latent size, cheap), 'vae' (a full decode), 'none'" },
  'preview-every': { type: 'number', default: 1, describe: 'make a preview every N steps (and at the last one)' },
  'webhook-secret': { type: 'string', describe: 'HMAC-SHA256 key of the X-SD-Signature header of webhooks (default: SD_WEBHOOK_SECRET; none: unsigned)' },
});

type Log = (level: 'info' | 'warn' | 'error', message: string) => void;

/** The server options these flags give; `log` is the server's logger once it exists. */
export function engineServerOptions(a: EngineArgs, log: Log): Partial<ServerOptions> {
  const every = a['preview-every'];
  if (!Number.isInteger(every) || every < 1) throw new UsageError(`--preview-every must be an integer >= 1, got ${every}`);
  const preview: PreviewOptions | null = a.preview === 'none' ? null : { decoder: a.preview as PreviewOptions['decoder'], every };
  const secret = a['webhook-secret'] ?? (process.env.SD_WEBHOOK_SECRET || null);
  const base: Partial<ServerOptions> = { preview, webhooks: { secret } };
  if (a['in-process']) return base;
  let engine: WorkerEngine | null = null;
  return {
    ...base,
    loadEngine: async () => {
      const spec = { weights: a.weights, config: a.config, tokenizer: a.tokenizer, backend: a.backend, precision: a.precision };
      engine = await WorkerEngine.start(spec, { log });
      return engine;
    },
    backend: () => engine?.backend ?? null,
  };
}
