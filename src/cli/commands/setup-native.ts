/**
 * `sd setup-native [--from PATH] [--gpu] [--force]`: the native `tensorflow` backend from a TensorFlow wheel, and the
 * native kernels that speed it up (src/setup/kernels.ts).
 */
import type { CommandModule } from 'yargs';
import { buildKernels } from '../../setup/kernels.js';
import { defaultRoot, setupNative } from '../../setup/native.js';

interface Args {
  from?: string;
  gpu: boolean;
  force: boolean;
}

const MB = 1024 * 1024;

export const setupNativeCommand: CommandModule<object, Args> = {
  command: 'setup-native',
  describe: 'make the native tensorflow backend available (tfjs-node with libtensorflow from a TensorFlow wheel, no download by tfjs-node)',
  builder: (y) =>
    y
      .option('from', { type: 'string', describe: 'a TensorFlow wheel (.whl), an unpacked wheel, or an installed tensorflow package folder' })
      .option('gpu', { type: 'boolean', default: false, describe: 'set up @tensorflow/tfjs-node-gpu from the CUDA-enabled tensorflow wheel' })
      .option('force', { type: 'boolean', default: false, describe: 'rebuild even if the package already loads' }) as never,
  handler: async (args) => {
    const t0 = Date.now();
    const log = (line: string) => process.stdout.write(`[${((Date.now() - t0) / 1000).toFixed(1).padStart(5)} s] ${line}\n`);
    const r = await setupNative({ from: args.from, gpu: args.gpu, force: args.force, root: defaultRoot(), log });
    const what = r.source === null ? 'nothing to do' : `set up from ${r.source}`;
    log(`${r.package}: ${what}; ${r.seconds.toFixed(1)} s, ${(r.bytes / MB).toFixed(0)} MB in ${r.dir}/{deps,lib}`);
    const k = await buildKernels(defaultRoot());
    log(`native kernels built in ${k.seconds.toFixed(1)} s: ${k.path}${k.usable ? '' : ' (this CPU lacks AVX2/FMA: they stay unused)'}`);
  },
};
