/**
 * The hint encoder (lllyasviel's `input_hint_block`, diffusers' `ControlNetConditioningEmbedding`): 3x3 convs with
 * SiLU between them, three of stride 2, from the hint image to the latent's size and the first level's width.
 *   hint NHWC [B, 8h, 8w, hintChannels] in [0, 1]  ->  hint embedding [B, h, w, modelChannels]
 * It depends on the hint alone (not on t or the text), so a denoising loop may compute it once per generation.
 * Weights: `input_hint_block.{0, 2, ..., 14}.{weight, bias}` (the odd indices are the SiLUs); config.ts has the plan.
 * The hint itself: `hintFromRgb` (an image used as it is, `--control-preprocess none`) or `hintFromEdges` (a Canny
 * map, HWC3(edges) / 255), both NHWC [1, H, W, 3] in [0, 1], RGB order (not [-1, 1] as the VAE's images).
 */
import * as tf from '../backend/tf.js';
import { ShapeError } from '../nn/errors.js';
import { Conv2d, silu } from '../nn/layers.js';
import type { WeightView } from '../nn/weight-view.js';
import { disposeOnThrow } from '../unet/blocks.js';
import { hintBlockPlan, type ControlNetConfig } from './config.js';

/** RGB bytes [H, W, 3] -> the hint NHWC [1, H, W, 3] = rgb / 255. */
export function hintFromRgb(rgb: Uint8Array, width: number, height: number): tf.Tensor4D {
  if (rgb.length !== width * height * 3) throw new ShapeError(`hint: ${rgb.length} bytes is not ${width}x${height} RGB`);
  return tf.tensor4d(Float32Array.from(rgb, (v) => v / 255), [1, height, width, 3]);
}

/** A Canny map [H, W] (0/255, image/canny.ts) -> the hint NHWC [1, H, W, 3]: the map in all three channels, / 255. */
export function hintFromEdges(edges: Uint8Array, width: number, height: number): tf.Tensor4D {
  if (edges.length !== width * height) throw new ShapeError(`hint: ${edges.length} bytes is not a ${width}x${height} edge map`);
  const rgb = new Uint8Array(3 * edges.length);
  edges.forEach((v, i) => rgb.fill(v, 3 * i, 3 * i + 3));
  return hintFromRgb(rgb, width, height);
}

export class HintEncoder {
  private constructor(private readonly convs: readonly Conv2d[]) {}

  /** `p` is the view at `input_hint_block`. */
  static load(p: WeightView, cfg: ControlNetConfig): HintEncoder {
    const convs: Conv2d[] = [];
    for (const s of hintBlockPlan(cfg)) {
      convs.push(disposeOnThrow(convs, () => Conv2d.load(p.child(s.index), s.cin, s.cout, 3, { stride: s.stride, padding: 1 })));
    }
    return new HintEncoder(convs);
  }

  apply(hint: tf.Tensor4D): tf.Tensor4D {
    return tf.tidy(() => {
      let h = hint;
      this.convs.forEach((conv, i) => {
        h = conv.apply(h);
        if (i < this.convs.length - 1) h = silu(h);
      });
      return h;
    });
  }

  dispose(): void {
    for (const c of this.convs) c.dispose();
  }
}
