/** `sd random-weights --out FILE [--half] [--config FILE] [--seed N]`: a full-size checkpoint of random weights. */
import type { CommandModule } from 'yargs';
import { existsSync } from 'node:fs';
import { sd15Shapes } from '../../pipeline/shapes.js';
import { writeRandomCheckpoint } from '../../weights/random.js';
import { UsageError } from '../errors.js';
import { ProgressBar } from '../progress.js';

interface Args {
  out: string;
  half: boolean;
  seed: number;
  force: boolean;
}

export const randomWeightsCommand: CommandModule<object, Args> = {
  command: 'random-weights',
  describe: 'write a full-size SD 1.5 checkpoint of random weights (original key names) for memory and speed tests',
  builder: (y) =>
    y
      .option('out', { type: 'string', demandOption: true, describe: 'the .safetensors file to write' })
      .option('half', { type: 'boolean', default: false, describe: 'store fp16 instead of fp32' })
      .option('seed', { type: 'number', default: 0 })
      .option('force', { type: 'boolean', default: false, describe: 'overwrite OUT if it exists' }) as never,
  handler: (args) => {
    if (existsSync(args.out) && !args.force) throw new UsageError(`${args.out} exists: pass --force to overwrite it`);
    const shapes = sd15Shapes();
    const bar = new ProgressBar('random weights (tensors)', shapes.size);
    writeRandomCheckpoint(args.out, shapes, { half: args.half, seed: args.seed, onTensor: (done) => bar.update(done) });
    bar.finish();
    const params = [...shapes.values()].reduce((a, s) => a + s.reduce((x, d) => x * d, 1), 0);
    process.stdout.write(`${args.out}: ${shapes.size} tensors, ${(params / 1e6).toFixed(1)} M parameters, ${args.half ? 'fp16' : 'fp32'}\n`);
  },
};
