/**
 * The checkpoints a request may name (`model` on our routes, A1111's `sd_model_checkpoint` in `override_settings` or
 * /sdapi/v1/options): the one loaded model of `sd serve`, or in queue mode every model the workers announce. Each is
 * described as A1111's /sdapi/v1/sd-models lists a checkpoint, and one rule finds the one a request names: its
 * title, its model name (the file name without extension), its file (path or base name), each with or without
 * A1111's " [hash]" suffix (clients send titles like "name.safetensors [6ce0161689]"), exact first, then ignoring case.
 */
import * as path from 'node:path';

export interface ModelInfo {
  readonly title: string;
  readonly model_name: string;
  readonly hash: string | null;
  readonly sha256: string | null;
  readonly filename: string;
  readonly config: string | null;
}

const EXTENSIONS = /\.(safetensors|ckpt|pt|pth|bin)$/i;

/** The loaded weights as A1111 lists a checkpoint; no hash (A1111 too leaves it null until it has hashed the file). */
export function modelInfo(weights: string | null): ModelInfo {
  const file = weights ?? 'model.safetensors';
  const base = path.basename(file.replace(/[\\/]+$/, ''));
  return { title: base, model_name: base.replace(EXTENSIONS, ''), hash: null, sha256: null, filename: path.resolve(file), config: null };
}

/**
 * A model a worker announces: `name` is what jobs are routed by; `file` the weights' file name, which is the title
 * when it is the name with an extension (so that two names for the same file stay two titles).
 */
export function announcedModelInfo(name: string, file: string | null = null): ModelInfo {
  const title = file !== null && file.replace(EXTENSIONS, '') === name ? file : name;
  return { title, model_name: name, hash: null, sha256: null, filename: title, config: null };
}

/** "name.safetensors [6ce0161689]" -> "name.safetensors". */
export const withoutHash = (name: string): string => name.replace(/\s*\[[0-9a-fA-F]{6,64}\]\s*$/, '').trim();

/** The checkpoint `asked` names among `known`; null when none does. */
export function findCheckpoint(asked: string, known: readonly ModelInfo[]): ModelInfo | null {
  const name = withoutHash(asked);
  const forms = (m: ModelInfo): string[] => [m.title, m.model_name, m.filename, path.basename(m.filename), ...(m.hash !== null ? [m.hash] : []), ...(m.sha256 !== null ? [m.sha256] : [])];
  for (const same of [(a: string, b: string) => a === b, (a: string, b: string) => a.toLowerCase() === b.toLowerCase()]) {
    const hit = known.find((m) => forms(m).some((f) => same(f, name)));
    if (hit !== undefined) return hit;
  }
  return null;
}

/** "tiny, other" (at most 20), for messages naming what may be asked for. */
export function listTitles(known: readonly ModelInfo[]): string {
  if (known.length === 0) return 'none';
  const titles = known.map((m) => m.title);
  return `${titles.slice(0, 20).join(', ')}${titles.length > 20 ? `, ... (${titles.length})` : ''}`;
}
