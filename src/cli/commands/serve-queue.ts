/**
 * `sd serve`'s flags for scaling out (issue #21), apart from serve.ts: `--queue redis://...` makes the server a front
 * (jobs go to BullMQ on Redis, `sd worker`s run them, no model loaded here), `--model` names the model a job runs on
 * when it names none, `--s3-endpoint` the S3-compatible server of s3:// URLs, `--log-prompts` logs prompts at info.
 */
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import type { Options } from 'yargs';
import { checkRedisUrl } from '../../queue/connection.js';
import { QueueFront } from '../../queue/front.js';
import type { ServerOptions } from '../../server/server.js';
import { isS3Url } from '../../storage/outputs.js';
import { UsageError } from '../errors.js';

export interface QueueArgs {
  queue?: string;
  model?: string;
  's3-endpoint'?: string;
  'log-prompts': boolean;
}

export const QUEUE_FLAGS: Readonly<Record<string, Options>> = Object.freeze({
  queue: { type: 'string', describe: 'Redis URL redis://HOST:PORT[/DB]: be a front for `sd worker`s (no model loaded here; default: SD_QUEUE)' },
  model: { type: 'string', describe: "with --queue: the model a job runs on when it names none (a worker's --model-name); default: the first announced" },
  's3-endpoint': { type: 'string', describe: 'S3-compatible server (MinIO, R2, ...) for s3:// URLs; default: AWS (credentials: the AWS_* variables)' },
  'log-prompts': { type: 'boolean', default: false, describe: 'log prompts at info level (they are not logged otherwise)' },
});

/** The server options of queue mode; {} without --queue. `outputs`: the front's own uid check needs a folder; with s3:// outputs only the workers store. */
export function queueServerOptions(a: QueueArgs & { outputs: string; 'max-queue': number; 'job-ttl': number }): Partial<ServerOptions> {
  const url = a.queue ?? (process.env.SD_QUEUE || undefined);
  const base = { logPrompts: a['log-prompts'] };
  if (url === undefined) {
    if (isS3Url(a.outputs)) throw new UsageError('--outputs s3://... needs --queue (the workers store to S3); without a queue, give a folder');
    return base;
  }
  try {
    checkRedisUrl(url);
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  const front = new QueueFront({ url, defaultModel: a.model ?? null, maxQueue: a['max-queue'], ttlS: a['job-ttl'] });
  const outputs = isS3Url(a.outputs) ? mkdtempSync(path.join(tmpdir(), 'sd-front-')) : a.outputs;
  return { ...base, front, outputs };
}
