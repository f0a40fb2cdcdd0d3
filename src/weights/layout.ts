/**
 * Key names of the two checkpoint layouts of SD 1.x and SDXL and the map between them.
 *
 * - original (CompVis / sgm single file): `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE), and
 *   SD 1.x: `cond_stage_model.transformer.text_model.*` (CLIP text encoder);
 *   SDXL: `conditioner.embedders.0.transformer.text_model.*` (CLIP ViT-L, the same HF names) and
 *   `conditioner.embedders.1.model.*` (OpenCLIP ViT-bigG, open_clip names).
 * - diffusers (a folder): `unet/`, `vae/`, `text_encoder/` (and SDXL's `text_encoder_2/`), each with its own names.
 *
 * The map is the one diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py (and _sdxl.py) applies,
 * with the block counts read from the keys instead of hard-coded, so small test models map too. Three tensors are
 * not copies: diffusers' VAE mid attention uses linear q/k/v/out weights [out, in] where the original uses 1x1
 * convs [out, in, 1, 1]; encoder 2's q/k/v projections are separate where open_clip stacks them in one
 * `attn.in_proj_weight` [3w, w]; and its `text_projection.weight` [proj, w] is a Linear weight where open_clip
 * keeps `text_projection` [w, proj] for `x @ P`.
 */
import { WeightsError } from './types.js';

/**
 * Where each network lives in an original single-file SD 1.x checkpoint (the attribute paths of CompVis
 * LatentDiffusion): the one place these prefixes are spelled. `textModule` is the HF CLIPTextModel, whose
 * `text_model` holds the encoder.
 */
export const SD1_PREFIXES = Object.freeze({
  unet: 'model.diffusion_model',
  vae: 'first_stage_model',
  textModule: 'cond_stage_model.transformer',
  textEncoder: 'cond_stage_model.transformer.text_model',
});

/** The same, as the start of a key. */
export const UNET_PREFIX = `${SD1_PREFIXES.unet}.`;
export const VAE_PREFIX = `${SD1_PREFIXES.vae}.`;
export const TEXT_PREFIX = `${SD1_PREFIXES.textModule}.`;

/** The same for SDXL base (sgm's DiffusionEngine: `conditioner.embedders.{0,1}`); UNet and VAE as SD 1.x. */
export const SDXL_PREFIXES = Object.freeze({
  unet: SD1_PREFIXES.unet,
  vae: SD1_PREFIXES.vae,
  textModule1: 'conditioner.embedders.0.transformer',
  text2: 'conditioner.embedders.1.model',
});

export type Component = 'unet' | 'vae' | 'text_encoder' | 'text_encoder_2';

/** Which original layout a diffusers folder maps to: SD 1.x, or SDXL base (a folder with `text_encoder_2/`). */
export type FolderFamily = 'sd1' | 'sdxl';

/** Where one original-layout tensor lives in a diffusers folder. */
export interface DiffusersName {
  readonly component: Component;
  /** The diffusers tensor (the first of `stack`). */
  readonly key: string;
  /** The diffusers tensor is [out, in]; the original is [out, in, 1, 1] (VAE mid attention q/k/v/proj_out). */
  readonly linearAsConv: boolean;
  /** The original is these diffusers tensors stacked on axis 0, in order (open_clip's q; k; v `in_proj`). */
  readonly stack?: readonly string[];
  /** The original is the transpose of this 2-D diffusers tensor (open_clip's `text_projection`). */
  readonly transpose?: boolean;
}

/** How a block's inner names change: original first segments <-> diffusers ones. */
type Inner = 'none' | 'unet-resnet' | 'vae-resnet' | 'vae-attention';

interface PrefixPair {
  readonly original: string;
  readonly diffusers: string;
  readonly inner: Inner;
}

