/**
 * The AUTOMATIC1111 dialect of the server: `/sdapi/v1/*` as a fastify plugin (registered under that prefix by
 * ../server.ts), translating A1111's requests to the same queue, outputs and auth as our own routes.
 *
 *   POST txt2img, img2img        wait in the bounded queue (429 with Retry-After when full), answer {images, parameters, info}
 *   GET  progress                the running job, A1111's shape (./progress.ts); current_image its preview
 *   POST interrupt, skip         stop the running job (and the rest of its request / only that image)
 *   GET/POST options             ./options.ts; GET sd-models, samplers, ... (./catalog.ts)
 *
 * The checkpoint of a generation is `override_settings.sd_model_checkpoint`, else the one POST options set, else the
 * server's default: in queue mode its jobs go only to workers announcing it; one that is not here answers 422.
 *   POST png-info                the parameters text of a PNG; refresh-* do nothing (one model, loaded at start)
 *
 * Bodies are parsed tolerantly (./fields.ts) and never by a JSON schema: clients send A1111's whole field set. The
 * JSON guards of our routes (depth, value count, Content-Length) apply here too, with an empty body read as {}.
 */
import { randomUUID } from 'node:crypto';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { checkJsonShape, checkWork, decodeBase64Image, resolveBounds, JSON_LIMITS, type RequestBounds } from '../body.js';
import { ParamError, type GenerateParams } from '../../pipeline/api.js';
import { resolveParams, type ParamLimits } from '../../pipeline/params.js';
import { DecodeBudget, decodeUploadedImage } from '../../image/upload.js';
import { readPngParameters } from '../../image/codec.js';
import { parseParameters } from '../../image/parameters.js';
import type { Engine } from '../engine.js';
import type { AdapterEcho } from '../adapters.js';
import type { ModelInfo } from '../checkpoints.js';
import type { ModelDirs } from '../models-dir.js';
import { HttpError, errorBody } from '../errors.js';
import type { ServerJob, ServerState } from '../work.js';
import { answerOf, type Made } from './answer.js';
import { catalog } from './catalog.js';
import type { RemoteListings } from './listings.js';
import { asBody, invalid, obj, str } from './fields.js';
import { A1111Options, type CheckpointHost } from './options.js';
import { A1111Progress, INTERRUPTED, SKIPPED, type ProgressHost } from './progress.js';
import { A1111_FIELD, imageCount, parseGeneration, toGenerateParams, type A1111Generation, type A1111Images, type A1111Mode } from './request.js';
import { prepareControlImage } from './controlnet.js';
import { prepareMask } from './mask.js';

/** What the routes need of the server (SdServer is it). */
export interface A1111Host extends ProgressHost, CheckpointHost {
  readonly state: ServerState;
  /** The bounds the server was started with (--max-pixels, ...); the model family's fill the rest. */
  readonly requestBounds: Partial<RequestBounds>;
  assertAccepting(): Engine;
  /** The checkpoint `asked` names (absent: the default), its limits and its queue name; `status` naming `field` when none is here. */
  modelFor(asked: string | null | undefined, field: string, status: number): { model?: string; limits: ParamLimits; info: ModelInfo | null };
  /** Queue checked params under `uid` (on `model`, in queue mode); 429 (HttpError with Retry-After) when the queue is full. */
  enqueue(uid: string, params: GenerateParams, extra?: { echo?: AdapterEcho; model?: string }): ServerJob;
}

export interface A1111RouteOptions {
  readonly host: A1111Host;
  readonly bodyLimit: number;
  /** Whether --api-auth is set (cmd-flags says so, without the password). */
  readonly basicAuth: boolean;
  /** The model folders (--controlnet-dir, --lora-dir, ...): alwayson_scripts.controlnet, <lora:> tags, the listings. */
  readonly models?: ModelDirs;
  /** Queue mode: what the workers' folders hold, listed before the front's own. */
  readonly remote?: RemoteListings;
}

const PREFIX = '/sdapi/v1';
/** `info`'s model when none is known (queue mode before any worker announced one: never answered, the job needs one). */
const UNKNOWN_MODEL: ModelInfo = Object.freeze({ title: 'unknown', model_name: 'unknown', hash: null, sha256: null, filename: 'unknown', config: null });
/** POST routes whose body may be as large as the server's body limit (an image in base64). */
const BODY_ROUTES = new Set(['txt2img', 'img2img', 'png-info', 'options'].map((r) => `${PREFIX}/${r}`));
const GENERATION_ROUTES = new Set([`${PREFIX}/txt2img`, `${PREFIX}/img2img`]);

