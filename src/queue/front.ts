/**
 * The front's side of the Redis queue (`sd serve --queue redis://...`): admits jobs into BullMQ and keeps a mirror
 * of each one it was asked about (status, step, result), read from Redis, so the routes work as with the in-process
 * queue (../server/jobs.ts): same Job objects, same `done` promise, same statuses. The front loads no model.
 *
 * The mirror follows Redis through BullMQ's QueueEvents (active, progress, completed, failed: the job is read again
 * at once) and a poll of the unfinished jobs every `pollMs` (events lost while Redis was away). A job another front
 * admitted, or one admitted before this front restarted, is read from Redis on first request (`lookup`).
 *
 * Cancel: a waiting job is removed from its queue; a running one is told through `sd:cancel` (./protocol.ts) and
 * its worker completes it as cancelled at its next step. Stop (A1111's interrupt) goes the same way: the worker
 * finishes the job at its next step with the image made so far, and it succeeds.
 * Progress: each step the worker reports (and the step of its latest preview, kept in `sd:preview:<id>`) is passed
 * on to the server's listener, which feeds the event streams; `preview(id)` reads that PNG. Shutdown of the front leaves the jobs in Redis to the
 * workers: only the requests waiting on this front are answered (503, shutting down).
 * Workers announce themselves (`sd:worker:<id>`): the models they hold with the models' limits, which the front
 * validates requests against; a job names its model (WorkItem.model), else it runs on the default one.
 */
import { randomUUID } from 'node:crypto';
import { Queue, QueueEvents, type Job as BullJob } from 'bullmq';
import type { Redis } from 'ioredis';
import type { ParamLimits } from '../pipeline/params.js';
import { announcedModelInfo, type ModelInfo } from '../server/checkpoints.js';
import { QueueFullError, isFinished, type Job, type JobFailure, type JobStatus } from '../server/jobs.js';
import type { InferenceResult, WorkItem } from '../server/work.js';
import { bullConnection, redisClient } from './connection.js';
import {
  CANCEL_CHANNEL,
  WORKER_KEYS,
  cancelKey,
  encodeParams,
  listingsKey,
  previewKey,
  queueName,
  stopKey,
  uidKey,
  type CancelMessage,
  type JobData,
  type JobProgressData,
  type Outcome,
  type PreviewFacts,
  type RemotePreview,
  type WorkerInfo,
  type WorkerListings,
} from './protocol.js';
import type { JobStore } from './store.js';

export type FrontJob = Job<WorkItem, InferenceResult>;

/** A running job's report: `stepped` when its step moved; `preview` when a new preview is in Redis (preview() reads its PNG). */
export interface FrontProgress {
  readonly step: number;
  readonly total: number;
  readonly stepped: boolean;
  readonly preview: PreviewFacts | null;
}

export interface QueueFrontOptions {
  readonly url: string;
  /** The model a job runs on when it names none; null: the first one the workers announce (by name). */
  readonly defaultModel?: string | null;
  readonly maxQueue: number;
  /** Seconds a finished job stays in Redis (and readable). */
  readonly ttlS: number;
  /** Fallback poll of unfinished jobs and of the workers' announcements; default 500 ms. */
  readonly pollMs?: number;
  readonly log?: (level: 'info' | 'warn' | 'error', fields: Record<string, unknown>, message: string) => void;
}

interface Entry {
  readonly job: FrontJob;
  readonly settle: () => void;
  model: string;
  /** Whether Redis holds it (added, or read from Redis). */
  stored: boolean;
  position: number;
  /** Whether this front set the uid's reservation (released again unless the job succeeded). */
  ownsUid: boolean;
  /** Cancelled by a client (not merely let go by this front's shutdown). */
  cancelRequested: boolean;
  /** The step of the latest preview the worker reported. */
  previewStep: number | null;
}

/** How long closing waits for admissions still on their way to Redis. */
const CLOSE_WAIT_MS = 5000;

/** Messages for what BullMQ reports as a failed job: no worker could finish it. */
function failureOf(reason: string): JobFailure {
  if (/stalled more than allowable limit|maxStartedAttempts|started attempts/i.test(reason)) {
    return { statusCode: 500, message: `the job's worker stopped while running it, each of the allowed times (a crash, or out of memory?): ${reason}` };
  }
  return { statusCode: 500, message: `the worker failed: ${reason}` };
}

