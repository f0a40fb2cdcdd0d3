/**
 * `<lora:NAME:...>` -> a file in a LoRA folder (`--lora-dir`), as A1111 finds networks: a file whose name without
 * extension is NAME (.safetensors, else .pt, .ckpt), anywhere under the folder; failing that, a .safetensors file
 * whose kohya metadata names it (`ss_output_name`, the training's output name). Only names found by listing the
 * folder are used, so a NAME such as `../x` never reaches outside it.
 */
import { readdirSync } from 'node:fs';
import { basename, extname, join, relative } from 'node:path';
import { SafetensorsFile } from '../weights/safetensors.js';
import { LoraError } from './types.js';

/** In order of preference when one name has several files. */
export const LORA_EXTENSIONS = Object.freeze(['.safetensors', '.pt', '.ckpt']);
/** Sub-folder depth searched and files listed at most: LoRA folders hold hundreds of files, a few levels deep. */
const MAX_DEPTH = 8;
const MAX_FILES = 100_000;

/** The path of the LoRA `name` in `dir`; LoraError naming the folder and what it holds when there is none. */
export function resolveLora(dir: string, name: string): string {
  const files = loraFiles(dir);
  const stem = (f: string) => basename(f, extname(f));
  const byStem = files.filter((f) => stem(f) === name);
  if (byStem.length > 0) {
    const rank = (f: string) => LORA_EXTENSIONS.indexOf(extname(f).toLowerCase());
    const best = byStem.reduce((a, b) => (rank(b) < rank(a) ? b : a));
    const rivals = byStem.filter((f) => f !== best && rank(f) === rank(best));
    if (rivals.length > 0) throw new LoraError(`LoRA "${name}" is ambiguous in ${dir}: ${[best, ...rivals].map((f) => relative(dir, f)).join(', ')}`);
    return best;
  }
  const byAlias = files.filter((f) => extname(f).toLowerCase() === '.safetensors' && outputName(f) === name);
  if (byAlias.length === 1) return byAlias[0];
  if (byAlias.length > 1) throw new LoraError(`LoRA "${name}" is ambiguous in ${dir}: ss_output_name of ${byAlias.map((f) => relative(dir, f)).join(', ')}`);
  const known = [...new Set(files.map(stem))].sort();
  const listed = known.length === 0 ? 'it holds no .safetensors, .pt or .ckpt files' : `it has ${known.slice(0, 20).join(', ')}${known.length > 20 ? `, ... (${known.length})` : ''}`;
  throw new LoraError(`no LoRA named "${name}" in ${dir}: ${listed}`);
}

/** Every LoRA-like file under dir, sorted. */
function loraFiles(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string, depth: number) => {
    let entries;
    try {
      entries = readdirSync(d, { withFileTypes: true });
    } catch (e) {
      if (depth === 0) throw new LoraError(`LoRA folder ${dir}: cannot list it (${(e as NodeJS.ErrnoException).code ?? String(e)})`);
      return;
    }
    for (const e of entries.sort((a, b) => (a.name < b.name ? -1 : 1))) {
      if (out.length >= MAX_FILES) throw new LoraError(`LoRA folder ${dir}: more than ${MAX_FILES} files`);
      const path = join(d, e.name);
      if (e.isDirectory() && depth < MAX_DEPTH) walk(path, depth + 1);
      else if (e.isFile() && LORA_EXTENSIONS.includes(extname(e.name).toLowerCase())) out.push(path);
    }
  };
  walk(dir, 0);
  return out;
}

/** kohya's `ss_output_name` of a safetensors file; null when it has none or cannot be read. */
function outputName(path: string): string | null {
  let f: SafetensorsFile | null = null;
  try {
    f = SafetensorsFile.open(path);
    return f.metadata.get('ss_output_name') ?? null;
  } catch {
    return null;
  } finally {
    f?.close();
  }
}
