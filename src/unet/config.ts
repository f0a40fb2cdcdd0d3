/**
 * UNet configuration (the `UNetModel` params of CompVis' `v1-inference.yaml` for SD 1.x, of Stability's sgm yaml
 * for SDXL) and the block plan it implies: which block sits at `input_blocks.N` / `output_blocks.N`, its channels,
 * and whether (and how deep, with how many heads) a SpatialTransformer follows its ResBlock.
 */
import { ConfigError } from '../nn/errors.js';

/**
 * Attention heads of every SpatialTransformer: a count (SD 1.x: 8 at every level; a list gives one per level, as
 * diffusers' `attention_head_dim` list does), or a head width, the count then being channels / width (SD 2.x, SDXL: 64).
 */
export type HeadSpec = { readonly count: number | readonly number[] } | { readonly width: number };

export interface UNetConfig {
  readonly inChannels: number; // latent channels in (4: the VAE's z; 9 for an inpainting UNet: z, mask, masked-image z)
  readonly outChannels: number; // predicted noise channels
  readonly modelChannels: number; // width of the first level; the time embedding is 4x this
  readonly channelMult: readonly number[]; // width of each level, in multiples of modelChannels
  readonly numResBlocks: number; // ResBlocks per level on the way down (one more on the way up)
  /** BasicTransformerBlocks after each ResBlock of a level, per level; 0: no attention at that level. */
  readonly transformerDepth: readonly number[];
  readonly middleTransformerDepth: number; // the middle block's (SD 1.x 1, SDXL 10)
  readonly heads: HeadSpec;
  /** proj_in / proj_out of each SpatialTransformer: 1x1 convs (SD 1.x) or Linears (SD 2.x, SDXL). */
  readonly projection: 'conv' | 'linear';
  readonly contextDim: number; // width of the text encoder's hidden states (CLIP ViT-L/14: 768)
  /**
   * Width of the embedding `label_emb` adds to the time embedding (SDXL: 2816, its pooled text and the Fourier
   * features of the size and crop conditioning); 0: none (SD 1.x).
   */
  readonly addedEmbeddingDim: number;
}

export const SD15_UNET: UNetConfig = Object.freeze({
  inChannels: 4,
  outChannels: 4,
  modelChannels: 320,
  channelMult: Object.freeze([1, 2, 4, 4]),
  numResBlocks: 2,
  transformerDepth: Object.freeze([1, 1, 1, 0]),
  middleTransformerDepth: 1,
  heads: Object.freeze({ count: 8 }),
  projection: 'conv',
  contextDim: 768,
  addedEmbeddingDim: 0,
});

/** The `params` of `unet_config` in an LDM / sgm yaml, as the fixtures' fixture.json "config" spells them. */
export interface LdmUNetParams {
  readonly in_channels?: number;
  readonly out_channels?: number;
  readonly model_channels?: number;
  readonly channel_mult?: readonly number[];
  readonly num_res_blocks?: number;
  readonly attention_resolutions?: readonly number[];
  readonly num_heads?: number;
  readonly num_head_channels?: number;
  readonly transformer_depth?: number | readonly number[];
  readonly transformer_depth_middle?: number;
  readonly context_dim?: number;
  readonly use_linear_in_transformer?: boolean;
  readonly adm_in_channels?: number;
  readonly num_classes?: number | string;
  readonly [other: string]: unknown;
}

/**
 * Translates LDM / sgm yaml (and fixture.json) UNet params, missing ones taking SD 1.5's values, and validates them.
 * `attention_resolutions` (downsampling factors with attention) and `transformer_depth` (one number, or one per
 * level) become one depth per level; `num_head_channels` (not -1) a head width, else `num_heads` a count.
 */
export function unetConfigFromLdm(json: LdmUNetParams): UNetConfig {
  const channelMult = Object.freeze([...(json.channel_mult ?? SD15_UNET.channelMult)]);
  const attention = json.attention_resolutions ?? [4, 2, 1];
  const depth = json.transformer_depth ?? 1;
  const depths = channelMult.map((_, level) => {
    if (!attention.includes(2 ** level)) return 0;
    return typeof depth === 'number' ? depth : depth[level];
  });
  if (typeof depth !== 'number' && depth.length !== channelMult.length) {
    throw new ConfigError(`unet config: transformer_depth names ${depth.length} levels, channel_mult ${channelMult.length}`);
  }
  if (json.num_classes !== undefined && json.num_classes !== 'sequential') {
    throw new ConfigError(`unet config: num_classes ${String(json.num_classes)} is not supported; only 'sequential' (SDXL's label_emb)`);
  }
  const headWidth = json.num_head_channels ?? -1;
  return validateConfig({
    inChannels: json.in_channels ?? SD15_UNET.inChannels,
    outChannels: json.out_channels ?? SD15_UNET.outChannels,
    modelChannels: json.model_channels ?? SD15_UNET.modelChannels,
    channelMult,
    numResBlocks: json.num_res_blocks ?? SD15_UNET.numResBlocks,
    transformerDepth: Object.freeze(depths),
    middleTransformerDepth: json.transformer_depth_middle ?? (typeof depth === 'number' ? depth : depth[depth.length - 1]),
    heads: Object.freeze(headWidth === -1 ? { count: json.num_heads ?? 8 } : { width: headWidth }),
    projection: json.use_linear_in_transformer === true ? 'linear' : 'conv',
    contextDim: json.context_dim ?? SD15_UNET.contextDim,
    addedEmbeddingDim: json.num_classes === 'sequential' ? (json.adm_in_channels ?? 0) : 0,
  });
}

