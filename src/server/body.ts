/**
 * The request body of POST /inference and POST /jobs: the guards its JSON passes before it is parsed
 * (a Content-Length within the route's limit, a nesting depth and a count of values), its JSON schema
 * (checked by fastify before a handler runs, unknown fields refused), its translation to the pipeline's
 * GenerateParams, and the `parameters` object answered back, named as the request names them so it can be
 * sent again to repeat an image. The schema checks types and the model-independent ranges; checkRequest the
 * rest: resolveParams (e.g. the model's smallest size, strength without an image; its ParamError becomes a 400
 * too), the server's bounds on the work of one request, and every uploaded image (../image/upload.ts).
 */
import type { FastifyInstance } from 'fastify';
import {
  CONVENTION_NAMES,
  NOISE_SOURCES,
  PROMPT_SYNTAXES,
  ParamError,
  SAMPLERS,
  type ConventionsName,
  type GenerateParams,
  type NoiseSource,
  type PixelPair,
  type PromptSyntax,
  type ResolvedParams,
  type SamplerName,
} from '../pipeline/api.js';
import {
  MAX_CFG_SCALE,
  MAX_MICRO_SIZE,
  MAX_PROMPT_CHARS,
  MAX_SEED,
  MAX_SIZE,
  MAX_STEPS,
  resolveParams,
  workBoundsFor,
  type ParamLimits,
  type WorkBounds,
} from '../pipeline/params.js';
import { DEFAULT_UPLOAD_LIMITS, DecodeBudget, decodeUploadedImage } from '../image/upload.js';
import { ADAPTER_PROPERTIES, adapterEcho, bodyFieldOf, checkAdapterImages, toAdapterParams, type AdapterBody, type AdapterEcho } from './adapters.js';
import { HttpError } from './errors.js';
import type { ModelDirs } from './models-dir.js';

/** uid: names the output files `<uid>.png` and `<uid>.json`, so only characters safe in any file name. */
export const UID_PATTERN = '^[A-Za-z0-9_-]{1,64}$';

/** The fields of ./adapters.ts (controlnet, mask, ip_adapter, loras) are in AdapterBody. */
export interface InferenceBody extends AdapterBody {
  readonly prompt: string;
  readonly uid?: string;
  readonly seed?: number;
  readonly steps?: number;
  readonly strength?: number;
  /** Classifier-free guidance on/off; `scale` is its scale. */
  readonly do_scale?: boolean;
  readonly scale?: number;
  readonly negative_prompt?: string;
  readonly sampler?: SamplerName;
  readonly karras?: boolean;
  readonly width?: number;
  readonly height?: number;
  /** img2img: a PNG or JPEG file, base64 (a `data:image/...;base64,` prefix is accepted). */
  readonly init_image?: string;
  /** 'cpu' (default) or 'gpu' random numbers. */
  readonly noise?: NoiseSource;
  readonly prompt_syntax?: PromptSyntax;
  /** Default: the loaded model's. */
  readonly conventions?: ConventionsName;
  /** SDXL: [height, width], [top, left], [height, width] (diffusers' names). */
  readonly original_size?: PixelPair;
  readonly crops_coords_top_left?: PixelPair;
  readonly target_size?: PixelPair;
  /** An http(s) URL the finished job is posted to (./webhooks.ts). */
  readonly webhook?: string;
  /** The checkpoint to run on (./checkpoints.ts: its name, title or file); default: the loaded model, or the queue's default. */
  readonly model?: string;
}

const text = { type: 'string', maxLength: MAX_PROMPT_CHARS } as const;
const size = { type: 'integer', minimum: 8, maximum: MAX_SIZE, multipleOf: 8 } as const;
const pair = (minimum: number) => ({ type: 'array', minItems: 2, maxItems: 2, items: { type: 'integer', minimum, maximum: MAX_MICRO_SIZE } }) as const;

