/**
 * The HTTP API with the real tiny fixture model (tests/fixtures/pipeline, 32x32, 1-2 steps, cpu backend) on a
 * real socket: each route's success path, the async job life cycle with cancel, bearer auth (401), a full
 * queue (429), and a table of malformed requests that must all be answered 4xx, leaving the server healthy.
 * Queue edge cases with a fake engine: tests/server-queue.test.ts; load and shutdown: tests/server-load.test.ts.
 */
import { mkdtemp, readFile, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { StableDiffusion } from '../src/pipeline/pipeline.js';
import { parseParameters } from '../src/image/parameters.js';
import { readPngParameters } from '../src/image/codec.js';
import { SdServer } from '../src/server/server.js';
import { borrowed, loadTinyModel } from './helpers.js';

const KEY = 'test-key-123';
const AUTH = { authorization: `Bearer ${KEY}` };

let engine: StableDiffusion;
let server: SdServer;
let outDir = '';

interface Answer {
  readonly status: number;
  readonly json: Record<string, unknown>;
  readonly headers: Headers;
}

async function call(method: string, route: string, body?: unknown, headers: Record<string, string> = AUTH): Promise<Answer> {
  const res = await fetch(`${server.url}${route}`, {
    method,
    headers: body !== undefined ? { 'content-type': 'application/json', ...headers } : headers,
    body: body !== undefined ? JSON.stringify(body) : undefined,
  });
  return { status: res.status, json: (await res.json()) as Record<string, unknown>, headers: res.headers };
}

async function until<T>(what: string, get: () => Promise<T>, ok: (v: T) => boolean): Promise<T> {
  for (let i = 0; i < 3000; i++) {
    const v = await get();
    if (ok(v)) return v;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`timed out waiting for ${what}`);
}

beforeAll(async () => {
  engine = await loadTinyModel();
  outDir = await mkdtemp(path.join(tmpdir(), 'sd-server-'));
  // The engine outlives this server: the test compares against it directly after the server used it.
  server = await SdServer.start(
    { loadEngine: async () => borrowed(engine), outputs: outDir, apiKey: KEY, backend: () => 'cpu' },
    { port: 0, host: '127.0.0.1' },
  );
  await server.ready();
});

afterAll(async () => {
  await server?.shutdown({ graceS: 0 });
  engine?.dispose();
  await rm(outDir, { recursive: true, force: true });
});

describe('server with the fixture model', () => {
  it('GET /health: ok, model loaded, backend, queue', async () => {
    const h = await call('GET', '/health', undefined, {});
    expect(h.status).toBe(200);
    expect(h.json).toMatchObject({ status: 'ok', model_loaded: true, backend: 'cpu', queue_depth: 0, running: 0 });
  });

  it('POST /inference: the image the pipeline makes for the same parameters, saved with its sidecar', async () => {
    const body = { prompt: 'a fern', negative_prompt: 'blurry', uid: 'fern-1', seed: 7, steps: 2, sampler: 'ddim', do_scale: true, scale: 5, width: 32, height: 32 };
    const a = await call('POST', '/inference', body);
    expect(a.status).toBe(200);
    expect(a.json).toMatchObject({ message: 'success', uid: 'fern-1', seed: 7 });
    expect(a.json.parameters).toMatchObject({ prompt: 'a fern', negative_prompt: 'blurry', steps: 2, sampler: 'ddim', do_scale: true, scale: 5, karras: false, width: 32, height: 32 });
    const png = Buffer.from(String(a.json.image), 'base64');
    const direct = await engine.generate({ prompt: 'a fern', negativePrompt: 'blurry', seed: 7, steps: 2, sampler: 'ddim', cfg: true, cfgScale: 5 });
    expect(png.equals(direct.images[0].png)).toBe(true);
    expect(parseParameters(readPngParameters(png) ?? '').settings).toMatchObject({ Seed: '7', Steps: '2', Sampler: 'DDIM', 'CFG scale': '5' });
    expect((await readFile(path.join(outDir, 'fern-1.png'))).equals(png)).toBe(true);
    const sidecar = JSON.parse(await readFile(path.join(outDir, 'fern-1.json'), 'utf8')) as Record<string, unknown>;
    expect(sidecar).toMatchObject({ uid: 'fern-1', seed: 7, parameters: a.json.parameters });
  });

  it('POST /inference: img2img from a base64 init_image with strength; a random uid and seed when none given', async () => {
    const init = await readFile(path.join(outDir, 'fern-1.png'));
    const a = await call('POST', '/inference', { prompt: 'a fern', steps: 2, strength: 0.5, do_scale: false, init_image: init.toString('base64') });
    expect(a.status).toBe(200);
    expect(String(a.json.uid)).toMatch(/^[0-9a-f-]{36}$/);
    expect(a.json.parameters).toMatchObject({ strength: 0.5, do_scale: false, steps: 2 });
    expect(parseParameters(readPngParameters(Buffer.from(String(a.json.image), 'base64')) ?? '').settings['Denoising strength']).toBe('0.5');
    expect(await readdir(outDir)).toContain(`${String(a.json.uid)}.png`);
  });

  it('POST /inference: noise, conventions and prompt_syntax pass to the pipeline, are answered and recorded; the prompt kept as given', async () => {
    const prompt = 'a (fern:1.3), [ink] <lora:nope:0.5>';
    const body = { prompt, seed: 11, steps: 2, sampler: 'euler_a', width: 32, height: 32, noise: 'gpu', conventions: 'diffusers', prompt_syntax: 'a1111' };
    const a = await call('POST', '/inference', body);
    expect(a.status).toBe(200);
    expect(a.json.parameters).toMatchObject({ prompt, noise: 'gpu', conventions: 'diffusers', prompt_syntax: 'a1111' });
    expect(a.json.parameters).not.toHaveProperty('original_size'); // SD 1.x: no size conditioning
    const png = Buffer.from(String(a.json.image), 'base64');
    const direct = await engine.generate({ prompt, seed: 11, steps: 2, sampler: 'euler_a', noise: 'gpu', conventions: 'diffusers' });
    expect(png.equals(direct.images[0].png)).toBe(true);
    const cpu = await engine.generate({ prompt, seed: 11, steps: 2, sampler: 'euler_a', noise: 'cpu', conventions: 'diffusers' });
    expect(Buffer.from(cpu.images[0].rgb).equals(Buffer.from(direct.images[0].rgb))).toBe(false);
    const text = readPngParameters(png) ?? '';
    expect(text.split('\n')[0]).toBe(prompt);
    expect(parseParameters(text).settings).toMatchObject({ Conventions: 'diffusers' });
    expect(parseParameters(text).settings).not.toHaveProperty('RNG'); // A1111 writes nothing for its GPU default
  });

  it('POST /inference: 400 for an unknown noise source, SDXL sizes on an SD 1.x model and a size not a multiple of 8', async () => {
    for (const [field, body] of [
      ['noise', { prompt: 'x', noise: 'cuda' }],
      ['conventions', { prompt: 'x', conventions: 'comfy' }],
      ['original_size', { prompt: 'x', original_size: [1024] }],
      ['originalSize', { prompt: 'x', original_size: [1024, 1024] }],
      ['width', { prompt: 'x', width: 30 }],
    ] as const) {
      const r = await call('POST', '/inference', body);
      expect(r.status, field).toBe(400);
      expect(String(r.json.message), field).toContain(field);
    }
  });

  it('POST /jobs -> 202 {id}; GET /jobs/:id until succeeded with the result', async () => {
    const posted = await call('POST', '/jobs', { prompt: 'a fern', uid: 'job-1', steps: 2, seed: 3 });
    expect(posted.status).toBe(202);
    expect(posted.headers.get('location')).toBe(`/jobs/${String(posted.json.id)}`);
    const done = await until('job-1', () => call('GET', `/jobs/${String(posted.json.id)}`), (a) => a.json.status === 'succeeded');
    const result = done.json.result as Record<string, unknown>;
    expect(result).toMatchObject({ message: 'success', uid: 'job-1', seed: 3 });
    expect((await readFile(path.join(outDir, 'job-1.png'))).equals(Buffer.from(String(result.image), 'base64'))).toBe(true);
  });

  it('DELETE /jobs/:id cancels a running job between steps: cancelled, no files', async () => {
    const posted = await call('POST', '/jobs', { prompt: 'a fern', uid: 'cancel-me', steps: 200, do_scale: false });
    const running = await until('running', () => call('GET', `/jobs/${String(posted.json.id)}`), (a) => a.json.status === 'running' && Number(a.json.step) >= 1);
    expect(running.json.total).toBe(200);
    const del = await call('DELETE', `/jobs/${String(posted.json.id)}`);
    expect(del.status).toBe(202);
    await until('cancelled', () => call('GET', `/jobs/${String(posted.json.id)}`), (a) => a.json.status === 'cancelled');
    expect((await readdir(outDir)).filter((f) => f.startsWith('cancel-me'))).toEqual([]);
    expect((await call('GET', '/jobs/no-such-job')).status).toBe(404);
  });

  it('401 without the right bearer key on every route but /health', async () => {
    for (const [method, route] of [['POST', '/inference'], ['POST', '/jobs'], ['GET', '/jobs/x'], ['DELETE', '/jobs/x'], ['GET', '/nope']]) {
      const none = await call(method, route, method === 'POST' ? { prompt: 'x' } : undefined, {});
      expect(none.status, `${method} ${route}`).toBe(401);
      expect(none.headers.get('www-authenticate')).toBe('Bearer');
      const wrong = await call(method, route, method === 'POST' ? { prompt: 'x' } : undefined, { authorization: 'Bearer nope' });
      expect(wrong.status, `${method} ${route}`).toBe(401);
    }
    expect((await call('GET', '/health', undefined, {})).status).toBe(200);
  });

  it('429 with Retry-After once 1 job runs and 8 wait; the queue drains after cancelling', async () => {
    // Sent together: while a job runs, the server answers between denoising steps, so one at a time is slow.
    const fill = await Promise.all(Array.from({ length: 9 }, (_, i) => call('POST', '/jobs', { prompt: `filler ${i}`, steps: 200, do_scale: false })));
    expect(fill.map((a) => a.status)).toEqual(Array(9).fill(202));
    const full = await Promise.all(['/inference', '/jobs'].map((route) => call('POST', route, { prompt: 'one too many', steps: 1 })));
    for (const a of full) {
      expect(a.status).toBe(429);
      expect(Number(a.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
    }
    expect((await call('GET', '/health', undefined, {})).json).toMatchObject({ queue_depth: 8, running: 1 });
    const cancelled = await Promise.all(fill.map((a) => call('DELETE', `/jobs/${String(a.json.id)}`)));
    // 200: cancelled while queued; 202: running, stops at its next step (a queued one may have started meanwhile).
    for (const a of cancelled) expect([200, 202]).toContain(a.status);
    await until('drained', () => call('GET', '/health', undefined, {}), (a) => a.json.running === 0 && a.json.queue_depth === 0);
  });
});

/** [what, body as text (or object), content type, expected status, the field the message must name]. */
type Malformed = readonly [string, unknown, string, number, string | null];

const notAnImage = Buffer.from('hello, this is not a picture').toString('base64');

const MALFORMED: readonly Malformed[] = [
  ['empty object', {}, 'json', 400, 'prompt'],
  ['prompt a number', { prompt: 1 }, 'json', 400, 'prompt'],
  ['prompt null', { prompt: null }, 'json', 400, 'prompt'],
  ['prompt too long', { prompt: 'x'.repeat(4001) }, 'json', 400, 'prompt'],
  ['steps 0', { prompt: 'x', steps: 0 }, 'json', 400, 'steps'],
  ['steps 201', { prompt: 'x', steps: 201 }, 'json', 400, 'steps'],
  ['steps fractional', { prompt: 'x', steps: 2.5 }, 'json', 400, 'steps'],
  ['steps a string', { prompt: 'x', steps: '4' }, 'json', 400, 'steps'],
  ['seed negative', { prompt: 'x', seed: -1 }, 'json', 400, 'seed'],
  ['seed 2^32', { prompt: 'x', seed: 2 ** 32 }, 'json', 400, 'seed'],
  ['seed fractional', { prompt: 'x', seed: 1.5 }, 'json', 400, 'seed'],
  ['strength 0', { prompt: 'x', strength: 0, init_image: notAnImage }, 'json', 400, 'strength'],
  ['strength 1.5', { prompt: 'x', strength: 1.5 }, 'json', 400, 'strength'],
  ['strength without init_image', { prompt: 'x', strength: 0.5 }, 'json', 400, 'strength'],
  ['scale negative', { prompt: 'x', scale: -1 }, 'json', 400, 'scale'],
  ['scale 31', { prompt: 'x', scale: 31 }, 'json', 400, 'scale'],
  ['scale a string', { prompt: 'x', scale: 'high' }, 'json', 400, 'scale'],
  ['do_scale a string', { prompt: 'x', do_scale: 'yes' }, 'json', 400, 'do_scale'],
  ['karras a number', { prompt: 'x', karras: 1 }, 'json', 400, 'karras'],
  ['unknown sampler', { prompt: 'x', sampler: 'plms' }, 'json', 400, 'sampler'],
  ['sampler a number', { prompt: 'x', sampler: 5 }, 'json', 400, 'sampler'],
  ['width not a multiple of 8', { prompt: 'x', width: 30 }, 'json', 400, 'width'],
  ['width below the model minimum', { prompt: 'x', width: 16 }, 'json', 400, 'width'],
  ['height too large', { prompt: 'x', height: 4096 }, 'json', 400, 'height'],
  ['height not a multiple of 8', { prompt: 'x', height: 33 }, 'json', 400, 'height'],
  ['uid with a slash', { prompt: 'x', uid: 'a/b' }, 'json', 400, 'uid'],
  ['uid with dots', { prompt: 'x', uid: '../etc' }, 'json', 400, 'uid'],
  ['uid empty', { prompt: 'x', uid: '' }, 'json', 400, 'uid'],
  ['uid 65 characters', { prompt: 'x', uid: 'u'.repeat(65) }, 'json', 400, 'uid'],
  ['uid a number', { prompt: 'x', uid: 12 }, 'json', 400, 'uid'],
  ['negative_prompt a number', { prompt: 'x', negative_prompt: 5 }, 'json', 400, 'negative_prompt'],
  ['init_image not base64', { prompt: 'x', init_image: 'not base64!!' }, 'json', 400, 'init_image'],
  ['init_image empty', { prompt: 'x', init_image: '' }, 'json', 400, 'init_image'],
  ['init_image not an image', { prompt: 'x', init_image: notAnImage }, 'json', 400, 'init_image'],
  ['init_image a truncated PNG', { prompt: 'x', init_image: 'iVBORw0KGgoAAAANSUhEUgAAACAAAAAg' }, 'json', 400, 'init_image'],
  ['unknown field', { prompt: 'x', foo: 1 }, 'json', 400, 'foo'],
  ['__proto__ key', '{"prompt":"x","__proto__":{"admin":true}}', 'json', 400, null],
  ['not JSON', '{"prompt": "x"', 'json', 400, 'body'],
  ['empty body', '', 'json', 400, 'body'],
  ['an array', '[1, 2]', 'json', 400, 'body'],
  ['null', 'null', 'json', 400, 'body'],
  ['a string', '"a fern"', 'json', 400, 'body'],
  ['text/plain', 'a fern', 'text/plain', 400, 'body'],
  ['an unsupported content type', '<prompt>x</prompt>', 'application/xml', 415, 'body'],
  ['larger than the body limit', { prompt: 'x', init_image: 'A'.repeat(21 * 2 ** 20) }, 'json', 413, 'body'],
];

describe('malformed requests', () => {
  it.each(MALFORMED)('%s -> 4xx naming the field', async (_what, body, type, status, field) => {
    const res = await fetch(`${server.url}/jobs`, {
      method: 'POST',
      headers: { 'content-type': type === 'json' ? 'application/json' : type, ...AUTH },
      body: typeof body === 'string' ? body : JSON.stringify(body),
    });
    const json = (await res.json()) as { message: string; field?: string };
    expect(res.status).toBe(status);
    expect(typeof json.message).toBe('string');
    if (field !== null) {
      expect(json.field).toBe(field);
      expect(json.message.startsWith(`${field}:`)).toBe(true);
    }
  });

  it('bad job ids are 400, unknown ones 404; afterwards the server is healthy and still generates', async () => {
    expect((await call('GET', '/jobs/a.b')).status).toBe(400);
    expect((await call('DELETE', `/jobs/${'x'.repeat(65)}`)).status).toBe(400);
    expect((await call('DELETE', '/jobs/unknown')).status).toBe(404);
    expect((await call('GET', '/health', undefined, {})).json).toMatchObject({ status: 'ok', queue_depth: 0, running: 0 });
    const a = await call('POST', '/inference', { prompt: 'still fine', steps: 1, do_scale: false, uid: 'after-malformed' });
    expect(a.status).toBe(200);
  });
});
