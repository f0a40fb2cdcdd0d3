/**
 * Which model family a checkpoint is, recognised from its keys with no flag: each family brings its configs, its
 * text-to-conditioning function and its latent scale (pipeline.ts asks for them by family). A checkpoint of a
 * family this engine does not run is refused by name, never run with the wrong architecture.
 *
 *   sd1   SD 1.x: `cond_stage_model.transformer.*` (CLIP ViT-L), `model.diffusion_model.*` without `label_emb`
 *   sdxl  SDXL base: `conditioner.embedders.0.transformer.*` (CLIP ViT-L) and `conditioner.embedders.1.model.*`
 *         (OpenCLIP ViT-bigG), `model.diffusion_model.label_emb.*` (size and crop conditioning)
 */
import { ConfigError } from '../nn/errors.js';
import type { TensorSource } from '../weights/types.js';

export type ModelFamily = 'sd1' | 'sdxl';

/** Tell-tale keys of checkpoints this engine does not run, in the order they are tested. */
const REFUSED: readonly [RegExp, string][] = [
  [/^(model\.diffusion_model\.)?double_blocks\./, 'FLUX checkpoints are not supported'],
  [/^model\.diffusion_model\.joint_blocks\./, 'Stable Diffusion 3 checkpoints are not supported'],
  [/^conditioner\.embedders\.0\.model\./, 'SDXL refiner checkpoints are not supported yet (only SDXL base 1.0)'],
  [/^cond_stage_model\.model\./, 'Stable Diffusion 2.x checkpoints (OpenCLIP text encoder, v-prediction) are not supported'],
];

const has = (keys: readonly string[], re: RegExp) => keys.some((k) => re.test(k));

/** The family of the checkpoint behind `src`; a ConfigError naming what it is when this engine cannot run it. */
export function detectFamily(src: TensorSource): ModelFamily {
  const keys = src.keys();
  for (const [re, why] of REFUSED) if (has(keys, re)) throw new ConfigError(`${src.path}: ${why}`);
  if (has(keys, /^conditioner\.embedders\.1\.model\./) || has(keys, /^model\.diffusion_model\.label_emb\./)) return 'sdxl';
  return 'sd1';
}
