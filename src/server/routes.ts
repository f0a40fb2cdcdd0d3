/**
 * The routes of the server, their schemas, and the two gates every request passes first:
 * bearer auth (every route but /health) and "is the model loaded" (503 on the work routes until it is).
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { INFERENCE_BODY_SCHEMA, JOB_ID_SCHEMA, type InferenceBody } from './body.js';
import { HttpError, errorBody } from './errors.js';
import { isFinished } from './jobs.js';
import type { Engine } from './engine.js';
import type { JobQueue } from './jobs.js';
import type { InferenceResult, ServerJob, ServerState, WorkItem } from './work.js';

/** What the routes need of the server (SdServer is it): its state, admission of work, and the job queue. */
export interface RouteHost {
  readonly state: ServerState;
  readonly queue: Pick<JobQueue<WorkItem, InferenceResult>, 'get' | 'cancel' | 'position'>;
  assertAccepting(): Engine;
  health(): { statusCode: number; body: Record<string, unknown> };
  admit(body: InferenceBody): Promise<ServerJob>;
}

export interface RouteOptions {
  readonly apiKey: string | null;
}

/** Routes that need the model: 503 while it loads (checked before the body is even read). */
const WORK_ROUTES = new Set(['/inference', '/jobs', '/jobs/:id']);
const OPEN_ROUTES = new Set(['/health']);

interface JobParams {
  readonly id: string;
}

export function registerRoutes(app: FastifyInstance, server: RouteHost, o: RouteOptions): void {
  app.addHook('onRequest', async (request) => {
    const route = request.routeOptions.url;
    if (o.apiKey !== null && (route === undefined || !OPEN_ROUTES.has(route))) checkBearer(request, o.apiKey);
    if (route !== undefined && WORK_ROUTES.has(route) && (server.state === 'loading' || server.state === 'failed')) {
      server.assertAccepting();
    }
  });

  app.setNotFoundHandler((request, reply) => {
    void reply.code(404).send(errorBody(404, `no route ${request.method} ${request.url}`));
  });

  app.get('/health', async (_request, reply) => {
    const h = server.health();
    return reply.code(h.statusCode).send(h.body);
  });

  app.post<{ Body: InferenceBody }>('/inference', { schema: { body: INFERENCE_BODY_SCHEMA } }, async (request, reply) => {
    const job = await server.admit(request.body);
    // A client that hangs up before its image is ready frees its place: cancel its job.
    const onClose = (): void => {
      if (!reply.raw.writableFinished) server.queue.cancel(job.id, 'client disconnected');
    };
    reply.raw.once('close', onClose);
    await job.done;
    reply.raw.off('close', onClose);
    return answerInference(job, reply);
  });

  app.post<{ Body: InferenceBody }>('/jobs', { schema: { body: INFERENCE_BODY_SCHEMA } }, async (request, reply) => {
    const job = await server.admit(request.body);
    return reply.code(202).header('location', `/jobs/${job.id}`).send({ id: job.id, uid: job.input.uid, status: job.status });
  });

  app.get<{ Params: JobParams }>('/jobs/:id', { schema: { params: JOB_ID_SCHEMA } }, async (request) => {
    return jobView(server, findJob(server, request.params.id));
  });

  app.delete<{ Params: JobParams }>('/jobs/:id', { schema: { params: JOB_ID_SCHEMA } }, async (request, reply) => {
    const job = findJob(server, request.params.id);
    if (isFinished(job.status)) throw new HttpError(409, `job ${job.id} already ${job.status}: nothing to cancel`);
    server.queue.cancel(job.id, 'client');
    // A queued job is cancelled at once (200); a running one stops at its next step (202, poll for 'cancelled').
    return reply.code(job.status === 'cancelled' ? 200 : 202).send({ ...jobView(server, job), cancel_requested: true });
  });
}

/** Constant-time comparison of `Authorization: Bearer <key>` (hashed first, so lengths leak nothing). */
function checkBearer(request: FastifyRequest, apiKey: string): void {
  const header = request.headers.authorization ?? '';
  const given = /^Bearer\s+(.+)$/i.exec(header)?.[1]?.trim() ?? '';
  const digest = (s: string): Buffer => createHash('sha256').update(s).digest();
  if (given === '' || !timingSafeEqual(digest(given), digest(apiKey))) {
    const why = given === '' ? 'missing Authorization: Bearer <key> header' : 'wrong API key';
    throw new HttpError(401, `unauthorized: ${why}`, undefined, { 'www-authenticate': 'Bearer' });
  }
}

function findJob(server: RouteHost, id: string): ServerJob {
  const job = server.queue.get(id);
  if (job === undefined) throw new HttpError(404, `job ${id} not found (unknown, or finished longer ago than --job-ttl)`);
  return job;
}

function answerInference(job: ServerJob, reply: FastifyReply): FastifyReply {
  if (job.status === 'succeeded' && job.result !== null) return reply.code(200).send(job.result);
  if (job.status === 'failed' && job.error !== null) {
    const { statusCode, message } = job.error;
    return reply.code(statusCode).send(errorBody(statusCode, message));
  }
  const why = job.cancelReason === 'shutdown' ? 'the server is shutting down' : `cancelled (${job.cancelReason ?? 'unknown'})`;
  return reply.code(503).send(errorBody(503, `not generated: ${why}`));
}

/** GET /jobs/:id: what a poller needs at each status. */
function jobView(server: RouteHost, job: ServerJob): Record<string, unknown> {
  const base = { id: job.id, uid: job.input.uid, status: job.status, created_at: job.createdAt.toISOString() };
  const finishedAt = job.finishedAt?.toISOString();
  switch (job.status) {
    case 'queued':
      return { ...base, position: server.queue.position(job.id) };
    case 'running':
      return { ...base, step: job.step, total: job.total, started_at: job.startedAt?.toISOString() };
    case 'succeeded':
      return { ...base, finished_at: finishedAt, result: job.result };
    case 'failed':
      return { ...base, finished_at: finishedAt, error: job.error?.message, error_status: job.error?.statusCode };
    case 'cancelled':
      return { ...base, finished_at: finishedAt, reason: job.cancelReason };
  }
}
