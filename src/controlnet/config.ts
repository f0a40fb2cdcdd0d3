/**
 * ControlNet configuration: the UNet config of its encoder half (the base model's, so that each residual has the
 * shape of the skip it is added to) and the hint encoder's widths, with SD 1.5's values (lllyasviel's cldm.py
 * `input_hint_block`, diffusers' `conditioning_embedding_out_channels`). diffusers' `config.json` is translated in
 * exactly one function, `controlNetConfigFromDiffusers`.
 *
 * The hint block of widths [c0, c1, ..., cK] is 2K + 2 3x3 convs (padding 1), SiLU between them:
 *   hintChannels -> c0, then per step k: ck -> ck, ck -> c(k+1) stride 2, then cK -> modelChannels
 * SD 1.5 ([16, 32, 96, 256]): 3->16, 16->16, 16->32 s2, 32->32, 32->96 s2, 96->96, 96->256 s2, 256->320; the three
 * stride-2 convs make the hint 8x the latent's size. Original names: `input_hint_block.{0, 2, ..., 4K + 2}`.
 */
import { ConfigError } from '../nn/errors.js';
import { SD15_UNET, validateConfig, type UNetConfig } from '../unet/config.js';
import { unetConfigFromDiffusers, type DiffusersUNetJson } from '../unet/diffusers-config.js';

/** Where lllyasviel's single files (control_v11p_sd15_canny.pth, ...) keep the ControlNet. */
export const CONTROL_PREFIX = 'control_model';

export interface ControlNetConfig {
  /** The encoder half (`time_embed`, `input_blocks`, `middle_block`): the base model's UNet config. */
  readonly unet: UNetConfig;
  readonly hintChannels: number; // channels of the hint image (3: RGB, e.g. a Canny map as HWC3)
  /** Widths of the hint block's levels (diffusers' conditioning_embedding_out_channels). */
  readonly hintBlockChannels: readonly number[];
}

/** lllyasviel's hint block (cldm.py): 16, 32, 96, 256 wide, an RGB hint. */
export type HintBlockConfig = Pick<ControlNetConfig, 'hintChannels' | 'hintBlockChannels'>;
export const SD_HINT_BLOCK: HintBlockConfig = Object.freeze({ hintChannels: 3, hintBlockChannels: Object.freeze([16, 32, 96, 256]) });

/**
 * A ControlNet for a base model with UNet config `unet`, with lllyasviel's hint block unless told otherwise. It reads
 * the latent alone, even where the base UNet takes more input channels (an inpainting UNet's 9: latent, mask,
 * masked-image latent), so its input width is the latent's, the UNet's output width.
 */
export function controlNetConfig(unet: UNetConfig, hint: Partial<HintBlockConfig> = {}): ControlNetConfig {
  return validateControlNetConfig({ unet: { ...unet, inChannels: unet.outChannels }, ...SD_HINT_BLOCK, ...hint });
}

export const SD15_CONTROLNET: ControlNetConfig = controlNetConfig(SD15_UNET);

/** One conv of the hint block: its index in `input_hint_block` and its widths and stride. */
export interface HintConvSpec {
  readonly index: number;
  readonly cin: number;
  readonly cout: number;
  readonly stride: 1 | 2;
}

/** The hint block's convs in order (see the header). */
export function hintBlockPlan(cfg: ControlNetConfig): HintConvSpec[] {
  const c = cfg.hintBlockChannels;
  const convs: Omit<HintConvSpec, 'index'>[] = [{ cin: cfg.hintChannels, cout: c[0], stride: 1 }];
  for (let k = 0; k + 1 < c.length; k++) convs.push({ cin: c[k], cout: c[k], stride: 1 }, { cin: c[k], cout: c[k + 1], stride: 2 });
  convs.push({ cin: c[c.length - 1], cout: cfg.unet.modelChannels, stride: 1 });
  return convs.map((s, i) => ({ ...s, index: 2 * i }));
}

