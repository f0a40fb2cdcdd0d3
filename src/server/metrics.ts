/**
 * `GET /metrics` in Prometheus' text format (version 0.0.4), kept by hand (a few counters, gauges and two
 * histograms need no client library). Fed by the server's job changes, the same in-process and with the Redis
 * queue (where the front counts the jobs it admitted, and the workers' announcements give the per-worker lines):
 *
 *   sd_queue_depth                       gauge      jobs waiting
 *   sd_jobs_running                      gauge      jobs running
 *   sd_jobs_total{status}                counter    finished jobs by status (succeeded, failed, cancelled)
 *   sd_job_failures_total                counter    failed jobs (the same as status="failed", for alerts)
 *   sd_job_wait_seconds                  histogram  admitted -> started
 *   sd_job_duration_seconds              histogram  started -> finished, succeeded jobs
 *   sd_workers                           gauge      live workers (queue mode)
 *   sd_worker_running{worker,host,model} gauge      per worker; sd_worker_jobs_total{worker,status} counter
 */
import type { WorkerInfo } from '../queue/protocol.js';
import type { ServerJob } from './work.js';

/** Seconds: a tiny test model's jobs to a large image on CPU. */
export const DURATION_BUCKETS = Object.freeze([0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600]);

class Histogram {
  private readonly counts: number[];
  private sum = 0;
  private n = 0;

  constructor(private readonly buckets: readonly number[]) {
    this.counts = buckets.map(() => 0);
  }

  observe(v: number): void {
    this.sum += v;
    this.n += 1;
    this.buckets.forEach((b, i) => {
      if (v <= b) this.counts[i] += 1;
    });
  }

  lines(name: string): string[] {
    return [
      ...this.buckets.map((b, i) => `${name}_bucket{le="${b}"} ${this.counts[i]}`),
      `${name}_bucket{le="+Inf"} ${this.n}`,
      `${name}_sum ${round(this.sum)}`,
      `${name}_count ${this.n}`,
    ];
  }
}

export interface MetricsSnapshot {
  readonly queueDepth: number;
  readonly running: number;
  /** Queue mode: the live workers; absent in-process. */
  readonly workers?: readonly WorkerInfo[];
}

export class Metrics {
  private readonly finished = { succeeded: 0, failed: 0, cancelled: 0 };
  private readonly wait = new Histogram(DURATION_BUCKETS);
  private readonly duration = new Histogram(DURATION_BUCKETS);
  private readonly started = new Set<string>();

  /** Every status change of a job (the server's onJobChange). */
  observe(job: ServerJob): void {
    if (job.status === 'running' && job.startedAt !== null && !this.started.has(job.id)) {
      this.started.add(job.id);
      this.wait.observe(Math.max(0, job.startedAt.getTime() - job.createdAt.getTime()) / 1000);
    }
    if (job.status !== 'succeeded' && job.status !== 'failed' && job.status !== 'cancelled') return;
    this.started.delete(job.id);
    this.finished[job.status] += 1;
    if (job.status === 'succeeded' && job.startedAt !== null && job.finishedAt !== null) {
      this.duration.observe(Math.max(0, job.finishedAt.getTime() - job.startedAt.getTime()) / 1000);
    }
  }

  render(s: MetricsSnapshot): string {
    const out: string[] = [];
    const metric = (name: string, type: string, help: string, lines: string[]): void => {
      out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`, ...lines);
    };
    metric('sd_queue_depth', 'gauge', 'Jobs waiting to run.', [`sd_queue_depth ${s.queueDepth}`]);
    metric('sd_jobs_running', 'gauge', 'Jobs running now.', [`sd_jobs_running ${s.running}`]);
    metric('sd_jobs_total', 'counter', 'Finished jobs by status.', Object.entries(this.finished).map(([k, v]) => `sd_jobs_total{status="${k}"} ${v}`));
    metric('sd_job_failures_total', 'counter', 'Failed jobs.', [`sd_job_failures_total ${this.finished.failed}`]);
    metric('sd_job_wait_seconds', 'histogram', 'Seconds from admission to start.', this.wait.lines('sd_job_wait_seconds'));
    metric('sd_job_duration_seconds', 'histogram', 'Seconds from start to finish of succeeded jobs.', this.duration.lines('sd_job_duration_seconds'));
    if (s.workers !== undefined) {
      const ws = s.workers;
      metric('sd_workers', 'gauge', 'Live workers.', [`sd_workers ${ws.length}`]);
      metric('sd_worker_running', 'gauge', 'Jobs running on each worker.', ws.map((w) => `sd_worker_running{${labels(w)}} ${w.running}`));
      metric('sd_worker_jobs_total', 'counter', 'Jobs finished by each worker since it started.', ws.flatMap((w) => [
        `sd_worker_jobs_total{worker="${esc(w.id)}",status="succeeded"} ${w.succeeded}`,
        `sd_worker_jobs_total{worker="${esc(w.id)}",status="failed"} ${w.failed}`,
      ]));
    }
    return out.join('\n') + '\n';
  }
}

const round = (v: number): number => Math.round(v * 1e6) / 1e6;
const esc = (v: string): string => v.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n');
const labels = (w: WorkerInfo): string => `worker="${esc(w.id)}",host="${esc(w.host)}",model="${esc(w.models.map((m) => m.name).join(','))}"`;

export const METRICS_CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8';