/** [original, diffusers, diffusers alternatives (older diffusers)] */
const INNER: Readonly<Record<Inner, ReadonlyArray<readonly [string, string, ...string[]]>>> = {
  none: [],
  'unet-resnet': [
    ['in_layers.0', 'norm1'], ['in_layers.2', 'conv1'], ['out_layers.0', 'norm2'], ['out_layers.3', 'conv2'],
    ['emb_layers.1', 'time_emb_proj'], ['skip_connection', 'conv_shortcut'],
  ],
  'vae-resnet': [['nin_shortcut', 'conv_shortcut']],
  'vae-attention': [['norm', 'group_norm'], ['q', 'to_q', 'query'], ['k', 'to_k', 'key'], ['v', 'to_v', 'value'], ['proj_out', 'to_out.0', 'proj_attn']],
};
const VAE_LINEAR_AS_CONV = new Set(['q', 'k', 'v', 'proj_out']);

/** Block counts of a UNet or VAE: levels (resolutions), resnets per down level, which levels have attention. */
export interface Structure {
  readonly levels: number;
  readonly resBlocks: number;
  readonly downAttention: readonly boolean[];
  /** Up levels in diffusers order: 0 is the lowest resolution. */
  readonly upAttention: readonly boolean[];
}

function unetPairs(s: Structure): PrefixPair[] {
  const p = (original: string, diffusers: string, inner: Inner = 'none'): PrefixPair => ({ original, diffusers, inner });
  const r1 = s.resBlocks + 1;
  const pairs = [
    p('time_embed.0.', 'time_embedding.linear_1.'), p('time_embed.2.', 'time_embedding.linear_2.'),
    p('label_emb.0.0.', 'add_embedding.linear_1.'), p('label_emb.0.2.', 'add_embedding.linear_2.'), // SDXL
    p('input_blocks.0.0.', 'conv_in.'), p('out.0.', 'conv_norm_out.'), p('out.2.', 'conv_out.'),
    p('middle_block.0.', 'mid_block.resnets.0.', 'unet-resnet'), p('middle_block.1.', 'mid_block.attentions.0.'),
    p('middle_block.2.', 'mid_block.resnets.1.', 'unet-resnet'),
  ];
  for (let i = 0; i < s.levels; i++) {
    for (let j = 0; j < s.resBlocks; j++) {
      const n = 1 + i * r1 + j;
      pairs.push(p(`input_blocks.${n}.0.`, `down_blocks.${i}.resnets.${j}.`, 'unet-resnet'));
      if (s.downAttention[i]) pairs.push(p(`input_blocks.${n}.1.`, `down_blocks.${i}.attentions.${j}.`));
    }
    if (i < s.levels - 1) pairs.push(p(`input_blocks.${(i + 1) * r1}.0.op.`, `down_blocks.${i}.downsamplers.0.conv.`));
  }
  for (let u = 0; u < s.levels; u++) {
    for (let j = 0; j <= s.resBlocks; j++) {
      const n = u * r1 + j;
      pairs.push(p(`output_blocks.${n}.0.`, `up_blocks.${u}.resnets.${j}.`, 'unet-resnet'));
      if (s.upAttention[u]) pairs.push(p(`output_blocks.${n}.1.`, `up_blocks.${u}.attentions.${j}.`));
    }
    const last = u * r1 + s.resBlocks;
    if (u < s.levels - 1) pairs.push(p(`output_blocks.${last}.${s.upAttention[u] ? 2 : 1}.`, `up_blocks.${u}.upsamplers.0.`));
  }
  return pairs;
}

