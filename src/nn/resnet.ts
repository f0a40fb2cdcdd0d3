/**
 * ResnetBlock, shared by the VAE and the UNet: NHWC [B, H, W, cin] -> [B, H, W, cout]
 *   h = Conv3x3(SiLU(GroupNorm(x)))
 *   h = h + Linear(SiLU(temb)), broadcast over H, W        only where the block has a time embedding (UNet)
 *   h = Conv3x3(SiLU(GroupNorm(h)))                        (dropout: inference, none)
 *   out = shortcut(x) + h, the shortcut a 1x1 conv when cin != cout
 * GroupNorm has 32 groups; eps is the caller's (VAE 1e-6, UNet 1e-5).
 *
 * The two SD checkpoint families name the same parts differently; each naming is one table below:
 *   CompVis ldm model.py ResnetBlock (VAE): norm1, conv1, temb_proj, norm2, conv2, nin_shortcut
 *   openaimodel.py ResBlock (UNet):        in_layers.0, in_layers.2, emb_layers.1, out_layers.0, out_layers.3, skip_connection
 */
import * as tf from '../backend/tf.js';
import { resnetOnHost } from '../backend/native-blocks.js';
import { Conv2d, GroupNorm, Linear } from './layers.js';
import { ShapeError, type WeightView } from './weight-view.js';

export interface ResnetNames {
  readonly norm1: string;
  readonly conv1: string;
  readonly timeProj: string;
  readonly norm2: string;
  readonly conv2: string;
  readonly shortcut: string;
}

export const COMPVIS_RESNET: ResnetNames = Object.freeze({
  norm1: 'norm1', conv1: 'conv1', timeProj: 'temb_proj', norm2: 'norm2', conv2: 'conv2', shortcut: 'nin_shortcut',
});

export const OPENAI_RESNET: ResnetNames = Object.freeze({
  norm1: 'in_layers.0', conv1: 'in_layers.2', timeProj: 'emb_layers.1', norm2: 'out_layers.0', conv2: 'out_layers.3', shortcut: 'skip_connection',
});

export interface ResnetOptions {
  readonly names: ResnetNames;
  readonly eps: number;
  /** Width of the time embedding fed to the block; 0 or absent: no time embedding (the VAE). */
  readonly timeChannels?: number;
}

/** The layers of a ResnetBlock, by role. */
interface ResnetParts {
  readonly norm1: GroupNorm;
  readonly conv1: Conv2d;
  readonly timeProj: Linear | null;
  readonly norm2: GroupNorm;
  readonly conv2: Conv2d;
  readonly shortcut: Conv2d | null;
}

export class ResnetBlock {
  private constructor(
    private readonly parts: ResnetParts,
    /** The block on the native kernels (backend/native-blocks.ts), when it was loaded for them. */
    private readonly onHost: ((x: tf.Tensor4D, tembAct?: tf.Tensor2D) => tf.Tensor4D) | null,
  ) {}

  static load(p: WeightView, cin: number, cout: number, { names, eps, timeChannels = 0 }: ResnetOptions): ResnetBlock {
    const parts: ResnetParts = {
      norm1: GroupNorm.load(p.child(names.norm1), cin, { eps }),
      conv1: Conv2d.load(p.child(names.conv1), cin, cout, 3),
      timeProj: timeChannels > 0 ? Linear.load(p.child(names.timeProj), timeChannels, cout) : null,
      norm2: GroupNorm.load(p.child(names.norm2), cout, { eps }),
      conv2: Conv2d.load(p.child(names.conv2), cout, cout, 3),
      shortcut: cin === cout ? null : Conv2d.load(p.child(names.shortcut), cin, cout, 1),
    };
    return new ResnetBlock(parts, p.native ? resnetOnHost(parts) : null);
  }

  /**
   * x [B, H, W, cin], tembAct = SiLU(time embedding) [B, timeChannels] (callers apply the SiLU once for all
   * blocks) -> [B, H, W, cout]. Intermediates are freed as soon as they are used, so at full VAE resolution
   * (512x512x128 floats: 128 MiB each) no more than three or four feature maps are alive at once.
   */
  apply(x: tf.Tensor4D, tembAct?: tf.Tensor2D): tf.Tensor4D {
    const { norm1, conv1, timeProj, norm2, conv2, shortcut } = this.parts;
    if ((timeProj === null) !== (tembAct === undefined)) {
      throw new ShapeError(`ResnetBlock: a time embedding must be given exactly when the block has one (${timeProj !== null})`);
    }
    if (this.onHost !== null) return this.onHost(x, tembAct);
    let h = normSiluConv(norm1, conv1, x);
    if (timeProj !== null && tembAct !== undefined) {
      const withTime = tf.tidy(() => tf.add(h, tf.reshape(timeProj.apply(tembAct), [x.shape[0], 1, 1, -1])) as tf.Tensor4D);
      h.dispose();
      h = withTime;
    }
    const h2 = normSiluConv(norm2, conv2, h);
    h.dispose();
    const out = tf.tidy(() => tf.add(shortcut === null ? x : shortcut.apply(x), h2) as tf.Tensor4D);
    h2.dispose();
    return out;
  }

  dispose(): void {
    for (const m of Object.values(this.parts)) m?.dispose();
  }
}

/** conv(SiLU(norm(x))), freeing each intermediate feature map as soon as the next exists. x is kept. */
export function normSiluConv(norm: GroupNorm, conv: Conv2d, x: tf.Tensor4D): tf.Tensor4D {
  const act = norm.applySilu(x);
  const out = conv.apply(act);
  act.dispose();
  return out;
}