export const INFERENCE_BODY_SCHEMA = Object.freeze({
  type: 'object',
  additionalProperties: false,
  required: ['prompt'],
  properties: {
    prompt: text,
    uid: { type: 'string', pattern: UID_PATTERN },
    seed: { type: 'integer', minimum: 0, maximum: MAX_SEED },
    steps: { type: 'integer', minimum: 1, maximum: MAX_STEPS },
    strength: { type: 'number', exclusiveMinimum: 0, maximum: 1 },
    do_scale: { type: 'boolean' },
    scale: { type: 'number', minimum: 0, maximum: MAX_CFG_SCALE },
    negative_prompt: text,
    sampler: { type: 'string', enum: SAMPLERS },
    karras: { type: 'boolean' },
    width: size,
    height: size,
    init_image: { type: 'string', minLength: 1 },
    noise: { type: 'string', enum: NOISE_SOURCES },
    prompt_syntax: { type: 'string', enum: PROMPT_SYNTAXES },
    conventions: { type: 'string', enum: CONVENTION_NAMES },
    original_size: pair(1),
    crops_coords_top_left: pair(0),
    target_size: pair(1),
    webhook: { type: 'string', minLength: 1, maxLength: 2048 },
    model: { type: 'string', minLength: 1, maxLength: 255 },
    ...ADAPTER_PROPERTIES,
  },
});

/** Route parameter `:id` of /jobs/:id. */
export const JOB_ID_SCHEMA = Object.freeze({
  type: 'object',
  additionalProperties: false,
  required: ['id'],
  properties: { id: { type: 'string', pattern: UID_PATTERN } },
});

const BASE64 = /^[A-Za-z0-9+/\-_]+={0,2}$/;
const DATA_URL = /^data:[a-z]+\/[a-z0-9.+-]+;base64,/i;

/** The bytes of an image field (`init_image` unless named); 400 when it is not base64 at all (what the bytes are is sharp's to say). */
export function decodeBase64Image(s: string, field = 'init_image'): Uint8Array {
  const b64 = s.replace(DATA_URL, '').replace(/\s+/g, '');
  if (!BASE64.test(b64)) throw new HttpError(400, `${field}: not base64 (A-Z, a-z, 0-9, +, /, = padding)`, field);
  const bytes = Buffer.from(b64, 'base64');
  if (bytes.length === 0) throw new HttpError(400, `${field}: decodes to no bytes`, field);
  return new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.length);
}

/** The pipeline's view of a (schema-checked) body; `uid` is the server's and not passed on. Model names resolve in `models`. */
export function toGenerateParams(b: InferenceBody, models: ModelDirs = {}): GenerateParams {
  return {
    prompt: b.prompt,
    negativePrompt: b.negative_prompt,
    seed: b.seed,
    steps: b.steps,
    cfg: b.do_scale,
    cfgScale: b.scale,
    sampler: b.sampler,
    karras: b.karras,
    width: b.width,
    height: b.height,
    strength: b.strength,
    initImage: b.init_image !== undefined ? decodeBase64Image(b.init_image) : undefined,
    noise: b.noise,
    promptSyntax: b.prompt_syntax,
    conventions: b.conventions,
    originalSize: b.original_size,
    cropTopLeft: b.crops_coords_top_left,
    targetSize: b.target_size,
    ...toAdapterParams(b, models, decodeBase64Image),
  };
}

/** What was run, in the request's names: POST it back (with the same init_image, mask and adapter images) to get the same image. */
export interface AnsweredParameters extends AdapterEcho {
  readonly prompt: string;
  readonly negative_prompt: string;
  readonly seed: number;
  readonly steps: number;
  readonly do_scale: boolean;
  readonly scale: number;
  readonly sampler: SamplerName;
  readonly karras: boolean;
  readonly width: number;
  readonly height: number;
  readonly strength?: number;
  readonly noise: NoiseSource;
  readonly prompt_syntax: PromptSyntax;
  readonly conventions: ConventionsName;
  /** SDXL's size conditioning, each given when it is not the default ([height, width], [0, 0], [height, width]). */
  readonly original_size?: PixelPair;
  readonly crops_coords_top_left?: PixelPair;
  readonly target_size?: PixelPair;
}

/** `echo`: what the request's adapter fields add (checkRequest's), which ResolvedParams does not name as the request does. */
export function toAnsweredParameters(r: ResolvedParams, echo: AdapterEcho = {}): AnsweredParameters {
  const isSize = (p: PixelPair) => p[0] === r.height && p[1] === r.width;
  return {
    prompt: r.prompt,
    negative_prompt: r.negativePrompt,
    seed: r.seed,
    steps: r.steps,
    do_scale: r.cfg,
    scale: r.cfgScale,
    sampler: r.sampler,
    karras: r.karras,
    width: r.width,
    height: r.height,
    ...(r.strength !== null ? { strength: r.strength } : {}),
    noise: r.noise,
    prompt_syntax: r.promptSyntax,
    conventions: r.conventions,
    ...(isSize(r.originalSize) ? {} : { original_size: r.originalSize }),
    ...(r.cropTopLeft[0] === 0 && r.cropTopLeft[1] === 0 ? {} : { crops_coords_top_left: r.cropTopLeft }),
    ...(isSize(r.targetSize) ? {} : { target_size: r.targetSize }),
    ...echo,
  };
}