function vaePairs(s: Structure): PrefixPair[] {
  const p = (original: string, diffusers: string, inner: Inner = 'none'): PrefixPair => ({ original, diffusers, inner });
  const pairs = [p('quant_conv.', 'quant_conv.'), p('post_quant_conv.', 'post_quant_conv.')];
  for (const side of ['encoder', 'decoder']) {
    pairs.push(
      p(`${side}.conv_in.`, `${side}.conv_in.`), p(`${side}.conv_out.`, `${side}.conv_out.`),
      p(`${side}.norm_out.`, `${side}.conv_norm_out.`),
      p(`${side}.mid.block_1.`, `${side}.mid_block.resnets.0.`, 'vae-resnet'),
      p(`${side}.mid.block_2.`, `${side}.mid_block.resnets.1.`, 'vae-resnet'),
      p(`${side}.mid.attn_1.`, `${side}.mid_block.attentions.0.`, 'vae-attention'),
    );
  }
  for (let i = 0; i < s.levels; i++) {
    for (let j = 0; j < s.resBlocks; j++) pairs.push(p(`encoder.down.${i}.block.${j}.`, `encoder.down_blocks.${i}.resnets.${j}.`, 'vae-resnet'));
    if (i < s.levels - 1) pairs.push(p(`encoder.down.${i}.downsample.`, `encoder.down_blocks.${i}.downsamplers.0.`));
  }
  for (let u = 0; u < s.levels; u++) {
    // the decoder's up levels are numbered from the lowest resolution in diffusers, from the highest in the original
    const o = s.levels - 1 - u;
    for (let j = 0; j <= s.resBlocks; j++) pairs.push(p(`decoder.up.${o}.block.${j}.`, `decoder.up_blocks.${u}.resnets.${j}.`, 'vae-resnet'));
    if (u < s.levels - 1) pairs.push(p(`decoder.up.${o}.upsample.`, `decoder.up_blocks.${u}.upsamplers.0.`));
  }
  return pairs;
}

/** More blocks of one kind than any real model has (SDXL's deepest list, its transformer blocks, has 10). */
const MAX_BLOCKS = 1024;

/**
 * 1 + the largest integer that follows `prefix` in any key (0 when none does). The count becomes loop bounds, so a
 * key naming block 99999999999 of a hostile folder is refused instead of being counted.
 */
function countAfter(keys: readonly string[], prefix: string): number {
  let n = 0;
  for (const k of keys) {
    if (!k.startsWith(prefix)) continue;
    const m = /^(\d+)\./.exec(k.slice(prefix.length));
    if (m === null) continue;
    const index = Number(m[1]);
    if (index >= MAX_BLOCKS) throw new WeightsError(`tensor ${k}: block index ${m[1]} is past ${MAX_BLOCKS - 1}; no Stable Diffusion model has that many`);
    n = Math.max(n, index + 1);
  }
  return n;
}

const hasPrefix = (keys: readonly string[], prefix: string) => keys.some((k) => k.startsWith(prefix));
const range = (n: number) => Array.from({ length: n }, (_, i) => i);

function diffusersUnetStructure(keys: readonly string[]): Structure {
  const levels = countAfter(keys, 'down_blocks.');
  return {
    levels,
    resBlocks: countAfter(keys, 'down_blocks.0.resnets.'),
    downAttention: range(levels).map((i) => hasPrefix(keys, `down_blocks.${i}.attentions.`)),
    upAttention: range(levels).map((u) => hasPrefix(keys, `up_blocks.${u}.attentions.`)),
  };
}

/** Original UNet keys (without the model prefix): the first downsampler sits at input block resBlocks + 1. */
function originalUnetStructure(keys: readonly string[]): Structure {
  const inputs = countAfter(keys, 'input_blocks.');
  const firstOp = range(inputs).find((n) => n > 0 && hasPrefix(keys, `input_blocks.${n}.0.op.`));
  const resBlocks = firstOp === undefined ? inputs - 1 : firstOp - 1;
  const levels = Math.max(1, Math.round(inputs / (resBlocks + 1)));
  const r1 = resBlocks + 1;
  return {
    levels,
    resBlocks,
    downAttention: range(levels).map((i) => hasPrefix(keys, `input_blocks.${1 + i * r1}.1.`)),
    upAttention: range(levels).map((u) => hasPrefix(keys, `output_blocks.${u * r1}.1.`)),
  };
}

function diffusersVaeStructure(keys: readonly string[]): Structure {
  const levels = countAfter(keys, 'encoder.down_blocks.');
  return { levels, resBlocks: countAfter(keys, 'encoder.down_blocks.0.resnets.'), downAttention: [], upAttention: [] };
}

function originalVaeStructure(keys: readonly string[]): Structure {
  const levels = countAfter(keys, 'encoder.down.');
  return { levels, resBlocks: countAfter(keys, 'encoder.down.0.block.'), downAttention: [], upAttention: [] };
}

