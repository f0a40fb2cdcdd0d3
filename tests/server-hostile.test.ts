/**
 * Hostile requests (issue #23) against the server with the real tiny fixture model on 127.0.0.1: each is
 * answered quickly with a 4xx naming the limit and the field, or (a PNG full of compressed text) served
 * without the server's memory growing by the inflated text. The payloads are built here: zTXt chunks of
 * 8 MiB deflated to 8 KB, an SVG of nested <use>, GIF and TIFF files, a 2048x2048 request, 18 MiB of JSON.
 * New APIs are imported inside their tests, so that each test fails on its own against the code before them.
 */
import { readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { crc32, deflateSync } from 'node:zlib';
import { pngChunk } from '../src/image/png-chunks.js';
import { withChunks } from './helpers.js';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { initBackend } from '../src/backend/select.js';
import { StableDiffusion, pipelineConfigFromLdm } from '../src/pipeline/pipeline.js';
import { SdServer } from '../src/server/server.js';

const FIXTURE = 'tests/fixtures/pipeline';
const MIB = 2 ** 20;

let server: SdServer;
let outDir = '';

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: null });
  const config = pipelineConfigFromLdm(JSON.parse(readFileSync(`${FIXTURE}/fixture.json`, 'utf8')).config);
  outDir = await mkdtemp(path.join(tmpdir(), 'sd-server-hostile-'));
  server = await SdServer.start(
    {
      loadEngine: () => StableDiffusion.load({ weights: `${FIXTURE}/model.safetensors`, config, tokenizer: 'tests/fixtures/tokenizer' }),
      outputs: outDir,
    },
    { port: 0, host: '127.0.0.1' },
  );
  await server.ready();
});

afterAll(async () => {
  await server?.shutdown({ graceS: 0 });
  await rm(outDir, { recursive: true, force: true });
});

interface Answer {
  readonly status: number;
  readonly json: Record<string, unknown>;
  /**
   * CPU time this process (the server and the client, every thread) spent until the answer, in ms: the work a
   * request made the server do, which a busy machine does not inflate as it does wall-clock time.
   */
  readonly cpuMs: number;
}

/** One request, never waiting more than 60 s. */
async function send(method: string, route: string, body?: string | object): Promise<Answer> {
  const started = process.cpuUsage();
  const res = await fetch(`${server.url}${route}`, {
    method,
    headers: body !== undefined ? { 'content-type': 'application/json' } : {},
    body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
    signal: AbortSignal.timeout(60_000),
  });
  const json = (await res.json()) as Record<string, unknown>;
  const used = process.cpuUsage(started);
  return { status: res.status, json, cpuMs: (used.user + used.system) / 1000 };
}

async function untilFinished(id: string): Promise<Answer> {
  for (let i = 0; i < 1500; i++) {
    const a = await send('GET', `/jobs/${id}`);
    if (['succeeded', 'failed', 'cancelled'].includes(String(a.json.status))) return a;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`job ${id} did not finish`);
}

function expectRefusal(a: Answer, status: number, field: string, says: RegExp): void {
  expect(a.status, JSON.stringify(a.json)).toBe(status);
  expect(a.json.field).toBe(field);
  expect(String(a.json.message)).toMatch(new RegExp(`^${field}: `));
  expect(String(a.json.message)).toMatch(says);
}

const rgbPng = (width = 32, height = 32): Promise<Buffer> =>
  sharp({ create: { width, height, channels: 3, background: '#3a7' } }).png().toBuffer();

