/**
 * The model folders of `sd serve` (--controlnet-dir, --ip-adapter-dir, --lora-dir) and the one rule by which a
 * request's model NAME becomes a file: a client never sends a path. A name is matched against what listing the
 * folder finds (a file's name without its extension, case-insensitive as A1111 matches; a diffusers ControlNet
 * folder's name; for LoRAs, failing that, kohya's `ss_output_name`), so `../x`, `/etc/passwd` or `a/b` can never
 * name anything outside it. A symbolic link inside the folder is followed only when its target is inside it too.
 * An unknown name answers 4xx naming it and a few of the folder's names; a kind whose folder was not given answers
 * 4xx naming the flag that enables it.
 *
 * Queue mode (`onWorker`): the front holds no model folders. A name is checked here for its form only and travels as
 * a reference (modelRef, `sd-model-name:{...}` in the path's place); the worker that runs the job finds it in its own
 * folders by this same rule (../queue/model-names.ts), and a name it does not have fails the job with the same 4xx.
 */
import { readdirSync, realpathSync, statSync } from 'node:fs';
import { basename, extname, join, relative, sep } from 'node:path';
import { SafetensorsFile } from '../weights/safetensors.js';
import { HttpError } from './errors.js';

export type ModelKind = 'controlnet' | 'ipAdapter' | 'lora';

interface KindFacts {
  /** The `sd serve` flag that names the folder. */
  readonly flag: string;
  readonly label: string;
  /** File extensions, in order of preference when one name has several files. */
  readonly extensions: readonly string[];
  /** Whether a folder with a config.json is a model of its own (a diffusers ControlNetModel). */
  readonly folders: boolean;
}

export const MODEL_KINDS: Readonly<Record<ModelKind, KindFacts>> = Object.freeze({
  // sd-webui-controlnet's CN_MODEL_EXTS, .safetensors first.
  controlnet: { flag: '--controlnet-dir', label: 'ControlNet', extensions: ['.safetensors', '.pth', '.pt', '.ckpt', '.bin'], folders: true },
  ipAdapter: { flag: '--ip-adapter-dir', label: 'IP-Adapter', extensions: ['.safetensors', '.bin'], folders: false },
  // src/lora/resolve.ts's LORA_EXTENSIONS.
  lora: { flag: '--lora-dir', label: 'LoRA', extensions: ['.safetensors', '.pt', '.ckpt'], folders: false },
});

/** The folders the server was started with; null or absent: that kind of model is not offered. */
export interface ModelDirs {
  readonly controlnet?: string | null;
  readonly ipAdapter?: string | null;
  readonly lora?: string | null;
  /** The CLIP vision encoder folder (transformers' image_encoder/) for every IP-Adapter; absent: the engine looks next to the adapter. */
  readonly imageEncoder?: string | null;
  /** Queue mode's front: names are resolved by the worker that runs the job, in its folders; here only their form is checked. */
  readonly onWorker?: boolean;
  /** The command whose flags the messages name; default 'sd serve'. */
  readonly holder?: 'sd serve' | 'sd worker';
}

/** A model name to be resolved by a worker: what resolveModel would have been asked, and how a miss is answered. */
export interface ModelRef {
  readonly kind: ModelKind;
  readonly name: string;
  readonly field: string;
  readonly status: number;
  readonly closest?: boolean;
  /** A prompt's <lora:> tag: 'without-folder' dropped when the worker has no --lora-dir, 'unknown' also when it lacks the name. */
  readonly optional?: 'without-folder' | 'unknown';
}

const REF_PREFIX = 'sd-model-name:';

export const modelRef = (r: ModelRef): string => `${REF_PREFIX}${JSON.stringify(r)}`;

/** The reference a path holds, or null when it is a path. */
export function parseModelRef(s: string): ModelRef | null {
  if (!s.startsWith(REF_PREFIX)) return null;
  const r = JSON.parse(s.slice(REF_PREFIX.length)) as ModelRef;
  if (!(r.kind in MODEL_KINDS) || typeof r.name !== 'string' || typeof r.field !== 'string' || typeof r.status !== 'number') throw new Error(`not a model reference: ${s.slice(0, 200)}`);
  return r;
}

/** `status` naming `field` when `name` cannot be a model's name at all (empty, a path, `.` or `..`). */
export function checkModelName(kind: ModelKind, name: string, field: string, status = 400): void {
  if (name.trim() === '' || name.length > 255 || /[\\/\0]/.test(name) || name === '.' || name === '..') {
    const shown = JSON.stringify(name.length > 80 ? `${name.slice(0, 80)}...` : name);
    const f = MODEL_KINDS[kind];
    throw new HttpError(status, `${field}: ${shown} is not a ${f.label} name (a file name in the server's ${f.flag}, without folders)`, field);
  }
}

export interface ModelEntry {
  /** What a request names it by: the file name without its extension, or the folder's name. */
  readonly name: string;
  /** The real path (symbolic links resolved), inside the folder. */
  readonly path: string;
  /** The path relative to the folder, as found. */
  readonly file: string;
}

/** Sub-folder depth searched and entries listed at most (model folders hold hundreds of files, a few levels deep). */
const MAX_DEPTH = 8;
const MAX_ENTRIES = 100_000;

