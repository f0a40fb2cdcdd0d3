/**
 * src/storage against a real S3 protocol server (s3rver, tests/queue-services.ts) and a real HTTP server: outputs
 * read back byte-identical, a taken uid refused by the conditional PUT (409) with nothing half stored, the folder
 * store's same contract; weights fetched from s3:// and https:// into the cache, resumed from a partial download
 * with a Range request (only the missing bytes sent), checked against their sha256, and a wrong digest refused.
 */
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { PutObjectCommand } from '@aws-sdk/client-s3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HttpError } from '../src/server/errors.js';
import { openOutputs } from '../src/storage/outputs.js';
import { fetchWeights, WeightsFetchError } from '../src/storage/weights.js';
import { S3_CREDENTIALS, TestS3 } from './queue-services.js';

let s3: TestS3;
const saved: Record<string, string | undefined> = {};

beforeAll(async () => {
  for (const [k, v] of Object.entries(S3_CREDENTIALS)) {
    saved[k] = process.env[k];
    process.env[k] = v;
  }
  s3 = await TestS3.start();
}, 30_000);

afterAll(async () => {
  await s3?.close();
  for (const [k, v] of Object.entries(saved)) {
    if (v === undefined) delete process.env[k];
    else process.env[k] = v;
  }
});

const png = (n: number): Buffer => Buffer.concat([Buffer.from([0x89, 0x50, 0x4e, 0x47]), randomBytes(n)]);

describe('outputs in S3', () => {
  it('stores the png and its json, reads them back byte-identical, and refuses the uid a second time with 409', async () => {
    const out = await openOutputs(`s3://${s3.bucket}/run1`, { endpoint: s3.endpoint });
    expect(out.location).toBe(`s3://${s3.bucket}/run1/`);
    const bytes = png(5000);
    expect(await out.exists('a1')).toBe(false);
    await out.save('a1', bytes, { uid: 'a1', seed: 7 });
    expect(await out.exists('a1')).toBe(true);
    expect(Buffer.compare((await out.read('a1', 'png')) as Buffer, bytes)).toBe(0);
    expect(JSON.parse(((await out.read('a1', 'json')) as Buffer).toString('utf8'))).toEqual({ uid: 'a1', seed: 7 });
    const again = await out.save('a1', png(10), { uid: 'a1', seed: 8 }).catch((e: unknown) => e);
    expect(again).toBeInstanceOf(HttpError);
    expect((again as HttpError).statusCode).toBe(409);
    expect(Buffer.compare((await out.read('a1', 'png')) as Buffer, bytes)).toBe(0); // not overwritten
    expect(await s3.keys('run1/')).toEqual(['run1/a1.json', 'run1/a1.png']);
  });

  it('a png whose key is taken after its json was stored: the json is removed again, the other png kept', async () => {
    const out = await openOutputs(`s3://${s3.bucket}/run2/`, { endpoint: s3.endpoint });
    const theirs = png(300);
    await s3.client().send(new PutObjectCommand({ Bucket: s3.bucket, Key: 'run2/b1.png', Body: theirs }));
    const e = await out.save('b1', png(300), { uid: 'b1' }).catch((x: unknown) => x);
    expect((e as HttpError).statusCode).toBe(409);
    expect(await s3.keys('run2/')).toEqual(['run2/b1.png']);
    expect(Buffer.compare((await out.read('b1', 'png')) as Buffer, theirs)).toBe(0);
    expect(await out.read('b1', 'json')).toBeNull();
  });

  it('refuses an s3 URL that is not one, saying what is expected', async () => {
    await expect(openOutputs('s3://A_/x')).rejects.toThrow(/expected s3:\/\/BUCKET/);
  });
});

describe('outputs in a folder', () => {
  it('the same contract: exists, read back, 409 for a taken uid', async () => {
    const dir = mkdtempSync(path.join(tmpdir(), 'sd-outputs-'));
    const out = await openOutputs(dir);
    const bytes = png(100);
    await out.save('c1', bytes, { uid: 'c1' });
    expect(await out.exists('c1')).toBe(true);
    expect(Buffer.compare((await out.read('c1', 'png')) as Buffer, bytes)).toBe(0);
    expect(((await out.save('c1', bytes, {}).catch((e: unknown) => e)) as HttpError).statusCode).toBe(409);
  });
});

