/**
 * What a weight source holds, for `sd inspect`: every tensor (name, dtype, shape), the file format, the key
 * layout, and parameter counts per network (UNet, VAE, text encoder; the rest, e.g. alphas_cumprod, apart).
 */
import { detectLayout, weightsFormat, type CheckpointLayout, type WeightsFormat } from './open.js';
import { TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX } from './layout.js';
import type { DType } from './dtypes.js';
import type { TensorSource } from './types.js';

export type Part = 'unet' | 'vae' | 'text_encoder' | 'other';

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
  /** Parameters of the three networks together. */
  readonly parameters: number;
  readonly dtypes: Readonly<Partial<Record<DType, number>>>;
}

export function partOf(name: string): Part {
  if (name.startsWith(UNET_PREFIX)) return 'unet';
  if (name.startsWith(VAE_PREFIX)) return 'vae';
  if (name.startsWith(TEXT_PREFIX)) return 'text_encoder';
  return 'other';
}

export function summarizeWeights(src: TensorSource): WeightsSummary {
  const numelByPart: Record<Part, number> = { unet: 0, vae: 0, text_encoder: 0, other: 0 };
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
    parameters: numelByPart.unet + numelByPart.vae + numelByPart.text_encoder,
    dtypes,
  };
}
