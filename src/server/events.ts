/**
 * GET /jobs/:id/events: a job's progress as server-sent events (text/event-stream), for a browser's EventSource or
 * `curl -N`. First the job as it stands (`status`, GET /jobs/:id's JSON), then as it happens:
 *
 *   event: progress    data: {"step", "total", "eta_s"}
 *   event: preview     data: {"step", "total", "width", "height", "decoder", "url"}   (a new /jobs/:id/preview.png)
 *   event: status      data: the job (when it starts running)
 *   event: succeeded | failed | cancelled    data: the job, as GET /jobs/:id shows it; then the stream closes
 *
 * A comment line every 15 s keeps proxies from closing an idle stream. Streams are bounded (./live.ts): one beyond
 * the limit is answered 503 with Retry-After; a client that goes away frees its slot.
 */
import type { FastifyReply } from 'fastify';
import { HttpError } from './errors.js';
import { isFinished } from './jobs.js';
import type { LiveEvent, LiveJobs } from './live.js';
import type { ServerJob } from './work.js';

const KEEPALIVE_MS = 15_000;

const frame = (e: LiveEvent): string => `event: ${e.event}\ndata: ${JSON.stringify(e.data)}\n\n`;

export function streamJobEvents(reply: FastifyReply, job: ServerJob, live: LiveJobs, view: () => Record<string, unknown>): FastifyReply {
  if (!live.acquire()) throw new HttpError(503, `too many event streams open (${live.maxClients}): poll GET /jobs/${job.id} instead, or retry`, undefined, { 'retry-after': '5' });
  const res = reply.raw;
  let closed = false;
  let unsubscribe = (): void => {};
  let keepalive: NodeJS.Timeout | null = null;
  const close = (): void => {
    if (closed) return;
    closed = true;
    unsubscribe();
    if (keepalive !== null) clearInterval(keepalive);
    live.release();
    res.end();
  };
  reply.hijack();
  res.writeHead(200, {
    'content-type': 'text/event-stream; charset=utf-8',
    'cache-control': 'no-store',
    connection: 'keep-alive',
    'x-accel-buffering': 'no',
  });
  res.on('close', close);
  const first = view();
  if (isFinished(job.status)) {
    res.write(frame({ event: job.status as LiveEvent['event'], data: first }));
    close();
    return reply;
  }
  res.write(frame({ event: 'status', data: first }));
  unsubscribe = live.subscribe(job.id, (e) => {
    if (closed) return;
    res.write(frame(e));
    if (e.event === 'succeeded' || e.event === 'failed' || e.event === 'cancelled') close();
  });
  keepalive = setInterval(() => res.write(': keepalive\n\n'), KEEPALIVE_MS);
  keepalive.unref();
  return reply;
}
