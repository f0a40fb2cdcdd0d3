/**
 * `sd worker`'s engine room: takes jobs from the BullMQ queue of the model it holds (./protocol.ts), runs them one at a
 * time on the model loaded once at start, reports each step as BullMQ progress, stores the image (../storage), and
 * completes the job with an Outcome the front reads (succeeded with the result, failed with an HTTP status, cancelled).
 *
 * - Crash recovery is BullMQ's: a job whose worker dies (its lock not renewed for `lockMs`) is found stalled by
 *   another worker and put back in line, up to `maxStalls` times; after that it fails, which the front reports as a
 *   job that stopped its worker each time. A retried job whose first attempt had already stored its files finds them
 *   (the sidecar names the job) and completes with them: no duplicate, no 409.
 * - Cancel: the `sd:cancel` channel aborts the running job at its next step; the `sd:cancel:<id>` key makes a job
 *   cancelled before it started complete at once. A message with `stop` (A1111's interrupt, or `sd:stop:<id>`) finishes
 *   the job at its next step with the image of that step's predicted x0: it succeeds, as in-process.
 * - Previews: the approx preview of every step (latent size, a few KiB of PNG) goes to `sd:preview:<id>` (expiring),
 *   and the progress names its step, so that the front serves /jobs/:id/preview.png, the event stream's previews and
 *   A1111's current_image as in-process; the key is removed when the job ends.
 * - `stop(graceS)` (SIGTERM): take nothing more, let the running job finish for `graceS` s, else put it back in line
 *   for another worker (never lost), then close.
 * - Every few seconds the worker announces itself (`sd:worker:<id>`, expiring after 3 missed beats): its models and
 *   their limits, its counters; the front's /health and /metrics read these.
 */
import { hostname } from 'node:os';
import { randomUUID } from 'node:crypto';
import { WaitingError, Worker, type Job as BullJob } from 'bullmq';
import type { Redis } from 'ioredis';
import type { Logger } from 'pino';
import { encodePng } from '../image/codec.js';
import type { PreviewOptions, StepPreview } from '../pipeline/api.js';
import { toAnsweredParameters } from '../server/body.js';
import type { Engine } from '../server/engine.js';
import { HttpError, toHttpError } from '../server/errors.js';
import type { ModelDirs } from '../server/models-dir.js';
import type { OutputStorage } from '../storage/outputs.js';
import { controlNetModelList, loraList } from '../server/a1111/listings.js';
import { resolveModelNames } from './model-names.js';
import { bullConnection, redisClient } from './connection.js';
import {
  CANCEL_CHANNEL,
  MAX_PREVIEW_BYTES,
  cancelKey,
  decodeParams,
  listingsKey,
  previewKey,
  queueName,
  stopKey,
  workerKey,
  type CancelMessage,
  type JobData,
  type JobProgressData,
  type JobTimings,
  type Outcome,
  type PreviewFacts,
  type RemotePreview,
  type WorkerInfo,
  type WorkerListings,
} from './protocol.js';

export interface QueueWorkerOptions {
  readonly url: string;
  /** The model's name (what jobs ask for), its weights' file name (announced as A1111's title) and the loaded engine. */
  readonly model: { readonly name: string; readonly file?: string; readonly engine: Engine };
  readonly outputs: OutputStorage;
  readonly log: Logger;
  /** Log prompts at info level. */
  readonly logPrompts?: boolean;
  /** A job's lock: a worker silent this long is taken for dead and its job re-queued; default 60 s. */
  readonly lockMs?: number;
  /** Times a job may be re-queued after its worker died before it fails; default 2. */
  readonly maxStalls?: number;
  /** Seconds between announcements; default 5. */
  readonly heartbeatS?: number;
  readonly id?: string;
  /** The folders a job's model names resolve in (./model-names.ts): --controlnet-dir, --ip-adapter-dir, --lora-dir, --image-encoder. */
  readonly models?: ModelDirs;
  /** Previews of the running job (into Redis for the front); default approx every step; null: none. */
  readonly preview?: PreviewOptions | null;
}

interface Running {
  readonly controller: AbortController;
  /** A1111's interrupt: finish with the image made so far. */
  readonly stopper: AbortController;
  reason: string | null;
}

