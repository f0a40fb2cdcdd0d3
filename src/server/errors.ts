/**
 * HTTP errors of the server and the one mapping from any thrown error to a status and a JSON body
 * `{statusCode, error, message, field?}`. Bad input is always 4xx with a message naming the field
 * (schema failures, ParamError, ImageError, an unparsable or oversized body); only our own faults are 5xx.
 */
import { STATUS_CODES } from 'node:http';
import type { FastifyError, FastifyReply, FastifyRequest } from 'fastify';
import { ParamError } from '../pipeline/api.js';
import { ImageError } from '../image/codec.js';

/** An answer other than success, with the status it is sent with. */
export class HttpError extends Error {
  override name = 'HttpError';
  constructor(
    readonly statusCode: number,
    message: string,
    readonly field?: string,
    readonly headers: Readonly<Record<string, string>> = {},
  ) {
    super(message);
  }
}

/** The body of every error answer. */
export interface ErrorBody {
  readonly statusCode: number;
  readonly error: string;
  readonly message: string;
  readonly field?: string;
}

export function errorBody(statusCode: number, message: string, field?: string): ErrorBody {
  return { statusCode, error: STATUS_CODES[statusCode] ?? 'Error', message, ...(field !== undefined ? { field } : {}) };
}

/** ParamError names the pipeline's fields (camelCase); the HTTP body names them as the request does. */
const BODY_FIELD: Readonly<Record<string, string>> = Object.freeze({
  negativePrompt: 'negative_prompt',
  cfgScale: 'scale',
  cfg: 'do_scale',
  initImage: 'init_image',
});

export function paramErrorToHttp(e: ParamError): HttpError {
  const field = BODY_FIELD[e.field] ?? e.field;
  const reason = e.message.startsWith(`${e.field}: `) ? e.message.slice(e.field.length + 2) : e.message;
  return new HttpError(400, `${field}: ${reason}`, field);
}

/** Status and body for anything a route or a job threw. */
export function toHttpError(e: unknown, bodyLimit?: number): HttpError {
  if (e instanceof HttpError) return e;
  if (e instanceof ParamError) return paramErrorToHttp(e);
  if (e instanceof ImageError) {
    // An upload names its field (../image/upload.ts); the pipeline's own decode says "init image".
    const field = e.field ?? 'init_image';
    const reason = e.message.startsWith(`${field}: `) ? e.message.slice(field.length + 2) : e.message.replace(/^init[_ ]image: /, '');
    return new HttpError(400, `${field}: ${reason}`, field);
  }
  const fe = e as Partial<FastifyError>;
  if (fe.code === 'FST_ERR_CTP_BODY_TOO_LARGE') {
    const limit = bodyLimit !== undefined ? ` of ${(bodyLimit / 2 ** 20).toFixed(1)} MiB` : '';
    return new HttpError(413, `body: larger than the server's limit${limit}; send a smaller init_image`, 'body');
  }
  if (typeof fe.statusCode === 'number' && fe.statusCode >= 400 && fe.statusCode < 500) {
    return new HttpError(fe.statusCode, `body: ${fe.message ?? 'bad request'}`, 'body');
  }
  return new HttpError(500, `internal error: ${e instanceof Error ? e.message : String(e)}`);
}

/** One JSON-schema (ajv) failure, as fastify hands it to the schemaErrorFormatter. */
export interface SchemaFailure {
  readonly instancePath: string;
  readonly keyword: string;
  readonly params: Readonly<Record<string, unknown>>;
  readonly message?: string;
}

/**
 * Turns ajv's first failure into `<field>: <reason>`. ajv says "must NOT have additional properties"
 * without the name and "must match pattern" with a regex; these read as the request's own words instead.
 */
export function describeSchemaFailure(f: SchemaFailure, part: string): HttpError {
  const path = f.instancePath.replace(/^\//, '').replaceAll('/', '.');
  const field = path !== '' ? path : part;
  const p = f.params;
  switch (f.keyword) {
    case 'additionalProperties':
      return new HttpError(400, `${String(p.additionalProperty)}: unknown field in ${part}`, String(p.additionalProperty));
    case 'required':
      return new HttpError(400, `${String(p.missingProperty)}: is required`, String(p.missingProperty));
    case 'enum':
      return new HttpError(400, `${field}: must be one of ${(p.allowedValues as unknown[]).join(', ')}`, field);
    case 'pattern':
      return new HttpError(400, `${field}: only letters, digits, '_' and '-' are allowed (1 to 64 of them)`, field);
    case 'type':
      return new HttpError(400, `${field}: must be ${p.type === 'object' ? 'a JSON object' : `of type ${String(p.type)}`}`, field);
    default:
      return new HttpError(400, `${field}: ${f.message ?? f.keyword}`, field);
  }
}

/** fastify's schemaErrorFormatter: the first failure (ajv runs with allErrors off) as an HttpError. */
export function schemaErrorFormatter(failures: readonly SchemaFailure[], part: string): Error {
  const first = failures[0];
  return first !== undefined ? describeSchemaFailure(first, part) : new HttpError(400, `${part}: invalid`, part);
}

/**
 * fastify's error handler: every error answered as JSON. Faults of ours (500) are logged with the stack;
 * expected refusals (4xx, 503 while loading or stopping) at debug level: the access log has their status.
 */
export function errorHandler(bodyLimit: number) {
  return (e: FastifyError | Error, request: FastifyRequest, reply: FastifyReply): void => {
    const h = toHttpError(e, bodyLimit);
    if (h.statusCode >= 500 && !(e instanceof HttpError)) request.log.error({ err: e }, h.message);
    else request.log.debug({ status: h.statusCode }, h.message);
    void reply.code(h.statusCode).headers(h.headers).send(errorBody(h.statusCode, h.message, h.field));
  };
}
