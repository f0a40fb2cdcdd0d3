/**
 * The live side of a job with a fake engine (fast, deterministic): GET /jobs/:id/preview.png is 404 before the first
 * preview, then the engine's latest preview as PNG (its bytes), then the result image; GET /jobs/:id/events of a
 * finished job sends its last event and closes; streams beyond maxEventClients answer 503 with Retry-After and a
 * closed one frees its slot; A1111's current_image is the same preview, null with skip_current_image.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import sharp from 'sharp';
import { afterEach, describe, expect, it } from 'vitest';
import { encodePng } from '../src/image/codec.js';
import type { GenerateOptions, GenerateParams, GenerateResult } from '../src/pipeline/api.js';
import { resolveParams, type ParamLimits } from '../src/pipeline/params.js';
import type { Engine } from '../src/server/engine.js';
import { SdServer } from '../src/server/server.js';

/** Each step waits for one of the test's go() calls; its preview is a 2x2 image filled with 10 x the step number. */
class SteppedEngine implements Engine {
  readonly limits: ParamLimits = { width: 16, height: 16, minSize: 8, clipLayers: 3 };
  private credits = 0;
  private waiting: (() => void) | null = null;
  go(): void {
    this.credits++;
    this.waiting?.();
  }
  private async nextStep(signal: AbortSignal | undefined): Promise<void> {
    while (this.credits === 0 && signal?.aborted !== true) {
      await new Promise<void>((res) => {
        this.waiting = res;
        signal?.addEventListener('abort', () => res(), { once: true });
      });
    }
    this.credits = Math.max(0, this.credits - 1);
  }
  async generate(p: GenerateParams, o: GenerateOptions): Promise<GenerateResult> {
    const r = resolveParams(p, this.limits);
    for (let step = 1; step <= r.steps; step++) {
      await this.nextStep(o.signal);
      if (o.signal?.aborted) throw new DOMException('cancelled', 'AbortError');
      o.onProgress?.(step, r.steps);
      await o.onPreview?.({ step, total: r.steps, image: 0, decoder: 'approx', rgb: new Uint8Array(12).fill(step * 10), width: 2, height: 2 });
    }
    const rgb = new Uint8Array(16 * 16 * 3).fill(200);
    return { images: [{ png: await encodePng({ rgb, width: 16, height: 16 }), rgb, seed: r.seed }], params: r };
  }
  dispose(): void {}
}

let server: SdServer | null = null;
let out = '';

afterEach(async () => {
  await server?.shutdown({ graceS: 0 });
  server = null;
  await rm(out, { recursive: true, force: true });
});

async function start(engine: Engine, maxEventClients = 32): Promise<SdServer> {
  out = await mkdtemp(path.join(tmpdir(), 'sd-events-'));
  server = await SdServer.start({ loadEngine: async () => engine, outputs: out, maxEventClients }, { port: 0, host: '127.0.0.1' });
  await server.ready();
  return server;
}

const json = async (s: SdServer, method: string, route: string, body?: unknown) => {
  const res = await fetch(`${s.url}${route}`, { method, headers: body !== undefined ? { 'content-type': 'application/json' } : {}, body: body !== undefined ? JSON.stringify(body) : undefined });
  return { status: res.status, headers: res.headers, json: (await res.json()) as Record<string, unknown> };
};

async function until(ok: () => Promise<boolean>): Promise<void> {
  for (let i = 0; i < 500; i++) {
    if (await ok()) return;
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error('timed out');
}

describe('previews and event streams', () => {
  it('preview.png: 404 before the first step, the latest preview while running, the image once succeeded; current_image the same', async () => {
    const engine = new SteppedEngine();
    const s = await start(engine);
    const { json: job } = await json(s, 'POST', '/jobs', { prompt: 'a', steps: 3 });
    const id = String(job.id);
    await until(async () => (await json(s, 'GET', `/jobs/${id}`)).json.status === 'running');
    expect((await fetch(`${s.url}/jobs/${id}/preview.png`)).status).toBe(404);
    expect((await json(s, 'GET', `/jobs/${id}`)).json.preview).toBeNull();
    engine.go();
    engine.go();
    await until(async () => (await json(s, 'GET', `/jobs/${id}`)).json.step === 2);
    const res = await fetch(`${s.url}/jobs/${id}/preview.png`);
    expect(res.headers.get('x-sd-step')).toBe('2');
    const { data, info } = await sharp(Buffer.from(await res.arrayBuffer())).raw().toBuffer({ resolveWithObject: true });
    expect([info.width, info.height]).toEqual([2, 2]);
    expect([...data]).toEqual(new Array(12).fill(20));
    const view = await json(s, 'GET', `/jobs/${id}`);
    expect(view.json).toMatchObject({ status: 'running', step: 2, total: 3, preview: `/jobs/${id}/preview.png` });
    const progress = await json(s, 'GET', '/sdapi/v1/progress');
    const current = await sharp(Buffer.from(String(progress.json.current_image), 'base64')).raw().toBuffer();
    expect([...current]).toEqual(new Array(12).fill(20));
    expect((await json(s, 'GET', '/sdapi/v1/progress?skip_current_image=true')).json.current_image).toBeNull();
    engine.go();
    await until(async () => (await json(s, 'GET', `/jobs/${id}`)).json.status === 'succeeded');
    const final = await sharp(Buffer.from(await (await fetch(`${s.url}/jobs/${id}/preview.png`)).arrayBuffer())).raw().toBuffer({ resolveWithObject: true });
    expect(final.info.width).toBe(16);
    const events = await (await fetch(`${s.url}/jobs/${id}/events`)).text(); // finished: one event, then closed
    expect(events.match(/^event: (\w+)$/gm)).toEqual(['event: succeeded']);
  });

  it('event streams are bounded: one past the limit is 503 with Retry-After; closing one frees its slot', async () => {
    const engine = new SteppedEngine();
    const s = await start(engine, 1);
    const { json: job } = await json(s, 'POST', '/jobs', { prompt: 'a', steps: 2 });
    const id = String(job.id);
    const first = new AbortController();
    const open = await fetch(`${s.url}/jobs/${id}/events`, { signal: first.signal });
    expect(open.status).toBe(200);
    const second = await json(s, 'GET', `/jobs/${id}/events`);
    expect(second.status).toBe(503);
    expect(second.headers.get('retry-after')).toBe('5');
    first.abort();
    await until(async () => s.live.openClients === 0);
    const again = await fetch(`${s.url}/jobs/${id}/events`);
    expect(again.status).toBe(200);
    engine.go();
    engine.go();
    const text = await again.text();
    expect(text.match(/^event: (\w+)$/gm)).toEqual(['event: status', 'event: progress', 'event: preview', 'event: progress', 'event: preview', 'event: succeeded']);
  });
});