export async function a1111Routes(app: FastifyInstance, o: A1111RouteOptions): Promise<void> {
  const { host } = o;
  const models = o.models ?? {};
  const options = new A1111Options(host);
  const progress = new A1111Progress(host);
  guardBodies(app, o.bodyLimit);
  app.addHook('onRequest', async (request) => {
    const route = request.routeOptions.url;
    if (route !== undefined && GENERATION_ROUTES.has(route) && (host.state === 'loading' || host.state === 'failed')) host.assertAccepting();
  });

  const generate = (mode: A1111Mode) => async (request: FastifyRequest, reply: FastifyReply) => {
    host.assertAccepting();
    const body = asBody(request.body ?? {});
    const settings = options.settingsFor(obj(body, 'override_settings'));
    const { model, limits, info } = host.modelFor(settings.checkpoint?.title, settings.checkpoint?.field ?? 'sd_model_checkpoint', 422);
    const g = parseGeneration(body, mode, limits, models);
    for (const note of g.notes) request.log.warn({ route: request.routeOptions.url }, note);
    const bounds = resolveBounds(host.requestBounds, limits);
    checkParams(toGenerateParams(g, settings, 0), limits, bounds, g);
    const images = await checkImages(g, bounds);
    const params = Array.from({ length: imageCount(g) }, (_, i) => toGenerateParams(g, settings, i, images));
    if (Object.keys(images).length > 0) checkParams(params[0], limits, bounds, g);
    host.assertAccepting(); // shutdown may have begun while the image was decoded
    const startedAt = new Date();
    const jobs = enqueueAll(host, params, model);
    const group = progress.add(mode, jobs);
    const onClose = (): void => {
      if (!reply.raw.writableFinished) for (const job of jobs) host.queue.cancel(job.id, 'client disconnected');
    };
    reply.raw.once('close', onClose);
    try {
      await Promise.all(jobs.map((j) => j.done));
    } finally {
      reply.raw.off('close', onClose);
      progress.remove(group);
    }
    return answerJobs(reply, body, g, jobs, { settings, model: info ?? host.defaultCheckpoint() ?? UNKNOWN_MODEL, startedAt });
  };

  app.post('/txt2img', generate('txt2img'));
  app.post('/img2img', generate('img2img'));

  app.get<{ Querystring: Record<string, unknown> }>('/progress', async (request) => progress.view(!isTrue(request.query.skip_current_image)));
  app.post('/interrupt', async () => {
    progress.interrupt();
    return {};
  });
  app.post('/skip', async () => {
    progress.skip();
    return {};
  });

  app.get('/options', async () => options.all);
  app.post('/options', async (request) => {
    options.set(asBody(request.body ?? {}));
    return true;
  });

  for (const [route, answer] of Object.entries(catalog({ checkpoints: host, basicAuth: o.basicAuth, models, ...(o.remote !== undefined ? { remote: o.remote } : {}) }))) app.get(`/${route}`, async () => answer());
  for (const route of ['refresh-checkpoints', 'refresh-vae', 'refresh-loras', 'refresh-embeddings']) {
    app.post(`/${route}`, async (_request, reply) => reply.type('application/json').send('null'));
  }

  app.post('/png-info', async (request) => {
    const image = str(asBody(request.body ?? {}), 'image', '');
    if (image.trim() === '') return { info: '', items: {}, parameters: {} };
    const bytes = decodeBase64(image, 'image');
    const text = isPng(bytes) ? readPngParameters(bytes) : null;
    if (text === null) return { info: '', items: {}, parameters: {} };
    const parsed = parseParameters(text);
    const parameters = { Prompt: parsed.prompt, 'Negative prompt': parsed.negativePrompt, ...parsed.settings };
    return { info: text, items: { parameters: text }, parameters };
  });
}

/**
 * The JSON guards of ../body.ts for this room: Content-Length within the route's limit before the body is read,
 * depth and value count before JSON.parse, and an empty body (interrupt with Content-Type: application/json) as {}.
 */
function guardBodies(app: FastifyInstance, bodyLimit: number): void {
  app.addHook('onRequest', async (request) => {
    const length = Number(request.headers['content-length'] ?? 0);
    const route = request.routeOptions.url;
    const limit = request.method === 'POST' && route !== undefined && BODY_ROUTES.has(route) ? bodyLimit : JSON_LIMITS.bytesWithoutBody;
    if (length > limit) throw new HttpError(413, `body: Content-Length ${length} is over the limit of ${limit} bytes for ${request.method} ${route ?? request.url}`, 'body');
  });
  const parse = app.getDefaultJsonParser('error', 'error');
  app.removeContentTypeParser('application/json');
  app.addContentTypeParser('application/json', { parseAs: 'string' }, (request, body, done) => {
    const text = body as string;
    if (text.trim() === '') return done(null, {});
    try {
      checkJsonShape(text);
    } catch (e) {
      return done(e as Error, undefined);
    }
    parse(request, text, done);
  });
}

/**
 * resolveParams (the model's ranges) and the server's work bounds for the request's images like `p`; fields named
 * as A1111 names them (a ControlNet's by its place in alwayson_scripts.controlnet.args).
 */
