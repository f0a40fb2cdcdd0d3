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
import * as kernels from '../backend/kernels.js';
import { Conv2d, GroupNorm, Linear } from './layers.js';
import type { WeightView } from './weight-view.js';

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

export class ResnetBlock {
  private constructor(
    private readonly norm1: GroupNorm,
    private readonly conv1: Conv2d,
    private readonly timeProj: Linear | null,
    private readonly norm2: GroupNorm,
    private readonly conv2: Conv2d,
    private readonly shortcut: Conv2d | null,
  ) {}

  static load(p: WeightView, cin: number, cout: number, { names, eps, timeChannels = 0 }: ResnetOptions): ResnetBlock {
    return new ResnetBlock(
      GroupNorm.load(p.child(names.norm1), cin, { eps }),
      Conv2d.load(p.child(names.conv1), cin, cout, 3),
      timeChannels > 0 ? Linear.load(p.child(names.timeProj), timeChannels, cout) : null,
      GroupNorm.load(p.child(names.norm2), cout, { eps }),
      Conv2d.load(p.child(names.conv2), cout, cout, 3),
      cin === cout ? null : Conv2d.load(p.child(names.shortcut), cin, cout, 1),
    );
  }

  /** Checkpoint key suffix -> PyTorch shape, for a model's expectedShapes. */
  static shapes(cin: number, cout: number, { names, timeChannels = 0 }: Omit<ResnetOptions, 'eps'>): [string, number[]][] {
    const s: [string, number[]][] = [
      [`${names.norm1}.weight`, [cin]], [`${names.norm1}.bias`, [cin]],
      [`${names.conv1}.weight`, [cout, cin, 3, 3]], [`${names.conv1}.bias`, [cout]],
    ];
    if (timeChannels > 0) s.push([`${names.timeProj}.weight`, [cout, timeChannels]], [`${names.timeProj}.bias`, [cout]]);
    s.push(
      [`${names.norm2}.weight`, [cout]], [`${names.norm2}.bias`, [cout]],
      [`${names.conv2}.weight`, [cout, cout, 3, 3]], [`${names.conv2}.bias`, [cout]],
    );
    if (cin !== cout) s.push([`${names.shortcut}.weight`, [cout, cin, 1, 1]], [`${names.shortcut}.bias`, [cout]]);
    return s;
  }

  /**
   * x [B, H, W, cin], tembAct = SiLU(time embedding) [B, timeChannels] (callers apply the SiLU once for all
   * blocks) -> [B, H, W, cout]. Intermediates are freed as soon as they are used, so at full VAE resolution
   * (512x512x128 floats: 128 MiB each) no more than three or four feature maps are alive at once.
   */
  apply(x: tf.Tensor4D, tembAct?: tf.Tensor2D): tf.Tensor4D {
    if ((this.timeProj === null) !== (tembAct === undefined)) {
      throw new RangeError(`ResnetBlock: a time embedding must be given exactly when the block has one (${this.timeProj !== null})`);
    }
    if (this.conv1.native) return this.applyNative(x, tembAct);
    let h = normSiluConv(this.norm1, this.conv1, x);
    const proj = this.timeProj;
    if (proj !== null && tembAct !== undefined) {
      const withTime = tf.tidy(() => tf.add(h, tf.reshape(proj.apply(tembAct), [x.shape[0], 1, 1, -1])) as tf.Tensor4D);
      h.dispose();
      h = withTime;
    }
    const h2 = normSiluConv(this.norm2, this.conv2, h);
    h.dispose();
    const out = tf.tidy(() => tf.add(this.shortcut === null ? x : this.shortcut.apply(x), h2) as tf.Tensor4D);
    h2.dispose();
    return out;
  }

  /**
   * The same block on the native kernels, on the host from end to end: x is read once and only the result becomes a
   * tensor; the time embedding rides in conv1's bias (one row per image) and the residual in conv2's.
   */
  private applyNative(x: tf.Tensor4D, tembAct?: tf.Tensor2D): tf.Tensor4D {
    const xh = kernels.toHost(x);
    const imageBias = this.timeProj !== null && tembAct !== undefined
      ? this.timeProj.applyHost(kernels.toHost(tembAct)).data // [B, cout]
      : undefined;
    const h = this.conv1.applyHost(this.norm1.applyHost(xh, true), { imageBias });
    const skip = this.shortcut === null ? xh : this.shortcut.applyHost(xh);
    return kernels.toTensor(this.conv2.applyHost(this.norm2.applyHost(h, true), { residual: skip }));
  }

  dispose(): void {
    for (const m of [this.norm1, this.conv1, this.timeProj, this.norm2, this.conv2, this.shortcut]) m?.dispose();
  }
}

/** conv(SiLU(norm(x))), freeing each intermediate feature map as soon as the next exists. x is kept. */
export function normSiluConv(norm: GroupNorm, conv: Conv2d, x: tf.Tensor4D): tf.Tensor4D {
  const act = norm.applySilu(x);
  const out = conv.apply(act);
  act.dispose();
  return out;
}
