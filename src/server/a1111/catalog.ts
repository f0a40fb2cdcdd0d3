/**
 * The read-only A1111 listing routes, with what this server has: one model, its samplers and schedules, the LoRAs
 * of --lora-dir, the ControlNet script when --controlnet-dir is set, and empty lists for every feature it does not
 * have (VAEs to swap, upscalers, embeddings, hypernetworks, face restorers, styles). Shapes as A1111's
 * modules/api/models.py answers them, so a client that fills its menus from them shows what is really there.
 */
import { samplerList, schedulerList } from './names.js';
import type { CheckpointHost } from './options.js';
import type { ModelDirs } from '../models-dir.js';
import { allLoras, type RemoteListings } from './listings.js';

export interface CatalogFacts {
  readonly checkpoints: CheckpointHost;
  readonly basicAuth: boolean;
  readonly models: ModelDirs;
  /** Queue mode: the workers' folders. */
  readonly remote?: RemoteListings;
}

/** GET route (after /sdapi/v1/) -> its answer. */
export function catalog(f: CatalogFacts): Readonly<Record<string, () => unknown>> {
  const controlnet = (f.models.controlnet != null && f.models.controlnet !== '') || f.models.onWorker === true; // queue mode: the workers have them
  const scripts = controlnet ? ['controlnet'] : [];
  const scriptInfo = (isImg2img: boolean) => ({ name: 'controlnet', is_alwayson: true, is_img2img: isImg2img, args: [] });
  return {
    'sd-models': () => [...f.checkpoints.checkpoints()],
    samplers: samplerList,
    schedulers: schedulerList,
    'sd-vae': () => [],
    upscalers: () => [],
    'latent-upscale-modes': () => [],
    loras: () => allLoras(f.models, f.remote),
    embeddings: () => ({ loaded: {}, skipped: {} }),
    hypernetworks: () => [],
    'face-restorers': () => [],
    'prompt-styles': () => [],
    'realesrgan-models': () => [],
    scripts: () => ({ txt2img: [...scripts], img2img: [...scripts] }),
    'script-info': () => (controlnet ? [scriptInfo(false), scriptInfo(true)] : []),
    extensions: () => [],
    // What A1111 would report of its command line, for the flags this server has an answer for.
    'cmd-flags': () => ({ api: true, nowebui: true, api_auth: f.basicAuth ? '(set)' : null, ckpt: f.checkpoints.defaultCheckpoint()?.filename ?? null, lora_dir: f.models.lora ?? null, controlnet_dir: f.models.controlnet ?? null, embeddings_dir: null }),
  };
}