export class QueueFront implements JobStore<WorkItem, InferenceResult> {
  private readonly redis: Redis;
  private readonly queues = new Map<string, { queue: Queue; events: QueueEvents }>();
  private readonly entries = new Map<string, Entry>();
  private workers_: WorkerInfo[] = [];
  private readonly limits_ = new Map<string, ParamLimits>();
  private waitingInRedis = 0;
  private activeInRedis = 0;
  private readonly timer: NodeJS.Timeout;
  private closed = false;
  private onChange: ((job: FrontJob) => void) | null = null;
  private onProgress: ((job: FrontJob, p: FrontProgress) => void) | null = null;
  /** Admissions not yet in Redis: closing waits for them, so a 202 is never lost to a restart. */
  private readonly adding = new Set<Promise<void>>();

  constructor(private readonly o: QueueFrontOptions) {
    this.redis = redisClient(o.url);
    this.redis.on('error', () => undefined); // reconnects on its own; the state is in `connected`
    this.timer = setInterval(() => void this.poll(), o.pollMs ?? 500);
    this.timer.unref();
  }

  /** Called on every status change of a mirrored job (the server's logs, metrics, running set), and on every step it reports. */
  listen(onChange: (job: FrontJob) => void, onProgress?: (job: FrontJob, p: FrontProgress) => void): void {
    this.onChange = onChange;
    this.onProgress = onProgress ?? null;
  }

  /** Resolves once Redis answers and the workers' announcements were read once. */
  async connect(): Promise<void> {
    await this.redis.ping();
    await this.poll();
  }

  get connected(): boolean {
    return this.redis.status === 'ready';
  }

  get depth(): number {
    const local = [...this.entries.values()].filter((e) => e.job.status === 'queued').length;
    return Math.max(local, this.waitingInRedis);
  }

  get runningCount(): number {
    const local = [...this.entries.values()].filter((e) => e.job.status === 'running').length;
    return Math.max(local, this.activeInRedis);
  }

  /** The live workers' announcements (refreshed every poll). */
  workers(): readonly WorkerInfo[] {
    return this.workers_;
  }

  /** The models the live workers announce, sorted by name, as A1111 lists checkpoints. */
  models(): readonly ModelInfo[] {
    const byName = new Map<string, ModelInfo>();
    for (const w of this.workers_) for (const m of w.models) if (!byName.has(m.name)) byName.set(m.name, announcedModelInfo(m.name, m.file ?? null));
    return [...byName.values()].sort((a, b) => a.model_name.localeCompare(b.model_name));
  }

  /** What the live workers' model folders hold, merged by name (the first worker's entry of a name is kept). */
  async listings(): Promise<WorkerListings> {
    const ids = this.workers_.map((w) => w.id);
    const values = ids.length > 0 ? await this.redis.mget(...ids.map(listingsKey)).catch(() => []) : [];
    const loras = new Map<string, Record<string, unknown>>();
    const controlnet = new Map<string, string>();
    for (const v of values) {
      if (v === null || v === undefined) continue;
      const l = JSON.parse(v) as WorkerListings;
      for (const lora of l.loras) if (!loras.has(String(lora.name))) loras.set(String(lora.name), lora);
      for (const c of l.controlnet) {
        const k = c.replace(/\s*\[[0-9a-f]+\]$/i, '').toLowerCase();
        if (!controlnet.has(k)) controlnet.set(k, c);
      }
    }
    const byKey = <T>(m: Map<string, T>): T[] => [...m.entries()].sort(([a], [b]) => a.toLowerCase().localeCompare(b.toLowerCase())).map(([, v]) => v);
    return { loras: byKey(loras), controlnet: byKey(controlnet) };
  }

  /** The model a job without one runs on: the default, else the first announced; null when none is known. */
  defaultModel(): string | null {
    if (this.o.defaultModel != null) return this.o.defaultModel;
    return [...this.limits_.keys()].sort()[0] ?? null;
  }

  /** The limits of `model` as its workers announced them; null when no worker has. */
  limits(model = this.defaultModel()): ParamLimits | null {
    return model === null ? null : (this.limits_.get(model) ?? null);
  }

  get(id: string): FrontJob | undefined {
    return this.entries.get(id)?.job;
  }

  position(id: string): number {
    return this.entries.get(id)?.position ?? 0;
  }