/** How many times smaller than the hint the hint embedding (and so the latent) is: 2^(levels - 1), 8 for SD. */
export function hintDownsample(cfg: ControlNetConfig): number {
  return 2 ** (cfg.hintBlockChannels.length - 1);
}

export function validateControlNetConfig(cfg: ControlNetConfig): ControlNetConfig {
  const unet = validateConfig(cfg.unet);
  const positive = (name: string, v: unknown) => {
    if (typeof v !== 'number' || !Number.isInteger(v) || v < 1) throw new ConfigError(`controlnet config: ${name} must be an integer >= 1, got ${String(v)}`);
  };
  positive('hintChannels', cfg.hintChannels);
  if (cfg.hintBlockChannels.length === 0) throw new ConfigError('controlnet config: hintBlockChannels must name at least one width');
  cfg.hintBlockChannels.forEach((c, i) => positive(`hintBlockChannels[${i}]`, c));
  return Object.freeze({ unet, hintChannels: cfg.hintChannels, hintBlockChannels: Object.freeze([...cfg.hintBlockChannels]) });
}

/** The fields of a diffusers ControlNetModel `config.json` this project reads: its UNet encoder's, and the hint's. */
export interface DiffusersControlNetJson extends DiffusersUNetJson {
  readonly conditioning_channels?: number;
  readonly conditioning_embedding_out_channels?: readonly number[];
  readonly controlnet_conditioning_channel_order?: string;
  readonly global_pool_conditions?: boolean;
}

/**
 * diffusers' ControlNetModel config -> ControlNetConfig: the encoder half's fields are a UNet's
 * (unet/diffusers-config.ts). SDXL ControlNets (addition_embed_type 'text_time') are refused by name until their
 * added-embedding names are mapped.
 */
export function controlNetConfigFromDiffusers(json: DiffusersControlNetJson, where: string): ControlNetConfig {
  const fail = (what: string): never => {
    throw new ConfigError(`${where}: ${what}`);
  };
  if (json.addition_embed_type === 'text_time') fail("an SDXL ControlNet (addition_embed_type 'text_time'): not supported yet, only SD 1.x ControlNets");
  if (json.addition_embed_type != null || json.class_embed_type != null) fail(`added embeddings (${String(json.addition_embed_type ?? json.class_embed_type)}) are not supported`);
  if (json.controlnet_conditioning_channel_order !== undefined && json.controlnet_conditioning_channel_order !== 'rgb') {
    fail(`controlnet_conditioning_channel_order '${json.controlnet_conditioning_channel_order}' is not supported (only rgb)`);
  }
  if (json.global_pool_conditions === true) fail('global_pool_conditions (shuffle ControlNets) is not supported');
  const unet = unetConfigFromDiffusers({ ...json, out_channels: json.in_channels }, where);
  return controlNetConfig(unet, {
    hintChannels: json.conditioning_channels ?? SD_HINT_BLOCK.hintChannels,
    hintBlockChannels: json.conditioning_embedding_out_channels ?? SD_HINT_BLOCK.hintBlockChannels,
  });
}

/**
 * A ControlNet's residuals fit a UNet when both have the same levels and widths and read the same text context;
 * throws ConfigError naming the first difference.
 */
export function checkFitsUNet(cn: ControlNetConfig, base: UNetConfig, where: string): void {
  const a = cn.unet;
  const same = (name: string, x: unknown, y: unknown) => {
    if (JSON.stringify(x) !== JSON.stringify(y)) {
      throw new ConfigError(`${where}: the ControlNet's ${name} is ${JSON.stringify(x)}, the base model's UNet's ${JSON.stringify(y)}: made for another model`);
    }
  };
  same('modelChannels', a.modelChannels, base.modelChannels);
  same('channelMult', a.channelMult, base.channelMult);
  same('numResBlocks', a.numResBlocks, base.numResBlocks);
  same('contextDim', a.contextDim, base.contextDim);
}
