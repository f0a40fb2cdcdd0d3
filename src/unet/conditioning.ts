/**
 * Conditioning: everything besides the latent and the timestep that steers the UNet's noise prediction, as one
 * object. It is built once per generation (pipeline/conditioning.ts, one function per model family), batched for
 * classifier-free guidance ([uncond, cond] along the batch axis, like the latent), and passed down unchanged from
 * the guided noise predictor to the blocks that read each part:
 *
 *   context      [B, N, contextDim]  the text encoder's features; every cross-attention attends to them
 *   added        [B, addedDim]       added to the time embedding through `label_emb` (SDXL: pooled text and the
 *                                    Fourier features of original size, crop and target size)
 *   residuals    one [B, h, w, c] per input block and one for the middle block (a ControlNet's output): each
 *                added to its skip connection, the last to the middle block's output
 *   extraTokens  further token sets with a scale each (IP-Adapter's image tokens): each cross-attention adds
 *                scale * attention(q, K'(tokens), V'(tokens)) with projections K', V' of its own
 *
 * A Conditioning does not own its tensors' lifetime beyond `disposeConditioning`: whoever built it disposes it.
 */
import * as tf from '../backend/tf.js';

export interface UNetResiduals {
  /** One per `input_blocks.N`, in order (SD 1.x: 12), each the shape of that block's output. */
  readonly down: readonly tf.Tensor4D[];
  /** The shape of the middle block's output. */
  readonly middle: tf.Tensor4D;
}

export interface ExtraTokens {
  readonly tokens: tf.Tensor3D; // [B, M, contextDim']
  readonly scale: number;
}

export interface Conditioning {
  readonly context: tf.Tensor3D;
  readonly added?: tf.Tensor2D;
  readonly residuals?: UNetResiduals;
  readonly extraTokens?: readonly ExtraTokens[];
}

/** Every tensor of `c`. */
export function conditioningTensors(c: Conditioning): tf.Tensor[] {
  return [
    c.context,
    ...(c.added === undefined ? [] : [c.added]),
    ...(c.residuals === undefined ? [] : [...c.residuals.down, c.residuals.middle]),
    ...(c.extraTokens ?? []).map((e) => e.tokens),
  ];
}

export function disposeConditioning(c: Conditioning): void {
  tf.dispose(conditioningTensors(c));
}

/**
 * Conditionings of equal structure joined along the batch axis (classifier-free guidance: [uncond, cond]).
 * Returns new tensors; the parts are left to their owner.
 */
export function concatConditioning(parts: readonly Conditioning[]): Conditioning {
  const [first] = parts;
  const join = <T extends tf.Tensor>(pick: (c: Conditioning) => T | undefined, name: string): T | undefined => {
    const all = parts.map(pick);
    if (all.every((t) => t === undefined)) return undefined;
    if (all.some((t) => t === undefined)) throw new TypeError(`concatConditioning: '${name}' is given for some parts only`);
    return tf.concat(all as T[], 0) as T;
  };
  const residuals = first.residuals === undefined ? undefined : {
    down: first.residuals.down.map((_, i) => join((c) => c.residuals?.down[i], `residuals.down[${i}]`) as tf.Tensor4D),
    middle: join((c) => c.residuals?.middle, 'residuals.middle') as tf.Tensor4D,
  };
  const extraTokens = first.extraTokens?.map((e, i) => ({
    tokens: join((c) => c.extraTokens?.[i].tokens, `extraTokens[${i}]`) as tf.Tensor3D,
    scale: e.scale,
  }));
  return {
    context: join((c) => c.context, 'context') as tf.Tensor3D,
    ...(first.added === undefined ? {} : { added: join((c) => c.added, 'added') }),
    ...(residuals === undefined ? {} : { residuals }),
    ...(extraTokens === undefined ? {} : { extraTokens }),
  };
}
