/** `sd download [--to weights/] [--mirror URL] [--only NAME]`: fetch the SD 1.5 checkpoint and tokenizer. */
import type { CommandModule } from 'yargs';
import { SD15_FILES, downloadItem, type DownloadItem } from '../../weights/download.js';
import { UsageError } from '../errors.js';
import { ProgressBar } from '../progress.js';

interface Args {
  to: string;
  mirror?: string;
  only?: string[];
}

/** With --mirror, every file is fetched from MIRROR/NAME instead of its public address (same sha256 check). */
export function planDownloads(mirror: string | undefined, only: readonly string[] | undefined): DownloadItem[] {
  const names = SD15_FILES.map((f) => f.name);
  for (const n of only ?? []) {
    if (!names.includes(n)) throw new UsageError(`--only ${n}: not a file sd download knows (${names.join(', ')})`);
  }
  return SD15_FILES.filter((f) => only === undefined || only.includes(f.name)).map((f) =>
    mirror === undefined ? f : { ...f, url: `${mirror.replace(/\/+$/, '')}/${f.name}` },
  );
}

export const downloadCommand: CommandModule<object, Args> = {
  command: 'download',
  describe: 'download the SD 1.5 checkpoint and the CLIP tokenizer (resumable, sha256-checked)',
  builder: (y) =>
    y
      .option('to', { type: 'string', default: 'weights', describe: 'target folder' })
      .option('mirror', { type: 'string', describe: 'fetch every file from MIRROR/<name> instead' })
      .option('only', { type: 'string', array: true, describe: 'only these file names' }) as never,
  handler: async (args) => {
    for (const item of planDownloads(args.mirror, args.only)) {
      // The bar counts megabytes.
      const bar = new ProgressBar(`${item.name} (MB)`, Math.ceil(item.bytes / 1e6));
      try {
        const path = await downloadItem(item, args.to, { onProgress: (p) => bar.update(Math.floor(p.done / 1e6)) });
        bar.finish();
        process.stdout.write(`${path}: sha256 ok\n`);
      } finally {
        bar.finish();
      }
    }
  },
};
