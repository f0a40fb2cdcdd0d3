/**
 * The `sd` command. Each subcommand lives in ./commands/<name>.ts and exports a yargs CommandModule;
 * this file only lists them. Errors the user can fix print one line and exit 1; bugs print a stack.
 */
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { isUserError } from './errors.js';
import { cannyCommand } from './commands/canny.js';
import { convertCommand } from './commands/convert.js';
import { downloadCommand } from './commands/download.js';
import { generateCommand } from './commands/generate.js';
import { infoCommand } from './commands/info.js';
import { inspectCommand } from './commands/inspect.js';
import { parityCommand } from './commands/parity.js';
import { randomWeightsCommand } from './commands/random-weights.js';
import { serveCommand } from './commands/serve.js';
import { setupNativeCommand } from './commands/setup-native.js';
import { workerCommand } from './commands/worker.js';

export async function main(argv: string[] = hideBin(process.argv)): Promise<void> {
  try {
    await yargs(argv)
      .scriptName('sd')
      .command(generateCommand)
      .command(serveCommand)
      .command(workerCommand)
      .command(inspectCommand)
      .command(convertCommand)
      .command(downloadCommand)
      .command(infoCommand)
      .command(setupNativeCommand)
      .command(randomWeightsCommand)
      .command(parityCommand)
      .command(cannyCommand)
      .demandCommand(1, 'name a command; `sd --help` lists them')
      .strict()
      .fail((msg, err, y) => {
        if (err) throw err;
        process.stderr.write(`${y.help() && ''}${msg}\n`);
        process.exit(2);
      })
      .help()
      .parseAsync();
  } catch (e) {
    if (isUserError(e)) {
      process.stderr.write(`sd: ${(e as Error).message}\n`);
      process.exit(1);
    }
    throw e;
  }
}
