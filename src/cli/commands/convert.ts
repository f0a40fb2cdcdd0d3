/** `sd convert IN OUT [--half] [--force]`: any supported weights -> one safetensors file with the original key names. */
import type { CommandModule } from 'yargs';
import { convertWeights } from '../../weights/convert.js';

interface Args {
  input: string;
  output: string;
  half?: boolean;
  force?: boolean;
}

export const convertCommand: CommandModule<object, Args> = {
  command: 'convert <input> <output>',
  describe: 'convert a .ckpt, .safetensors or diffusers folder to one .safetensors file (original SD key names)',
  builder: (y) =>
    y
      .positional('input', { type: 'string', demandOption: true, describe: 'weight file or diffusers folder' })
      .positional('output', { type: 'string', demandOption: true, describe: '.safetensors file to write' })
      .option('half', { type: 'boolean', default: false, describe: 'store floating-point tensors as fp16 (half the size)' })
      .option('force', { type: 'boolean', default: false, describe: 'replace OUTPUT if it exists' }) as never,
  handler: (args) => {
    const tty = process.stderr.isTTY === true;
    let shown = -1;
    const result = convertWeights(args.input, args.output, {
      half: args.half,
      force: args.force,
      onTensor: (_name, done, total) => {
        const pct = Math.floor((100 * done) / total);
        if (tty && pct !== shown) process.stderr.write(`\rconverting: ${pct}%`);
        shown = pct;
      },
    });
    if (tty) process.stderr.write('\n');
    const mb = (result.bytes / 1e6).toFixed(1);
    process.stdout.write(`wrote ${args.output}: ${result.tensors} tensors, ${mb} MB${args.half === true ? ' (fp16)' : ''}\n`);
  },
};
