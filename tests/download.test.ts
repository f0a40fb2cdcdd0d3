import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DownloadError, downloadItem, type DownloadItem } from '../src/weights/download.js';
import { planDownloads } from '../src/cli/commands/download.js';

const body = Buffer.from(Array.from({ length: 300_000 }, (_, i) => (i * 7919) % 251));
const sha = createHash('sha256').update(body).digest('hex');
const ranges: (string | undefined)[] = [];
let server: Server;
let base: string;

beforeAll(async () => {
  server = createServer((req, res) => {
    ranges.push(req.headers.range);
    if (req.url === '/missing') {
      res.writeHead(404).end();
      return;
    }
    const m = /^bytes=(\d+)-$/.exec(req.headers.range ?? '');
    if (m !== null) {
      const from = Number(m[1]);
      if (from >= body.length) {
        res.writeHead(416).end();
        return;
      }
      res.writeHead(206, { 'content-length': body.length - from, 'content-range': `bytes ${from}-${body.length - 1}/${body.length}` });
      res.end(body.subarray(from));
      return;
    }
    res.writeHead(200, { 'content-length': body.length }).end(body);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});
afterAll(() => server.close());

const item = (over: Partial<DownloadItem> = {}): DownloadItem => ({ name: 'model.bin', url: `${base}/model.bin`, sha256: sha, bytes: body.length, ...over });

describe('sd download', () => {
  it('downloads, verifies and names the file only when complete', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'sd-dl-'));
    const seen: number[] = [];
    const path = await downloadItem(item(), dir, { onProgress: (p) => seen.push(p.done) });
    expect(readFileSync(path).equals(body)).toBe(true);
    expect(seen.at(-1)).toBe(body.length);
    expect(existsSync(`${path}.part`)).toBe(false);
  });

  it('resumes a partial download with a Range request', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'sd-dl-'));
    writeFileSync(join(dir, 'model.bin.part'), body.subarray(0, 123_456));
    ranges.length = 0;
    const path = await downloadItem(item(), dir);
    expect(ranges).toEqual(['bytes=123456-']);
    expect(readFileSync(path).equals(body)).toBe(true);
  });

  it('refuses a file whose sha256 differs and removes the partial file', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'sd-dl-'));
    await expect(downloadItem(item({ sha256: '0'.repeat(64) }), dir)).rejects.toThrow(/sha256 .* does not match/);
    expect(existsSync(join(dir, 'model.bin.part'))).toBe(false);
    expect(existsSync(join(dir, 'model.bin'))).toBe(false);
  });

  it('reports HTTP errors and unreachable hosts clearly', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'sd-dl-'));
    await expect(downloadItem(item({ url: `${base}/missing` }), dir)).rejects.toThrow(/HTTP 404/);
    const closed = createServer();
    await new Promise<void>((r) => closed.listen(0, '127.0.0.1', r));
    const port = (closed.address() as AddressInfo).port;
    closed.close();
    const err = await downloadItem(item({ url: `http://127.0.0.1:${port}/model.bin` }), dir).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(DownloadError);
    expect((err as Error).message).toMatch(/cannot reach 127\.0\.0\.1:\d+ .*check the network/);
  });

  it('plans downloads from a mirror and rejects unknown names', () => {
    const plan = planDownloads('http://mirror.local/sd/', ['bpe_simple_vocab_16e6.txt.gz']);
    expect(plan.map((p) => p.url)).toEqual(['http://mirror.local/sd/bpe_simple_vocab_16e6.txt.gz']);
    expect(() => planDownloads(undefined, ['nope.bin'])).toThrow(/not a file sd download knows/);
  });
});
