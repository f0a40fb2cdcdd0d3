/**
 * The `parameters` text that AUTOMATIC1111's web UI stores in its PNGs, so tools that read those (the web UI's
 * "PNG Info", image browsers) show how an image was made:
 *
 *   a botanical illustration of a fern
 *   Negative prompt: blurry
 *   Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: v1-5-pruned-emaonly
 *
 * The negative-prompt line is left out when it is empty; settings are `Key: value` pairs joined by ", ".
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
  const lines = [p.prompt];
  if (p.negativePrompt !== '') lines.push(`Negative prompt: ${p.negativePrompt}`);
  lines.push(settings.map(([k, v]) => `${k}: ${v}`).join(', '));
  return lines.join('\n');
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