describe('compressed metadata in an init_image', () => {
  it('a PNG of 32 zTXt/iTXt chunks of 8 MiB each (and an iCCP bomb) is answered at once, RSS grows by MBs not GBs', async () => {
    const inflated = Buffer.alloc(8 * MIB, 'A');
    const deflated = deflateSync(inflated, { level: 9 }); // ~8 KB
    const ztxt = pngChunk('zTXt', Buffer.concat([Buffer.from('Comment\0\0', 'latin1'), deflated]));
    const itxt = pngChunk('iTXt', Buffer.concat([Buffer.from('Description\0\x01\0\0\0', 'latin1'), deflated]));
    const iccp = pngChunk('iCCP', Buffer.concat([Buffer.from('bomb\0\0', 'latin1'), deflateSync(Buffer.alloc(8 * MIB), { level: 9 })]));
    const png = withChunks(await rgbPng(), [iccp, ...Array<Buffer>(24).fill(ztxt), ...Array<Buffer>(8).fill(itxt)]);
    expect(png.length).toBeLessThan(400 * 1024); // 32 x 8 MiB = 256 MiB of text behind it

    // The same request with the plain PNG first: what an init_image costs here (the first decode's set-up included),
    // so the bound below is about the chunks, on a busy machine too.
    const job = (image: Buffer) => ({ prompt: 'a fern', steps: 1, do_scale: false, strength: 0.5, init_image: image.toString('base64') });
    const plain = await send('POST', '/jobs', job(await rgbPng()));
    expect(plain.status, JSON.stringify(plain.json)).toBe(202);
    expect((await untilFinished(String(plain.json.id))).json.status).toBe('succeeded');
    const before = process.memoryUsage().rss;
    const posted = await send('POST', '/jobs', job(png));
    expect(posted.status, JSON.stringify(posted.json)).toBe(202);
    // This POST costs ~3 s of CPU here against the plain one's ~0.1 s (not yet explained: stripping the chunks, the
    // base64 and sharp's decode of the stripped file take milliseconds), and 3.2-3.8 s on a loaded machine, so the
    // bound is the plain one's + 6 s: libvips inflating the text (4.7 GB, see png-chunks.ts) takes far longer. That
    // nothing is inflated is what the RSS check below shows.
    expect(posted.cpuMs, `CPU time of the POST (the plain one: ${plain.cpuMs.toFixed(0)} ms)`).toBeLessThan(plain.cpuMs + 6000);
    const done = await untilFinished(String(posted.json.id));
    expect(done.json.status, JSON.stringify(done.json)).toBe('succeeded');
    const grown = process.memoryUsage().rss - before;
    expect(grown / MIB, `RSS grew by ${(grown / MIB).toFixed(0)} MiB`).toBeLessThan(256);
  });
});