/** Seconds a preview stays in Redis when its worker never removes it (killed mid-job). */
const PREVIEW_TTL_S = 600;
/** A preview at most this often (ms): fast steps (a small model) would otherwise spend more on previews than on steps. */
const PREVIEW_EVERY_MS = 250;

const SHUTDOWN = 'shutdown';

export class QueueWorker {
  readonly id: string;
  private readonly worker: Worker<JobData, Outcome>;
  private readonly redis: Redis;
  private readonly subscriber: Redis;
  private readonly running = new Map<string, Running>();
  private readonly beat: NodeJS.Timeout;
  private readonly startedAt = Date.now();
  private succeeded = 0;
  private failed = 0;
  private stopping: Promise<void> | null = null;
  /** JSON WorkerListings, once listed. */
  private listings: string | null = null;

  private constructor(private readonly o: QueueWorkerOptions) {
    this.id = o.id ?? `${hostname()}-${process.pid}-${randomUUID().slice(0, 8)}`;
    this.redis = redisClient(o.url);
    this.subscriber = redisClient(o.url);
    for (const c of [this.redis, this.subscriber]) c.on('error', () => undefined); // they reconnect on their own
    const lockMs = o.lockMs ?? 60_000;
    this.worker = new Worker<JobData, Outcome>(queueName(o.model.name), (job, token) => this.process(job, token), {
      connection: bullConnection(o.url),
      name: this.id,
      concurrency: 1,
      lockDuration: lockMs,
      stalledInterval: Math.max(500, Math.round(lockMs / 2)),
      maxStalledCount: o.maxStalls ?? 2,
      autorun: false,
    });
    this.worker.on('error', (e) => o.log.warn({ err: e.message }, 'queue connection trouble (reconnecting)'));
    this.beat = setInterval(() => void this.announce(), (o.heartbeatS ?? 5) * 1000);
    this.beat.unref();
  }

  /** Announces itself, listens for cancels, starts taking jobs. */
  static async start(o: QueueWorkerOptions): Promise<QueueWorker> {
    const w = new QueueWorker(o);
    await w.subscriber.subscribe(CANCEL_CHANNEL);
    await w.list();
    w.subscriber.on('message', (_channel: string, message: string) => w.onCancel(message));
    await w.announce();
    void w.worker.run().catch((e: unknown) => o.log.error({ err: (e as Error).message }, 'the worker stopped taking jobs'));
    await w.worker.waitUntilReady();
    o.log.info({ worker: w.id, model: o.model.name, queue: queueName(o.model.name), outputs: o.outputs.location }, 'worker ready: taking jobs');
    return w;
  }

  get runningCount(): number {
    return this.running.size;
  }

  /** Take nothing more; the running job gets `graceS` s to finish, then goes back in line for another worker. */
  stop(graceS: number): Promise<void> {
    if (this.stopping !== null && graceS <= 0) this.returnRunning();
    this.stopping ??= this.shutdown(graceS);
    return this.stopping;
  }

  /** Abort the running job so that it goes back in line (shutdown's end of grace). */
  private returnRunning(): void {
    for (const r of this.running.values()) {
      r.reason = SHUTDOWN;
      r.controller.abort(new Error('worker shutting down'));
    }
  }

  private async shutdown(graceS: number): Promise<void> {
    this.o.log.info({ worker: this.id, graceS, running: this.running.size }, 'stopping: finishing the running job');
    const timer = setTimeout(() => this.returnRunning(), graceS * 1000);
    await this.worker.close(); // waits for the running job
    clearTimeout(timer);
    clearInterval(this.beat);
    await this.redis.del(workerKey(this.id), listingsKey(this.id)).catch(() => 0);
    this.subscriber.disconnect();
    this.redis.disconnect();
    this.o.model.engine.dispose();
    this.o.log.info({ worker: this.id }, 'worker stopped');
  }

  private onCancel(message: string): void {
    let m: Partial<Record<keyof CancelMessage, unknown>>;
    try {
      m = JSON.parse(message) as typeof m;
    } catch {
      return;
    }
    const r = typeof m.id === 'string' ? this.running.get(m.id) : undefined;
    if (r === undefined) return;
    if (m.stop === true) return r.stopper.abort();
    r.reason = typeof m.reason === 'string' ? m.reason : 'client';
    r.controller.abort(new Error(`cancelled (${r.reason})`));
  }

