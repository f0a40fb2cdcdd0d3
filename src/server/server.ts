/**
 * The HTTP server of `sd serve` (fastify): one model in memory, generations from a bounded FIFO queue.
 *
 *   POST   /inference   generate and wait: {message: 'success', uid, image (base64 PNG), seed, parameters}
 *   POST   /jobs        the same body, queued: 202 {id}; then
 *   GET    /jobs/:id    {status: queued | running (step, total) | succeeded (result) | failed (error) | cancelled}
 *   DELETE /jobs/:id    cancel (a running job stops between two steps)
 *   GET    /jobs/:id/preview.png   the running job's latest preview (./live.ts); /jobs/:id/events: server-sent events (./events.ts)
 *   POST /jobs {webhook}  the finished job is posted to that URL, signed (./webhooks.ts)
 *   GET    /health      {status: loading | ok | failed | stopping, ...}; 200 only when ok
 *   GET    /            the web page (and /web/*, /info, the gallery at /outputs: ./web.ts)
 *
 * Life cycle: `SdServer.start` listens at once and loads the model in the background (503 on /health
 * and on the work routes until it is in memory). `shutdown()` (SIGTERM/SIGINT) refuses new work with 503,
 * cancels the queued jobs, lets the running one finish for `graceS` seconds then aborts it, closes.
 * Generations run in an engine worker by default (./engine-worker.ts, given as loadEngine by `sd serve`).
 * Routes, schemas and auth are in ./routes.ts; the queue in ./jobs.ts; files in ./outputs.ts; the A1111 dialect
 * (/sdapi/v1/*, same queue, outputs and auth) in ./a1111/.
 */
import { randomUUID } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import Fastify, { type FastifyInstance, type FastifyServerOptions } from 'fastify';
import type { GenerateParams } from '../pipeline/api.js';
import { a1111Routes } from './a1111/routes.js';
import { controlNetRoutes } from './a1111/listings.js';
import { parseApiAuth } from './a1111/auth.js';
import { checkRequest, guardJsonBodies, toAnsweredParameters, type InferenceBody, type RequestBounds } from './body.js';
import type { Engine } from './engine.js';
import type { AdapterEcho } from './adapters.js';
import type { ModelDirs } from './models-dir.js';
import { HttpError, errorHandler, schemaErrorFormatter, toHttpError } from './errors.js';
import { JobQueue, QueueFullError, isFinished, type JobContext } from './jobs.js';
import { OutputStore } from './outputs.js';
import { registerGates, registerRoutes } from './routes.js';
import { METRICS_CONTENT_TYPE, Metrics } from './metrics.js';
import type { FrontProgress, QueueFront } from '../queue/front.js';
import { findCheckpoint, listTitles, modelInfo, type ModelInfo } from './checkpoints.js';
import type { ParamLimits } from '../pipeline/params.js';
import { frontEngine, frontHealth, registerFrontHooks } from '../queue/front-server.js';
import type { JobStore } from '../queue/store.js';
import { registerWebPage } from './web.js';
import type { InferenceResult, ServerJob, ServerState, WorkItem } from './work.js';
import type { PreviewOptions, StepPreview } from '../pipeline/api.js';
import { etaSeconds, jobView } from './job-view.js';
import { LiveJobs } from './live.js';
import { WebhookSender, checkWebhookUrl, type WebhookOptions } from './webhooks.js';

