/**
 * The adapter fields of POST /inference and POST /jobs and their translation to the pipeline's GenerateParams:
 *
 *   controlnet  [{model, image, preprocess, low, high, scale, start, end}] (or one such object) -> controlNets
 *   mask        base64 PNG/JPEG, white = repaint (needs init_image)                            -> mask
 *   ip_adapter  {model, image, scale}                                                          -> ipAdapter
 *   loras       [{name, multiplier}], and the prompt's <lora:NAME:W> tags (A1111 syntax)       -> loras
 *
 * Models are NAMES in the folders `sd serve` was started with (./models-dir.ts), never paths; every image goes
 * through the upload checks (../image/upload.ts) on the request's one decode budget. The answered `parameters`
 * echo these fields as sent, names and numbers, without image bytes (as init_image is not echoed either).
 */
import type { ControlNetParams, GenerateParams, IpAdapterParams } from '../pipeline/api.js';
import { CONTROL_PREPROCESSORS, type ControlPreprocess } from '../pipeline/api.js';
import type { LoraSpec } from '../lora/types.js';
import { LoraError } from '../lora/types.js';
import { extractLoraTags } from '../lora/tags.js';
import { DecodeBudget, decodeUploadedImage, type UploadLimits } from '../image/upload.js';
import { HttpError } from './errors.js';
import { checkModelName, modelRef, resolveModel, type ModelDirs } from './models-dir.js';

/** Most ControlNets and LoRAs one request may name (each costs a model in memory or a merge). */
export const MAX_CONTROLNETS = 4;
export const MAX_LORAS = 16;
/** A model name: a file name, so at most a file name's length. */
const NAME = { type: 'string', minLength: 1, maxLength: 255 } as const;
const IMAGE = { type: 'string', minLength: 1 } as const;
const FRACTION = { type: 'number', minimum: 0, maximum: 1 } as const;

export interface ControlNetBody {
  readonly model: string;
  /** base64 PNG/JPEG/WebP (a data: URL prefix is accepted). */
  readonly image: string;
  readonly preprocess?: ControlPreprocess;
  readonly low?: number;
  readonly high?: number;
  readonly scale?: number;
  readonly start?: number;
  readonly end?: number;
}

export interface IpAdapterBody {
  readonly model: string;
  readonly image: string;
  readonly scale?: number;
}

export interface LoraBody {
  readonly name: string;
  /** Both the text encoder's and the UNet's multiplier; default 1. */
  readonly multiplier?: number;
}

export interface AdapterBody {
  readonly controlnet?: ControlNetBody | readonly ControlNetBody[];
  readonly mask?: string;
  readonly ip_adapter?: IpAdapterBody;
  readonly loras?: readonly LoraBody[];
}

/** The keywords of one ControlNet unit: `properties`/`required` apply to an object, `items` to a list, so one schema takes both forms. */
const CONTROLNET_UNIT = {
  type: 'object',
  additionalProperties: false,
  required: ['model', 'image'],
  properties: {
    model: NAME,
    image: IMAGE,
    preprocess: { type: 'string', enum: CONTROL_PREPROCESSORS },
    low: { type: 'number', minimum: 0, maximum: 65535 },
    high: { type: 'number', minimum: 0, maximum: 65535 },
    scale: { type: 'number', minimum: 0, maximum: 10 },
    start: FRACTION,
    end: FRACTION,
  },
} as const;

/** Schema properties of the adapter fields, merged into ./body.ts's INFERENCE_BODY_SCHEMA. */
export const ADAPTER_PROPERTIES = Object.freeze({
  // One unit or a list: ./body.ts's parser puts a single object in a list before the schema sees it.
  controlnet: { type: 'array', maxItems: MAX_CONTROLNETS, items: CONTROLNET_UNIT },
  mask: IMAGE,
  ip_adapter: {
    type: 'object',
    additionalProperties: false,
    required: ['model', 'image'],
    properties: { model: NAME, image: IMAGE, scale: { type: 'number', minimum: 0, maximum: 10 } },
  },
  loras: {
    type: 'array',
    maxItems: MAX_LORAS,
    items: {
      type: 'object',
      additionalProperties: false,
      required: ['name'],
      properties: { name: NAME, multiplier: { type: 'number', minimum: -10, maximum: 10 } },
    },
  },
});

/** The ControlNet units of a body, a single object read as a list of one. */
export const controlUnits = (b: AdapterBody): readonly ControlNetBody[] =>
  b.controlnet === undefined ? [] : Array.isArray(b.controlnet) ? (b.controlnet as readonly ControlNetBody[]) : [b.controlnet as ControlNetBody];

/** What the answered `parameters` add for these fields: as sent, without the images (and `model`, when the request named one). */
export interface AdapterEcho {
  /** The checkpoint's name (../checkpoints.ts) when the request named one. */
  readonly model?: string;
  readonly controlnet?: readonly Omit<ControlNetBody, 'image'>[];
  readonly ip_adapter?: Omit<IpAdapterBody, 'image'>;
  readonly loras?: readonly LoraBody[];
}

export function adapterEcho(b: AdapterBody): AdapterEcho {
  const units = controlUnits(b);
  const withoutImage = <T extends { image: string }>(u: T): Omit<T, 'image'> => {
    const { image: _image, ...rest } = u;
    return rest;
  };
  return {
    ...(units.length > 0 ? { controlnet: units.map(withoutImage) } : {}),
    ...(b.ip_adapter !== undefined ? { ip_adapter: withoutImage(b.ip_adapter) } : {}),
    ...(b.loras !== undefined && b.loras.length > 0 ? { loras: b.loras } : {}),
  };
}

