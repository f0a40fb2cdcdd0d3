/**
 * diffusers' UNet2DConditionModel `config.json` -> UNetConfig: the translation of diffusers' names into this
 * project's, used for a diffusers folder's unet/ (pipeline/diffusers-config.ts) and, for its encoder half, a
 * diffusers ControlNetModel (controlnet/config.ts).
 *
 *   block_out_channels [320, 640, 1280, 1280]   -> modelChannels 320, channelMult [1, 2, 4, 4]
 *   down_block_types "CrossAttn..." per level    -> attention at that level, transformer_layers_per_block deep
 *   attention_head_dim (or num_attention_heads)  -> heads per level: diffusers' historical name, a head COUNT
 *   use_linear_projection                        -> projection 'linear' (SDXL) or 'conv' (SD 1.x)
 *   addition_embed_type 'text_time'              -> label_emb of projection_class_embeddings_input_dim (SDXL: 2816)
 */
import { ConfigError } from '../nn/errors.js';
import { SD15_UNET, validateConfig, type UNetConfig } from './config.js';

/** The fields of a diffusers UNet2DConditionModel / ControlNetModel `config.json` this project reads. */
export interface DiffusersUNetJson {
  readonly in_channels?: number;
  readonly out_channels?: number;
  readonly block_out_channels?: readonly number[];
  readonly down_block_types?: readonly string[];
  readonly layers_per_block?: number;
  readonly attention_head_dim?: number | readonly number[];
  readonly num_attention_heads?: number | readonly number[] | null;
  readonly transformer_layers_per_block?: number | readonly number[];
  readonly cross_attention_dim?: number;
  readonly use_linear_projection?: boolean;
  readonly addition_embed_type?: string | null;
  readonly addition_time_embed_dim?: number | null;
  readonly projection_class_embeddings_input_dim?: number | null;
  readonly class_embed_type?: string | null;
  readonly mid_block_type?: string | null;
  readonly [other: string]: unknown;
}

/** Refuses what the UNet cannot run, naming the field; `where` says which file. */
function refuseUnsupported(json: DiffusersUNetJson, where: string): void {
  const fail = (what: string): never => {
    throw new ConfigError(`${where}: ${what}`);
  };
  if (json.class_embed_type != null) fail(`class_embed_type '${json.class_embed_type}' is not supported`);
  if (json.addition_embed_type != null && json.addition_embed_type !== 'text_time') {
    fail(`addition_embed_type '${json.addition_embed_type}' is not supported (only SDXL's 'text_time')`);
  }
  if (json.mid_block_type != null && json.mid_block_type !== 'UNetMidBlock2DCrossAttn') fail(`mid_block_type '${json.mid_block_type}' is not supported`);
  if (json.cross_attention_dim !== undefined && typeof json.cross_attention_dim !== 'number') {
    fail('cross_attention_dim per block is not supported (one number only)');
  }
}

export function unetConfigFromDiffusers(json: DiffusersUNetJson, where: string): UNetConfig {
  refuseUnsupported(json, where);
  const blocks = json.block_out_channels ?? SD15_UNET.channelMult.map((m) => m * SD15_UNET.modelChannels);
  const modelChannels = blocks[0];
  if (blocks.some((b) => b % modelChannels !== 0)) throw new ConfigError(`${where}: block_out_channels [${blocks.join(', ')}] are not multiples of the first`);
  const types = json.down_block_types ?? blocks.map((_, i) => (i < blocks.length - 1 ? 'CrossAttnDownBlock2D' : 'DownBlock2D'));
  if (types.length !== blocks.length) throw new ConfigError(`${where}: down_block_types names ${types.length} levels, block_out_channels ${blocks.length}`);
  const layers = json.transformer_layers_per_block ?? 1;
  const depthAt = (level: number) => (typeof layers === 'number' ? layers : layers[level]);
  const heads = json.num_attention_heads ?? json.attention_head_dim ?? 8;
  const textTime = json.addition_embed_type === 'text_time';
  if (textTime && typeof json.projection_class_embeddings_input_dim !== 'number') {
    throw new ConfigError(`${where}: addition_embed_type 'text_time' needs projection_class_embeddings_input_dim`);
  }
  try {
    return validateConfig({
      inChannels: json.in_channels ?? SD15_UNET.inChannels,
      outChannels: json.out_channels ?? json.in_channels ?? SD15_UNET.outChannels,
      modelChannels,
      channelMult: Object.freeze(blocks.map((b) => b / modelChannels)),
      numResBlocks: json.layers_per_block ?? SD15_UNET.numResBlocks,
      transformerDepth: Object.freeze(types.map((t, level) => (t.startsWith('CrossAttn') ? depthAt(level) : 0))),
      middleTransformerDepth: depthAt(blocks.length - 1),
      heads: Object.freeze({ count: typeof heads === 'number' ? heads : Object.freeze([...heads]) }),
      projection: json.use_linear_projection === true ? 'linear' : 'conv',
      contextDim: json.cross_attention_dim ?? SD15_UNET.contextDim,
      addedEmbeddingDim: textTime ? (json.projection_class_embeddings_input_dim as number) : 0,
    });
  } catch (e) {
    if (e instanceof ConfigError) throw new ConfigError(`${where}: ${e.message}`);
    throw e;
  }
}
