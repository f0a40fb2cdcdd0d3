/**
 * The job queue: a bounded FIFO of work items run `concurrency` at a time, each cancellable through its
 * AbortSignal, kept after it finishes for `ttlMs` so its status can be read, then forgotten.
 *
 * `maxQueue` counts jobs WAITING, not the ones running: with the defaults (1 running, 8 waiting) the
 * server holds at most 9 generations, and a client that gets 202/200 knows at most 8 are ahead of it.
 * A submit beyond that throws QueueFullError (the server answers 429 with Retry-After).
 *
 * The queue knows nothing of HTTP or images: a job is an input and a `run(input, ctx)` that resolves
 * to a result; how a failure maps to a status is the caller's (see `describeError`).
 */
import { randomUUID } from 'node:crypto';

export type JobStatus = 'queued' | 'running' | 'succeeded' | 'failed' | 'cancelled';

export interface JobContext {
  /** The job's id (for what the runner reports about it: previews, events). */
  readonly id: string;
  readonly signal: AbortSignal;
  /** Finish early with what is made so far (A1111's interrupt); the job then succeeds. */
  readonly stop: AbortSignal;
  /** step is 1-based; total is the number of steps that will run. */
  readonly onProgress: (step: number, total: number) => void;
}

export interface JobFailure {
  /** The HTTP status this failure is answered with on the synchronous route (400 bad input, 500 ours). */
  readonly statusCode: number;
  readonly message: string;
  /** The request field it names, when it is bad input. */
  readonly field?: string;
}

export interface Job<I, R> {
  readonly id: string;
  readonly input: I;
  readonly createdAt: Date;
  status: JobStatus;
  step: number;
  total: number;
  startedAt: Date | null;
  finishedAt: Date | null;
  result: R | null;
  error: JobFailure | null;
  /** Why it was cancelled: 'client' (DELETE or a closed connection) or 'shutdown'. */
  cancelReason: string | null;
  /** Resolves (never rejects) once the job is succeeded, failed or cancelled. */
  readonly done: Promise<void>;
}

export interface JobQueueOptions<I, R> {
  readonly run: (input: I, ctx: JobContext) => Promise<R>;
  /** How a thrown error is reported; an abort is recognised before this is asked. */
  readonly describeError: (e: unknown) => JobFailure;
  readonly maxQueue: number;
  readonly concurrency: number;
  /** How long a finished job stays readable; 0 forgets it at once. */
  readonly ttlMs: number;
  /** Called on every status change (for logs). */
  readonly onChange?: (job: Job<I, R>) => void;
  /** The client's guess of how long a job takes before any has run (Retry-After). */
  readonly initialJobMs?: number;
}

export class QueueFullError extends Error {
  override name = 'QueueFullError';
  constructor(
    readonly maxQueue: number,
    readonly retryAfterS: number,
  ) {
    super(`the queue is full (${maxQueue} jobs waiting): retry in about ${retryAfterS} s`);
  }
}

interface Entry<I, R> {
  readonly job: Job<I, R>;
  readonly controller: AbortController;
  readonly stopper: AbortController;
  readonly settle: () => void;
  expiry: NodeJS.Timeout | null;
}

/** Mean of the last few job durations, for Retry-After. */
const DURATION_WINDOW = 8;

export class JobQueue<I, R> {
  private readonly entries = new Map<string, Entry<I, R>>();
  private readonly waiting: Entry<I, R>[] = [];
  private readonly running = new Set<Entry<I, R>>();
  private readonly durationsMs: number[] = [];
  private paused = false;

  constructor(private readonly o: JobQueueOptions<I, R>) {}

  get depth(): number {
    return this.waiting.length;
  }

  get runningCount(): number {
    return this.running.size;
  }

  get(id: string): Job<I, R> | undefined {
    return this.entries.get(id)?.job;
  }

  /** 1-based place in line of a queued job, or 0 when it is not waiting. */
  position(id: string): number {
    return this.waiting.findIndex((e) => e.job.id === id) + 1;
  }

  /** Enqueue, or throw QueueFullError when `maxQueue` jobs already wait. */
  submit(input: I): Job<I, R> {
    if (this.waiting.length >= this.o.maxQueue) throw new QueueFullError(this.o.maxQueue, this.retryAfterS());
    let settle = (): void => {};
    const done = new Promise<void>((resolve) => (settle = resolve));
    const job: Job<I, R> = {
      id: randomUUID(), input, createdAt: new Date(), status: 'queued', step: 0, total: 0,
      startedAt: null, finishedAt: null, result: null, error: null, cancelReason: null, done,
    };
    const entry: Entry<I, R> = { job, controller: new AbortController(), stopper: new AbortController(), settle, expiry: null };
    this.entries.set(job.id, entry);
    this.waiting.push(entry);
    this.o.onChange?.(job);
    this.pump();
    return job;
  }