/** Decodes a base64 field (./body.ts's decodeBase64Image, naming `field`). */
export type Base64Reader = (s: string, field: string) => Uint8Array;

/**
 * The names of a body resolved to paths (400 for an unknown one, or a kind whose folder is not configured),
 * before any image is decoded. Images are left as base64-decoded bytes; checkAdapterImages checks them.
 */
export function toAdapterParams(b: AdapterBody & { prompt: string; prompt_syntax?: string }, dirs: ModelDirs, read: Base64Reader): Partial<GenerateParams> {
  const controlNets = controlUnits(b).map((u, i): ControlNetParams => {
    const field = `controlnet[${i}]`;
    return {
      model: resolveModel('controlnet', dirs, u.model, `${field}.model`),
      image: read(u.image, `${field}.image`),
      ...(u.preprocess !== undefined ? { preprocess: u.preprocess } : {}),
      ...(u.low !== undefined ? { low: u.low } : {}),
      ...(u.high !== undefined ? { high: u.high } : {}),
      ...(u.scale !== undefined ? { scale: u.scale } : {}),
      ...(u.start !== undefined ? { start: u.start } : {}),
      ...(u.end !== undefined ? { end: u.end } : {}),
    };
  });
  const ip = b.ip_adapter;
  const ipAdapter: IpAdapterParams | undefined =
    ip === undefined
      ? undefined
      : {
          model: resolveModel('ipAdapter', dirs, ip.model, 'ip_adapter.model'),
          image: read(ip.image, 'ip_adapter.image'),
          ...(ip.scale !== undefined ? { scale: ip.scale } : {}),
          ...(dirs.imageEncoder != null && dirs.imageEncoder !== '' ? { imageEncoder: dirs.imageEncoder } : {}),
        };
  const loras = [...fieldLoras(b.loras ?? [], dirs), ...promptLoras(b, dirs)];
  return {
    ...(controlNets.length > 0 ? { controlNets } : {}),
    ...(ipAdapter !== undefined ? { ipAdapter } : {}),
    ...(b.mask !== undefined ? { mask: read(b.mask, 'mask') } : {}),
    ...(loras.length > 0 ? { loras } : {}),
  };
}

function fieldLoras(loras: readonly LoraBody[], dirs: ModelDirs): LoraSpec[] {
  return loras.map((l, i) => {
    const m = l.multiplier ?? 1;
    return { path: resolveModel('lora', dirs, l.name, `loras[${i}].name`), te: m, unet: m };
  });
}

/**
 * The prompt's <lora:NAME:TE:UNET> tags, in A1111 syntax only (plain prompts have no tags), when --lora-dir is set;
 * without it the tags are left to the engine, which strips them with a warning that they were not applied. Queue
 * mode: the worker decides the same with its own --lora-dir.
 */
function promptLoras(b: { prompt: string; prompt_syntax?: string }, dirs: ModelDirs): LoraSpec[] {
  const onWorker = dirs.onWorker === true;
  if (b.prompt_syntax === 'plain' || ((dirs.lora == null || dirs.lora === '') && !onWorker)) return [];
  let tags;
  try {
    tags = extractLoraTags(b.prompt).loras;
  } catch (e) {
    if (e instanceof LoraError) throw new HttpError(400, `prompt: ${e.message}`, 'prompt');
    throw e;
  }
  const pathOf = (name: string): string => {
    if (!onWorker) return resolveModel('lora', dirs, name, 'prompt');
    checkModelName('lora', name, 'prompt');
    return modelRef({ kind: 'lora', name, field: 'prompt', status: 400, optional: 'without-folder' });
  };
  return tags.map((t) => ({ path: pathOf(t.name), te: t.te, unet: t.unet }));
}

/**
 * Every image of the adapter fields through the upload checks, on the request's budget (shared with init_image);
 * returns the params with each image replaced by its checked bytes.
 */
export async function checkAdapterImages(p: GenerateParams, limits: UploadLimits, budget: DecodeBudget): Promise<GenerateParams> {
  if (p.mask !== undefined && p.initImage === undefined) throw new HttpError(400, 'mask: inpainting needs init_image (the image to repaint)', 'mask');
  const mask = p.mask !== undefined ? (await decodeUploadedImage(p.mask, 'mask', limits, budget)).bytes : undefined;
  let controlNets: ControlNetParams[] | undefined;
  for (const [i, c] of (p.controlNets ?? []).entries()) {
    const image = (await decodeUploadedImage(c.image, `controlnet[${i}].image`, limits, budget)).bytes;
    (controlNets ??= []).push({ ...c, image });
  }
  const ipAdapter =
    p.ipAdapter === undefined ? undefined : { ...p.ipAdapter, image: (await decodeUploadedImage(p.ipAdapter.image, 'ip_adapter.image', limits, budget)).bytes };
  return { ...p, ...(mask !== undefined ? { mask } : {}), ...(controlNets !== undefined ? { controlNets } : {}), ...(ipAdapter !== undefined ? { ipAdapter } : {}) };
}

/** A pipeline field name (ParamError's `controlNets[0].scale`) as this body names it (`controlnet[0].scale`). */
export function bodyFieldOf(field: string): string {
  return field.replace(/^controlNets/, 'controlnet').replace(/^ipAdapter/, 'ip_adapter').replace(/^initImage/, 'init_image');
}
