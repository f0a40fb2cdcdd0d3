/**
 * The `parameters` text that AUTOMATIC1111's web UI stores in its PNGs, so tools that read those (the web UI's
 * "PNG Info", image browsers) show how an image was made:
 *
 *   a botanical illustration of a fern
 *   Negative prompt: blurry
 *   Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: v1-5-pruned-emaonly
 *
 * The negative-prompt line is left out when it is empty; settings are `Key: value` pairs joined by ", ".
 *
 * What decides the random numbers and the sampler's path is recorded too, so the image can be made again: the
 * noise source as A1111 writes its RNG setting (`RNG: CPU` for torch's CPU generator, nothing for its default
 * "GPU"; it also writes `RNG: NV`, the same numbers as GPU), `Conventions: diffusers` (nothing for A1111's),
 * `Prompt syntax: plain` (nothing for A1111's), `Pad conds: True` when the prompt and negative prompt were padded to
 * one length (A1111's pad_cond_uncond; it writes the key only then), and SDXL's size conditioning when it is not the default
 * (`Original size: WxH`, `Crop top: T`, `Crop left: L`, `Target size: WxH`, sizes written as Size is).
 *
 * Adapters as A1111's ControlNet extension (sd-webui-controlnet) writes its units, one quoted setting each, numbered
 * from 0, so its "send to txt2img" restores them (the images themselves are not stored):
 *   ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny, Weight: 0.8, Resize Mode: Just Resize,
 *                  Threshold A: 100, Threshold B: 200, Guidance Start: 0, Guidance End: 1"
 *   ControlNet 1: "Module: ip-adapter_clip_sd15, Model: ip-adapter_sd15, Weight: 0.6, Resize Mode: Just Resize,
 *                  Guidance Start: 0, Guidance End: 1"                    (an IP-Adapter is a unit there too)
 * Module is the preprocessor (`canny`, or `none` for an image used as it is); Model the file's name without
 * extension. Inpainting adds `Mask blur: 0` (the mask is used as given, never blurred; A1111's default is 4).
 */

/** What an image was made with (the pipeline's ResolvedParams fits), with this image's own seed. */
export interface ImageParameters {
  readonly prompt: string;
  readonly negativePrompt: string;
  readonly seed: number;
  readonly steps: number;
  readonly cfgScale: number;
  readonly cfg: boolean;
  readonly sampler: string;
  readonly karras: boolean;
  readonly width: number;
  readonly height: number;
  readonly clipSkip: number;
  readonly strength: number | null;
  /** The weights file's base name, without extension. */
  readonly model?: string;
  /** 'cpu' or 'gpu' (absent: not recorded). */
  readonly noise?: string;
  /** 'a1111' or 'diffusers'. */
  readonly conventions?: string;
  /** 'a1111' or 'plain'. */
  readonly promptSyntax?: string;
  /** Whether cond and uncond were padded to one length (A1111's "Pad conds"). */
  readonly padConds?: boolean;
  /** SDXL: [height, width], [top, left], [height, width]. */
  readonly originalSize?: readonly [number, number];
  readonly cropTopLeft?: readonly [number, number];
  readonly targetSize?: readonly [number, number];
  /** ControlNet units, in order (their models by name). */
  readonly controlNets?: readonly ControlUnitParameters[];
  /** The IP-Adapter, written as the unit after the ControlNets. */
  readonly ipAdapter?: IpAdapterParameters | null;
  /** Whether an inpainting mask was used. */
  readonly mask?: boolean;
}

export interface ControlUnitParameters {
  /** The preprocessor: 'canny' or 'none'. */
  readonly module: string;
  readonly model: string;
  readonly weight: number;
  readonly start: number;
  readonly end: number;
  /** Canny's thresholds (A1111's Threshold A / B). */
  readonly low?: number | null;
  readonly high?: number | null;
}

export interface IpAdapterParameters {
  readonly model: string;
  readonly weight: number;
  /** A1111's preprocessor name for the image encoder: 'ip-adapter_clip_sd15' (ViT-H, SD 1.x) or 'ip-adapter_clip_sdxl'. */
  readonly module: string;
}