/** Every model of `kind` under `dir`, sorted by name; a folder that cannot be listed throws. */
export function listModels(kind: ModelKind, dir: string): ModelEntry[] {
  const facts = MODEL_KINDS[kind];
  const root = realpathSync(dir);
  const inside = (p: string): boolean => p === root || p.startsWith(root + sep);
  const out: ModelEntry[] = [];
  let seen = 0;
  const walk = (d: string, depth: number): void => {
    let entries;
    try {
      entries = readdirSync(d, { withFileTypes: true });
    } catch (e) {
      if (depth === 0) throw e;
      return;
    }
    for (const e of entries.sort((a, b) => (a.name < b.name ? -1 : 1))) {
      if (++seen > MAX_ENTRIES) return;
      const found = join(d, e.name);
      let real = found;
      let isDir = e.isDirectory();
      let isFile = e.isFile();
      if (e.isSymbolicLink()) {
        try {
          real = realpathSync(found);
          const s = statSync(real);
          isDir = s.isDirectory();
          isFile = s.isFile();
        } catch {
          continue; // a dangling link
        }
        if (!inside(real)) continue; // a link out of the folder names nothing
      }
      const file = relative(root, found);
      if (isDir && facts.folders && isModelFolder(real)) out.push({ name: e.name, path: real, file });
      else if (isDir && depth < MAX_DEPTH) walk(found, depth + 1);
      else if (isFile && facts.extensions.includes(extname(e.name).toLowerCase())) out.push({ name: basename(e.name, extname(e.name)), path: real, file });
    }
  };
  walk(root, 0);
  const rank = (m: ModelEntry): number => facts.extensions.indexOf(extname(m.path).toLowerCase());
  return out.sort((a, b) => (a.name.toLowerCase() < b.name.toLowerCase() ? -1 : a.name.toLowerCase() > b.name.toLowerCase() ? 1 : rank(a) - rank(b)));
}

/** A diffusers model folder: config.json and its weights beside it. */
function isModelFolder(dir: string): boolean {
  try {
    return statSync(join(dir, 'config.json')).isFile();
  } catch {
    return false;
  }
}

/** The folder of `kind`, or `status` naming the field and the flag that would enable it. */
export function modelDir(kind: ModelKind, dirs: ModelDirs, field: string, status = 400): string {
  const dir = dirs[kind];
  if (dir === undefined || dir === null || dir === '') {
    const f = MODEL_KINDS[kind];
    const who = dirs.holder === 'sd worker' ? 'worker' : 'server';
    throw new HttpError(status, `${field}: this ${who} offers no ${f.label} models; start ${dirs.holder ?? 'sd serve'} with ${f.flag} DIR to enable them`, field);
  }
  return dir;
}

/**
 * The path of the model `name` of `kind`: `status` (400 on our routes, 422 on A1111's) when the kind is not
 * configured, the name is not a plain name, or nothing in the folder has it (`onWorker`: a reference, see the header). `closest`: failing an exact name, the
 * shortest name that contains it, ignoring case (the ControlNet extension's find_closest_lora_model_name, which
 * lets its own API example name a model "canny").
 */
export function resolveModel(kind: ModelKind, dirs: ModelDirs, name: string, field: string, status = 400, closest = false): string {
  checkModelName(kind, name, field, status);
  if (dirs.onWorker === true) return modelRef({ kind, name, field, status, ...(closest ? { closest } : {}) });
  const dir = modelDir(kind, dirs, field, status);
  const facts = MODEL_KINDS[kind];
  const shown = JSON.stringify(name.length > 80 ? `${name.slice(0, 80)}...` : name);
  let models: ModelEntry[];
  try {
    models = listModels(kind, dir);
  } catch (e) {
    throw new HttpError(500, `${facts.flag} ${dir}: cannot list it (${(e as NodeJS.ErrnoException).code ?? String(e)})`);
  }
  const found =
    findByName(models, name, facts.extensions) ?? (kind === 'lora' ? findByOutputName(models, name) : null) ?? (closest ? findContaining(models, name) : null);
  if (found !== null) return found.path;
  const names = [...new Set(models.map((m) => m.name))];
  const listed = names.length === 0 ? 'it holds none' : `it has ${names.slice(0, 20).join(', ')}${names.length > 20 ? `, ... (${names.length})` : ''}`;
  throw new HttpError(status, `${field}: no ${facts.label} named ${shown} in this ${dirs.holder === 'sd worker' ? 'worker' : 'server'}'s ${facts.flag}: ${listed}`, field);
}

/** By file name without extension (or with it), exact first, then ignoring case; the preferred extension wins. */
function findByName(models: readonly ModelEntry[], name: string, extensions: readonly string[]): ModelEntry | null {
  const withExt = extensions.includes(extname(name).toLowerCase()) ? basename(name, extname(name)) : null;
  for (const same of [(a: string, b: string) => a === b, (a: string, b: string) => a.toLowerCase() === b.toLowerCase()]) {
    const hit = models.find((m) => same(m.name, name)) ?? (withExt !== null ? models.find((m) => same(m.name, withExt) && same(extname(m.path), extname(name))) : undefined);
    if (hit !== undefined) return hit;
  }
  return null;
}

function findContaining(models: readonly ModelEntry[], name: string): ModelEntry | null {
  const k = name.toLowerCase();
  const hits = models.filter((m) => m.name.toLowerCase().includes(k));
  return hits.length === 0 ? null : hits.reduce((a, b) => (b.name.length < a.name.length ? b : a));
}

/** A LoRA whose kohya metadata names it (`ss_output_name`, its training's output name), as A1111 aliases it. */
function findByOutputName(models: readonly ModelEntry[], name: string): ModelEntry | null {
  const hits = models.filter((m) => extname(m.path).toLowerCase() === '.safetensors' && safetensorsMetadata(m.path).get('ss_output_name') === name);
  return hits.length === 1 ? hits[0] : null;
}

/** A safetensors file's `__metadata__`; empty when it has none or cannot be read. */
export function safetensorsMetadata(path: string): ReadonlyMap<string, string> {
  let f: SafetensorsFile | null = null;
  try {
    f = SafetensorsFile.open(path);
    return f.metadata;
  } catch {
    return new Map();
  } finally {
    f?.close();
  }
}
