/**
 * A1111's global progress and interrupt: what `/sdapi/v1/progress` reports and what `/interrupt` and `/skip` stop.
 *
 * One A1111 request is one group of queue jobs, one job per image (batch_size x n_iter), so that its images wait
 * in the same bounded queue as every other job. Progress is the running job's (whichever dialect queued it):
 * `(job_no + sampling_step / sampling_steps) / job_count` over its group, A1111's formula. `/interrupt` cancels the
 * running job and the rest of its group; `/skip` the running job only (the group goes on with its next image).
 * An interrupted image is finished early, as A1111 does: its job stops at the next step and succeeds with the image
 * of that step's predicted x0 (the rest of the group is cancelled); a skipped one is dropped.
 * Both act on what runs now and leave no flag behind: an interrupt while idle does not cut the next job short.
 * `current_image` is the running job's latest preview (../live.ts) as a bare base64 PNG, null before its first step
 * or with `?skip_current_image=true`.
 */
import type { ServerJob } from '../work.js';
import type { A1111Mode } from './request.js';

export interface Group {
  readonly mode: A1111Mode;
  readonly jobs: readonly ServerJob[];
  interrupted: boolean;
  skipped: boolean;
}

/** The running jobs and how to cancel one: the part of the server this needs. */
export interface ProgressHost {
  runningJobs(): readonly ServerJob[];
  readonly queue: { cancel(id: string, reason: string): boolean };
  /** Finish a running job with what it made so far; false when it cannot (it is then cancelled). */
  stopJob?(id: string): boolean;
  /** The latest preview of a job, as PNG. */
  readonly live?: { previewPng(id: string): Promise<{ png: Buffer } | null> };
}

export const INTERRUPTED = 'interrupted';
export const SKIPPED = 'skipped';

/** A1111's job_timestamp: local time as YYYYMMDDhhmmss. */
export function timestamp(d: Date): string {
  const p = (n: number): string => String(n).padStart(2, '0');
  return `${d.getFullYear()}${p(d.getMonth() + 1)}${p(d.getDate())}${p(d.getHours())}${p(d.getMinutes())}${p(d.getSeconds())}`;
}

export class A1111Progress {
  private readonly groups = new Map<string, Group>();

  constructor(private readonly host: ProgressHost) {}

  add(mode: A1111Mode, jobs: readonly ServerJob[]): Group {
    const group: Group = { mode, jobs, interrupted: false, skipped: false };
    for (const job of jobs) this.groups.set(job.id, group);
    return group;
  }

  remove(group: Group): void {
    for (const job of group.jobs) this.groups.delete(job.id);
  }

  /** GET /sdapi/v1/progress; `withImage` false: `current_image` null (A1111's skip_current_image). */
  async view(withImage = true): Promise<Record<string, unknown>> {
    const job = this.host.runningJobs()[0];
    const idle = {
      progress: 0,
      eta_relative: 0,
      state: { skipped: false, interrupted: false, stopping_generation: false, job: '', job_count: 0, job_timestamp: timestamp(new Date()), job_no: 0, sampling_step: 0, sampling_steps: 0 },
      current_image: null,
      textinfo: null,
      current_task: null,
    };
    if (job === undefined) return idle;
    const group = this.groups.get(job.id);
    const jobs = group?.jobs ?? [job];
    const jobNo = Math.max(0, jobs.indexOf(job));
    const steps = job.total > 0 ? job.total : (job.input.params.steps ?? 0);
    const progress = Math.min(1, (jobNo + (steps > 0 ? job.step / steps : 0)) / jobs.length);
    const started = (jobs[0].startedAt ?? job.startedAt ?? new Date()).getTime();
    const elapsedS = (Date.now() - started) / 1000;
    return {
      ...idle,
      progress,
      eta_relative: progress > 0 ? Math.max(0, elapsedS / progress - elapsedS) : 0,
      state: {
        ...idle.state,
        skipped: group?.skipped ?? false,
        interrupted: group?.interrupted ?? false,
        job: `${group?.mode ?? 'job'} ${jobNo + 1}/${jobs.length}`,
        job_count: jobs.length,
        job_timestamp: timestamp(new Date(started)),
        job_no: jobNo,
        sampling_step: job.step,
        sampling_steps: steps,
      },
      current_image: withImage ? ((await this.host.live?.previewPng(job.id))?.png.toString('base64') ?? null) : null,
      current_task: job.id,
    };
  }

  /** POST /sdapi/v1/interrupt: the running jobs and the rest of their groups. Returns how many were stopped. */
  interrupt(): number {
    let n = 0;
    for (const job of this.host.runningJobs()) {
      const group = this.groups.get(job.id);
      if (group !== undefined) group.interrupted = true;
      const stopped = this.host.stopJob?.(job.id) === true;
      if (stopped) n++;
      for (const j of group?.jobs ?? [job]) if (!(stopped && j === job) && this.host.queue.cancel(j.id, INTERRUPTED)) n++;
    }
    return n;
  }

  /** POST /sdapi/v1/skip: the running jobs only. */
  skip(): number {
    let n = 0;
    for (const job of this.host.runningJobs()) {
      const group = this.groups.get(job.id);
      if (group !== undefined) group.skipped = true;
      if (this.host.queue.cancel(job.id, SKIPPED)) n++;
    }
    return n;
  }
}
