/**
 * Which checkpoint weight each LoRA module changes.
 *
 * Trainers name modules after the model they trained: kohya-ss trains SD 1.x on a diffusers-layout UNet and an HF
 * CLIPTextModel, and writes `lora_unet_` / `lora_te_` + the module path with '.' -> '_'
 * (`lora_unet_down_blocks_0_attentions_0_proj_in`, `lora_te_text_model_encoder_layers_0_self_attn_q_proj`);
 * diffusers/PEFT writes `unet.` / `text_encoder.` + the same path with its dots. Both are diffusers names, while the
 * model is loaded under the original (CompVis) names. So every name is found through the one diffusers <-> original
 * table of weights/layout.ts, applied to the model's own keys: its block counts (num_res_blocks, the levels with
 * attention) are those of the model, never A1111's hard-coded num_res_blocks = 2, which is wrong for a model with
 * another count (input_blocks.(1 + i*(nrb+1) + j), output_blocks.(i*(nrb+1) + j), ...).
 *
 * SDXL LoRAs are told by their names (sdxlEvidence): two text encoders (`lora_te1_`, `lora_te2_`,
 * `text_encoder_2.`), kohya's sgm-layout UNet names for SDXL (`lora_unet_input_blocks_4_1_...`), `ss_base_model_version`
 * in the metadata, and, for a module that does not fit, names or shapes only SDXL has (sdxlModuleHint).
 */
import { originalToDiffusers } from '../weights/layout.js';
import type { LoraNetwork } from './types.js';

export interface LoraTarget {
  /** The original checkpoint key of the weight the module changes. */
  readonly key: string;
  readonly network: LoraNetwork;
}

const KOHYA_PREFIX: Readonly<Record<LoraNetwork, string>> = { unet: 'lora_unet_', te: 'lora_te_' };
const PEFT_PREFIX: Readonly<Record<LoraNetwork, string>> = { unet: 'unet.', te: 'text_encoder.' };

/** The kohya stem of a diffusers module path: `lora_unet_down_blocks_0_attentions_0_proj_in`. */
export const kohyaName = (network: LoraNetwork, path: string): string => KOHYA_PREFIX[network] + path.replaceAll('.', '_');

/** The PEFT name of a diffusers module path: `unet.down_blocks.0.attentions.0.proj_in`. */
export const peftName = (network: LoraNetwork, path: string): string => PEFT_PREFIX[network] + path;

/**
 * Every module name a LoRA may use for the model whose checkpoint keys are `modelKeys` (original SD 1.x names),
 * both kohya and PEFT spellings, -> the weight it changes. Only `.weight` tensors of the UNet and text encoder.
 */
export function loraTargets(modelKeys: readonly string[]): Map<string, LoraTarget> {
  const out = new Map<string, LoraTarget>();
  for (const [key, d] of originalToDiffusers(modelKeys)) {
    if (d.component === 'vae' || !d.key.endsWith('.weight')) continue;
    const network: LoraNetwork = d.component === 'unet' ? 'unet' : 'te';
    const path = d.key.slice(0, -'.weight'.length);
    out.set(kohyaName(network, path), { key, network });
    out.set(peftName(network, path), { key, network });
  }
  return out;
}

/** The network a module name belongs to, from its prefix; null for a prefix neither format uses for SD 1.x. */
export function networkOf(id: string): LoraNetwork | null {
  for (const network of ['unet', 'te'] as const) {
    if (id.startsWith(KOHYA_PREFIX[network]) || id.startsWith(PEFT_PREFIX[network])) return network;
  }
  return null;
}

const SDXL_TEXT_ENCODERS = /^(lora_te[12]_|text_encoder_2\.)/;
const SGM_UNET = /^lora_unet_(input_blocks|middle_block|output_blocks)_/;

/** Why module names (and kohya metadata) say SDXL, or null. */
export function sdxlEvidence(ids: readonly string[], metadata: ReadonlyMap<string, string>): string | null {
  const te = ids.find((id) => SDXL_TEXT_ENCODERS.test(id));
  if (te !== undefined) return `${te} is a module of SDXL's second text encoder pair (lora_te1_/lora_te2_, text_encoder_2.)`;
  const sgm = ids.find((id) => SGM_UNET.test(id));
  if (sgm !== undefined) return `${sgm} is a kohya-ss SDXL UNet name (sgm layout: input_blocks, middle_block, output_blocks)`;
  const version = metadata.get('ss_base_model_version') ?? '';
  if (version.startsWith('sdxl')) return `its metadata says ss_base_model_version = ${version}`;
  return null;
}

/** SDXL's cross-attention context: CLIP ViT-L (768) and OpenCLIP ViT-bigG (1280) features concatenated. */
const SDXL_CONTEXT_DIM = 2048;
/** Names only SDXL's UNet has: deeper transformers (2 and 10 blocks a level), attention in up_blocks.0. */
const SDXL_ONLY_MODULE = /transformer_blocks[._][1-9]|up_blocks[._]0[._]attentions|add_embedding/;

/**
 * For a module that does not fit an SD 1.x model: why it looks like SDXL's, or null. `downShape` is its lora_down.
 */
export function sdxlModuleHint(id: string, downShape: readonly number[]): string | null {
  if (SDXL_ONLY_MODULE.test(id)) return `${id} exists only in SDXL's UNet`;
  if (/attn2[._]to_[kv]$/.test(id) && downShape[1] === SDXL_CONTEXT_DIM) {
    return `${id} reads a ${SDXL_CONTEXT_DIM}-wide text context (SDXL's two text encoders)`;
  }
  return null;
}
