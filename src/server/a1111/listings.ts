/**
 * What the model folders hold, as A1111 and its ControlNet extension list it: `/sdapi/v1/loras` (modules/api
 * models.py via extensions-builtin/Lora: name, alias, path, metadata), and the extension's own routes that
 * clients probe before they send a unit (scripts/api.py): `GET /controlnet/version`, `/controlnet/model_list`
 * ("name [hash]", A1111's short model hash, the IP-Adapters of --ip-adapter-dir too, as the extension lists them
 * with its ControlNets), `/controlnet/module_list` (the preprocessors this server runs, with
 * their sliders), `/controlnet/settings`. Paths are given relative to their folder: a client only needs names.
 * In queue mode the workers' folders are listed (each worker lists its own at start), then the front's, by name.
 */
import { createHash } from 'node:crypto';
import { closeSync, openSync, readSync, statSync } from 'node:fs';
import type { FastifyInstance } from 'fastify';
import { listModels, safetensorsMetadata, type ModelDirs } from '../models-dir.js';
import { HttpError } from '../errors.js';
import { JSON_LIMITS } from '../body.js';
import { CANNY_SLIDERS, MAX_UNITS } from './controlnet.js';

/** What model folders hold, as listed here: the LoRAs (loraList) and the extension's model_list (controlNetModelList). */
export interface FolderListings {
  readonly loras: readonly Record<string, unknown>[];
  readonly controlnet: readonly string[];
}

/** Queue mode: the workers' listings (the front's QueueFront.listings). */
export type RemoteListings = () => Promise<FolderListings>;

/** `first`'s entries, then those of `then` whose key is new. */
function union<T>(first: readonly T[], then: readonly T[], key: (t: T) => string): T[] {
  const seen = new Set(first.map(key));
  return [...first, ...then.filter((t) => !seen.has(key(t)) && seen.add(key(t)) !== undefined)];
}

/** /sdapi/v1/loras: the workers' (queue mode), then this server's --lora-dir. */
export async function allLoras(dirs: ModelDirs, remote?: RemoteListings): Promise<Record<string, unknown>[]> {
  const local = loraList(dirs);
  return remote === undefined ? local : union((await remote()).loras, local, (l) => String(l.name));
}

/** /controlnet/model_list: the workers' (queue mode), then this server's folders. */
export async function allControlNets(dirs: ModelDirs, remote?: RemoteListings): Promise<string[]> {
  const local = controlNetModelList(dirs);
  return remote === undefined ? local : union((await remote()).controlnet, local, (c) => c.replace(/\s*\[[0-9a-f]+\]$/i, '').toLowerCase());
}

/** sd-webui-controlnet's get_api_version(). */
export const CONTROLNET_API_VERSION = 3;

/** A1111's sd_models.model_hash: sha256 of the 64 KiB at offset 1 MiB, its first 8 hex digits (of nothing for a small file). */
export function a1111ShortHash(path: string): string {
  const fd = openSync(path, 'r');
  try {
    const buf = Buffer.alloc(0x10000);
    const n = readSync(fd, buf, 0, buf.length, 0x100000);
    return createHash('sha256').update(buf.subarray(0, n)).digest('hex').slice(0, 8);
  } finally {
    closeSync(fd);
  }
}

/** A1111's read_metadata_from_safetensors: string values, those that read as JSON objects or lists parsed. */
function metadataObject(path: string): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of safetensorsMetadata(path)) {
    let value: unknown = v;
    if (v.startsWith('{') || v.startsWith('[')) {
      try {
        value = JSON.parse(v);
      } catch {
        value = v;
      }
    }
    out[k] = value;
  }
  return out;
}

/** GET /sdapi/v1/loras: every LoRA of --lora-dir (none without it). */
export function loraList(dirs: ModelDirs): Record<string, unknown>[] {
  if (dirs.lora == null || dirs.lora === '') return [];
  const seen = new Set<string>();
  return listModels('lora', dirs.lora)
    .filter((m) => !seen.has(m.name) && seen.add(m.name) !== undefined)
    .map((m) => {
      const metadata = m.path.toLowerCase().endsWith('.safetensors') ? metadataObject(m.path) : {};
      const alias = typeof metadata.ss_output_name === 'string' && metadata.ss_output_name !== '' ? metadata.ss_output_name : m.name;
      return { name: m.name, alias, path: m.file, metadata };
    });
}

/** The extension's model_list entries: "name [hash]" for files, the folder's name for a diffusers folder. */
export function controlNetModelList(dirs: ModelDirs): string[] {
  const seen = new Set<string>();
  const out: string[] = [];
  const has = (d: string | null | undefined): d is string => d != null && d !== '';
  const models = [...(has(dirs.controlnet) ? listModels('controlnet', dirs.controlnet) : []), ...(has(dirs.ipAdapter) ? listModels('ipAdapter', dirs.ipAdapter) : [])];
  for (const m of models) {
    if (seen.has(m.name.toLowerCase())) continue;
    seen.add(m.name.toLowerCase());
    out.push(statSync(m.path).isFile() ? `${m.name} [${a1111ShortHash(m.path)}]` : m.name);
  }
  return out;
}

const RESOLUTION = { name: 'Resolution', value: 512, min: 64, max: 2048, step: 8 };

/** The extension's module_list answer for the preprocessors this server runs. */
export function controlNetModules(): Record<string, unknown> {
  const slider = (name: string, s: { value: number; min: number; max: number }) => ({ name, value: s.value, min: s.min, max: s.max, step: 1 });
  return {
    module_list: ['none', 'canny', 'invert', 'ip-adapter_clip_sd15', 'ip-adapter-auto'],
    module_detail: {
      none: { model_free: false, sliders: [RESOLUTION] },
      canny: { model_free: false, sliders: [RESOLUTION, slider('Low Threshold', CANNY_SLIDERS.low), slider('High Threshold', CANNY_SLIDERS.high)] },
      invert: { model_free: false, sliders: [] },
      'ip-adapter_clip_sd15': { model_free: false, sliders: [] },
      'ip-adapter-auto': { model_free: false, sliders: [] },
    },
  };
}

/** The extension's routes, registered under /controlnet (a plugin of their own: they are not under /sdapi/v1). */
export async function controlNetRoutes(app: FastifyInstance, o: { models: ModelDirs; remote?: RemoteListings }): Promise<void> {
  app.addHook('onRequest', async (request) => {
    const length = Number(request.headers['content-length'] ?? 0);
    if (length > JSON_LIMITS.bytesWithoutBody) throw new HttpError(413, `body: Content-Length ${length} is over the limit of ${JSON_LIMITS.bytesWithoutBody} bytes for ${request.method} ${request.url}`, 'body');
  });
  app.get('/version', async () => ({ version: CONTROLNET_API_VERSION }));
  app.get('/model_list', async () => ({ model_list: await allControlNets(o.models, o.remote) }));
  app.get('/module_list', async () => controlNetModules());
  app.get('/settings', async () => ({ control_net_unit_count: MAX_UNITS }));
}
