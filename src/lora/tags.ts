/**
 * A1111's extra-network tags in a prompt (modules/extra_networks.py `parse_prompt`, the Lora extension's
 * `activate`): `<lora:NAME:TE:UNET:DYN>` and its alias `<lyco:...>`.
 *
 * Every `<type:args>` tag (regex `<(\w+):([^>]+)>`) is cut out whatever its type, and the text around it is left
 * exactly as it was, spaces and commas included (`"a fern, <lora:x:0.8>"` -> `"a fern, "`). args split on ':'; an
 * arg with exactly one '=' is named, any other positional. For lora: name = 1st positional; te = 2nd positional or
 * 1.0, `te=` overrides; unet = 3rd positional or te, `unet=` overrides; dyn = 4th positional or `dyn=` (an integer,
 * DyLoRA's rank), else null. Other types (`<hypernet:...>`) are returned in `others`.
 */
import { LoraError } from './types.js';

export interface LoraTag {
  readonly name: string;
  readonly te: number;
  readonly unet: number;
  readonly dyn: number | null;
}

export interface ExtraNetworkTag {
  readonly type: string;
  readonly args: readonly string[];
}

export interface PromptTags {
  /** The prompt with every tag cut out, the rest unchanged. */
  readonly prompt: string;
  readonly loras: readonly LoraTag[];
  readonly others: readonly ExtraNetworkTag[];
}

/** Python's `\w` on str: letters, digits (any script) and '_'. */
const TAG = /<([\p{L}\p{N}_]+):([^>]+)>/gu;
const LORA_TYPES = new Set(['lora', 'lyco']);

export function extractLoraTags(prompt: string): PromptTags {
  const loras: LoraTag[] = [];
  const others: ExtraNetworkTag[] = [];
  const rest = prompt.replace(TAG, (tag: string, type: string, args: string) => {
    const items = args.split(':');
    if (LORA_TYPES.has(type)) loras.push(loraTag(tag, items));
    else others.push({ type, args: items });
    return '';
  });
  return { prompt: rest, loras, others };
}

/** ExtraNetworkParams: `item.split('=', 2)` of two parts is named, everything else positional. */
function loraTag(tag: string, items: readonly string[]): LoraTag {
  const positional: string[] = [];
  const named = new Map<string, string>();
  for (const item of items) {
    const parts = item.split('=');
    if (parts.length === 2) named.set(parts[0], parts[1]);
    else positional.push(item);
  }
  if (positional.length === 0) throw new LoraError(`${tag}: no LoRA name (the first argument without '=')`);
  const number = (what: string, text: string) => pythonFloat(tag, what, text);
  let te = positional.length > 1 ? number('te multiplier', positional[1]) : 1.0;
  te = named.has('te') ? number('te', named.get('te') as string) : te;
  let unet = positional.length > 2 ? number('unet multiplier', positional[2]) : te;
  unet = named.has('unet') ? number('unet', named.get('unet') as string) : unet;
  let dyn = positional.length > 3 ? pythonInt(tag, 'dyn', positional[3]) : null;
  dyn = named.has('dyn') ? pythonInt(tag, 'dyn', named.get('dyn') as string) : dyn;
  return { name: positional[0], te, unet, dyn };
}

const FLOAT = /^[+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?$/i;

/**
 * Python's float(text), surrounding whitespace allowed; 'inf' and 'nan', which Python takes, are refused here too:
 * they would turn every merged weight into inf or NaN.
 */
function pythonFloat(tag: string, what: string, text: string): number {
  const t = text.trim();
  const v = Number(t);
  if (!FLOAT.test(t) || !Number.isFinite(v)) throw new LoraError(`${tag}: ${what} ${JSON.stringify(text)} is not a finite number`);
  return v;
}

/** Python's int(text). */
function pythonInt(tag: string, what: string, text: string): number {
  const t = text.trim();
  if (!/^[+-]?\d+$/.test(t)) throw new LoraError(`${tag}: ${what} ${JSON.stringify(text)} is not an integer`);
  return Number(t);
}
