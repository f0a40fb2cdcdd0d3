/**
 * A LoRA of random weights for a model, in kohya-ss's file layout, for measuring what applying and switching LoRAs
 * costs where a trained one cannot be had (`sd random-weights --model lora-sd15`, bench/lora.ts).
 *
 * Its modules are those of a kohya LoCon file, the largest common kind: in the UNet every Linear and Conv2d of the
 * Transformer2DModel blocks (proj_in, proj_out, attn1/attn2 to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2), of
 * the ResnetBlock2Ds (conv1, conv2, conv_shortcut, time_emb_proj) and the Downsample2D/Upsample2D convs (kohya's
 * UNET_TARGET_REPLACE_MODULE and its conv counterpart); in the text encoder CLIPAttention's q/k/v/out_proj and
 * CLIPMLP's fc1/fc2. Each module at rank r: lora_down [r, in(, kh, kw)], lora_up [out, r(, 1, 1)], alpha. Values as
 * weights/random.ts makes them (N(0, 1/fan_in)), so the merged delta is about the size of the weight it changes.
 */
import { encodeFloat16 } from '../weights/dtypes.js';
import { randomTensor } from '../weights/random.js';
import { writeSafetensors } from '../weights/safetensors.js';
import type { TensorInfo } from '../weights/types.js';
import { loraTargets } from './keys.js';

const LOCON_UNET = /_attentions_\d+_(proj_in|proj_out|transformer_blocks_\d+_(attn[12]_(to_q|to_k|to_v|to_out_0)|ff_net_(0_proj|2)))$|_resnets_\d+_(conv1|conv2|conv_shortcut|time_emb_proj)$|_(downsamplers|upsamplers)_0_conv$/;
const LOCON_TE = /_self_attn_(q|k|v|out)_proj$|_mlp_fc[12]$/;

/** Every tensor of a random LoCon for the model whose checkpoint keys and shapes are `model`, with its shape. */
export function randomLoraShapes(model: ReadonlyMap<string, readonly number[]>, rank: number): Map<string, number[]> {
  const out = new Map<string, number[]>();
  for (const [id, target] of loraTargets([...model.keys()])) {
    if (!id.startsWith('lora_')) continue; // the kohya spelling only (loraTargets lists PEFT's too)
    if (!(target.network === 'unet' ? LOCON_UNET : LOCON_TE).test(id)) continue;
    const [o, ...inner] = model.get(target.key) ?? [];
    const conv = inner.length === 3;
    out.set(`${id}.lora_down.weight`, [rank, ...inner]);
    out.set(`${id}.lora_up.weight`, conv ? [o, rank, 1, 1] : [o, rank]);
    out.set(`${id}.alpha`, []);
  }
  return out;
}

export interface RandomLoraOptions {
  readonly rank?: number;
  /** kohya's alpha; default rank / 2 (scale 0.5). */
  readonly alpha?: number;
  readonly half?: boolean;
  readonly seed?: number;
  readonly onTensor?: (done: number, total: number) => void;
}

/** Writes a random LoCon for `model` to `path` (.safetensors); returns its tensors' shapes. */
export function writeRandomLora(path: string, model: ReadonlyMap<string, readonly number[]>, o: RandomLoraOptions = {}): Map<string, number[]> {
  const rank = o.rank ?? 32;
  const alpha = o.alpha ?? rank / 2;
  const dtype = o.half === true ? 'F16' : 'F32';
  const shapes = randomLoraShapes(model, rank);
  const infos: [string, TensorInfo][] = [...shapes].map(([k, shape]) => [k, { dtype, shape }]);
  let done = 0;
  writeSafetensors(
    path,
    infos,
    (key) => {
      const values = key.endsWith('.alpha') ? Float32Array.of(alpha) : randomTensor(key, shapes.get(key) ?? [], o.seed ?? 0);
      o.onTensor?.(++done, infos.length);
      return dtype === 'F16' ? encodeFloat16(values) : values;
    },
    { ss_network_module: 'networks.lora', ss_network_dim: String(rank), ss_network_alpha: String(alpha), generator: 'sd-tfjs random-weights (not a trained LoRA)' },
  );
  return shapes;
}
