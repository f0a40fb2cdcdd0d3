/** The VAE's configuration (CompVis AutoencoderKL `ddconfig` + `embed_dim`). */
import { ConfigError } from '../nn/errors.js';

export interface VaeConfig {
  readonly inChannels: number; // image channels (RGB)
  readonly outChannels: number;
  readonly ch: number; // channels of the first level; level i has ch * chMult[i]
  readonly chMult: readonly number[]; // one entry per resolution level; each level but the last halves H and W
  readonly numResBlocks: number; // resnets per encoder level; the decoder has one more per level
  readonly attnResolutions: readonly number[]; // feature-map sizes (relative to `resolution`) with attention besides the mid block
  readonly resolution: number; // the training image size; only locates attnResolutions
  readonly zChannels: number; // the encoder outputs 2 * zChannels: mean and log-variance
  readonly embedDim: number; // latent channels after quant_conv
}

/** The SD 1.x VAE (LDM first_stage_config, kl-f8): 512x512x3 images <-> 64x64x4 latents. */
export const SD15_VAE: VaeConfig = Object.freeze({
  inChannels: 3,
  outChannels: 3,
  ch: 128,
  chMult: Object.freeze([1, 2, 4, 4]),
  numResBlocks: 2,
  attnResolutions: Object.freeze([]),
  resolution: 256,
  zChannels: 4,
  embedDim: 4,
});

/** GroupNorm eps of every CompVis VAE norm (model.py Normalize). */
export const VAE_GN_EPS = 1e-6;

/** How much smaller a latent is than its image: 2^(levels - 1); 8 for SD 1.x. */
export function downsampleFactor(cfg: VaeConfig): number {
  return 2 ** (cfg.chMult.length - 1);
}

/** Size of the feature maps at level i relative to `resolution` (encoder and decoder agree level by level). */
export function levelResolution(cfg: VaeConfig, level: number): number {
  return cfg.resolution / 2 ** level;
}

function positiveInt(v: unknown, field: string): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 1) {
    throw new ConfigError(`vae config: "${field}" must be a positive integer, got ${JSON.stringify(v)}`);
  }
  return v;
}

function intList(v: unknown, field: string, allowEmpty: boolean): number[] {
  if (!Array.isArray(v) || (!allowEmpty && v.length === 0)) {
    throw new ConfigError(`vae config: "${field}" must be a ${allowEmpty ? '' : 'non-empty '}list of positive integers`);
  }
  return v.map((x, i) => positiveInt(x, `${field}[${i}]`));
}

/**
 * The LDM `ddconfig` format (as in the fixtures: `{double_z, z_channels, resolution, in_channels, out_ch, ch,
 * ch_mult, num_res_blocks, attn_resolutions, dropout, embed_dim}`) -> VaeConfig. embed_dim defaults to z_channels;
 * resolution may be left out when attn_resolutions is empty.
 */
export function vaeConfigFromLdm(json: unknown): VaeConfig {
  if (typeof json !== 'object' || json === null) throw new ConfigError('vae config: expected a JSON object');
  const j = json as Record<string, unknown>;
  const ch = positiveInt(j.ch, 'ch');
  if (ch % 32 !== 0) throw new ConfigError(`vae config: "ch" ${ch} must be a multiple of 32 (GroupNorm has 32 groups)`);
  if ((j.double_z ?? true) !== true) {
    throw new ConfigError('vae config: "double_z" must be true: AutoencoderKL encodes a mean and a log-variance');
  }
  const zChannels = positiveInt(j.z_channels, 'z_channels');
  const attn = intList(j.attn_resolutions ?? [], 'attn_resolutions', true);
  return Object.freeze({
    inChannels: positiveInt(j.in_channels, 'in_channels'),
    outChannels: positiveInt(j.out_ch, 'out_ch'),
    ch,
    chMult: Object.freeze(intList(j.ch_mult, 'ch_mult', false)),
    numResBlocks: positiveInt(j.num_res_blocks, 'num_res_blocks'),
    attnResolutions: Object.freeze(attn),
    // only locates attn_resolutions, so it may be left out where there are none (sgm's SDXL config does)
    resolution: attn.length === 0 && j.resolution === undefined ? SD15_VAE.resolution : positiveInt(j.resolution, 'resolution'),
    zChannels,
    embedDim: positiveInt(j.embed_dim ?? zChannels, 'embed_dim'),
  });
}

/**
 * diffusers' AutoencoderKL `config.json` -> VaeConfig: `block_out_channels` [128, 256, 512, 512] are ch 128 and
 * chMult [1, 2, 4, 4], `layers_per_block` the resnets per encoder level, `latent_channels` both z and the latent.
 * Its mid-block attention is the VAE's only attention (no attn_resolutions). The scale factor is the pipeline's.
 */
export function vaeConfigFromDiffusers(json: unknown, where: string): VaeConfig {
  if (typeof json !== 'object' || json === null) throw new ConfigError(`${where}: expected a JSON object`);
  const j = json as Record<string, unknown>;
  if (j.mid_block_add_attention === false) throw new ConfigError(`${where}: mid_block_add_attention false is not supported`);
  if (j.use_quant_conv === false || j.use_post_quant_conv === false) throw new ConfigError(`${where}: a VAE without quant_conv / post_quant_conv is not supported`);
  if (j.norm_num_groups !== undefined && j.norm_num_groups !== 32) throw new ConfigError(`${where}: norm_num_groups ${String(j.norm_num_groups)} is not supported (32 only)`);
  try {
    const blocks = intList(j.block_out_channels ?? [128, 256, 512, 512], 'block_out_channels', false);
    const ch = blocks[0];
    if (blocks.some((b) => b % ch !== 0)) throw new ConfigError(`vae config: block_out_channels [${blocks.join(', ')}] are not multiples of the first`);
    const latent = j.latent_channels ?? 4;
    return vaeConfigFromLdm({
      double_z: true,
      z_channels: latent,
      embed_dim: latent,
      in_channels: j.in_channels ?? 3,
      out_ch: j.out_channels ?? 3,
      ch,
      ch_mult: blocks.map((b) => b / ch),
      num_res_blocks: j.layers_per_block ?? 2,
      attn_resolutions: [],
    });
  } catch (e) {
    if (e instanceof ConfigError) throw new ConfigError(`${where}: ${e.message}`);
    throw e;
  }
}
