/**
 * open_clip's text tower (SDXL's second encoder, OpenCLIP ViT-bigG/14; SD 2.x's ViT-H/14 too) as a ClipTextEncoder:
 * the same network as HF's CLIPTextModel, its parts named by OPEN_CLIP_NAMES (names.ts), with the text projection.
 *
 * One spelling is not a names-table matter: torch's nn.MultiheadAttention keeps its packed q/k/v projection as two
 * tensors of its own, `attn.in_proj_weight` [3w, w] and `attn.in_proj_bias` [3w], where a Linear submodule would
 * say `attn.in_proj.weight` / `.bias`. The loader reads the file through `packedAsModule`, which renames just those
 * two (no tensor is copied), so Linear.loadBlocks takes q, k and v as the three row blocks of the one tensor. Checks
 * and their messages use the file's own names.
 * Weights: `<prefix>.{token_embedding.weight, positional_embedding, transformer.resblocks.{i}.*, ln_final.*,
 * text_projection}`; `<prefix>.logit_scale` (CLIP's contrastive temperature) is not part of the text encoder.
 */
import { WeightView, checkCheckpoint } from '../nn/weight-view.js';
import type { TensorSource } from '../weights/types.js';
import type { ResidencyPolicy } from '../nn/residency.js';
import type { ClipConfig } from './config.js';
import { ClipTextEncoder, expectedShapes } from './index.js';
import { OPEN_CLIP_NAMES } from './names.js';

/** Keys under an open_clip prefix that are not text-encoder weights. */
const NOT_TEXT_WEIGHTS = /(^|\.)logit_scale$/;

const IN_FILE = /\.in_proj_(weight|bias)$/;
const AS_MODULE = /\.in_proj\.(weight|bias)$/;

/** `...attn.in_proj_weight` (the file) -> `...attn.in_proj.weight` (what a Linear reads); other keys unchanged. */
export const moduleName = (fileKey: string): string => fileKey.replace(IN_FILE, '.in_proj.$1');

/** The inverse: the file's name of a key the loader reads. */
export const fileName = (moduleKey: string): string => moduleKey.replace(AS_MODULE, '.in_proj_$1');

/** `src` with nn.MultiheadAttention's packed projection named as a Linear submodule (moduleName). */
export function packedAsModule(src: TensorSource): TensorSource {
  return {
    path: src.path,
    keys: () => src.keys().map(moduleName),
    has: (key) => src.has(fileName(key)),
    info: (key) => src.info(fileName(key)),
    bytes: (key) => src.bytes(fileName(key)),
    float32: (key) => src.float32(fileName(key)),
    close: () => src.close(),
  };
}

/** Every key of an open_clip text tower under `prefix`, as the file names it, with its PyTorch shape. */
export function openClipShapes(cfg: ClipConfig, prefix: string): Map<string, number[]> {
  return new Map([...expectedShapes(cfg, prefix, OPEN_CLIP_NAMES)].map(([key, shape]) => [fileName(key), shape]));
}

/** Checks every key and shape under `prefix` against cfg (naming the file's keys), then loads. */
export function loadOpenClipText(src: TensorSource, cfg: ClipConfig, prefix: string, policy: ResidencyPolicy = 'resident'): ClipTextEncoder {
  checkCheckpoint(src, openClipShapes(cfg, prefix), prefix, { ignore: NOT_TEXT_WEIGHTS });
  return ClipTextEncoder.loadFrom(WeightView.root(packedAsModule(src), prefix), cfg, OPEN_CLIP_NAMES, policy);
}