/** Our sampler names -> the web UI's labels (its "Karras" variants append " Karras"). */
const SAMPLER_LABELS: Readonly<Record<string, string>> = Object.freeze({
  ddpm: 'DDPM',
  ddim: 'DDIM',
  euler: 'Euler',
  euler_a: 'Euler a',
  heun: 'Heun',
  lms: 'LMS',
  dpmpp_2m: 'DPM++ 2M',
});

export function samplerLabel(sampler: string, karras: boolean): string {
  const label = SAMPLER_LABELS[sampler] ?? sampler;
  return karras ? `${label} Karras` : label;
}

/** A value that may not contain the separators of the settings line. */
function settingValue(v: string): string {
  return /[,:\n"]/.test(v) ? JSON.stringify(v) : v;
}

export function formatParameters(p: ImageParameters): string {
  const settings: [string, string | number][] = [
    ['Steps', p.steps],
    ['Sampler', samplerLabel(p.sampler, p.karras)],
    // Guidance off is the same computation as a scale of 1, which is how the web UI writes it.
    ['CFG scale', p.cfg ? p.cfgScale : 1],
    ['Seed', p.seed],
    ['Size', `${p.width}x${p.height}`],
  ];
  if (p.model !== undefined) settings.push(['Model', settingValue(p.model)]);
  if (p.strength !== null) settings.push(['Denoising strength', p.strength]);
  if (p.clipSkip > 1) settings.push(['Clip skip', p.clipSkip]);
  settings.push(...sourceSettings(p));
  if (p.mask === true) settings.push(['Mask blur', 0]);
  settings.push(...adapterSettings(p));
  const lines = [p.prompt];
  if (p.negativePrompt !== '') lines.push(`Negative prompt: ${p.negativePrompt}`);
  lines.push(settings.map(([k, v]) => `${k}: ${v}`).join(', '));
  return lines.join('\n');
}

const isSize = (hw: readonly [number, number] | undefined, p: ImageParameters) => hw === undefined || (hw[0] === p.height && hw[1] === p.width);

/** The settings that say where the random numbers and the sampler's path came from (see the header). */
function sourceSettings(p: ImageParameters): [string, string | number][] {
  const out: [string, string | number][] = [];
  if (p.noise === 'cpu') out.push(['RNG', 'CPU']);
  if (p.conventions !== undefined && p.conventions !== 'a1111') out.push(['Conventions', settingValue(p.conventions)]);
  if (p.promptSyntax !== undefined && p.promptSyntax !== 'a1111') out.push(['Prompt syntax', settingValue(p.promptSyntax)]);
  if (p.padConds === true) out.push(['Pad conds', 'True']);
  if (!isSize(p.originalSize, p)) out.push(['Original size', `${p.originalSize![1]}x${p.originalSize![0]}`]);
  if (p.cropTopLeft !== undefined && p.cropTopLeft[0] !== 0) out.push(['Crop top', p.cropTopLeft[0]]);
  if (p.cropTopLeft !== undefined && p.cropTopLeft[1] !== 0) out.push(['Crop left', p.cropTopLeft[1]]);
  if (!isSize(p.targetSize, p)) out.push(['Target size', `${p.targetSize![1]}x${p.targetSize![0]}`]);
  return out;
}

/** One ControlNet extension unit: `"Key: value, ..."` (its values never hold quotes or commas: names are plain). */
function unitSetting(u: ControlUnitParameters): string {
  const parts: [string, string | number][] = [['Module', u.module], ['Model', u.model], ['Weight', u.weight], ['Resize Mode', 'Just Resize']];
  if (u.low != null) parts.push(['Threshold A', u.low]);
  if (u.high != null) parts.push(['Threshold B', u.high]);
  parts.push(['Guidance Start', u.start], ['Guidance End', u.end]);
  return JSON.stringify(parts.map(([k, v]) => `${k}: ${String(v).replace(/[,:"]/g, '_')}`).join(', '));
}

/** `ControlNet N: "..."` for each ControlNet, then the IP-Adapter as the next unit (see the header). */
function adapterSettings(p: ImageParameters): [string, string][] {
  const units: ControlUnitParameters[] = [...(p.controlNets ?? [])];
  if (p.ipAdapter != null) units.push({ module: p.ipAdapter.module, model: p.ipAdapter.model, weight: p.ipAdapter.weight, start: 0, end: 1 });
  return units.map((u, i) => [`ControlNet ${i}`, unitSetting(u)]);
}

/** The ControlNet extension units of a parsed settings line, in order: each unit's own `Key: value` pairs. */
export function controlUnits(settings: Readonly<Record<string, string>>): Readonly<Record<string, string>>[] {
  const out: Record<string, string>[] = [];
  for (let i = 0; settings[`ControlNet ${i}`] !== undefined; i++) out.push(parseSettings(settings[`ControlNet ${i}`]));
  return out;
}

/** What a parameters text says about its random numbers, conventions, prompt syntax and cond padding, A1111's defaults when silent. */
export interface GenerationSources {
  /** `RNG: CPU` -> 'cpu'; absent, `GPU` or `NV` (A1111's CUDA-compatible generator) -> 'gpu'. */
  readonly noise: 'cpu' | 'gpu';
  readonly conventions: 'a1111' | 'diffusers';
  readonly promptSyntax: 'a1111' | 'plain';
  /** `Pad conds: True` -> true (A1111's pad_cond_uncond, its infotext name); absent -> false. */
  readonly padCondUncond: boolean;
}

export function generationSources(settings: Readonly<Record<string, string>>): GenerationSources {
  const rng = (settings.RNG ?? 'GPU').toUpperCase();
  if (!['CPU', 'GPU', 'NV'].includes(rng)) throw new RangeError(`parameters: RNG ${JSON.stringify(settings.RNG)}; expected CPU, GPU or NV`);
  const conventions = settings.Conventions ?? 'a1111';
  if (conventions !== 'a1111' && conventions !== 'diffusers') throw new RangeError(`parameters: Conventions ${JSON.stringify(conventions)}; expected a1111 or diffusers`);
  const promptSyntax = settings['Prompt syntax'] ?? 'a1111';
  if (promptSyntax !== 'a1111' && promptSyntax !== 'plain') throw new RangeError(`parameters: Prompt syntax ${JSON.stringify(promptSyntax)}; expected a1111 or plain`);
  const padConds = settings['Pad conds'] ?? 'False';
  if (!/^(true|false)$/i.test(padConds)) throw new RangeError(`parameters: Pad conds ${JSON.stringify(padConds)}; expected True or False`);
  return { noise: rng === 'CPU' ? 'cpu' : 'gpu', conventions, promptSyntax, padCondUncond: padConds.toLowerCase() === 'true' };
}

export interface ParsedParameters {
  readonly prompt: string;
  readonly negativePrompt: string;
  /** The settings line as written, e.g. {Steps: '20', Sampler: 'Euler a', ...}. */
  readonly settings: Readonly<Record<string, string>>;
}

/** `Key: value` pairs of a settings line; a value in double quotes may hold commas. */
function parseSettings(line: string): Record<string, string> {
  const out: Record<string, string> = {};
  const re = /\s*([^:,]+):\s*("(?:\\.|[^\\"])*"|[^,]*)\s*(?:,|$)/g;
  for (const m of line.matchAll(re)) {
    const value = m[2].startsWith('"') ? (JSON.parse(m[2]) as string) : m[2].trim();
    out[m[1].trim()] = value;
  }
  return out;
}

/** The inverse of formatParameters (also reads the web UI's own files: the last line is the settings). */
export function parseParameters(text: string): ParsedParameters {
  const lines = text.split('\n');
  const settingsLine = lines.length > 1 && /^Steps: /.test(lines[lines.length - 1]) ? lines.pop()! : '';
  const neg = lines.findIndex((l) => l.startsWith('Negative prompt: '));
  const prompt = (neg < 0 ? lines : lines.slice(0, neg)).join('\n');
  const negativePrompt = neg < 0 ? '' : lines.slice(neg).join('\n').slice('Negative prompt: '.length);
  return { prompt, negativePrompt, settings: parseSettings(settingsLine) };
}