  /**
   * Cancel: a waiting job at once; a running one through its signal (it turns 'cancelled' when the run
   * stops at the next step, or finishes normally if it was already past the last one).
   * Returns false when the job is unknown or already finished.
   */
  cancel(id: string, reason = 'client'): boolean {
    const entry = this.entries.get(id);
    if (entry === undefined || isFinished(entry.job.status)) return false;
    entry.job.cancelReason ??= reason;
    const at = this.waiting.indexOf(entry);
    if (at >= 0) {
      this.waiting.splice(at, 1);
      this.finish(entry, 'cancelled');
    } else {
      entry.controller.abort(new Error(`job ${id} cancelled (${reason})`));
    }
    return true;
  }

  /**
   * Finish a running job early: it stops at its next step and succeeds with the image made so far (A1111's
   * interrupt). Returns false when the job is not running.
   */
  stop(id: string): boolean {
    const entry = this.entries.get(id);
    if (entry === undefined || entry.job.status !== 'running') return false;
    entry.stopper.abort();
    return true;
  }

  /** Shutdown, first half: start nothing more and cancel every waiting job. */
  drain(reason: string): void {
    this.paused = true;
    for (const entry of [...this.waiting]) this.cancel(entry.job.id, reason);
  }

  /** Shutdown, second half: abort the running jobs (after the grace period). */
  abortRunning(reason: string): void {
    for (const entry of [...this.running]) this.cancel(entry.job.id, reason);
  }

  /** Resolves once no job is running. */
  async idle(): Promise<void> {
    await Promise.all([...this.running].map((e) => e.job.done));
  }

  /** Forget every finished job now and stop the expiry timers (after shutdown). */
  dispose(): void {
    for (const entry of this.entries.values()) if (entry.expiry !== null) clearTimeout(entry.expiry);
    this.entries.clear();
  }

  /** Seconds until a place in the queue is likely free: one mean job per `concurrency`, at least 1. */
  retryAfterS(): number {
    const n = this.durationsMs.length;
    const meanMs = n > 0 ? this.durationsMs.reduce((a, b) => a + b, 0) / n : (this.o.initialJobMs ?? 5000);
    return Math.max(1, Math.ceil(meanMs / 1000 / this.o.concurrency));
  }

  /**
   * Start waiting jobs while slots are free. The slot is taken now (the job reads 'running'), the run
   * itself begins on the next turn of the event loop, so the request that submitted it is answered
   * first (a generation's first stretch of work holds the loop for a while).
   */
  private pump(): void {
    while (!this.paused && this.running.size < this.o.concurrency && this.waiting.length > 0) {
      const entry = this.waiting.shift() as Entry<I, R>;
      this.running.add(entry);
      entry.job.status = 'running';
      entry.job.startedAt = new Date();
      this.o.onChange?.(entry.job);
      setImmediate(() => void this.start(entry));
    }
  }

  private async start(entry: Entry<I, R>): Promise<void> {
    const { job, controller } = entry;
    if (controller.signal.aborted) return this.finish(entry, 'cancelled');
    const onProgress = (step: number, total: number): void => {
      job.step = step;
      job.total = total;
    };
    try {
      job.result = await this.o.run(job.input, { id: job.id, signal: controller.signal, stop: entry.stopper.signal, onProgress });
      this.finish(entry, 'succeeded');
    } catch (e) {
      if (controller.signal.aborted) {
        this.finish(entry, 'cancelled');
      } else {
        job.error = this.o.describeError(e);
        this.finish(entry, 'failed');
      }
    }
  }

  private finish(entry: Entry<I, R>, status: JobStatus): void {
    const { job } = entry;
    job.status = status;
    job.finishedAt = new Date();
    if (this.running.delete(entry) && status === 'succeeded') this.recordDuration(job);
    this.o.onChange?.(job);
    this.expire(entry);
    entry.settle();
    this.pump();
  }

  private recordDuration(job: Job<I, R>): void {
    this.durationsMs.push((job.finishedAt?.getTime() ?? 0) - (job.startedAt?.getTime() ?? 0));
    if (this.durationsMs.length > DURATION_WINDOW) this.durationsMs.shift();
  }

  private expire(entry: Entry<I, R>): void {
    const forget = (): void => {
      this.entries.delete(entry.job.id);
    };
    if (this.o.ttlMs <= 0) return forget();
    entry.expiry = setTimeout(forget, this.o.ttlMs);
    entry.expiry.unref();
  }
}

export const isFinished = (s: JobStatus): boolean => s === 'succeeded' || s === 'failed' || s === 'cancelled';