  /** Read a job this front does not mirror yet (another front's, or from before a restart) from Redis. */
  async lookup(id: string): Promise<void> {
    if (this.entries.has(id)) return;
    for (const [model, { queue }] of this.allQueues()) {
      const bull = (await queue.getJob(id).catch(() => undefined)) as BullJob<JobData> | undefined;
      if (bull?.data?.uid === undefined) continue;
      if (this.entries.has(id)) return;
      const entry = this.mirror(id, { uid: bull.data.uid, params: { prompt: '' } }, model, new Date(bull.data.admittedAt ?? bull.timestamp));
      entry.stored = true;
      await this.refresh(entry, bull);
      return;
    }
  }

  submit(input: WorkItem, model: string | null = input.model ?? this.defaultModel()): FrontJob {
    if (model === null) throw new Error('no model to run the job on: no worker has announced one yet (start `sd worker --queue ...`)');
    if (this.depth >= this.o.maxQueue) throw new QueueFullError(this.o.maxQueue, this.retryAfterS());
    const entry = this.mirror(randomUUID(), input, model, new Date());
    this.onChange?.(entry.job);
    const adding = this.add(entry).finally(() => this.adding.delete(adding));
    this.adding.add(adding);
    return entry.job;
  }

  cancel(id: string, reason = 'client'): boolean {
    const entry = this.entries.get(id);
    if (entry === undefined || isFinished(entry.job.status)) return false;
    entry.job.cancelReason ??= reason;
    entry.cancelRequested = true;
    void this.tellCancel(entry, reason);
    if (entry.job.status === 'queued') this.finish(entry, 'cancelled');
    return true;
  }

  /** Finish a running job now with the image made so far (A1111's interrupt); false when it is not running. */
  stop(id: string): boolean {
    const entry = this.entries.get(id);
    if (entry === undefined || entry.job.status !== 'running') return false;
    void this.tellStop(entry);
    return true;
  }

  /** The running job's latest preview, as its worker put it into Redis; null when there is none (or Redis is away). */
  async preview(id: string): Promise<(Omit<RemotePreview, 'png'> & { png: Buffer }) | null> {
    const raw = await this.redis.get(previewKey(id)).catch(() => null);
    if (raw === null) return null;
    try {
      const p = JSON.parse(raw) as RemotePreview;
      return { ...p, png: Buffer.from(p.png, 'base64') };
    } catch {
      return null;
    }
  }

  /** The jobs stay in Redis for the workers; the requests waiting here are answered now. */
  drain(reason: string): void {
    for (const entry of this.entries.values()) {
      if (isFinished(entry.job.status)) continue;
      entry.job.cancelReason ??= reason;
      this.finish(entry, 'cancelled', false);
    }
  }

  abortRunning(): void {}

  async idle(): Promise<void> {}

  retryAfterS(): number {
    return 5;
  }

  /** Stops polling (the server's dispose); close() then ends the connections. */
  dispose(): void {
    this.closed = true;
    clearInterval(this.timer);
  }

  /** Waits (a few seconds at most) for the admissions on their way to Redis, then closes the connections. */
  async close(): Promise<void> {
    this.dispose();
    const wait = new Promise<void>((r) => setTimeout(r, CLOSE_WAIT_MS).unref());
    await Promise.race([Promise.allSettled([...this.adding]), wait]);
    const closing = [...this.queues.values()].flatMap(({ queue, events }) => [queue.close(), events.close()]);
    this.redis.disconnect();
    await Promise.all(closing).catch(() => undefined);
  }

  private mirror(id: string, input: WorkItem, model: string, createdAt: Date): Entry {
    let settle = (): void => {};
    const done = new Promise<void>((resolve) => (settle = resolve));
    const job: FrontJob = {
      id, input, createdAt, status: 'queued', step: 0, total: 0,
      startedAt: null, finishedAt: null, result: null, error: null, cancelReason: null, done,
    };
    const entry: Entry = { job, settle, model, stored: false, position: 0, ownsUid: false, cancelRequested: false, previewStep: null };
    this.entries.set(id, entry);
    return entry;
  }