  private async process(job: BullJob<JobData, Outcome>, token?: string): Promise<Outcome> {
    const id = job.id ?? '';
    const takenAt = Date.now();
    // Listening first, then the keys: a cancel or stop sent while the job was being taken is seen one way or the other.
    const run: Running = { controller: new AbortController(), stopper: new AbortController(), reason: null };
    this.running.set(id, run);
    const [cancelled, stop] = await Promise.all([this.redis.get(cancelKey(id)), this.redis.get(stopKey(id))]).catch(() => [null, null]);
    if (cancelled !== null) {
      this.running.delete(id);
      return { status: 'cancelled', reason: cancelled };
    }
    if (stop !== null) run.stopper.abort();
    void this.announce();
    const { uid, model } = job.data;
    const log = this.o.log.child({ job: id, uid });
    const params = decodeParams(job.data.params);
    log.info({ model, attempt: job.attemptsStarted, ...(this.o.logPrompts === true ? { prompt: params.prompt, negative_prompt: params.negativePrompt } : {}) }, 'job started');
    if (this.o.logPrompts !== true) log.debug({ prompt: params.prompt }, 'job prompt');
    let firstStepAt = 0;
    let lastStepAt = 0;
    const previews = new PreviewWriter(this.redis, id, (p) => void job.updateProgress(p).catch(() => undefined));
    const preview = this.o.preview === undefined ? { decoder: 'approx' as const } : this.o.preview;
    try {
      const local = resolveModelNames(params, this.o.models ?? {}, (message) => log.warn(message));
      const r = await this.o.model.engine.generate(local, {
        signal: run.controller.signal,
        stop: run.stopper.signal,
        onProgress: (step, total) => {
          lastStepAt = Date.now();
          if (step === 1) firstStepAt = lastStepAt;
          previews.progress(step, total);
        },
        ...(preview !== null ? { preview, onPreview: (p: StepPreview) => previews.preview(p) } : {}),
      });
      const image = r.images[0];
      if (image === undefined) throw new Error('the pipeline returned no image');
      const parameters = toAnsweredParameters(r.params, job.data.echo);
      await this.store(id, uid, image.png, { uid, seed: image.seed, created_at: new Date().toISOString(), parameters, job: id, worker: this.id });
      const end = Date.now();
      const timings: JobTimings = {
        queuedMs: takenAt - job.data.admittedAt,
        firstStepMs: (firstStepAt || end) - takenAt,
        stepsMs: (lastStepAt || end) - (firstStepAt || end),
        decodeMs: end - (lastStepAt || end),
        totalMs: end - job.data.admittedAt,
      };
      this.succeeded += 1;
      log.info({ status: 'succeeded', ...timings, ...(r.stoppedAt !== undefined ? { stopped_at: r.stoppedAt } : {}) }, r.stoppedAt !== undefined ? 'job succeeded (interrupted: the image of its last step)' : 'job succeeded');
      return { status: 'succeeded', result: { message: 'success', uid, image: image.png.toString('base64'), seed: image.seed, parameters }, timings };
    } catch (e) {
      if (run.controller.signal.aborted && run.reason === SHUTDOWN && token !== undefined) {
        await job.moveToWait(token); // back in line for another worker
        log.info('job returned to the queue: worker shutting down');
        throw new WaitingError();
      }
      if (run.controller.signal.aborted) {
        log.info({ status: 'cancelled', reason: run.reason }, 'job cancelled');
        return { status: 'cancelled', reason: run.reason ?? 'client' };
      }
      const h = toHttpError(e);
      this.failed += 1;
      if (h.statusCode >= 500) log.error({ err: e }, `generation failed: ${h.message}`);
      else log.info({ status: 'failed', error: h.message }, 'job failed');
      return { status: 'failed', statusCode: h.statusCode, message: h.message, ...(h.field !== undefined ? { field: h.field } : {}) };
    } finally {
      this.running.delete(id);
      previews.close();
      void this.announce();
    }
  }

  /** Stores both files; a 409 from an earlier attempt of this same job (its sidecar names the job) is that attempt's work, kept. */
  private async store(jobId: string, uid: string, png: Buffer, sidecar: Record<string, unknown>): Promise<void> {
    try {
      await this.o.outputs.save(uid, png, sidecar);
    } catch (e) {
      if (!(e instanceof HttpError) || e.statusCode !== 409) throw e;
      const earlier = await this.o.outputs.read(uid, 'json');
      const mine = earlier !== null && (JSON.parse(earlier.toString('utf8')) as { job?: unknown }).job === jobId;
      if (!mine) throw e;
      if ((await this.o.outputs.read(uid, 'png')) === null) throw e; // the earlier attempt's json without its png: leave it to the error
      this.o.log.info({ job: jobId, uid }, 'outputs already stored by an earlier attempt of this job');
    }
  }