/** Rename a key by the first pair whose `from` side prefixes it, then rename the block's inner first segment. */
function rename(key: string, pairs: readonly PrefixPair[], from: 'original' | 'diffusers'): { key: string; inner: string } | null {
  const to = from === 'original' ? 'diffusers' : 'original';
  for (const pair of pairs) {
    if (!key.startsWith(pair[from])) continue;
    const rest = key.slice(pair[from].length);
    for (const [original, ...diffusers] of INNER[pair.inner]) {
      const names = from === 'original' ? [original] : diffusers;
      const hit = names.find((n) => rest.startsWith(`${n}.`));
      if (hit === undefined) continue;
      const target = from === 'original' ? diffusers[0] : original;
      return { key: pair[to] + target + rest.slice(hit.length), inner: pair.inner === 'vae-attention' ? original : '' };
    }
    return { key: pair[to] + rest, inner: '' };
  }
  return null;
}

/**
 * HF CLIPTextModel keys as the text encoders' files hold them: `text_model.*` (and encoder 2's `text_projection.weight`);
 * transformers 4.5x saves the encoder without the `text_model.` module, which is put back here.
 */
function hfTextKey(key: string): string {
  return /^(embeddings|encoder|final_layer_norm)\./.test(key) ? `text_model.${key}` : key;
}

/** HF CLIPTextModel -> open_clip names, inside one encoder layer (`text_model.encoder.layers.N.`). */
const OPEN_CLIP_LAYER: ReadonlyArray<readonly [string, string]> = [
  ['layer_norm1.', 'ln_1.'], ['layer_norm2.', 'ln_2.'], ['self_attn.out_proj.', 'attn.out_proj.'],
  ['mlp.fc1.', 'mlp.c_fc.'], ['mlp.fc2.', 'mlp.c_proj.'],
];
const OPEN_CLIP_TOP: ReadonlyArray<readonly [string, string]> = [
  ['text_model.embeddings.token_embedding.weight', 'token_embedding.weight'],
  ['text_model.embeddings.position_embedding.weight', 'positional_embedding'],
  ['text_model.final_layer_norm.weight', 'ln_final.weight'],
  ['text_model.final_layer_norm.bias', 'ln_final.bias'],
];
const HF_LAYER = /^text_model\.encoder\.layers\.(\d+)\.(.*)$/;
const HF_QKV = /^self_attn\.[qkv]_proj\.(weight|bias)$/;

/**
 * SDXL's text_encoder_2 (HF CLIPTextModelWithProjection) under open_clip's names (`conditioner.embedders.1.model.*`):
 * q/k/v stacked into `attn.in_proj_weight` / `in_proj_bias`, `text_projection` transposed, `position_ids` (a buffer
 * open_clip does not keep) dropped. Throws for a key with no open_clip name, or a layer missing one of q, k, v.
 */
function openClipNames(keys: readonly string[], where: string): Map<string, DiffusersName> {
  const prefix = `${SDXL_PREFIXES.text2}.`;
  const byHf = new Map(keys.map((k) => [hfTextKey(k), k]));
  const out = new Map<string, DiffusersName>();
  const put = (name: string, d: Omit<DiffusersName, 'component' | 'linearAsConv'>) => {
    const prev = out.get(prefix + name);
    if (prev !== undefined) throw new WeightsError(`${where}: text_encoder_2 keys ${prev.key} and ${d.key} both map to ${prefix}${name}`);
    out.set(prefix + name, { component: 'text_encoder_2', linearAsConv: false, ...d });
  };
  for (const [hf, key] of byHf) {
    if (hf === 'text_model.embeddings.position_ids') continue;
    if (hf === 'text_projection.weight') {
      put('text_projection', { key, transpose: true });
      continue;
    }
    const top = OPEN_CLIP_TOP.find(([h]) => h === hf);
    if (top !== undefined) {
      put(top[1], { key });
      continue;
    }
    const m = HF_LAYER.exec(hf);
    if (m !== null && Number(m[1]) >= MAX_BLOCKS) throw new WeightsError(`${where}: tensor ${key}: layer index ${m[1]} is past ${MAX_BLOCKS - 1}; no Stable Diffusion text encoder has that many`);
    const layer = m === null ? undefined : OPEN_CLIP_LAYER.find(([h]) => m[2].startsWith(h));
    if (m !== null && layer !== undefined) {
      put(`transformer.resblocks.${m[1]}.${layer[1]}${m[2].slice(layer[0].length)}`, { key });
      continue;
    }
    const qkv = m === null ? null : HF_QKV.exec(m[2]);
    if (m === null || qkv === null) throw new WeightsError(`${where}: text_encoder_2 key ${key} has no open_clip name: not SDXL's CLIPTextModelWithProjection`);
    if (!m[2].startsWith('self_attn.q_proj.')) continue; // k and v are stacked with q
    const parts = ['q', 'k', 'v'].map((x) => `text_model.encoder.layers.${m[1]}.self_attn.${x}_proj.${qkv[1]}`);
    const stack = parts.map((hfPart) => {
      const k = byHf.get(hfPart);
      if (k === undefined) throw new WeightsError(`${where}: text_encoder_2 has ${key} but no ${hfPart} to stack with it`);
      return k;
    });
    put(`transformer.resblocks.${m[1]}.attn.in_proj_${qkv[1]}`, { key, stack });
  }
  return out;
}

