/**
 * `sd inspect PATH [--summary]`: list the tensors of a weight file or diffusers folder, its format, layout, model
 * family (pipeline/families.ts: SD 1.x, SDXL base, or what it is and that it is not supported) and parameters per
 * network.
 */
import type { CommandModule } from 'yargs';
import { ConfigError } from '../../nn/errors.js';
import { detectFamily, type ModelFamily } from '../../pipeline/families.js';
import { openWeights } from '../../weights/open.js';
import { summarizeWeights, type WeightsSummary } from '../../weights/inspect.js';
import { printable } from '../../weights/printable.js';

interface Args {
  path: string;
  summary?: boolean;
}

export const inspectCommand: CommandModule<object, Args> = {
  command: 'inspect <path>',
  describe: 'list the tensors of a .safetensors / .ckpt file or diffusers folder (name, dtype, shape), its format and parameter count',
  builder: (y) =>
    y
      .positional('path', { type: 'string', demandOption: true, describe: 'weight file or diffusers folder' })
      .option('summary', { type: 'boolean', default: false, describe: 'only the totals, not one line per tensor' }) as never,
  handler: (args) => {
    const src = openWeights(args.path);
    try {
      const summary = summarizeWeights(src);
      process.stdout.write(formatSummary(args.path, summary, !(args.summary ?? false), familyOf(src, summary)));
    } finally {
      src.close();
    }
  },
};

const count = (n: number) => n.toLocaleString('en-US');

const LAYOUT_NAMES: Readonly<Record<WeightsSummary['layout'], string>> = {
  'sd1-original': 'original single file (CompVis / sgm names)',
  diffusers: 'diffusers',
  unknown: 'unknown',
};

const FAMILY_NAMES: Readonly<Record<ModelFamily, string>> = { sd1: 'SD 1.x', sdxl: 'SDXL base' };

/**
 * The family line: detectFamily's answer, its refusal (a checkpoint of a family the engine does not run), or
 * none for a file with no UNet or text encoder under the original names (a LoRA, a single diffusers component).
 */
export function familyOf(src: Parameters<typeof detectFamily>[0], s: WeightsSummary): string {
  try {
    const family = FAMILY_NAMES[detectFamily(src)];
    if (s.numelByPart.unet + s.numelByPart.text_encoder + s.numelByPart.text_encoder_2 > 0) return family;
    return 'none recognised (no UNet or text encoder under the original single-file names)';
  } catch (e) {
    if (e instanceof ConfigError) return `not supported: ${e.message.slice(src.path.length + 2)}`;
    throw e;
  }
}

/** Parameters of each network the file has, SDXL's two text encoders apart. */
function networks(s: WeightsSummary): string {
  const p = s.numelByPart;
  const parts: [string, number][] = [['unet', p.unet], ['vae', p.vae]];
  if (p.text_encoder_2 > 0) parts.push(['text encoder 1', p.text_encoder], ['text encoder 2', p.text_encoder_2]);
  else parts.push(['text encoder', p.text_encoder]);
  return parts.map(([name, n]) => `${name} ${count(n)}`).join(', ');
}

export function formatSummary(path: string, s: WeightsSummary, withTensors: boolean, family?: string): string {
  const lines: string[] = [];
  if (withTensors) {
    // Names come from the file: escaped, so none can move the cursor or reverse the text after it.
    const names = s.tensors.map((t) => printable(t.name));
    const width = names.reduce((w, n) => Math.max(w, n.length), 0); // a loop: a file may hold more names than a call takes arguments
    s.tensors.forEach((t, i) => lines.push(`${names[i].padEnd(width)}  ${t.dtype.padEnd(4)}  [${t.shape.join(', ')}]`));
    lines.push('');
  }
  const dtypes = Object.entries(s.dtypes).map(([d, n]) => `${n} ${d}`).join(', ');
  lines.push(
    `file:       ${printable(path)}`,
    `format:     ${s.format}`,
    `layout:     ${LAYOUT_NAMES[s.layout]}${s.layout === 'diffusers' && s.format === 'diffusers-folder' ? ' (shown under the original single-file names)' : ''}`,
    ...(family === undefined ? [] : [`family:     ${family}`]),
    `tensors:    ${s.tensors.length} (${dtypes})`,
    `parameters: ${count(s.parameters)} (${networks(s)})`,
    `other:      ${count(s.numelByPart.other)} values outside the networks (e.g. alphas_cumprod, model_ema.*, position_ids)`,
  );
  return lines.join('\n') + '\n';
}