  private async add(entry: Entry): Promise<void> {
    const { job, model } = entry;
    try {
      const taken = await this.redis.set(uidKey(job.input.uid), job.id, 'EX', Math.max(60, this.o.ttlS), 'NX');
      if (taken === null) {
        job.error = { statusCode: 409, message: `uid: '${job.input.uid}' is taken (a job in progress already uses it); choose another uid or leave it out for a random one` };
        return this.finish(entry, 'failed');
      }
      entry.ownsUid = true;
      const data: JobData = { uid: job.input.uid, model, params: encodeParams(job.input.params), admittedAt: job.createdAt.getTime(), ...(job.input.echo !== undefined ? { echo: job.input.echo } : {}) };
      await this.queueOf(model).queue.add('generate', data, {
        jobId: job.id,
        removeOnComplete: { age: this.o.ttlS },
        removeOnFail: { age: this.o.ttlS },
      });
      entry.stored = true;
      if (entry.cancelRequested) await this.tellCancel(entry, job.cancelReason ?? 'client');
    } catch (e) {
      if (isFinished(job.status)) return;
      job.error = { statusCode: 503, message: `the job could not be queued: Redis at ${this.o.url} is unreachable (${(e as Error).message})` };
      this.finish(entry, 'failed');
    }
  }

  private async tellCancel(entry: Entry, reason: string): Promise<void> {
    const id = entry.job.id;
    try {
      await this.redis.set(cancelKey(id), reason, 'EX', Math.max(60, this.o.ttlS));
      await this.redis.publish(CANCEL_CHANNEL, JSON.stringify({ id, reason } satisfies CancelMessage));
      if (entry.stored) await this.queueOf(entry.model).queue.remove(id).catch(() => 0); // refused while a worker holds it
    } catch (e) {
      this.o.log?.('warn', { job: id, err: (e as Error).message }, 'cancel not delivered: Redis unreachable');
    }
  }

  private async tellStop(entry: Entry): Promise<void> {
    const id = entry.job.id;
    try {
      await this.redis.set(stopKey(id), '1', 'EX', Math.max(60, this.o.ttlS));
      await this.redis.publish(CANCEL_CHANNEL, JSON.stringify({ id, reason: 'interrupted', stop: true } satisfies CancelMessage));
    } catch (e) {
      this.o.log?.('warn', { job: id, err: (e as Error).message }, 'interrupt not delivered: Redis unreachable');
    }
  }

  private queueOf(model: string): { queue: Queue; events: QueueEvents } {
    let q = this.queues.get(model);
    if (q === undefined) {
      const name = queueName(model);
      const queue = new Queue(name, { connection: bullConnection(this.o.url) });
      const events = new QueueEvents(name, { connection: bullConnection(this.o.url) });
      queue.on('error', () => undefined);
      events.on('error', () => undefined);
      const touch = ({ jobId }: { jobId: string }): void => {
        const entry = this.entries.get(jobId);
        if (entry !== undefined && entry.stored) void this.refresh(entry);
      };
      for (const event of ['active', 'progress', 'completed', 'failed', 'removed'] as const) events.on(event, touch as never);
      q = { queue, events };
      this.queues.set(model, q);
    }
    return q;
  }

  private allQueues(): [string, { queue: Queue; events: QueueEvents }][] {
    for (const model of this.limits_.keys()) this.queueOf(model);
    const d = this.defaultModel();
    if (d !== null) this.queueOf(d);
    return [...this.queues.entries()];
  }

  /** Reads the job from Redis into its mirror; Redis away: the next event or poll tries again. */
  private async refresh(entry: Entry, known?: BullJob<JobData>): Promise<void> {
    try {
      await this.read(entry, known);
    } catch (e) {
      this.o.log?.('warn', { job: entry.job.id, err: (e as Error).message }, 'job not read from Redis');
    }
  }

