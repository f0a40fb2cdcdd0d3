/**
 * UNet configuration (CompVis `UNetModel` params of SD 1.x `v1-inference.yaml`) and the block plan it implies.
 *
 * The block plan is computed here once and shared by the loader (unet.ts) and expectedShapes (shapes.ts), so the
 * two cannot disagree about which block sits at `input_blocks.N` / `output_blocks.N`.
 */

export interface UNetConfig {
  readonly inChannels: number; // latent channels in (4: the VAE's z)
  readonly outChannels: number; // predicted noise channels
  readonly modelChannels: number; // width of the first level; the time embedding is 4x this
  readonly channelMult: readonly number[]; // width of each level, in multiples of modelChannels
  readonly numResBlocks: number; // ResBlocks per level on the way down (one more on the way up)
  /** Downsampling factors (1 = top level) whose ResBlocks are followed by a SpatialTransformer. */
  readonly attentionResolutions: readonly number[];
  readonly numHeads: number; // attention heads at every level; head width = channels / numHeads
  readonly transformerDepth: number; // BasicTransformerBlocks per SpatialTransformer
  readonly contextDim: number; // width of the text encoder's hidden states (CLIP ViT-L/14: 768)
}

export const SD15_UNET: UNetConfig = Object.freeze({
  inChannels: 4,
  outChannels: 4,
  modelChannels: 320,
  channelMult: Object.freeze([1, 2, 4, 4]),
  numResBlocks: 2,
  attentionResolutions: Object.freeze([4, 2, 1]),
  numHeads: 8,
  transformerDepth: 1,
  contextDim: 768,
});

/** A config that cannot describe an SD 1.x UNet, or a forward call with inputs that do not fit it. */
export class UNetError extends Error {
  override name = 'UNetError';
}

/** The `params` of `unet_config` in an LDM yaml, as the fixtures' fixture.json "config" spells them. */
export interface LdmUNetParams {
  readonly in_channels?: number;
  readonly out_channels?: number;
  readonly model_channels?: number;
  readonly channel_mult?: readonly number[];
  readonly num_res_blocks?: number;
  readonly attention_resolutions?: readonly number[];
  readonly num_heads?: number;
  readonly num_head_channels?: number;
  readonly transformer_depth?: number;
  readonly context_dim?: number;
  readonly use_linear_in_transformer?: boolean;
  readonly [other: string]: unknown;
}

/** Translates LDM yaml / fixture.json UNet params (missing ones take SD 1.5's values) and validates them. */
export function unetConfigFromLdm(json: LdmUNetParams): UNetConfig {
  if (json.num_head_channels !== undefined && json.num_head_channels !== -1) {
    throw new UNetError(`unet config: num_head_channels ${json.num_head_channels} (SD 2.x style) is not supported; SD 1.x sets num_heads`);
  }
  if (json.use_linear_in_transformer === true) {
    throw new UNetError('unet config: use_linear_in_transformer (SD 2.x) is not supported; SD 1.x uses 1x1 conv proj_in/proj_out');
  }
  return validateConfig({
    inChannels: json.in_channels ?? SD15_UNET.inChannels,
    outChannels: json.out_channels ?? SD15_UNET.outChannels,
    modelChannels: json.model_channels ?? SD15_UNET.modelChannels,
    channelMult: Object.freeze([...(json.channel_mult ?? SD15_UNET.channelMult)]),
    numResBlocks: json.num_res_blocks ?? SD15_UNET.numResBlocks,
    attentionResolutions: Object.freeze([...(json.attention_resolutions ?? SD15_UNET.attentionResolutions)]),
    numHeads: json.num_heads ?? SD15_UNET.numHeads,
    transformerDepth: json.transformer_depth ?? SD15_UNET.transformerDepth,
    contextDim: json.context_dim ?? SD15_UNET.contextDim,
  });
}

/** Checks every number a UNet needs; returns the config frozen. */
export function validateConfig(cfg: UNetConfig): UNetConfig {
  const positive = (name: string, v: unknown) => {
    if (typeof v !== 'number' || !Number.isInteger(v) || v < 1) throw new UNetError(`unet config: ${name} must be a positive integer, got ${String(v)}`);
  };
  for (const key of ['inChannels', 'outChannels', 'modelChannels', 'numResBlocks', 'numHeads', 'transformerDepth', 'contextDim'] as const) {
    positive(key, cfg[key]);
  }
  if (cfg.channelMult.length === 0) throw new UNetError('unet config: channelMult must name at least one level');
  cfg.channelMult.forEach((m, i) => positive(`channelMult[${i}]`, m));
  cfg.attentionResolutions.forEach((r, i) => positive(`attentionResolutions[${i}]`, r));
  for (const m of cfg.channelMult) {
    const ch = m * cfg.modelChannels;
    if (ch % 32 !== 0) throw new UNetError(`unet config: level width ${ch} is not a multiple of 32 (GroupNorm uses 32 groups)`);
    if (ch % cfg.numHeads !== 0) throw new UNetError(`unet config: level width ${ch} does not split into ${cfg.numHeads} heads`);
  }
  return Object.freeze({ ...cfg });
}

/** One entry of `input_blocks`: the stem conv, a ResBlock (+ SpatialTransformer), or a Downsample. */
export type InputBlockSpec =
  | { readonly kind: 'conv_in'; readonly cout: number }
  | { readonly kind: 'res'; readonly cin: number; readonly cout: number; readonly attention: boolean }
  | { readonly kind: 'down'; readonly ch: number };

/** One entry of `output_blocks`: a ResBlock on [h, skip] concatenated (+ SpatialTransformer) (+ Upsample). */
export interface OutputBlockSpec {
  readonly cin: number; // h's channels + the skip's
  readonly cout: number;
  readonly attention: boolean;
  readonly upsample: boolean;
}

export interface UNetBlockPlan {
  readonly timeEmbedDim: number;
  readonly input: readonly InputBlockSpec[];
  readonly middleChannels: number;
  readonly output: readonly OutputBlockSpec[];
}

/** The block list of CompVis UNetModel.__init__, with the channel bookkeeping it does. */
export function unetBlockPlan(cfg: UNetConfig): UNetBlockPlan {
  const input: InputBlockSpec[] = [{ kind: 'conv_in', cout: cfg.modelChannels }];
  const skipChannels = [cfg.modelChannels]; // `input_block_chans`: what each input block hands to the way up
  let ch = cfg.modelChannels;
  let ds = 1; // current downsampling factor
  cfg.channelMult.forEach((mult, level) => {
    for (let i = 0; i < cfg.numResBlocks; i++) {
      input.push({ kind: 'res', cin: ch, cout: mult * cfg.modelChannels, attention: cfg.attentionResolutions.includes(ds) });
      ch = mult * cfg.modelChannels;
      skipChannels.push(ch);
    }
    if (level !== cfg.channelMult.length - 1) {
      input.push({ kind: 'down', ch });
      skipChannels.push(ch);
      ds *= 2;
    }
  });
  const middleChannels = ch;
  const output: OutputBlockSpec[] = [];
  [...cfg.channelMult.entries()].reverse().forEach(([level, mult]) => {
    for (let i = 0; i <= cfg.numResBlocks; i++) {
      const cin = ch + (skipChannels.pop() as number);
      ch = mult * cfg.modelChannels;
      const upsample = level > 0 && i === cfg.numResBlocks;
      output.push({ cin, cout: ch, attention: cfg.attentionResolutions.includes(ds), upsample });
      if (upsample) ds /= 2;
    }
  });
  return { timeEmbedDim: 4 * cfg.modelChannels, input, middleChannels, output };
}