function checkParams(p: GenerateParams, limits: ParamLimits, bounds: RequestBounds, g: A1111Generation): void {
  try {
    checkWork({ ...resolveParams(p, limits), batch: imageCount(g) }, bounds);
  } catch (e) {
    if (!(e instanceof ParamError)) throw e;
    const control = g.controlNets.filter((u) => u.module !== 'ip-adapter');
    const ip = g.controlNets.find((u) => u.module === 'ip-adapter');
    const field =
      A1111_FIELD[e.field] ??
      e.field.replace(/^controlNets\[(\d+)\]/, (all, k: string) => control[Number(k)]?.field ?? all).replace(/^ipAdapter/, (all) => ip?.field ?? all);
    throw invalid(field, e.message.startsWith(`${e.field}: `) ? e.message.slice(e.field.length + 2) : e.message);
  }
}

function decodeBase64(s: string, field: string): Uint8Array {
  try {
    return decodeBase64Image(s);
  } catch (e) {
    if (e instanceof HttpError) throw invalid(field, e.message.replace(/^init_image: /, ''));
    throw e;
  }
}

/** A1111's query booleans: true, "true", "1" (FastAPI's parsing of bool). */
const isTrue = (v: unknown): boolean => v === true || (typeof v === 'string' && ['true', '1', 'yes', 'on'].includes(v.toLowerCase()));

const isPng = (b: Uint8Array): boolean => b.length > 8 && b[0] === 0x89 && b[1] === 0x50 && b[2] === 0x4e && b[3] === 0x47;

/**
 * init_images[0], the mask and each ControlNet unit's image: base64, then the upload checks (format, pixel limit,
 * the request's one decode budget) before anything decodes them; then the mask and control images prepared as
 * A1111 prepares them (./mask.ts, ./controlnet.ts). A unit without an image takes the init image, as the extension does.
 */
async function checkImages(g: A1111Generation, bounds: RequestBounds): Promise<A1111Images> {
  const upload = { maxPixels: bounds.maxImagePixels, maxDecodeBytes: bounds.maxDecodeBytes };
  const budget = new DecodeBudget(bounds.maxDecodeBytes);
  const check = async (b64: string, field: string): Promise<Uint8Array> => (await decodeUploadedImage(decodeBase64(b64, field), field, upload, budget)).bytes;
  const initImage = g.initImage !== null ? await check(g.initImage, 'init_images') : undefined;
  const mask = g.mask !== null ? await prepareMask(await check(g.mask.mask, 'mask'), g.mask) : undefined;
  const controlImages: Uint8Array[] = [];
  for (const u of g.controlNets) {
    const bytes = u.image !== null ? await check(u.image, `${u.field}.image`) : initImage;
    if (bytes === undefined) throw invalid(`${u.field}.image`, 'controlnet is enabled but no input image is given');
    controlImages.push(await prepareControlImage(bytes, u, g.width, g.height));
  }
  return { ...(initImage !== undefined ? { initImage } : {}), ...(mask !== undefined ? { mask } : {}), ...(controlImages.length > 0 ? { controlImages } : {}) };
}

/** One job per image; when the queue cannot take them all, none is left queued and the request answers 429. */
function enqueueAll(host: A1111Host, params: readonly GenerateParams[], model: string | undefined): ServerJob[] {
  const jobs: ServerJob[] = [];
  try {
    for (const p of params) jobs.push(host.enqueue(randomUUID(), p, model !== undefined ? { model } : {}));
  } catch (e) {
    for (const job of jobs) host.queue.cancel(job.id, 'queue full');
    throw e;
  }
  return jobs;
}

/**
 * All images made: 200. Some interrupted or skipped: 200 with the images that were made (A1111 answers what it
 * has: the interrupted image finished early from its last step's predicted x0, ./progress.ts; a skipped one is left out).
 * A failure: its status; cancelled otherwise (client gone, shutdown): 503.
 */
function answerJobs(reply: FastifyReply, body: Readonly<Record<string, unknown>>, g: A1111Generation, jobs: readonly ServerJob[], m: Omit<Made, 'results' | 'missing'>): FastifyReply {
  const failed = jobs.find((j) => j.status === 'failed');
  if (failed?.error != null) return reply.code(failed.error.statusCode).send(errorBody(failed.error.statusCode, failed.error.message, failed.error.field));
  const stopped = (j: ServerJob): boolean => j.status === 'cancelled' && (j.cancelReason === INTERRUPTED || j.cancelReason === SKIPPED);
  const lost = jobs.find((j) => j.status === 'cancelled' && !stopped(j));
  if (lost !== undefined) {
    const why = lost.cancelReason === 'shutdown' ? 'the server is shutting down' : `cancelled (${lost.cancelReason ?? 'unknown'})`;
    return reply.code(503).send(errorBody(503, `not generated: ${why}`));
  }
  const results = jobs.flatMap((j) => (j.status === 'succeeded' && j.result !== null ? [j.result] : []));
  return reply.code(200).send(answerOf(body, g, { ...m, results, missing: jobs.length - results.length }));
}