export interface ServerOptions {
  /** Loads the model; called once, right after the server starts listening. */
  readonly loadEngine: () => Promise<Engine>;
  /** Folder for `<uid>.png` + `<uid>.json`; created if missing. */
  readonly outputs: string;
  /** Require `Authorization: Bearer <apiKey>` on every route but /health; null/undefined: no auth. */
  readonly apiKey?: string | null;
  /** A1111's --api-auth "user:pass[,user2:pass2]": HTTP Basic accepted (on every route but /health) besides the key. */
  readonly apiAuth?: string | null;
  /** The weights path: the checkpoint `model` and A1111's sd_model_checkpoint may name (./checkpoints.ts). */
  readonly weights?: string | null;
  /** Jobs that may wait (the running ones not counted); default 8. */
  readonly maxQueue?: number;
  /** Generations run at the same time; default 1. */
  readonly concurrency?: number;
  /** Seconds a finished job stays readable at GET /jobs/:id; default 3600. */
  readonly jobTtlS?: number;
  /** Seconds shutdown waits for running jobs before cancelling them; default 20 (under Kubernetes' 30). */
  readonly graceS?: number;
  /** Largest request body in bytes; default 20 MiB (an init image in base64). */
  readonly bodyLimit?: number;
  /** What one request may ask for (pixels, steps * pixels, uploaded images); defaults: the model family's. */
  readonly bounds?: Partial<RequestBounds>;
  /** The folders model names resolve in (--controlnet-dir, --ip-adapter-dir, --lora-dir, --image-encoder); absent: not offered. With `front`, the workers' folders instead (listings still read these). */
  readonly models?: ModelDirs;
  /** fastify's logger option: false in tests, pino options or true otherwise. */
  readonly logger?: FastifyServerOptions['logger'];
  /** The backend name /health reports (known once the model loaded). */
  readonly backend?: () => string | null;
  /** Previews of running jobs (GET /jobs/:id/preview.png, A1111's current_image); default approx every step; null: none. */
  readonly preview?: PreviewOptions | null;
  /** `secret` is --webhook-secret, the HMAC key of webhooks' X-SD-Signature (./webhooks.ts); the rest for tests. */
  readonly webhooks?: Partial<WebhookOptions>;
  /** Open GET /jobs/:id/events streams at most (default 32; beyond: 503). */
  readonly maxEventClients?: number;
  /** `sd serve --queue`: jobs go to BullMQ on Redis for `sd worker`s (src/queue); no model is loaded here, loadEngine is not called. */
  readonly front?: QueueFront;
  /** Log prompts at info level (otherwise they are not logged). */
  readonly logPrompts?: boolean;
}

export interface ListenOptions {
  readonly port: number;
  readonly host: string;
}

export type { InferenceResult, ServerJob, ServerState, WorkItem } from './work.js';

export const DEFAULT_SERVER = Object.freeze({ maxQueue: 8, concurrency: 1, jobTtlS: 3600, graceS: 20, bodyLimit: 20 * 2 ** 20 });

/** Where requests' model names resolve: the server's folders, or in queue mode the workers' (only their form is checked here). */
function namesIn(o: ServerOptions): ModelDirs {
  return o.front !== undefined ? { ...o.models, imageEncoder: null, onWorker: true } : (o.models ?? {});
}

export class SdServer {
  private state_: ServerState = 'loading';
  private engine: Engine | null = null;
  private loadError: string | null = null;
  private loading: Promise<void> = Promise.resolve();
  private closing: Promise<void> | null = null;
  readonly queue: JobStore<WorkItem, InferenceResult>;
  readonly metrics = new Metrics();
  private readonly running = new Set<ServerJob>();
  /** Previews and event streams of running jobs. */
  readonly live: LiveJobs;
  readonly webhooks: WebhookSender;

  private constructor(
    readonly app: FastifyInstance,
    readonly outputs: OutputStore,
    private readonly o: ServerOptions,
  ) {
    this.live = new LiveJobs(o.maxEventClients);
    this.webhooks = new WebhookSender({ secret: null, ...o.webhooks, log: (level, message, fields) => app.log[level](fields, message) });
    o.front?.listen((job) => this.onJobChange(job), (job, p) => this.onRemoteProgress(job, p));
    this.queue = o.front ?? new JobQueue<WorkItem, InferenceResult>({
      run: (item, ctx) => this.run(item, ctx),
      describeError: (e) => {
        const h = toHttpError(e);
        if (h.statusCode >= 500) app.log.error({ err: e }, `generation failed: ${h.message}`);
        return { statusCode: h.statusCode, message: h.message, ...(h.field !== undefined ? { field: h.field } : {}) };
      },
      maxQueue: o.maxQueue ?? DEFAULT_SERVER.maxQueue,
      concurrency: o.concurrency ?? DEFAULT_SERVER.concurrency,
      ttlMs: (o.jobTtlS ?? DEFAULT_SERVER.jobTtlS) * 1000,
      onChange: (job) => this.onJobChange(job),
    });
  }

