/**
 * Names of a diffusers `ControlNetModel` -> lllyasviel's original names (`control_model.*`, cldm.py), which the
 * model loads from. The UNet-like part (time_embedding, conv_in, down_blocks, mid_block) is the UNet's map
 * (weights/layout.ts), so both networks' encoder names are spelled in one place; the ControlNet's own parts:
 *
 *   controlnet_cond_embedding.conv_in      input_hint_block.0
 *   controlnet_cond_embedding.blocks.k     input_hint_block.{2k + 2}
 *   controlnet_cond_embedding.conv_out     input_hint_block.{2K + 2}       (K blocks)
 *   controlnet_down_blocks.i               zero_convs.i.0
 *   controlnet_mid_block                   middle_block_out.0
 * Shapes are the same in both layouts (every part is a conv, or a linear in both).
 */
import { diffusersToOriginal, UNET_PREFIX } from '../weights/layout.js';
import { WeightsError } from '../weights/types.js';
import { CONTROL_PREFIX } from './config.js';

/** More blocks than any ControlNet has: a larger index is refused before it becomes a loop bound. */
const MAX_INDEX = 1024;

const HINT = 'controlnet_cond_embedding.';

/** `<index>.<rest>` after `prefix`, with the index bounded; null when `key` is not of that form. */
function indexed(key: string, prefix: string, where: string): { index: number; rest: string } | null {
  if (!key.startsWith(prefix)) return null;
  const m = /^(\d+)\.(.+)$/.exec(key.slice(prefix.length));
  if (m === null) return null;
  const index = Number(m[1]);
  if (index >= MAX_INDEX) throw new WeightsError(`${where}: tensor ${key}: index ${m[1]} is past ${MAX_INDEX - 1}; no ControlNet has that many blocks`);
  return { index, rest: m[2] };
}

/** The original name (without the prefix) of one of the ControlNet's own diffusers keys, or null for another key. */
function ownName(key: string, hintBlocks: number, where: string): string | null {
  if (key.startsWith('controlnet_mid_block.')) return `middle_block_out.0.${key.slice('controlnet_mid_block.'.length)}`;
  const zero = indexed(key, 'controlnet_down_blocks.', where);
  if (zero !== null) return `zero_convs.${zero.index}.0.${zero.rest}`;
  if (key.startsWith(`${HINT}conv_in.`)) return `input_hint_block.0.${key.slice(`${HINT}conv_in.`.length)}`;
  if (key.startsWith(`${HINT}conv_out.`)) return `input_hint_block.${2 * hintBlocks + 2}.${key.slice(`${HINT}conv_out.`.length)}`;
  const block = indexed(key, `${HINT}blocks.`, where);
  if (block !== null) return `input_hint_block.${2 * block.index + 2}.${block.rest}`;
  return null;
}

/**
 * original name (`${prefix}.…`) -> diffusers key, for every key of a ControlNetModel weight file. Throws
 * WeightsError naming the first key with no original name (another kind of model, or an SDXL ControlNet's
 * add_embedding, not mapped yet).
 */
export function controlNetDiffusersToOriginal(keys: readonly string[], where: string, prefix: string = CONTROL_PREFIX): Map<string, string> {
  const hintBlocks = keys.reduce((n, k) => Math.max(n, (indexed(k, `${HINT}blocks.`, where)?.index ?? -1) + 1), 0);
  const out = new Map<string, string>();
  const add = (original: string, key: string) => {
    const name = prefix === '' ? original : `${prefix}.${original}`;
    const other = out.get(name);
    if (other !== undefined) throw new WeightsError(`${where}: keys ${other} and ${key} both map to ${name}`);
    out.set(name, key);
  };
  const unetKeys: string[] = [];
  for (const key of keys) {
    if (key.startsWith('add_embedding.')) throw new WeightsError(`${where}: ${key}: an SDXL ControlNet (added embedding): not supported yet, only SD 1.x ControlNets`);
    const own = ownName(key, hintBlocks, where);
    if (own !== null) add(own, key);
    else if (key.startsWith('controlnet_')) throw new WeightsError(`${where}: ${key} is no part of a ControlNetModel this project knows`);
    else unetKeys.push(key);
  }
  let unet: Map<string, { key: string }>;
  try {
    unet = diffusersToOriginal('unet', unetKeys, where);
  } catch (e) {
    throw new WeightsError(`${where}: not a diffusers ControlNetModel: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
  }
  for (const [name, d] of unet) add(name.slice(UNET_PREFIX.length), d.key);
  return out;
}

/** Whether the keys are a diffusers ControlNetModel's (its hint encoder is there). */
export function isDiffusersControlNet(keys: readonly string[]): boolean {
  return keys.some((k) => k.startsWith(HINT));
}