describe('weights into the cache', () => {
  const file = randomBytes(300_000);
  const digest = createHash('sha256').update(file).digest('hex');
  let http: Server;
  let base = '';
  const ranges: string[] = [];

  beforeAll(async () => {
    await s3.client().send(new PutObjectCommand({ Bucket: s3.bucket, Key: 'models/tiny.safetensors', Body: file }));
    http = createServer((req, res) => {
      const range = req.headers.range;
      ranges.push(range ?? '');
      const m = /^bytes=(\d+)-$/.exec(range ?? '');
      if (m !== null) {
        const from = Number(m[1]);
        res.writeHead(206, { 'content-length': file.length - from, 'content-range': `bytes ${from}-${file.length - 1}/${file.length}` });
        res.end(file.subarray(from));
      } else {
        res.writeHead(200, { 'content-length': file.length });
        res.end(file);
      }
    });
    await new Promise<void>((r) => http.listen(0, '127.0.0.1', () => r()));
    base = `http://127.0.0.1:${(http.address() as { port: number }).port}`;
  });

  afterAll(() => new Promise<void>((r) => http.close(() => r())));

  it('s3://: downloaded once with progress, the digest written beside it; the second call is a cache hit', async () => {
    const cacheDir = mkdtempSync(path.join(tmpdir(), 'sd-cache-'));
    const progress: number[] = [];
    const got = await fetchWeights(`s3://${s3.bucket}/models/tiny.safetensors`, { cacheDir, sha256: digest, s3: { endpoint: s3.endpoint }, onProgress: (n) => progress.push(n) });
    expect(Buffer.compare(readFileSync(got), file)).toBe(0);
    expect(readFileSync(`${got}.sha256`, 'utf8').trim()).toBe(digest);
    expect(progress.at(-1)).toBe(file.length);
    const again = await fetchWeights(`s3://${s3.bucket}/models/tiny.safetensors`, { cacheDir, sha256: digest, s3: { endpoint: s3.endpoint }, onProgress: () => expect.unreachable() });
    expect(again).toBe(got);
  });

  it('s3://: resumes a partial download from where it stopped', async () => {
    const cacheDir = mkdtempSync(path.join(tmpdir(), 'sd-cache-'));
    const url = `s3://${s3.bucket}/models/tiny.safetensors`;
    const first = await fetchWeights(url, { cacheDir, s3: { endpoint: s3.endpoint } });
    // make it partial: the first 100 kB as the .part, the finished file gone
    writeFileSync(`${first}.part`, file.subarray(0, 100_000));
    rmSync(first);
    const seen: number[] = [];
    const got = await fetchWeights(`${url}#sha256=${digest}`, { cacheDir, s3: { endpoint: s3.endpoint }, onProgress: (n) => seen.push(n) });
    expect(Buffer.compare(readFileSync(got), file)).toBe(0);
    expect(Math.min(...seen)).toBeGreaterThan(100_000); // the first bytes were not fetched again
  });

  it('https://: a resumed download sends a Range request; a wrong sha256 is refused and nothing is kept', async () => {
    const cacheDir = mkdtempSync(path.join(tmpdir(), 'sd-cache-'));
    const url = `${base}/m/tiny.safetensors`;
    const done = await fetchWeights(url, { cacheDir });
    expect(Buffer.compare(readFileSync(done), file)).toBe(0);
    rmSync(done);
    writeFileSync(`${done}.part`, file.subarray(0, 1234));
    ranges.length = 0;
    const resumed = await fetchWeights(url, { cacheDir, sha256: digest });
    expect(ranges).toEqual(['bytes=1234-']);
    expect(Buffer.compare(readFileSync(resumed), file)).toBe(0);

    const other = mkdtempSync(path.join(tmpdir(), 'sd-cache-'));
    const wrong = await fetchWeights(url, { cacheDir: other, sha256: '0'.repeat(64) }).catch((e: unknown) => e);
    expect(wrong).toBeInstanceOf(WeightsFetchError);
    expect((wrong as Error).message).toMatch(/sha256 .* is not the expected 0{64}/);
    expect(existsSync(done.replace(cacheDir, other))).toBe(false);
    expect(existsSync(`${done.replace(cacheDir, other)}.part`)).toBe(false);
  });
});