  /** Listen, then load the model in the background; `ready()` says when (and whether) it loaded. */
  static async start(o: ServerOptions, listen: ListenOptions): Promise<SdServer> {
    const outputs = await OutputStore.open(o.outputs);
    const bodyLimit = o.bodyLimit ?? DEFAULT_SERVER.bodyLimit;
    const app = Fastify({
      logger: o.logger ?? false,
      bodyLimit,
      // Strict JSON schema: wrong types are errors (not coerced), unknown fields are errors (not dropped).
      ajv: { customOptions: { coerceTypes: false, removeAdditional: false, useDefaults: false, allErrors: false } },
      schemaErrorFormatter,
    });
    app.setErrorHandler(errorHandler(bodyLimit));
    const server = new SdServer(app, outputs, o);
    const apiAuth = parseApiAuth(o.apiAuth ?? '');
    registerGates(app, server, { apiKey: o.apiKey ?? null, apiAuth });
    // Each dialect in its own scope, with its own JSON guards (the A1111 room takes large bodies on its own routes).
    await app.register(async (ours) => {
      registerRoutes(ours, server);
      registerWebPage(ours, server); // GET /, /web/*, /info, /outputs (./web.ts)
      guardJsonBodies(ours, bodyLimit);
    });
    const front = o.front;
    const remote = front !== undefined ? { remote: () => front.listings() } : {}; // queue mode: the workers' folders
    await app.register(a1111Routes, { prefix: '/sdapi/v1', host: server, bodyLimit, basicAuth: apiAuth.length > 0, models: namesIn(o), ...remote });
    await app.register(controlNetRoutes, { prefix: '/controlnet', models: o.models ?? {}, ...remote }); // the ControlNet extension's own routes
    app.get('/metrics', async (_request, reply) => reply.type(METRICS_CONTENT_TYPE).send(server.metricsText()));
    if (o.front !== undefined) registerFrontHooks(app, o.front);
    await app.listen({ port: listen.port, host: listen.host });
    server.loading = server.load();
    return server;
  }

  get state(): ServerState {
    return this.state_;
  }

  /** http://host:port the server listens on. */
  get url(): string {
    const a = this.app.server.address() as AddressInfo;
    return `http://${a.family === 'IPv6' ? `[${a.address}]` : a.address}:${a.port}`;
  }

  /** Resolves once the model is loaded; rejects with the load error if it failed. */
  async ready(): Promise<void> {
    await this.loading;
    if (this.loadError !== null) throw new Error(`model failed to load: ${this.loadError}`);
  }

  health(): { statusCode: number; body: Record<string, unknown> } {
    const body = {
      status: this.state_ === 'stopped' ? 'stopping' : this.state_,
      model_loaded: this.engine !== null,
      backend: this.o.backend?.() ?? null,
      queue_depth: this.queue.depth,
      max_queue: this.o.maxQueue ?? DEFAULT_SERVER.maxQueue,
      running: this.queue.runningCount,
      concurrency: this.o.concurrency ?? DEFAULT_SERVER.concurrency,
      ...(this.loadError !== null ? { error: this.loadError } : {}),
      ...(this.o.front !== undefined ? frontHealth(this.o.front) : {}),
    };
    return { statusCode: this.state_ === 'ok' ? 200 : 503, body };
  }

  /** 503 unless the server takes new work now. */
  assertAccepting(): Engine {
    if (this.state_ === 'loading') throw new HttpError(503, 'the model is still loading: retry shortly', undefined, { 'retry-after': '5' });
    if (this.state_ === 'failed') throw new HttpError(503, `the model failed to load: ${this.loadError ?? ''}`);
    if (this.state_ !== 'ok' || this.engine === null) throw new HttpError(503, 'the server is shutting down and takes no new work');
    return this.engine;
  }

  /**
   * Validate a request fully (schema already passed; here the model's ranges, the server's bounds and the
   * uploaded images), reserve its uid, queue it. Bad input throws 400, a taken uid 409, a full queue 429.
   */
  async admit(body: InferenceBody): Promise<ServerJob> {
    const { model, limits, info } = this.modelFor(body.model, 'model', 400);
    const webhook = body.webhook !== undefined ? checkWebhookUrl(body.webhook) : undefined;
    const checked = await checkRequest(body, limits, this.o.bounds, namesIn(this.o));
    const echo = body.model !== undefined && info !== null ? { model: info.model_name, ...checked.echo } : checked.echo;
    return this.enqueue(body.uid ?? randomUUID(), { ...checked.params, seed: checked.resolved.seed }, { echo, webhook, model });
  }