/** What one request may cost the server; the defaults follow the model family (WORK_BOUNDS) and DEFAULT_UPLOAD_LIMITS. */
export interface RequestBounds extends WorkBounds {
  /** Largest width * height of one uploaded image (--max-image-pixels). */
  readonly maxImagePixels: number;
  /** Largest decoded size in bytes of all the uploaded images of one request (--max-decode-mib). */
  readonly maxDecodeBytes: number;
}

export function resolveBounds(o: Partial<RequestBounds>, limits: ParamLimits): RequestBounds {
  const family = workBoundsFor(limits);
  const maxPixels = o.maxPixels ?? family.maxPixels;
  return {
    maxPixels,
    // A --max-pixels of its own moves the default --max-work with it: the family's steps at the largest size.
    maxWork: o.maxWork ?? Math.round((family.maxWork / family.maxPixels) * maxPixels),
    maxImagePixels: o.maxImagePixels ?? DEFAULT_UPLOAD_LIMITS.maxPixels,
    maxDecodeBytes: o.maxDecodeBytes ?? DEFAULT_UPLOAD_LIMITS.maxDecodeBytes,
  };
}

/** 1048576 -> "1048576 (1024x1024)" when the count is a square, so a limit reads as a size. */
function pixels(n: number): string {
  const side = Math.sqrt(n);
  return Number.isInteger(side) ? `${n} (${side}x${side})` : String(n);
}

/** 400 when the image to generate is larger than --max-pixels, or steps * pixels more than --max-work. */
export function checkWork(r: ResolvedParams, b: WorkBounds): void {
  const size = r.width * r.height;
  if (size > b.maxPixels) {
    throw new HttpError(400, `width: ${r.width}x${r.height} is ${size} pixels, over this server's limit of ${pixels(b.maxPixels)} (--max-pixels)`, 'width');
  }
  const work = r.steps * size * r.batch;
  if (work > b.maxWork) {
    const at = Math.floor(b.maxWork / size / r.batch);
    throw new HttpError(
      400,
      `steps: ${r.steps} steps at ${r.width}x${r.height} is ${work} pixel-steps, over this server's limit of ${b.maxWork} (--max-work): ` +
        `at most ${at} steps at this size`,
      'steps',
    );
  }
}

export interface CheckedRequest {
  /** What the job runs: the request's params with every uploaded image replaced by its checked bytes, model names by paths. */
  readonly params: GenerateParams;
  readonly resolved: ResolvedParams;
  /** The adapter fields as the answered `parameters` echo them (toAnsweredParameters). */
  readonly echo: AdapterEcho;
}

/**
 * Everything about a (schema-checked) body that is checked before it is queued; any failure is a 4xx. Model
 * names resolve in `models` (the server's --controlnet-dir, --ip-adapter-dir, --lora-dir) before any image is decoded.
 */
export async function checkRequest(body: InferenceBody, limits: ParamLimits, o: Partial<RequestBounds> = {}, models: ModelDirs = {}): Promise<CheckedRequest> {
  const b = resolveBounds(o, limits);
  const params = toGenerateParams(body, models);
  const resolved = resolveNamed(params, limits);
  checkWork(resolved, b);
  const echo = adapterEcho(body);
  const upload = { maxPixels: b.maxImagePixels, maxDecodeBytes: b.maxDecodeBytes };
  const budget = new DecodeBudget(b.maxDecodeBytes); // shared by all the images of this request
  const initImage = params.initImage !== undefined ? (await decodeUploadedImage(params.initImage, 'init_image', upload, budget)).bytes : undefined;
  const checked = await checkAdapterImages({ ...params, ...(initImage !== undefined ? { initImage } : {}) }, upload, budget);
  return { params: checked, resolved, echo };
}

