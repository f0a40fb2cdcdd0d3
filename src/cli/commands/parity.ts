/** `sd parity DIR [--backend B] [--kind K ...]`: compare the engine against reference fixtures. */
import type { CommandModule } from 'yargs';
import { BACKENDS, initBackend, type BackendName } from '../../backend/select.js';
import { formatResult, runParity, summary } from '../../parity/runner.js';

interface Args {
  dir: string;
  backend?: BackendName;
  kind?: string[];
}

export const parityCommand: CommandModule<object, Args> = {
  command: 'parity [dir]',
  describe: 'run reference fixtures (tokenizer, weights, rng, samplers, models, pipeline) and report errors',
  builder: (y) =>
    y
      .positional('dir', { type: 'string', default: 'tests/fixtures', describe: 'a fixtures folder (e.g. ../shared/fixtures)' })
      .option('backend', { choices: BACKENDS, describe: 'TensorFlow.js backend (default: the best available)' })
      .option('kind', { type: 'string', array: true, describe: 'only these fixture kinds' }) as never,
  handler: async (args) => {
    const choice = await initBackend({ backend: args.backend });
    const results = await runParity(args.dir, {
      backend: choice.name,
      kinds: args.kind,
      onResult: (r) => process.stdout.write(formatResult(r) + '\n'),
    });
    process.stdout.write(summary(results) + '\n');
    if (results.some((r) => !r.passed) || results.length === 0) process.exitCode = 1;
  },
};
