/**
 * The routes of the server, their schemas, and the two gates every request passes first:
 * auth (every route but /health, both dialects: the Bearer key, or A1111's HTTP Basic of ./a1111/auth.ts)
 * and "is the model loaded" (503 on the work routes until it is).
 */
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { INFERENCE_BODY_SCHEMA, JOB_ID_SCHEMA, JSON_LIMITS, type InferenceBody } from './body.js';
import { HttpError, errorBody } from './errors.js';
import { basicAllowed, basicCredentials, sameSecret, type BasicCredentials } from './a1111/auth.js';
import { isFinished } from './jobs.js';
import { WEB_OPEN_ROUTES } from './web.js';
import type { Engine } from './engine.js';
import type { JobQueue } from './jobs.js';
import type { InferenceResult, ServerJob, ServerState, WorkItem } from './work.js';
import { jobView } from './job-view.js';
import type { LiveJobs } from './live.js';
import { streamJobEvents } from './events.js';

/** What the routes need of the server (SdServer is it): its state, admission of work, and the job queue. */
export interface RouteHost {
  readonly state: ServerState;
  readonly queue: Pick<JobQueue<WorkItem, InferenceResult>, 'get' | 'cancel' | 'position'>;
  assertAccepting(): Engine;
  health(): { statusCode: number; body: Record<string, unknown> };
  admit(body: InferenceBody): Promise<ServerJob>;
  /** Previews and event streams of running jobs (./live.ts). */
  readonly live: LiveJobs;
}

export interface RouteOptions {
  readonly apiKey: string | null;
  /** --api-auth users; empty: no Basic auth. */
  readonly apiAuth?: readonly BasicCredentials[];
}

/** Routes that need the model: 503 while it loads (checked before the body is even read). */
const WORK_ROUTES = new Set(['/inference', '/jobs', '/jobs/:id', '/jobs/:id/preview.png', '/jobs/:id/events']);
const OPEN_ROUTES = new Set(['/health', ...WEB_OPEN_ROUTES]); // the page asks for the key itself

interface JobParams {
  readonly id: string;
}

/**
 * The gates of every route of both dialects (on the root instance): auth, the 503 while the model loads, and the
 * 404 (413 first when its body is larger than a body-less route may send: the JSON guards are each dialect's own).
 */
export function registerGates(app: FastifyInstance, server: RouteHost, o: RouteOptions): void {
  app.addHook('onRequest', async (request) => {
    const route = request.routeOptions.url;
    const auth = o.apiKey !== null || (o.apiAuth ?? []).length > 0;
    if (auth && (route === undefined || !OPEN_ROUTES.has(route))) checkAuth(request, o.apiKey, o.apiAuth ?? []);
    if (route !== undefined && WORK_ROUTES.has(route) && (server.state === 'loading' || server.state === 'failed')) {
      server.assertAccepting();
    }
    const length = Number(request.headers['content-length'] ?? 0);
    if (route === undefined && length > JSON_LIMITS.bytesWithoutBody) {
      throw new HttpError(413, `body: Content-Length ${length} is over the limit of ${JSON_LIMITS.bytesWithoutBody} bytes for ${request.method} ${request.url}`, 'body');
    }
  });

  app.setNotFoundHandler((request, reply) => {
    void reply.code(404).send(errorBody(404, `no route ${request.method} ${request.url}`));
  });
}

/** Our dialect's routes (/inference, /jobs, /health), in a scope of their own with ../body.ts's JSON guards. */
export function registerRoutes(app: FastifyInstance, server: RouteHost): void {

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
    return viewOf(server, findJob(server, request.params.id));
  });

  // The latest preview of a running job (./live.ts; latent size with the approx decoder), the image once it succeeded.
  app.get<{ Params: JobParams }>('/jobs/:id/preview.png', { schema: { params: JOB_ID_SCHEMA } }, async (request, reply) => {
    const job = findJob(server, request.params.id);
    if (job.status === 'succeeded' && job.result !== null) return reply.type('image/png').header('cache-control', 'no-store').send(Buffer.from(job.result.image, 'base64'));
    const p = await server.live.previewPng(job.id);
    if (p === null) throw new HttpError(404, `job ${job.id} has no preview (${job.status === 'running' ? 'before its first step' : job.status})`);
    return reply.type('image/png').header('cache-control', 'no-store').header('x-sd-step', String(p.step)).header('x-sd-total', String(p.total)).send(p.png);
  });

  app.get<{ Params: JobParams }>('/jobs/:id/events', { schema: { params: JOB_ID_SCHEMA } }, async (request, reply) => {
    const job = findJob(server, request.params.id);
    return streamJobEvents(reply, job, server.live, () => viewOf(server, job));
  });

  app.delete<{ Params: JobParams }>('/jobs/:id', { schema: { params: JOB_ID_SCHEMA } }, async (request, reply) => {
    const job = findJob(server, request.params.id);
    if (isFinished(job.status)) throw new HttpError(409, `job ${job.id} already ${job.status}: nothing to cancel`);
    server.queue.cancel(job.id, 'client');
    // A queued job is cancelled at once (200); a running one stops at its next step (202, poll for 'cancelled').
    return reply.code(job.status === 'cancelled' ? 200 : 202).send({ ...viewOf(server, job), cancel_requested: true });
  });
}

/**
 * `Authorization: Bearer <key>` compared in constant time (hashed first, so lengths leak nothing), or, with
 * --api-auth, `Basic base64(user:pass)`. The 401 challenges with Basic when Basic users exist (A1111 clients
 * show a login), else with Bearer.
 */
function checkAuth(request: FastifyRequest, apiKey: string | null, users: readonly BasicCredentials[]): void {
  const header = request.headers.authorization ?? '';
  const given = /^Bearer\s+(.+)$/i.exec(header)?.[1]?.trim() ?? '';
  if (apiKey !== null && given !== '' && sameSecret(given, apiKey)) return;
  const basic = basicCredentials(header);
  if (users.length > 0 && basic !== null && basicAllowed(basic, users)) return;
  const expected = [apiKey !== null ? 'Bearer <key>' : null, users.length > 0 ? 'Basic <user:password>' : null].filter((s) => s !== null).join(' or ');
  const why = given === '' && basic === null ? `missing Authorization: ${expected} header` : given !== '' ? 'wrong API key' : 'wrong user or password';
  throw new HttpError(401, `unauthorized: ${why}`, undefined, { 'www-authenticate': users.length > 0 ? 'Basic realm="sd serve"' : 'Bearer' });
}

function findJob(server: RouteHost, id: string): ServerJob {
  const job = server.queue.get(id);
  if (job === undefined) throw new HttpError(404, `job ${id} not found (unknown, or finished longer ago than --job-ttl)`);
  return job;
}

function answerInference(job: ServerJob, reply: FastifyReply): FastifyReply {
  if (job.status === 'succeeded' && job.result !== null) return reply.code(200).send(job.result);
  if (job.status === 'failed' && job.error !== null) {
    const { statusCode, message, field } = job.error;
    return reply.code(statusCode).send(errorBody(statusCode, message, field));
  }
  const why = job.cancelReason === 'shutdown' ? 'the server is shutting down' : `cancelled (${job.cancelReason ?? 'unknown'})`;
  return reply.code(503).send(errorBody(503, `not generated: ${why}`));
}

/** GET /jobs/:id: what a poller needs at each status (./job-view.ts). */
function viewOf(server: RouteHost, job: ServerJob): Record<string, unknown> {
  return jobView(job, server.queue.position(job.id), server.live.hasPreview(job.id));
}