  private async read(entry: Entry, known?: BullJob<JobData>): Promise<void> {
    const { job } = entry;
    if (isFinished(job.status)) return;
    const { queue } = this.queueOf(entry.model);
    let bull = known ?? ((await queue.getJob(job.id)) as BullJob<JobData> | undefined);
    if (isFinished(job.status)) return;
    if (bull === undefined || bull === null) {
      if (job.cancelReason !== null) return this.finish(entry, 'cancelled');
      job.error = { statusCode: 503, message: 'the job is gone from Redis (restarted without persistence, or expired): submit it again' };
      return this.finish(entry, 'failed');
    }
    const state = await bull.getState();
    if ((state === 'completed' && bull.returnvalue == null) || (state === 'failed' && bull.failedReason == null)) {
      bull = (await queue.getJob(job.id)) as BullJob<JobData> | undefined; // it finished between the two reads
      if (bull === undefined || bull === null || isFinished(job.status)) return;
    }
    if (bull.processedOn != null) job.startedAt = new Date(bull.processedOn);
    const progress = bull.progress as JobProgressData | number;
    if (typeof progress === 'object' && progress !== null && state === 'active') this.progressed(entry, progress);
    else if (typeof progress === 'object' && progress !== null) {
      job.step = progress.step;
      job.total = progress.total;
    }
    if (state === 'completed') {
      const outcome = bull.returnvalue as unknown as Outcome;
      job.finishedAt = new Date(bull.finishedOn ?? Date.now());
      if (outcome.status === 'succeeded') {
        job.result = outcome.result;
        return this.finish(entry, 'succeeded');
      }
      if (outcome.status === 'cancelled') {
        job.cancelReason ??= outcome.reason;
        return this.finish(entry, 'cancelled');
      }
      job.error = { statusCode: outcome.statusCode, message: outcome.message, ...(outcome.field !== undefined ? { field: outcome.field } : {}) };
      return this.finish(entry, 'failed');
    }
    if (state === 'failed') {
      job.error = failureOf(bull.failedReason ?? 'unknown');
      job.finishedAt = new Date(bull.finishedOn ?? Date.now());
      return this.finish(entry, 'failed');
    }
    if (state === 'active') {
      entry.position = 0;
      return this.move(entry, 'running');
    }
    if (job.cancelReason !== null || (await this.redis.exists(cancelKey(job.id))) === 1) return this.finish(entry, 'cancelled');
    entry.position = await this.placeInLine(entry);
  }

  /** A step (or a new preview) reported: the mirror follows, then the server's listener (after the job reads 'running'). */
  private progressed(entry: Entry, p: JobProgressData): void {
    const { job } = entry;
    const stepped = p.step !== job.step || p.total !== job.total;
    const preview = p.preview !== undefined && p.preview.step !== entry.previewStep ? p.preview : null;
    if (!stepped && preview === null) return;
    job.step = p.step;
    job.total = p.total;
    if (preview !== null) entry.previewStep = preview.step;
    if (job.status !== 'running') {
      entry.position = 0;
      this.move(entry, 'running');
    }
    this.onProgress?.(job, { step: p.step, total: p.total, stepped, preview });
  }

  /** BullMQ pushes on the left of `wait` and workers take from the right. */
  private async placeInLine(entry: Entry): Promise<number> {
    const key = `bull:${queueName(entry.model)}:wait`;
    const [at, length] = await Promise.all([this.redis.lpos(key, entry.job.id), this.redis.llen(key)]);
    return at === null ? 0 : length - at;
  }

  private move(entry: Entry, status: JobStatus): void {
    if (entry.job.status === status) return;
    entry.job.status = status;
    this.onChange?.(entry.job);
  }

  private finish(entry: Entry, status: JobStatus, notify = true): void {
    const { job } = entry;
    if (isFinished(job.status)) return;
    job.status = status;
    job.finishedAt ??= new Date();
    if (notify) this.onChange?.(job);
    entry.settle();
    if (entry.ownsUid && status !== 'succeeded') void this.redis.del(uidKey(job.input.uid)).catch(() => 0);
    const forget = setTimeout(() => this.entries.delete(job.id), this.o.ttlS * 1000);
    forget.unref();
  }

  private async poll(): Promise<void> {
    if (this.closed) return;
    try {
      await this.readWorkers();
      let waiting = 0;
      let active = 0;
      for (const [, { queue }] of this.allQueues()) {
        const counts = await queue.getJobCounts('waiting', 'active', 'prioritized', 'delayed');
        waiting += (counts.waiting ?? 0) + (counts.prioritized ?? 0) + (counts.delayed ?? 0);
        active += counts.active ?? 0;
      }
      this.waitingInRedis = waiting;
      this.activeInRedis = active;
      await Promise.all([...this.entries.values()].filter((e) => e.stored && !isFinished(e.job.status)).map((e) => this.refresh(e)));
    } catch {
      // Redis away: the next poll tries again (ioredis reconnects on its own)
    }
  }

  private async readWorkers(): Promise<void> {
    const keys: string[] = [];
    let cursor = '0';
    do {
      const [next, found] = await this.redis.scan(cursor, 'MATCH', WORKER_KEYS, 'COUNT', 100);
      cursor = next;
      keys.push(...found);
    } while (cursor !== '0');
    const values = keys.length > 0 ? await this.redis.mget(...keys) : [];
    const workers = values.flatMap((v) => (v === null ? [] : [JSON.parse(v) as WorkerInfo]));
    for (const w of workers) for (const m of w.models) this.limits_.set(m.name, m.limits);
    this.workers_ = workers.sort((a, b) => a.id.localeCompare(b.id));
  }
}
