/**
 * Reading one field of an A1111 request body the way A1111's pydantic models accept it: null or absent is the
 * default; a number may come as a JSON number, an integral float (64.0) where an integer is meant, or a numeric
 * string ("7.0", "-1"); a boolean as true/false or "true"/"false". Anything else answers 422 naming the field
 * (FastAPI's status for a body that does not validate). Fields nobody reads are simply never looked at.
 */
import { HttpError } from '../errors.js';

export type Body = Readonly<Record<string, unknown>>;

export const invalid = (field: string, why: string): HttpError => new HttpError(422, `${field}: ${why}`, field);

/** The body as an object; an empty body (`{}` from the parser) is one. */
export function asBody(v: unknown, what = 'body'): Body {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw invalid(what, 'must be a JSON object');
  return v as Body;
}

const NUMERIC = /^\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*$/;

export interface NumberRule {
  readonly min?: number;
  readonly max?: number;
  readonly integer?: boolean;
}

/** A number, or `fallback` when null/absent. */
export function num(b: Body, field: string, fallback: number, rule: NumberRule = {}): number {
  const v = b[field];
  if (v === undefined || v === null) return fallback;
  return checkNumber(field, v, rule);
}

/** A number or null when null/absent. */
export function numOrNull(b: Body, field: string, rule: NumberRule = {}): number | null {
  const v = b[field];
  return v === undefined || v === null ? null : checkNumber(field, v, rule);
}

export function checkNumber(field: string, v: unknown, rule: NumberRule = {}): number {
  let n: number;
  if (typeof v === 'number') n = v;
  else if (typeof v === 'string' && NUMERIC.test(v)) n = Number(v);
  else throw invalid(field, `must be a number, got ${describe(v)}`);
  if (!Number.isFinite(n)) throw invalid(field, 'must be a finite number');
  if (rule.integer === true && !Number.isInteger(n)) throw invalid(field, `must be an integer, got ${n}`);
  if (rule.min !== undefined && n < rule.min) throw invalid(field, `must be >= ${rule.min}, got ${n}`);
  if (rule.max !== undefined && n > rule.max) throw invalid(field, `must be <= ${rule.max}, got ${n}`);
  return n;
}

export function str(b: Body, field: string, fallback: string, maxLength?: number): string {
  const v = b[field];
  if (v === undefined || v === null) return fallback;
  if (typeof v !== 'string') throw invalid(field, `must be a string, got ${describe(v)}`);
  if (maxLength !== undefined && v.length > maxLength) throw invalid(field, `longer than ${maxLength} characters`);
  return v;
}

export function strOrNull(b: Body, field: string): string | null {
  const v = b[field];
  return v === undefined || v === null ? null : str(b, field, '');
}

export function bool(b: Body, field: string, fallback: boolean): boolean {
  const v = b[field];
  if (v === undefined || v === null) return fallback;
  if (typeof v === 'boolean') return v;
  if (v === 'true' || v === 'false') return v === 'true';
  if (v === 0 || v === 1) return v === 1;
  throw invalid(field, `must be true or false, got ${describe(v)}`);
}

/** An object field (override_settings, alwayson_scripts); null/absent: {}. */
export function obj(b: Body, field: string): Body {
  const v = b[field];
  if (v === undefined || v === null) return {};
  return asBody(v, field);
}

/** A list field (init_images, styles); null/absent: []. */
export function list(b: Body, field: string): readonly unknown[] {
  const v = b[field];
  if (v === undefined || v === null) return [];
  if (!Array.isArray(v)) throw invalid(field, `must be a list, got ${describe(v)}`);
  return v;
}

function describe(v: unknown): string {
  if (Array.isArray(v)) return 'a list';
  if (typeof v === 'string') return JSON.stringify(v.length > 40 ? `${v.slice(0, 40)}...` : v);
  return typeof v === 'object' ? 'an object' : String(v);
}
