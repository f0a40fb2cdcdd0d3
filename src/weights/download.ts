/**
 * Fetching the SD 1.5 checkpoint and the CLIP tokenizer from their public addresses: resumable (a `.part` file
 * and an HTTP Range request), verified (sha256 of the whole file before it takes its final name), atomic (rename).
 */
import { createHash } from 'node:crypto';
import { createReadStream, existsSync, mkdirSync, renameSync, rmSync, statSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { join } from 'node:path';

export interface DownloadItem {
  /** File name in the target folder. */
  readonly name: string;
  readonly url: string;
  readonly sha256: string;
  readonly bytes: number;
}

/** What `sd download` fetches: the EMA-only SD 1.5 checkpoint (fp32 weights of the UNet, VAE, text encoder) and the tokenizer. */
export const SD15_FILES: readonly DownloadItem[] = Object.freeze([
  {
    name: 'v1-5-pruned-emaonly.safetensors',
    url: 'https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/v1-5-pruned-emaonly.safetensors',
    sha256: '6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa',
    bytes: 4_265_146_304,
  },
  {
    name: 'bpe_simple_vocab_16e6.txt.gz',
    url: 'https://github.com/openai/CLIP/raw/main/clip/bpe_simple_vocab_16e6.txt.gz',
    sha256: '924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a',
    bytes: 1_356_917,
  },
]);

export class DownloadError extends Error {
  override name = 'DownloadError';
}

export interface DownloadProgress {
  readonly name: string;
  readonly done: number;
  readonly total: number;
}

export interface DownloadOptions {
  readonly onProgress?: (p: DownloadProgress) => void;
  readonly signal?: AbortSignal;
}

async function sha256OfFile(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/**
 * Download one item into `dir`. An existing file with the right hash is kept; a `.part` file is resumed.
 * Returns the final path.
 */
export async function downloadItem(item: DownloadItem, dir: string, opts: DownloadOptions = {}): Promise<string> {
  mkdirSync(dir, { recursive: true });
  const target = join(dir, item.name);
  const part = `${target}.part`;
  if (existsSync(target)) {
    if ((await sha256OfFile(target)) === item.sha256) return target;
    throw new DownloadError(`${target} exists but its sha256 differs from ${item.url}'s: move it away and run again`);
  }
  let have = existsSync(part) ? statSync(part).size : 0;
  let response: Response;
  try {
    response = await fetch(item.url, {
      headers: have > 0 ? { Range: `bytes=${have}-` } : {},
      redirect: 'follow',
      signal: opts.signal,
    });
  } catch (e) {
    const cause = e instanceof Error && e.cause instanceof Error ? e.cause.message : String(e);
    throw new DownloadError(
      `cannot reach ${new URL(item.url).host} (${cause}): check the network, or fetch ${item.url} by hand into ${dir}/`,
    );
  }
  if (response.status === 416 && have > 0) {
    // The .part is already complete (or longer than the file): verify it below as it is.
    await response.body?.cancel();
  } else if (response.status === 200 || response.status === 206) {
    if (response.status === 200 && have > 0) have = 0; // the server ignored the Range: start over
    const total = Number(response.headers.get('content-length') ?? NaN) + have;
    const file = await open(part, have > 0 ? 'a' : 'w');
    try {
      let done = have;
      if (response.body === null) throw new DownloadError(`${item.url}: empty response`);
      for await (const chunk of response.body as unknown as AsyncIterable<Uint8Array>) {
        await file.write(chunk);
        done += chunk.byteLength;
        opts.onProgress?.({ name: item.name, done, total: Number.isFinite(total) ? total : item.bytes });
      }
    } finally {
      await file.close();
    }
  } else {
    await response.body?.cancel();
    throw new DownloadError(`${item.url}: HTTP ${response.status} ${response.statusText}`);
  }
  const got = await sha256OfFile(part);
  if (got !== item.sha256) {
    rmSync(part, { force: true });
    throw new DownloadError(`${item.name}: sha256 ${got} does not match the expected ${item.sha256}; the partial file was removed, run again`);
  }
  renameSync(part, target);
  return target;
}
