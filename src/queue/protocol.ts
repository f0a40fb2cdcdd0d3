/**
 * What the front and the workers agree on in Redis, in one place: the BullMQ queue of each model, the keys beside it
 * (cancel flags and channel, worker announcements, uid reservations), a job's data and its outcome.
 *
 *   queue   `sd.<model>`           one BullMQ queue per model name: only a worker that holds the model takes its jobs
 *   key     `sd:cancel:<job id>`   set by the front, read by a worker when it takes the job (a cancel that beat it)
 *   key     `sd:stop:<job id>`     the same for A1111's interrupt: finish the job now with the image made so far
 *   channel `sd:cancel`            published by the front, heard by every worker (a cancel or a stop while the job runs)
 *   key     `sd:preview:<job id>`  the running job's latest preview (a small PNG, JSON RemotePreview), set by its worker
 *   key     `sd:worker:<id>`       a worker's announcement (models, limits, counters), refreshed every few seconds
 *   key     `sd:uid:<uid>`         a uid reserved by a job in flight (SET NX), so two fronts cannot give it twice
 *   key     `sd:listings:<id>`     what a worker's model folders hold, as A1111 lists it (WorkerListings), set at start
 *
 * A job's data is JSON: the uid and the GenerateParams, with every byte array (init image, mask, control and
 * IP-Adapter images) as {"$bytes": base64}; BullMQ would otherwise store a Buffer as an array of numbers.
 * A worker always completes a job with an Outcome (succeeded, failed with the HTTP status, cancelled); a BullMQ
 * "failed" job is one no worker could finish (it stalled more than the allowed attempts: a crash each time).
 */
import type { GenerateParams, PreviewDecoder } from '../pipeline/api.js';
import type { ParamLimits } from '../pipeline/params.js';
import type { AdapterEcho } from '../server/adapters.js';
import type { InferenceResult } from '../server/work.js';

export const CANCEL_CHANNEL = 'sd:cancel';
export const cancelKey = (jobId: string): string => `sd:cancel:${jobId}`;
export const stopKey = (jobId: string): string => `sd:stop:${jobId}`;
export const previewKey = (jobId: string): string => `sd:preview:${jobId}`;
export const workerKey = (workerId: string): string => `sd:worker:${workerId}`;
export const WORKER_KEYS = 'sd:worker:*';
export const uidKey = (uid: string): string => `sd:uid:${uid}`;
export const listingsKey = (workerId: string): string => `sd:listings:${workerId}`;

/** A worker's model folders as the front's A1111 listings answer them (/sdapi/v1/loras, /controlnet/model_list). */
export interface WorkerListings {
  readonly loras: readonly Record<string, unknown>[];
  readonly controlnet: readonly string[];
}

/** Model names as A1111 lists them: the weights' file name without its extension. Any other character becomes '_'. */
export function queueName(model: string): string {
  return `sd.${model.replace(/[^A-Za-z0-9._-]/g, '_')}`;
}

export interface JobData {
  readonly uid: string;
  readonly model: string;
  /** GenerateParams through encodeParams. */
  readonly params: unknown;
  /** ms since the epoch, when the front admitted it. */
  readonly admittedAt: number;
  /** WorkItem.echo: the adapter fields as the answer names them. */
  readonly echo?: AdapterEcho;
}

/** What a running job reports as BullMQ progress. */
export interface JobProgressData {
  readonly step: number;
  readonly total: number;
  /** The preview under `sd:preview:<job id>` (without its PNG), once there is one. */
  readonly preview?: PreviewFacts;
}

/** What the channel `sd:cancel` carries: a cancel, or with `stop` A1111's interrupt (finish with the image so far). */
export interface CancelMessage {
  readonly id: string;
  readonly reason: string;
  readonly stop?: boolean;
}

/** What the event stream says of a preview. */
export interface PreviewFacts {
  readonly step: number;
  readonly total: number;
  readonly image: number;
  readonly width: number;
  readonly height: number;
  readonly decoder: PreviewDecoder;
}

/** A preview in Redis: its facts and the PNG as base64. */
export interface RemotePreview extends PreviewFacts {
  readonly png: string;
}

/** A preview PNG larger than this is not put into Redis (the approx previews are a few KiB: latent size). */
export const MAX_PREVIEW_BYTES = 512 * 1024;

export type Outcome =
  | { readonly status: 'succeeded'; readonly result: InferenceResult; readonly timings: JobTimings }
  | { readonly status: 'failed'; readonly statusCode: number; readonly message: string; readonly field?: string }
  | { readonly status: 'cancelled'; readonly reason: string };

/** Milliseconds, measured by the worker. */
export interface JobTimings {
  /** Admitted by the front -> taken by the worker. */
  readonly queuedMs: number;
  /** Taken -> the first denoising step done (text encoding, init image, first step). */
  readonly firstStepMs: number;
  /** The denoising steps. */
  readonly stepsMs: number;
  /** Last step -> PNG and outputs stored (VAE decode, encoding, upload). */
  readonly decodeMs: number;
  readonly totalMs: number;
}

/** A worker's announcement, what `sd:worker:<id>` holds. */
export interface WorkerInfo {
  readonly id: string;
  readonly host: string;
  readonly pid: number;
  /** `file`: the weights' file name (A1111's title of the checkpoint when it is the name with an extension). */
  readonly models: readonly { readonly name: string; readonly limits: ParamLimits; readonly file?: string }[];
  readonly running: number;
  /** The job it runs now, or null. */
  readonly current: string | null;
  readonly succeeded: number;
  readonly failed: number;
  readonly startedAt: number;
  readonly seenAt: number;
}

interface Bytes {
  readonly $bytes: string;
}

/** GenerateParams -> JSON-safe value: byte arrays as {$bytes: base64}. */
export function encodeParams(p: GenerateParams): unknown {
  return JSON.parse(JSON.stringify(p, (_key, value: unknown) => (value instanceof Uint8Array ? { $bytes: Buffer.from(value).toString('base64') } : toJsonBytes(value))));
}

/** The inverse of encodeParams. */
export function decodeParams(v: unknown): GenerateParams {
  return JSON.parse(JSON.stringify(v), (_key, value: unknown) => (isBytes(value) ? new Uint8Array(Buffer.from(value.$bytes, 'base64')) : value)) as GenerateParams;
}

/** JSON.stringify has already turned a Buffer into {type: 'Buffer', data: [...]} by the time the replacer sees it. */
function toJsonBytes(value: unknown): unknown {
  if (typeof value === 'object' && value !== null && (value as { type?: unknown }).type === 'Buffer' && Array.isArray((value as { data?: unknown }).data)) {
    return { $bytes: Buffer.from((value as { data: number[] }).data).toString('base64') };
  }
  return value;
}

const isBytes = (v: unknown): v is Bytes =>
  typeof v === 'object' && v !== null && typeof (v as Bytes).$bytes === 'string' && Object.keys(v).length === 1;