describe('image formats: PNG, JPEG and WebP only, by their magic bytes', () => {
  /** 10 levels of 10 <use> of the level below: 10^10 rectangles if a renderer expanded them all. */
  function nestedUseSvg(): string {
    const levels = [`<g id="l0"><rect width="1" height="1"/></g>`];
    for (let i = 1; i <= 10; i++) levels.push(`<g id="l${i}">${`<use xlink:href="#l${i - 1}"/>`.repeat(10)}</g>`);
    return `<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" width="32" height="32"><defs>${levels.join('')}</defs><use xlink:href="#l10"/></svg>`;
  }

  it.each([
    ['SVG of nested <use>', async () => Buffer.from(nestedUseSvg()), /SVG/],
    ['GIF', async () => sharp({ create: { width: 32, height: 32, channels: 3, background: '#3a7' } }).gif().toBuffer(), /GIF/],
    ['TIFF', async () => sharp({ create: { width: 32, height: 32, channels: 3, background: '#3a7' } }).tiff().toBuffer(), /TIFF/],
    ['random bytes', async () => Buffer.from('not an image, just words'), /not an image file/],
  ] as const)('%s -> 400 naming the format and the accepted ones', async (_what, make, names) => {
    const a = await send('POST', '/jobs', { prompt: 'x', steps: 1, init_image: (await make()).toString('base64') });
    expectRefusal(a, 400, 'init_image', /accepted formats are PNG, JPEG and WebP/);
    expect(String(a.json.message)).toMatch(names);
    expect(a.cpuMs, 'CPU time of the POST').toBeLessThan(3000);
  });

  it('JPEG and WebP are accepted', async () => {
    for (const file of [await sharp({ create: { width: 40, height: 24, channels: 3, background: '#3a7' } }).jpeg().toBuffer(),
      await sharp({ create: { width: 40, height: 24, channels: 4, background: '#3a7a' } }).webp().toBuffer()]) {
      const a = await send('POST', '/jobs', { prompt: 'x', steps: 1, do_scale: false, init_image: file.toString('base64') });
      expect(a.status, JSON.stringify(a.json)).toBe(202);
      expect((await untilFinished(String(a.json.id))).json.status).toBe('succeeded');
    }
  });

  it('a PNG whose header says 10000x10000 -> 400 naming --max-image-pixels, before any decoding', async () => {
    const png = await rgbPng();
    const huge = Buffer.from(png);
    huge.writeUInt32BE(10_000, 16);
    huge.writeUInt32BE(10_000, 20);
    huge.writeUInt32BE(crc32(huge.subarray(12, 29)), 29);
    const a = await send('POST', '/jobs', { prompt: 'x', steps: 1, init_image: huge.toString('base64') });
    expectRefusal(a, 400, 'init_image', /10000x10000 .* over this server's limit of 50000000 .*--max-image-pixels/);
  });
});

describe('size of work', () => {
  it('2048x2048 at 1 step -> 400 naming --max-pixels (default 1024x1024 for SD 1.x)', async () => {
    const a = await send('POST', '/jobs', { prompt: 'x', steps: 1, width: 2048, height: 2048 });
    expectRefusal(a, 400, 'width', /2048x2048 is 4194304 pixels, over this server's limit of 1048576 \(1024x1024\) \(--max-pixels\)/);
  });

  it('1024x1024 at 200 steps -> 400 naming --max-work (default 150 steps at 1024x1024)', async () => {
    const a = await send('POST', '/jobs', { prompt: 'x', steps: 200, width: 1024, height: 1024 });
    expectRefusal(a, 400, 'steps', /over this server's limit of 157286400 \(--max-work\): at most 150 steps at this size/);
  });

  it('the bounds follow the model family and the options; the CLI is not bound', async () => {
    const { checkWork, resolveBounds } = await import('../src/server/body.js');
    const { SD15_LIMITS, resolveParams } = await import('../src/pipeline/params.js');
    const sd1 = resolveBounds({}, SD15_LIMITS);
    expect(sd1).toMatchObject({ maxPixels: 1024 * 1024, maxWork: 150 * 1024 * 1024 });
    expect(resolveBounds({}, { ...SD15_LIMITS, family: 'sdxl' })).toMatchObject({ maxPixels: 1536 * 1536, maxWork: 150 * 1536 * 1536 });
    expect(resolveBounds({ maxPixels: 512 * 512 }, SD15_LIMITS).maxWork).toBe(150 * 512 * 512);
    const at = (steps: number, width: number, height: number) => resolveParams({ prompt: 'x', steps, width, height });
    expect(() => checkWork(at(150, 1024, 1024), sd1)).not.toThrow();
    expect(() => checkWork(at(151, 1024, 1024), sd1)).toThrow(/--max-work/);
    expect(() => checkWork(at(200, 512, 512), sd1)).not.toThrow();
    expect(() => checkWork(at(1, 2048, 2048), sd1)).toThrow(/--max-pixels/);
    expect(() => resolveParams({ prompt: 'x', steps: 1, width: 2048, height: 2048 })).not.toThrow(); // what `sd generate` runs
  });
});

describe('large JSON bodies', () => {
  it('18 MiB of nested arrays -> 400 naming the depth limit, in well under a second of parsing', async () => {
    const n = 9 * MIB;
    const a = await send('POST', '/inference', '['.repeat(n) + ']'.repeat(n));
    expectRefusal(a, 400, 'body', /nested deeper than 8 levels/);
    expect(a.cpuMs, "CPU time of the POST").toBeLessThan(3000); // JSON.parse alone takes ~10 s on it
  });

  it('18 MiB of one flat array -> 400 naming the value-count limit', async () => {
    const a = await send('POST', '/jobs', `[${'0,'.repeat(9 * MIB - 1)}0]`);
    expectRefusal(a, 400, 'body', /more than 10000 JSON values/);
  });

  it('a Content-Length over the route limit -> 413 before the body is read', async () => {
    const a = await send('DELETE', '/jobs/some-job', { pad: 'x'.repeat(64 * 1024) });
    expectRefusal(a, 413, 'body', /over the limit of 4096 bytes for DELETE \/jobs\/:id/);
  });

  it('strings with quotes, brackets and escapes do not count as structure', async () => {
    const { checkJsonShape } = await import('../src/server/body.js');
    expect(() => checkJsonShape(JSON.stringify({ prompt: '[[[[[[[[[[[[{{{{{{{{{ \\" \\\\', negative_prompt: ',,,'.repeat(5000) }))).not.toThrow();
    expect(() => checkJsonShape('{"a":"\\\\"}' + '['.repeat(9))).toThrow(/deeper than 8/);
  });
});

describe('no authentication on a reachable address', () => {
  it('warns unless the host is loopback or an API key is set', async () => {
    const { noAuthWarning } = await import('../src/cli/commands/serve.js');
    for (const host of ['127.0.0.1', '127.1.2.3', 'localhost', '::1', '[::1]', '::ffff:127.0.0.1']) expect(noAuthWarning(host, null), host).toBeNull();
    for (const host of ['0.0.0.0', '::', '192.168.1.20', 'sd.example.com']) {
      expect(noAuthWarning(host, null), host).toMatch(/^no authentication: listening on .* set SD_API_KEY \(or --api-key\)/);
      expect(noAuthWarning(host, 'key'), host).toBeNull();
    }
  });

  it('--max-pixels and --max-work take a number or a product like 1024x1024', async () => {
    const { parseProduct } = await import('../src/cli/commands/serve.js');
    expect(parseProduct('max-pixels', '1024x1024')).toBe(1048576);
    expect(parseProduct('max-work', '150 x 1024 x 1024')).toBe(157286400);
    expect(parseProduct('max-pixels', '1048576')).toBe(1048576);
    for (const bad of ['0', '-5', '1024x', 'abc', '1.5x2']) expect(() => parseProduct('max-pixels', bad), bad).toThrow(/--max-pixels must be/);
  });
});
