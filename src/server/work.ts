/**
 * What the server's parts share about a job, so that none of them imports another's internals: what a job runs,
 * what it answers, and the server's lifecycle states. server.ts runs jobs; routes.ts answers HTTP with them.
 */
import type { GenerateParams } from '../pipeline/api.js';
import type { AdapterEcho } from './adapters.js';
import type { AnsweredParameters } from './body.js';
import type { Job } from './jobs.js';

export type ServerState = 'loading' | 'ok' | 'failed' | 'stopping' | 'stopped';

/** What a job runs: the request, resolved enough that a retry gives the same image. */
export interface WorkItem {
  readonly uid: string;
  readonly params: GenerateParams;
  /** The request's adapter fields as its answer echoes them (names, not the paths params holds). */
  readonly echo?: AdapterEcho;
  /** POST /jobs' `webhook`: where the finished job is posted (./webhooks.ts). */
  readonly webhook?: string;
  /** Queue mode: the model (as its workers announce it) the job runs on; absent: the front's default. */
  readonly model?: string;
}

/** The answer of POST /inference, and `result` of a succeeded job. */
export interface InferenceResult {
  readonly message: 'success';
  readonly uid: string;
  /** base64 PNG, with the A1111 `parameters` text chunk. */
  readonly image: string;
  readonly seed: number;
  readonly parameters: AnsweredParameters;
}

export type ServerJob = Job<WorkItem, InferenceResult>;
