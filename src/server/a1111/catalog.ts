/**
 * The read-only A1111 listing routes, with what this server has: one model, its samplers and schedules, and
 * empty lists for every feature it does not have (VAEs to swap, upscalers, LoRA and embedding folders,
 * hypernetworks, face restorers, styles, scripts). Shapes as A1111's modules/api/models.py answers them, so a
 * client that fills its menus from them shows what is really there.
 */
import { samplerList, schedulerList } from './names.js';
import type { ModelInfo } from './options.js';

export interface CatalogFacts {
  readonly model: ModelInfo;
  readonly basicAuth: boolean;
}

/** GET route (after /sdapi/v1/) -> its answer. */
export function catalog(f: CatalogFacts): Readonly<Record<string, () => unknown>> {
  return {
    'sd-models': () => [f.model],
    samplers: samplerList,
    schedulers: schedulerList,
    'sd-vae': () => [],
    upscalers: () => [],
    'latent-upscale-modes': () => [],
    loras: () => [],
    embeddings: () => ({ loaded: {}, skipped: {} }),
    hypernetworks: () => [],
    'face-restorers': () => [],
    'prompt-styles': () => [],
    'realesrgan-models': () => [],
    scripts: () => ({ txt2img: [], img2img: [] }),
    'script-info': () => [],
    extensions: () => [],
    // What A1111 would report of its command line, for the flags this server has an answer for.
    'cmd-flags': () => ({ api: true, nowebui: true, api_auth: f.basicAuth ? '(set)' : null, ckpt: f.model.filename, lora_dir: null, embeddings_dir: null }),
  };
}