  /** The checkpoints a request may name: the loaded model, or in queue mode those the workers announce (./checkpoints.ts). */
  checkpoints(): readonly ModelInfo[] {
    return this.o.front !== undefined ? this.o.front.models() : [modelInfo(this.o.weights ?? null)];
  }

  /** The checkpoint jobs run on when they name none: the loaded one, or the queue's default (null before any is announced). */
  defaultCheckpoint(): ModelInfo | null {
    if (this.o.front === undefined) return modelInfo(this.o.weights ?? null);
    const name = this.o.front.defaultModel();
    return name === null ? null : (this.o.front.models().find((m) => m.model_name === name) ?? { ...modelInfo(name), title: name, filename: name });
  }

  describeCheckpoints(): string {
    const titles = listTitles(this.checkpoints());
    return this.o.front !== undefined ? `the workers announce ${titles === 'none' ? 'none yet' : titles}` : `this server has one model, ${titles}`;
  }

  /**
   * The model a request names (`asked`, by title, name, file or with A1111's " [hash]"; absent: the default) and the
   * limits to check it against: `status` naming `field` and the models there are when no such model is here.
   * `model` is the queue's name of it (what WorkItem.model routes by), undefined without a queue.
   */
  modelFor(asked: string | null | undefined, field: string, status: number): { model?: string; limits: ParamLimits; info: ModelInfo | null } {
    const engine = this.assertAccepting();
    if (asked === undefined || asked === null || asked === '') return { limits: engine.limits, info: this.defaultCheckpoint() };
    const info = findCheckpoint(asked, this.checkpoints());
    if (info === null) throw new HttpError(status, `${field}: no model ${JSON.stringify(asked)} here: ${this.describeCheckpoints()}`, field);
    if (this.o.front === undefined) return { limits: engine.limits, info };
    const limits = this.o.front.limits(info.model_name);
    if (limits === null) throw new HttpError(503, `${field}: no worker holds ${info.model_name} now; retry shortly`, field, { 'retry-after': '5' });
    return { model: info.model_name, limits, info };
  }

  /** Queue params already checked (admit's checks, or the A1111 room's): 503 when stopping, 409 for a taken uid, 429 when full. */
  enqueue(uid: string, params: GenerateParams, extra: { echo?: AdapterEcho; webhook?: string; model?: string } = {}): ServerJob {
    this.assertAccepting(); // shutdown may have begun while an image was decoded
    const { echo, webhook, model } = extra;
    this.outputs.reserve(uid);
    try {
      return this.queue.submit({ uid, params, ...(echo !== undefined ? { echo } : {}), ...(webhook !== undefined ? { webhook } : {}), ...(model !== undefined ? { model } : {}) });
    } catch (e) {
      this.outputs.release(uid);
      if (e instanceof QueueFullError) throw new HttpError(429, e.message, undefined, { 'retry-after': String(e.retryAfterS) });
      throw e;
    }
  }

  /** The bounds given at start (the model family's fill in the rest). */
  get requestBounds(): Partial<RequestBounds> {
    return this.o.bounds ?? {};
  }

  /** GET /metrics: Prometheus text. */
  metricsText(): string {
    return this.metrics.render({ queueDepth: this.queue.depth, running: this.queue.runningCount, ...(this.o.front !== undefined ? { workers: this.o.front.workers() } : {}) });
  }

  /** Finish a running job now with the image made so far (A1111's interrupt; in queue mode its worker does); false when it is not running. */
  stopJob(id: string): boolean {
    return this.queue instanceof JobQueue ? this.queue.stop(id) : (this.o.front?.stop(id) ?? false);
  }

  /** The jobs running now, whichever route queued them. */
  runningJobs(): readonly ServerJob[] {
    return [...this.running];
  }

  /**
   * Stop: new work 503, queued jobs cancelled, running jobs given `graceS` seconds then aborted, then
   * the listener closed and the model freed. A second call (a second signal) aborts at once.
   */
  shutdown(opts: { graceS?: number } = {}): Promise<void> {
    const graceS = opts.graceS ?? this.o.graceS ?? DEFAULT_SERVER.graceS;
    if (this.closing !== null) {
      if (graceS <= 0) this.queue.abortRunning('shutdown');
      return this.closing;
    }
    this.closing = this.stop(graceS);
    return this.closing;
  }

