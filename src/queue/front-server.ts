/**
 * What `sd serve --queue` changes in the server (../server/server.ts), kept here so the server's hunk is small:
 * the Engine the front validates requests with (no model: the limits the workers announced), the /health fields of
 * queue mode, and the hook that reads a job from Redis before `GET /jobs/:id` / `DELETE /jobs/:id` look for it.
 */
import type { FastifyInstance } from 'fastify';
import type { ParamLimits } from '../pipeline/params.js';
import type { Engine } from '../server/engine.js';
import { HttpError } from '../server/errors.js';
import type { QueueFront } from './front.js';

/** Connects, then stands in for the model: `limits` are the default model's as its workers announced them. */
export async function frontEngine(front: QueueFront): Promise<Engine> {
  await front.connect();
  return {
    get limits(): ParamLimits {
      const limits = front.limits();
      if (limits === null) {
        throw new HttpError(503, 'no worker has announced a model yet: start `sd worker --queue ...` (jobs are validated against the model a worker holds)', undefined, { 'retry-after': '5' });
      }
      return limits;
    },
    generate: () => Promise.reject(new Error('the queue front runs no model: workers do')),
    dispose: () => undefined,
  };
}

/** /health in queue mode: no model here, Redis and the workers instead. */
export function frontHealth(front: QueueFront): Record<string, unknown> {
  const workers = front.workers();
  return {
    mode: 'queue',
    model_loaded: false,
    redis: front.connected ? 'connected' : 'reconnecting',
    default_model: front.defaultModel(),
    workers: workers.length,
    models: [...new Set(workers.flatMap((w) => w.models.map((m) => m.name)))].sort(),
  };
}

/** Jobs admitted by another front, or before this one restarted, are read from Redis on first request. */
export function registerFrontHooks(app: FastifyInstance, front: QueueFront): void {
  app.addHook('preHandler', async (request) => {
    if (request.routeOptions.url !== '/jobs/:id') return;
    const id = (request.params as { id?: unknown }).id;
    if (typeof id === 'string') await front.lookup(id);
  });
}
