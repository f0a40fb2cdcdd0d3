/**
 * The job store the server admits work into and reads jobs from, whichever runs them: the in-process JobQueue
 * (../server/jobs.ts, the engine on this machine) or QueueFront (./front.ts, BullMQ on Redis, `sd worker`s
 * elsewhere). The server's routes see only this.
 */
import type { Job } from '../server/jobs.js';

export interface JobStore<I, R> {
  /** Jobs waiting (not running). */
  readonly depth: number;
  readonly runningCount: number;
  get(id: string): Job<I, R> | undefined;
  /** 1-based place in line of a queued job, 0 when unknown or not waiting. */
  position(id: string): number;
  /** Admit a job, or throw QueueFullError. */
  submit(input: I): Job<I, R>;
  /** False when the job is unknown or finished. */
  cancel(id: string, reason?: string): boolean;
  /** Shutdown: take nothing more (the in-process queue also cancels what waits). */
  drain(reason: string): void;
  abortRunning(reason: string): void;
  /** Resolves once nothing this process runs is running. */
  idle(): Promise<void>;
  dispose(): void;
  retryAfterS(): number;
}