/** Heads of the SpatialTransformers of `level` (channels wide). */
export function headsAt(cfg: UNetConfig, level: number, channels: number): number {
  const h = cfg.heads;
  if ('width' in h) return channels / h.width;
  return typeof h.count === 'number' ? h.count : h.count[level];
}

/** Checks every number a UNet needs; returns the config frozen. */
export function validateConfig(cfg: UNetConfig): UNetConfig {
  const integer = (name: string, v: unknown, min: number) => {
    if (typeof v !== 'number' || !Number.isInteger(v) || v < min) {
      throw new ConfigError(`unet config: ${name} must be an integer >= ${min}, got ${String(v)}`);
    }
  };
  for (const key of ['inChannels', 'outChannels', 'modelChannels', 'numResBlocks', 'contextDim'] as const) integer(key, cfg[key], 1);
  integer('middleTransformerDepth', cfg.middleTransformerDepth, 0);
  integer('addedEmbeddingDim', cfg.addedEmbeddingDim, 0);
  if (cfg.channelMult.length === 0) throw new ConfigError('unet config: channelMult must name at least one level');
  cfg.channelMult.forEach((m, i) => integer(`channelMult[${i}]`, m, 1));
  if (cfg.transformerDepth.length !== cfg.channelMult.length) {
    throw new ConfigError(`unet config: transformerDepth has ${cfg.transformerDepth.length} levels, channelMult ${cfg.channelMult.length}`);
  }
  cfg.transformerDepth.forEach((d, i) => integer(`transformerDepth[${i}]`, d, 0));
  if (cfg.projection !== 'conv' && cfg.projection !== 'linear') {
    throw new ConfigError(`unet config: projection must be 'conv' or 'linear', got ${String(cfg.projection)}`);
  }
  const h = cfg.heads;
  if ('width' in h) integer('heads.width', h.width, 1);
  else if (typeof h.count === 'number') integer('heads.count', h.count, 1);
  else if (h.count.length !== cfg.channelMult.length) throw new ConfigError(`unet config: heads.count names ${h.count.length} levels, channelMult ${cfg.channelMult.length}`);
  cfg.channelMult.forEach((m, level) => {
    const ch = m * cfg.modelChannels;
    if (ch % 32 !== 0) throw new ConfigError(`unet config: level width ${ch} is not a multiple of 32 (GroupNorm uses 32 groups)`);
    const heads = headsAt(cfg, level, ch);
    const attends = cfg.transformerDepth[level] > 0 || (level === cfg.channelMult.length - 1 && cfg.middleTransformerDepth > 0);
    if (attends && (!Number.isInteger(heads) || heads < 1 || ch % heads !== 0)) {
      throw new ConfigError(`unet config: level width ${ch} does not split into ${heads} heads`);
    }
  });
  return Object.freeze({ ...cfg });
}

/** A SpatialTransformer after a ResBlock: how many BasicTransformerBlocks, and their heads. */
export interface AttentionSpec {
  readonly depth: number;
  readonly heads: number;
}

/** One entry of `input_blocks`: the stem conv, a ResBlock (+ SpatialTransformer), or a Downsample. */
export type InputBlockSpec =
  | { readonly kind: 'conv_in'; readonly cout: number }
  | { readonly kind: 'res'; readonly cin: number; readonly cout: number; readonly attention: AttentionSpec | null }
  | { readonly kind: 'down'; readonly ch: number };

/** One entry of `output_blocks`: a ResBlock on [h, skip] concatenated (+ SpatialTransformer) (+ Upsample). */
export interface OutputBlockSpec {
  readonly cin: number; // h's channels + the skip's
  readonly cout: number;
  readonly attention: AttentionSpec | null;
  readonly upsample: boolean;
}

export interface UNetBlockPlan {
  readonly timeEmbedDim: number;
  readonly input: readonly InputBlockSpec[];
  readonly middle: { readonly channels: number; readonly attention: AttentionSpec | null };
  readonly output: readonly OutputBlockSpec[];
}

/** The block list of CompVis / sgm UNetModel.__init__, with the channel bookkeeping it does. */
export function unetBlockPlan(cfg: UNetConfig): UNetBlockPlan {
  const attentionAt = (level: number, ch: number, depth: number): AttentionSpec | null =>
    depth > 0 ? { depth, heads: headsAt(cfg, level, ch) } : null;
  const input: InputBlockSpec[] = [{ kind: 'conv_in', cout: cfg.modelChannels }];
  const skipChannels = [cfg.modelChannels]; // `input_block_chans`: what each input block hands to the way up
  let ch = cfg.modelChannels;
  const last = cfg.channelMult.length - 1;
  cfg.channelMult.forEach((mult, level) => {
    for (let i = 0; i < cfg.numResBlocks; i++) {
      const cout = mult * cfg.modelChannels;
      input.push({ kind: 'res', cin: ch, cout, attention: attentionAt(level, cout, cfg.transformerDepth[level]) });
      ch = cout;
      skipChannels.push(ch);
    }
    if (level !== last) {
      input.push({ kind: 'down', ch });
      skipChannels.push(ch);
    }
  });
  const middle = { channels: ch, attention: attentionAt(last, ch, cfg.middleTransformerDepth) };
  const output: OutputBlockSpec[] = [];
  [...cfg.channelMult.entries()].reverse().forEach(([level, mult]) => {
    for (let i = 0; i <= cfg.numResBlocks; i++) {
      const cin = ch + (skipChannels.pop() as number);
      ch = mult * cfg.modelChannels;
      output.push({ cin, cout: ch, attention: attentionAt(level, ch, cfg.transformerDepth[level]), upsample: level > 0 && i === cfg.numResBlocks });
    }
  });
  return { timeEmbedDim: 4 * cfg.modelChannels, input, middle, output };
}
