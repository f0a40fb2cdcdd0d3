/**
 * The VAE's configuration (CompVis AutoencoderKL `ddconfig` + `embed_dim`) and every key it reads from a
 * checkpoint with its PyTorch shape (for config-vs-checkpoint checks and generated weights).
 */
import { ConfigError } from '../nn/weight-view.js';
import { COMPVIS_RESNET, ResnetBlock } from '../nn/resnet.js';

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

/** Where the VAE lives in an original single-file SD 1.x checkpoint. */
export const VAE_PREFIX = 'first_stage_model';

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
 * ch_mult, num_res_blocks, attn_resolutions, dropout, embed_dim}`) -> VaeConfig. embed_dim defaults to z_channels.
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
  return Object.freeze({
    inChannels: positiveInt(j.in_channels, 'in_channels'),
    outChannels: positiveInt(j.out_ch, 'out_ch'),
    ch,
    chMult: Object.freeze(intList(j.ch_mult, 'ch_mult', false)),
    numResBlocks: positiveInt(j.num_res_blocks, 'num_res_blocks'),
    attnResolutions: Object.freeze(intList(j.attn_resolutions ?? [], 'attn_resolutions', true)),
    resolution: positiveInt(j.resolution, 'resolution'),
    zChannels,
    embedDim: positiveInt(j.embed_dim ?? zChannels, 'embed_dim'),
  });
}

type Shapes = [string, number[]][];

const convShapes = (name: string, cin: number, cout: number, k: number): Shapes => [
  [`${name}.weight`, [cout, cin, k, k]], [`${name}.bias`, [cout]],
];
const normShapes = (name: string, c: number): Shapes => [[`${name}.weight`, [c]], [`${name}.bias`, [c]]];
const resnetShapes = (name: string, cin: number, cout: number): Shapes =>
  ResnetBlock.shapes(cin, cout, { names: COMPVIS_RESNET }).map(([k, s]) => [`${name}.${k}`, s]);
const attnShapes = (name: string, c: number): Shapes => [
  ...normShapes(`${name}.norm`, c),
  ...['q', 'k', 'v', 'proj_out'].flatMap((n) => convShapes(`${name}.${n}`, c, c, 1)),
];
const midShapes = (name: string, c: number): Shapes => [
  ...resnetShapes(`${name}.block_1`, c, c), ...attnShapes(`${name}.attn_1`, c), ...resnetShapes(`${name}.block_2`, c, c),
];

function encoderShapes(cfg: VaeConfig): Shapes {
  const s: Shapes = convShapes('encoder.conv_in', cfg.inChannels, cfg.ch, 3);
  let cin = cfg.ch;
  cfg.chMult.forEach((mult, i) => {
    const cout = cfg.ch * mult;
    for (let j = 0; j < cfg.numResBlocks; j++) {
      s.push(...resnetShapes(`encoder.down.${i}.block.${j}`, cin, cout));
      if (cfg.attnResolutions.includes(levelResolution(cfg, i))) s.push(...attnShapes(`encoder.down.${i}.attn.${j}`, cout));
      cin = cout;
    }
    if (i !== cfg.chMult.length - 1) s.push(...convShapes(`encoder.down.${i}.downsample.conv`, cout, cout, 3));
  });
  s.push(...midShapes('encoder.mid', cin), ...normShapes('encoder.norm_out', cin), ...convShapes('encoder.conv_out', cin, 2 * cfg.zChannels, 3));
  return s;
}

function decoderShapes(cfg: VaeConfig): Shapes {
  let cin = cfg.ch * cfg.chMult[cfg.chMult.length - 1];
  const s: Shapes = [...convShapes('decoder.conv_in', cfg.zChannels, cin, 3), ...midShapes('decoder.mid', cin)];
  for (let i = cfg.chMult.length - 1; i >= 0; i--) {
    const cout = cfg.ch * cfg.chMult[i];
    for (let j = 0; j <= cfg.numResBlocks; j++) {
      s.push(...resnetShapes(`decoder.up.${i}.block.${j}`, cin, cout));
      if (cfg.attnResolutions.includes(levelResolution(cfg, i))) s.push(...attnShapes(`decoder.up.${i}.attn.${j}`, cout));
      cin = cout;
    }
    if (i !== 0) s.push(...convShapes(`decoder.up.${i}.upsample.conv`, cout, cout, 3));
  }
  s.push(...normShapes('decoder.norm_out', cin), ...convShapes('decoder.conv_out', cin, cfg.outChannels, 3));
  return s;
}

/** Every checkpoint key the VAE reads, with its PyTorch shape. */
export function expectedShapes(cfg: VaeConfig = SD15_VAE, prefix = VAE_PREFIX): Map<string, number[]> {
  const all: Shapes = [
    ...encoderShapes(cfg),
    ...convShapes('quant_conv', 2 * cfg.zChannels, 2 * cfg.embedDim, 1),
    ...convShapes('post_quant_conv', cfg.embedDim, cfg.zChannels, 1),
    ...decoderShapes(cfg),
  ];
  return new Map(all.map(([k, s]) => [prefix === '' ? k : `${prefix}.${k}`, s]));
}