  private async announce(): Promise<void> {
    const info: WorkerInfo = {
      id: this.id,
      host: hostname(),
      pid: process.pid,
      models: [{ name: this.o.model.name, limits: this.o.model.engine.limits, ...(this.o.model.file !== undefined ? { file: this.o.model.file } : {}) }],
      running: this.running.size,
      current: [...this.running.keys()][0] ?? null,
      succeeded: this.succeeded,
      failed: this.failed,
      startedAt: this.startedAt,
      seenAt: Date.now(),
    };
    await this.redis.set(workerKey(this.id), JSON.stringify(info), 'EX', this.ttlS).catch(() => undefined);
    if (this.listings !== null) {
      const kept = await this.redis.expire(listingsKey(this.id), this.ttlS).catch(() => 1);
      if (kept === 0) await this.redis.set(listingsKey(this.id), this.listings, 'EX', this.ttlS).catch(() => undefined); // Redis restarted
    }
  }

  private get ttlS(): number {
    return Math.ceil((this.o.heartbeatS ?? 5) * 3);
  }

  /** What the model folders hold, listed once at start into `sd:listings:<id>` (kept alive with the announcement). */
  private async list(): Promise<void> {
    const dirs = this.o.models ?? {};
    try {
      const listings: WorkerListings = { loras: loraList(dirs), controlnet: controlNetModelList(dirs) };
      this.listings = JSON.stringify(listings);
      await this.redis.set(listingsKey(this.id), this.listings, 'EX', this.ttlS);
    } catch (e) {
      this.o.log.warn({ err: (e as Error).message }, 'the model folders were not listed for the front');
    }
  }
}

/**
 * One job's progress and previews into Redis, in order and one write at a time: a preview is encoded to PNG and set
 * under `sd:preview:<id>` before the progress that names its step; a preview made while the last one is still being
 * written replaces the one waiting (only the latest matters), and one made within PREVIEW_EVERY_MS of the last one
 * written is let go. close() removes the key once the job ends.
 */
class PreviewWriter {
  private step = 0;
  private total = 0;
  private shown: PreviewFacts | undefined;
  private waiting: StepPreview | null = null;
  private writing: Promise<void> | null = null;
  private closed = false;
  private writtenAt = 0;

  constructor(
    private readonly redis: Redis,
    private readonly jobId: string,
    private readonly report: (p: JobProgressData) => void,
  ) {}

  progress(step: number, total: number): void {
    this.step = step;
    this.total = total;
    this.report(this.current());
  }

  preview(p: StepPreview): void {
    if (Date.now() - this.writtenAt < PREVIEW_EVERY_MS) return;
    this.waiting = p;
    this.writing ??= this.drain().finally(() => (this.writing = null));
  }

  close(): void {
    this.closed = true;
    this.waiting = null;
    void (this.writing ?? Promise.resolve()).then(() => this.redis.del(previewKey(this.jobId))).catch(() => 0);
  }

  private current(): JobProgressData {
    return { step: this.step, total: this.total, ...(this.shown !== undefined ? { preview: this.shown } : {}) };
  }

  private async drain(): Promise<void> {
    while (this.waiting !== null && !this.closed) {
      const p = this.waiting;
      this.waiting = null;
      this.writtenAt = Date.now();
      try {
        const png = await encodePng({ rgb: p.rgb, width: p.width, height: p.height });
        if (png.length > MAX_PREVIEW_BYTES || this.closed) continue;
        const facts: PreviewFacts = { step: p.step, total: p.total, image: p.image, width: p.width, height: p.height, decoder: p.decoder };
        const value: RemotePreview = { ...facts, png: png.toString('base64') };
        await this.redis.set(previewKey(this.jobId), JSON.stringify(value), 'EX', PREVIEW_TTL_S);
        this.shown = facts;
        if (!this.closed) this.report(this.current());
      } catch {
        // Redis away or an odd preview: the next one tries again; previews are best effort
      }
    }
  }
}
