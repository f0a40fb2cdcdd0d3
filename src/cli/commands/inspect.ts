/** `sd inspect PATH [--summary]`: list the tensors of a weight file or diffusers folder, its format and layout. */
import type { CommandModule } from 'yargs';
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
      process.stdout.write(formatSummary(args.path, summarizeWeights(src), !(args.summary ?? false)));
    } finally {
      src.close();
    }
  },
};

const count = (n: number) => n.toLocaleString('en-US');

export function formatSummary(path: string, s: WeightsSummary, withTensors: boolean): string {
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
    `layout:     ${s.layout}${s.layout === 'diffusers' && s.format === 'diffusers-folder' ? ' (shown under the original single-file names)' : ''}`,
    `tensors:    ${s.tensors.length} (${dtypes})`,
    `parameters: ${count(s.parameters)} (unet ${count(s.numelByPart.unet)}, vae ${count(s.numelByPart.vae)}, text encoder ${count(s.numelByPart.text_encoder)})`,
    `other:      ${count(s.numelByPart.other)} values outside the three networks (e.g. alphas_cumprod, model_ema.*)`,
  );
  return lines.join('\n') + '\n';
}
