/**
 * What a job looks like to a client, the one shape GET /jobs/:id answers, the event stream's last event carries and
 * a webhook posts: status, and at each status what a poller needs (place in line; step, total, eta_s and the preview
 * URL while it runs; the result, the error or the reason once finished).
 */
import type { ServerJob } from './work.js';

/** Seconds left, from the mean step time so far; null before the first step. */
export function etaSeconds(job: ServerJob, now = Date.now()): number | null {
  if (job.status !== 'running' || job.startedAt === null || job.step <= 0 || job.total <= 0) return null;
  const perStep = (now - job.startedAt.getTime()) / 1000 / job.step;
  return Math.max(0, Math.round(perStep * (job.total - job.step) * 10) / 10);
}

export const previewUrl = (id: string): string => `/jobs/${id}/preview.png`;

/** `position`: the job's 1-based place in line (queued jobs); `hasPreview`: whether a preview of it exists yet. */
export function jobView(job: ServerJob, position: number, hasPreview: boolean): Record<string, unknown> {
  const base = { id: job.id, uid: job.input.uid, status: job.status, created_at: job.createdAt.toISOString() };
  const finishedAt = job.finishedAt?.toISOString();
  switch (job.status) {
    case 'queued':
      return { ...base, position };
    case 'running':
      return {
        ...base,
        step: job.step,
        total: job.total,
        eta_s: etaSeconds(job),
        preview: hasPreview ? previewUrl(job.id) : null,
        started_at: job.startedAt?.toISOString(),
      };
    case 'succeeded':
      return { ...base, finished_at: finishedAt, result: job.result };
    case 'failed':
      return { ...base, finished_at: finishedAt, error: job.error?.message, error_status: job.error?.statusCode, ...(job.error?.field !== undefined ? { error_field: job.error.field } : {}) };
    case 'cancelled':
      return { ...base, finished_at: finishedAt, reason: job.cancelReason };
  }
}
