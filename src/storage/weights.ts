/**
 * Weights from `s3://bucket/key` or `https://...` into a local cache, once per machine: a cold start is one download,
 * every later start a file read. The download goes to `<name>.part`; an interrupted one resumes where it stopped
 * (an HTTP Range request, S3's Range too); the file's sha256 is computed as it arrives (the part already on disk
 * first) and checked against the expected one when given (`#sha256=<hex>` at the end of the URL, or `sha256`),
 * then the part is renamed to its name and the digest written beside it (`<name>.sha256`). A local path is returned
 * as it is. One file per URL (a .safetensors or .ckpt); a diffusers folder is not fetched this way.
 */
import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream, existsSync } from 'node:fs';
import { mkdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import * as path from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { GetObjectCommand } from '@aws-sdk/client-s3';
import { parseS3Url, s3Client, type S3Settings } from './s3.js';

export interface FetchWeightsOptions {
  /** Default: SD_WEIGHTS_CACHE, else ~/.cache/sd-tfjs/weights. */
  readonly cacheDir?: string;
  /** Expected sha256 (hex); the URL's `#sha256=` fragment is used when absent. */
  readonly sha256?: string;
  readonly s3?: S3Settings;
  /** Called as bytes arrive (at most every 1%), total null when the server does not say. */
  readonly onProgress?: (received: number, total: number | null) => void;
}

export class WeightsFetchError extends Error {
  override name = 'WeightsFetchError';
}

export const isRemoteWeights = (spec: string): boolean => /^(s3|https?):\/\//.test(spec);

export function defaultCacheDir(): string {
  return process.env.SD_WEIGHTS_CACHE || path.join(process.env.HOME ?? '.', '.cache', 'sd-tfjs', 'weights');
}

/** The local file of `spec`: itself when it is a path, else the cached download (fetched first when missing). */
export async function fetchWeights(spec: string, o: FetchWeightsOptions = {}): Promise<string> {
  if (!isRemoteWeights(spec)) return spec;
  const [url, fragment = ''] = spec.split('#', 2);
  const expected = (o.sha256 ?? /^sha256=([0-9a-fA-F]{64})$/.exec(fragment)?.[1] ?? null)?.toLowerCase() ?? null;
  const dir = o.cacheDir ?? defaultCacheDir();
  await mkdir(dir, { recursive: true });
  const name = `${createHash('sha256').update(url).digest('hex').slice(0, 16)}-${path.basename(new URL(url).pathname) || 'weights'}`;
  const file = path.join(dir, name);
  if (existsSync(file)) {
    const digest = (await readFile(`${file}.sha256`, 'utf8').catch(() => '')).trim();
    if (expected === null || digest === expected) return file;
    await rm(file, { force: true }); // a cached file of another version: fetch again
  }
  const part = `${file}.part`;
  const hash = createHash('sha256');
  const have = existsSync(part) ? (await stat(part)).size : 0;
  if (have > 0) for await (const chunk of createReadStream(part)) hash.update(chunk as Buffer);
  const body = await open(url, have, o.s3 ?? {});
  if (have > 0 && !body.resumed) {
    body.stream.destroy(); // the server ignored the Range and sends the whole file: start over
    return fetchFresh(spec, o, part);
  }
  await receive(body, part, have, hash, o.onProgress);
  const digest = hash.digest('hex');
  if (expected !== null && digest !== expected) {
    await rm(part, { force: true });
    throw new WeightsFetchError(`${url}: sha256 ${digest} is not the expected ${expected}; the download was removed, check the URL or the digest`);
  }
  await rename(part, file);
  await writeFile(`${file}.sha256`, `${digest}\n`);
  return file;
}

async function fetchFresh(spec: string, o: FetchWeightsOptions, part: string): Promise<string> {
  await rm(part, { force: true });
  return fetchWeights(spec, o);
}

interface Body {
  readonly stream: Readable;
  /** Bytes of the whole file, when known. */
  readonly total: number | null;
  /** Whether the body starts at the requested offset (206) rather than at 0. */
  readonly resumed: boolean;
}

async function open(url: string, from: number, s3: S3Settings): Promise<Body> {
  const range = from > 0 ? `bytes=${from}-` : undefined;
  if (url.startsWith('s3://')) {
    const where = parseS3Url(url, '--weights');
    const key = where.prefix.replace(/\/$/, '');
    if (key === '') throw new WeightsFetchError(`--weights: ${url} names a bucket, not a file: expected s3://BUCKET/KEY`);
    const r = await s3Client(s3).send(new GetObjectCommand({ Bucket: where.bucket, Key: key, Range: range })).catch((e: unknown) => {
      throw new WeightsFetchError(`${url}: ${(e as Error).message}`);
    });
    const total = r.ContentRange !== undefined ? Number(r.ContentRange.split('/')[1]) : (r.ContentLength ?? null);
    return { stream: r.Body as Readable, total: Number.isFinite(total) ? total : null, resumed: from > 0 && r.ContentRange !== undefined };
  }
  const res = await fetch(url, { headers: range !== undefined ? { range } : {} }).catch((e: unknown) => {
    throw new WeightsFetchError(`${url}: ${(e as Error).message}`);
  });
  if (res.status !== 200 && res.status !== 206) throw new WeightsFetchError(`${url}: HTTP ${res.status} ${res.statusText}`);
  if (res.body === null) throw new WeightsFetchError(`${url}: empty response`);
  const resumed = res.status === 206;
  const length = Number(res.headers.get('content-length') ?? NaN);
  const total = resumed ? Number(res.headers.get('content-range')?.split('/')[1] ?? NaN) : length;
  return { stream: Readable.fromWeb(res.body as import('node:stream/web').ReadableStream), total: Number.isFinite(total) ? total : null, resumed };
}

async function receive(body: Body, part: string, have: number, hash: ReturnType<typeof createHash>, onProgress?: FetchWeightsOptions['onProgress']): Promise<void> {
  let received = have;
  let reported = -1;
  const out = createWriteStream(part, { flags: have > 0 ? 'a' : 'w' });
  body.stream.on('data', (chunk: Buffer) => {
    hash.update(chunk);
    received += chunk.length;
    const pct = body.total !== null ? Math.floor((received / body.total) * 100) : Math.floor(received / 2 ** 20);
    if (pct !== reported) {
      reported = pct;
      onProgress?.(received, body.total);
    }
  });
  await pipeline(body.stream, out);
  if (body.total !== null && received !== body.total) {
    throw new WeightsFetchError(`download cut short at ${received} of ${body.total} bytes; run again to resume`);
  }
}