/**
 * The original names of one diffusers component's keys: original name -> diffusers key. `family` says which
 * single file the folder stands for (it places text encoder 1). Throws for a key with no original name (the folder
 * holds another architecture).
 */
export function diffusersToOriginal(component: Component, keys: readonly string[], where: string, family: FolderFamily = 'sd1'): Map<string, DiffusersName> {
  if (component === 'text_encoder_2') return openClipNames(keys, where);
  const out = new Map<string, DiffusersName>();
  const pairs = component === 'unet' ? unetPairs(diffusersUnetStructure(keys)) : vaePairs(diffusersVaeStructure(keys));
  const textPrefix = family === 'sdxl' ? `${SDXL_PREFIXES.textModule1}.` : TEXT_PREFIX;
  for (const key of keys) {
    let name: string;
    let linearAsConv = false;
    if (component === 'text_encoder') {
      name = textPrefix + hfTextKey(key);
    } else {
      const r = rename(key, pairs, 'diffusers');
      if (r === null) throw new WeightsError(`${where}: ${component} key ${key} has no original (SD 1.x or SDXL) name: not a Stable Diffusion ${component}`);
      name = (component === 'unet' ? UNET_PREFIX : VAE_PREFIX) + r.key;
      linearAsConv = VAE_LINEAR_AS_CONV.has(r.inner) && key.endsWith('.weight');
    }
    if (out.has(name)) throw new WeightsError(`${where}: ${component} keys ${out.get(name)?.key} and ${key} both map to ${name}`);
    out.set(name, { component, key, linearAsConv });
  }
  return out;
}

/**
 * The forward map (original single-file names -> diffusers folder names), the inverse of diffusersToOriginal.
 * Keys of neither network (alphas_cumprod, model_ema.*) map to nothing, nor do SDXL's text encoders (LoRA names
 * for them are not diffusers paths). Used to check the map by round trip and to name LoRA targets.
 */
export function originalToDiffusers(keys: readonly string[]): Map<string, DiffusersName> {
  const strip = (prefix: string) => keys.filter((k) => k.startsWith(prefix)).map((k) => k.slice(prefix.length));
  const unet = unetPairs(originalUnetStructure(strip(UNET_PREFIX)));
  const vae = vaePairs(originalVaeStructure(strip(VAE_PREFIX)));
  const out = new Map<string, DiffusersName>();
  for (const key of keys) {
    if (key.startsWith(TEXT_PREFIX)) {
      out.set(key, { component: 'text_encoder', key: key.slice(TEXT_PREFIX.length), linearAsConv: false });
      continue;
    }
    const [component, prefix, pairs] = key.startsWith(UNET_PREFIX) ? (['unet', UNET_PREFIX, unet] as const) : (['vae', VAE_PREFIX, vae] as const);
    if (!key.startsWith(prefix)) continue;
    const r = rename(key.slice(prefix.length), pairs, 'original');
    if (r === null) continue;
    out.set(key, { component, key: r.key, linearAsConv: VAE_LINEAR_AS_CONV.has(r.inner) && key.endsWith('.weight') });
  }
  return out;
}
