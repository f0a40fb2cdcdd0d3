/**
 * What a weight source holds, for `sd inspect`: every tensor (name, dtype, shape), the file format, the key
 * layout, and parameter counts per network (UNet, VAE, text encoder, SDXL's second text encoder; the rest, e.g.
 * alphas_cumprod and the non-weights under a network's prefix, apart). The model family is the pipeline's to say
 * (pipeline/families.ts; `sd inspect` asks it).
 */
import { detectLayout, weightsFormat, type CheckpointLayout, type WeightsFormat } from './open.js';
import { SDXL_PREFIXES, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX } from './layout.js';
import type { DType } from './dtypes.js';
import type { TensorSource } from './types.js';

export type Part = 'unet' | 'vae' | 'text_encoder' | 'text_encoder_2' | 'other';

/**
 * Keys under a network's prefix that are not its weights: CLIP's `position_ids` buffer (0..76), open_clip's
 * contrastive `logit_scale`.
 */
const NOT_WEIGHTS = /(\.embeddings\.position_ids|\.logit_scale)$/;
const SDXL_TEXT_1 = `${SDXL_PREFIXES.textModule1}.`;
const SDXL_TEXT_2 = `${SDXL_PREFIXES.text2}.`;

export interface TensorSummary {
  readonly name: string;
  readonly dtype: DType;
  readonly shape: readonly number[];
  readonly numel: number;
  readonly part: Part;
}

export interface WeightsSummary {
  readonly format: WeightsFormat;
  readonly layout: CheckpointLayout;
  readonly tensors: readonly TensorSummary[];
  /** Elements per part; `other` holds buffers and bookkeeping (alphas_cumprod, model_ema.*, ...). */
  readonly numelByPart: Readonly<Record<Part, number>>;
  /** Parameters of the networks together. */
  readonly parameters: number;
  readonly dtypes: Readonly<Partial<Record<DType, number>>>;
}

export function partOf(name: string): Part {
  if (NOT_WEIGHTS.test(name)) return 'other';
  if (name.startsWith(UNET_PREFIX)) return 'unet';
  if (name.startsWith(VAE_PREFIX)) return 'vae';
  if (name.startsWith(TEXT_PREFIX) || name.startsWith(SDXL_TEXT_1)) return 'text_encoder';
  if (name.startsWith(SDXL_TEXT_2)) return 'text_encoder_2';
  return 'other';
}

export function summarizeWeights(src: TensorSource): WeightsSummary {
  const numelByPart: Record<Part, number> = { unet: 0, vae: 0, text_encoder: 0, text_encoder_2: 0, other: 0 };
  const dtypes: Partial<Record<DType, number>> = {};
  const tensors = src.keys().map((name): TensorSummary => {
    const { dtype, shape } = src.info(name);
    const numel = shape.reduce((a, d) => a * d, 1);
    const part = partOf(name);
    numelByPart[part] += numel;
    dtypes[dtype] = (dtypes[dtype] ?? 0) + 1;
    return { name, dtype, shape, numel, part };
  });
  return {
    format: weightsFormat(src),
    layout: detectLayout(src),
    tensors,
    numelByPart,
    parameters: numelByPart.unet + numelByPart.vae + numelByPart.text_encoder + numelByPart.text_encoder_2,
    dtypes,
  };
}
