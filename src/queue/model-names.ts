/**
 * A worker's side of the model names of a job (ControlNets, IP-Adapter, LoRAs): the front (queue mode) checked
 * their form only and sent references (../server/models-dir.ts modelRef) where paths go; here each is found in the
 * worker's own folders (`sd worker --controlnet-dir, --ip-adapter-dir, --lora-dir, --image-encoder`) by the rule
 * `sd serve` applies to its own (resolveModel: listed names only, no traversal, symbolic links kept inside). A
 * name the worker does not have throws the HttpError resolveModel throws (4xx naming the field and what the worker
 * has), which fails the job with that status. A prompt's <lora:> tag the worker cannot apply is dropped with a
 * warning, as `sd serve` drops it: without --lora-dir (our routes), or also when unknown (A1111's routes).
 * A path that is not a reference (a front from before queue-mode names) is passed on as it came.
 */
import type { ControlNetParams, GenerateParams, IpAdapterParams } from '../pipeline/api.js';
import type { LoraSpec } from '../lora/types.js';
import { HttpError } from '../server/errors.js';
import { MODEL_KINDS, parseModelRef, resolveModel, type ModelDirs } from '../server/models-dir.js';

export function resolveModelNames(p: GenerateParams, dirs: ModelDirs, warn: (message: string) => void): GenerateParams {
  const local: ModelDirs = { ...dirs, onWorker: false, holder: 'sd worker' };
  let named = false;
  /** The path of `path` (a reference resolved here, or a path as given); null: an optional tag dropped. */
  const find = (path: string): string | null => {
    const r = parseModelRef(path);
    if (r === null) return path;
    named = true;
    const dir = local[r.kind];
    if (r.optional !== undefined && (dir == null || dir === '')) {
      warn(`<lora:${r.name}> not applied: this worker has no ${MODEL_KINDS[r.kind].flag}`);
      return null;
    }
    try {
      return resolveModel(r.kind, local, r.name, r.field, r.status, r.closest === true);
    } catch (e) {
      if (r.optional !== 'unknown' || !(e instanceof HttpError) || e.statusCode !== r.status) throw e;
      warn(`<lora:${r.name}> skipped: ${e.message.replace(/^prompt: /, '')}`);
      return null;
    }
  };
  const controlNets = p.controlNets?.map((c): ControlNetParams => ({ ...c, model: find(c.model) ?? c.model }));
  let ipAdapter: IpAdapterParams | undefined;
  if (p.ipAdapter !== undefined) {
    const wasRef = parseModelRef(p.ipAdapter.model) !== null;
    const encoder = local.imageEncoder;
    ipAdapter = {
      ...p.ipAdapter,
      model: find(p.ipAdapter.model) ?? p.ipAdapter.model,
      ...(wasRef && encoder != null && encoder !== '' ? { imageEncoder: encoder } : {}),
    };
  }
  const loras = p.loras?.flatMap((l): LoraSpec[] => {
    const path = find(l.path);
    return path === null ? [] : [{ ...l, path }];
  });
  if (!named) return p;
  return {
    ...p,
    ...(controlNets !== undefined ? { controlNets } : {}),
    ...(ipAdapter !== undefined ? { ipAdapter } : {}),
    ...(loras !== undefined ? { loras } : {}),
  };
}