  private async stop(graceS: number): Promise<void> {
    this.state_ = 'stopping';
    this.app.log.info({ graceS, queued: this.queue.depth, running: this.queue.runningCount }, 'shutting down');
    this.queue.drain('shutdown');
    const idle = this.queue.idle();
    if (graceS <= 0) this.queue.abortRunning('shutdown');
    const timer = setTimeout(() => this.queue.abortRunning('shutdown'), graceS * 1000);
    await idle;
    clearTimeout(timer);
    await this.app.close();
    await Promise.race([this.webhooks.idle(), new Promise((r) => setTimeout(r, 2000).unref())]); // the last jobs' webhooks
    this.webhooks.close();
    this.queue.dispose();
    await this.o.front?.close();
    this.engine?.dispose();
    this.engine = null;
    this.state_ = 'stopped';
    this.app.log.info('stopped');
  }

  private async load(): Promise<void> {
    const started = Date.now();
    try {
      const engine = this.o.front !== undefined ? await frontEngine(this.o.front) : await this.o.loadEngine();
      if (this.state_ !== 'loading') return engine.dispose(); // shut down while loading
      this.engine = engine;
      this.state_ = 'ok';
      this.app.log.info({ ms: Date.now() - started, backend: this.o.backend?.() ?? null }, 'model loaded');
    } catch (e) {
      this.loadError = e instanceof Error ? e.message : String(e);
      if (this.state_ === 'loading') this.state_ = 'failed';
      this.app.log.error({ err: e }, 'model failed to load');
    }
  }

  private async run(item: WorkItem, ctx: JobContext): Promise<InferenceResult> {
    if (this.engine === null) throw new HttpError(503, 'the model is not loaded');
    const preview = this.o.preview === undefined ? { decoder: 'approx' as const } : this.o.preview;
    const r = await this.engine.generate(item.params, {
      signal: ctx.signal,
      stop: ctx.stop,
      onProgress: (step, total) => {
        ctx.onProgress(step, total);
        const job = this.queue.get(ctx.id);
        this.live.progress(ctx.id, { step, total, eta_s: job !== undefined ? etaSeconds(job) : null });
      },
      ...(preview !== null ? { preview, onPreview: (p: StepPreview) => this.live.preview(ctx.id, p) } : {}),
    });
    const image = r.images[0];
    if (image === undefined) throw new Error('the pipeline returned no image');
    const parameters = toAnsweredParameters(r.params, item.echo);
    const createdAt = new Date().toISOString();
    await this.outputs.save(item.uid, image.png, { uid: item.uid, seed: image.seed, created_at: createdAt, parameters });
    return { message: 'success', uid: item.uid, image: image.png.toString('base64'), seed: image.seed, parameters };
  }

  /** Queue mode: a worker's step, and its preview in Redis (read when a client asks for it), to the event streams. */
  private onRemoteProgress(job: ServerJob, p: FrontProgress): void {
    const front = this.o.front;
    if (front === undefined) return;
    if (p.stepped) this.live.progress(job.id, { step: p.step, total: p.total, eta_s: etaSeconds(job) });
    if (p.preview !== null) this.live.remotePreview(job.id, p.preview, async () => (await front.preview(job.id))?.png ?? null);
  }

  private onJobChange(job: ServerJob): void {
    this.metrics.observe(job);
    const { id, status } = job;
    if (status === 'running') this.running.add(job);
    else this.running.delete(job);
    const finished = isFinished(status);
    this.live.status(id, finished, finished ? (status as 'succeeded' | 'failed' | 'cancelled') : 'status', jobView(job, this.queue.position(id), this.live.hasPreview(id)));
    if (finished && job.input.webhook !== undefined) this.webhooks.send(job.input.webhook, `job.${status}`, jobView(job, 0, false));
    if (status === 'queued' && this.o.logPrompts === true) this.app.log.info({ job: id, prompt: job.input.params.prompt, negative_prompt: job.input.params.negativePrompt }, 'job prompt');
    if (!finished) {
      this.app.log.info({ job: id, uid: job.input.uid, status }, `job ${status}`);
      return;
    }
    this.outputs.release(job.input.uid);
    const ms = job.startedAt !== null && job.finishedAt !== null ? job.finishedAt.getTime() - job.startedAt.getTime() : 0;
    const extra = status === 'failed' ? { error: job.error?.message } : status === 'cancelled' ? { reason: job.cancelReason } : {};
    this.app.log.info({ job: id, uid: job.input.uid, status, ms, ...extra }, `job ${status}`);
  }
}