/** resolveParams, its ParamError naming the field as the body does (`controlnet[0].scale`, not `controlNets[0].scale`). */
function resolveNamed(p: GenerateParams, limits: ParamLimits): ResolvedParams {
  try {
    return resolveParams(p, limits);
  } catch (e) {
    if (!(e instanceof ParamError) || bodyFieldOf(e.field) === e.field) throw e;
    const field = bodyFieldOf(e.field);
    throw new HttpError(400, `${field}: ${e.message.startsWith(`${e.field}: `) ? e.message.slice(e.field.length + 2) : e.message}`, field);
  }
}

/** Bounds on a JSON body, checked on the raw text before JSON.parse (an 18 MiB `[[[[...` blocked the loop 4-6 s). */
export const JSON_LIMITS = Object.freeze({
  /** Our bodies are one object of scalars (depth 1); room for nested fields to come. */
  depth: 8,
  /** Arrays, objects and comma-separated members together. */
  values: 10_000,
  /** Content-Length of a request to a route that takes no body. */
  bytesWithoutBody: 4096,
});

/** Routes whose POST body is an InferenceBody: they may be as large as the server's body limit. */
const BODY_ROUTES = new Set(['/inference', '/jobs']);

const mib = (n: number): string => (n >= 2 ** 20 ? `${(n / 2 ** 20).toFixed(1)} MiB` : `${n} bytes`);

/**
 * One pass over the raw JSON text: 400 once it nests deeper than `depth` or holds more than `values` values.
 * Strings are skipped with indexOf (a base64 image is one long string), so a legitimate body costs little.
 */
export function checkJsonShape(text: string, limits = JSON_LIMITS): void {
  let depth = 0;
  let values = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 0x22) {
      i = closingQuote(text, i);
      if (i < 0) return; // unterminated: JSON.parse says so
    } else if (c === 0x5b || c === 0x7b) {
      if (++depth > limits.depth) throw new HttpError(400, `body: JSON nested deeper than ${limits.depth} levels (the server's limit)`, 'body');
      values++;
    } else if (c === 0x5d || c === 0x7d) {
      depth--;
    } else if (c === 0x2c) {
      if (++values > limits.values) throw new HttpError(400, `body: more than ${limits.values} JSON values (the server's limit)`, 'body');
    }
  }
}

/** `controlnet` may be one unit or a list of them: the schema sees a list either way. */
function oneOrList(body: unknown): unknown {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) return body;
  const b = body as Record<string, unknown>;
  const c = b.controlnet;
  return typeof c === 'object' && c !== null && !Array.isArray(c) ? { ...b, controlnet: [c] } : body;
}

/** Index of the quote that closes the string opened at `open` (one not escaped by an odd run of backslashes), or -1. */
function closingQuote(text: string, open: number): number {
  let at = open;
  for (;;) {
    at = text.indexOf('"', at + 1);
    if (at < 0) return -1;
    let slashes = 0;
    while (text.charCodeAt(at - 1 - slashes) === 0x5c) slashes++;
    if (slashes % 2 === 0) return at;
  }
}

/**
 * Before any body is read: 413 when its Content-Length is over the route's limit (`bodyLimit` for the POST body
 * routes, JSON_LIMITS.bytesWithoutBody elsewhere). Before JSON.parse: checkJsonShape. Then fastify's own parser
 * (which refuses `__proto__` and `constructor` keys).
 */
export function guardJsonBodies(app: FastifyInstance, bodyLimit: number): void {
  app.addHook('onRequest', async (request) => {
    const length = Number(request.headers['content-length'] ?? 0);
    const route = request.routeOptions.url;
    const takesBody = request.method === 'POST' && route !== undefined && BODY_ROUTES.has(route);
    const limit = takesBody ? bodyLimit : JSON_LIMITS.bytesWithoutBody;
    if (length > limit) {
      const hint = takesBody ? '; send a smaller init_image' : '';
      throw new HttpError(413, `body: Content-Length ${length} is over the limit of ${mib(limit)} for ${request.method} ${route ?? request.url}${hint}`, 'body');
    }
  });
  const parse = app.getDefaultJsonParser('error', 'error');
  app.removeContentTypeParser('application/json');
  app.addContentTypeParser('application/json', { parseAs: 'string' }, (request, body, done) => {
    checkJsonShape(body as string);
    parse(request, body as string, (e: Error | null, value?: unknown) => done(e, e === null ? oneOrList(value) : undefined));
  });
}
