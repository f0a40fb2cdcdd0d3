/**
 * The request body of POST /inference and POST /jobs: its JSON schema (checked by fastify before a handler
 * runs, unknown fields refused), its translation to the pipeline's GenerateParams, and the `parameters`
 * object answered back, named as the request names them so it can be sent again to repeat an image.
 * The schema checks types and the model-independent ranges; resolveParams checks the rest (e.g. the
 * model's smallest size, strength without an image) and its ParamError becomes a 400 too.
 */
import { SAMPLERS, type GenerateParams, type ResolvedParams, type SamplerName } from '../pipeline/api.js';
import { MAX_CFG_SCALE, MAX_PROMPT_CHARS, MAX_SEED, MAX_SIZE, MAX_STEPS } from '../pipeline/params.js';
import { HttpError } from './errors.js';

/** uid: names the output files `<uid>.png` and `<uid>.json`, so only characters safe in any file name. */
export const UID_PATTERN = '^[A-Za-z0-9_-]{1,64}$';

export interface InferenceBody {
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
}

const text = { type: 'string', maxLength: MAX_PROMPT_CHARS } as const;
const size = { type: 'integer', minimum: 8, maximum: MAX_SIZE, multipleOf: 8 } as const;

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

/** The bytes of `init_image`; 400 when it is not base64 at all (what the bytes are is sharp's to say). */
export function decodeBase64Image(s: string): Uint8Array {
  const b64 = s.replace(DATA_URL, '').replace(/\s+/g, '');
  if (!BASE64.test(b64)) throw new HttpError(400, 'init_image: not base64 (A-Z, a-z, 0-9, +, /, = padding)', 'init_image');
  const bytes = Buffer.from(b64, 'base64');
  if (bytes.length === 0) throw new HttpError(400, 'init_image: decodes to no bytes', 'init_image');
  return new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.length);
}

/** The pipeline's view of a (schema-checked) body; `uid` is the server's and not passed on. */
export function toGenerateParams(b: InferenceBody): GenerateParams {
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
  };
}

/** What was run, in the request's names: POST it back (with the same init_image) to get the same image. */
export interface AnsweredParameters {
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
}

export function toAnsweredParameters(r: ResolvedParams): AnsweredParameters {
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
  };
}
