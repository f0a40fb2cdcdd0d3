/**
 * The server's queue and job logic, made deterministic with a fake Engine whose steps wait on a gate the
 * test opens: exactly how many requests a full queue admits, cancel while queued and while running,
 * job expiry, uid conflicts, loading and shutdown states. (tests/server.test.ts runs the real model.)
 */
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import type { GenerateOptions, GenerateParams, GenerateResult } from '../src/pipeline/api.js';
import { resolveParams, type ParamLimits } from '../src/pipeline/params.js';
import { encodePng } from '../src/image/codec.js';
import type { Engine } from '../src/server/engine.js';
import { SdServer, type ServerOptions } from '../src/server/server.js';

/** Each step waits until the test calls open() (or the job is cancelled); honours the AbortSignal between steps. */
class GatedEngine implements Engine {
  readonly limits: ParamLimits = { width: 16, height: 16, minSize: 8, clipLayers: 3 };
  private gate: Promise<void>;
  private release = (): void => {};
  started = 0;
  disposed = false;

  constructor(open = false) {
    this.gate = new Promise((r) => (this.release = r));
    if (open) this.open();
  }

  open(): void {
    this.release();
  }

  async generate(p: GenerateParams, o: GenerateOptions): Promise<GenerateResult> {
    const r = resolveParams(p, this.limits);
    this.started += 1;
    const aborted = new Promise<void>((res) => o.signal?.addEventListener('abort', () => res(), { once: true }));
    for (let step = 1; step <= r.steps; step++) {
      await Promise.race([this.gate, aborted]);
      await new Promise((res) => setImmediate(res));
      if (o.signal?.aborted) throw new DOMException('cancelled', 'AbortError');
      o.onProgress?.(step, r.steps);
    }
    const rgb = new Uint8Array(r.width * r.height * 3).fill(r.seed % 256);
    const png = await encodePng({ rgb, width: r.width, height: r.height });
    return { images: [{ png, rgb, seed: r.seed }], params: r };
  }

  dispose(): void {
    this.disposed = true;
  }
}

let server: SdServer | null = null;
let outDir = '';

async function startWith(engine: Engine | Promise<Engine>, extra: Partial<ServerOptions> = {}): Promise<SdServer> {
  outDir = await mkdtemp(path.join(tmpdir(), 'sd-server-queue-'));
  server = await SdServer.start({ loadEngine: () => Promise.resolve(engine), outputs: outDir, ...extra }, { port: 0, host: '127.0.0.1' });
  return server;
}

afterEach(async () => {
  await server?.shutdown({ graceS: 0 });
  server = null;
  await rm(outDir, { recursive: true, force: true });
});

async function call(s: SdServer, method: string, route: string, body?: unknown): Promise<{ status: number; json: Record<string, unknown>; headers: Headers }> {
  const res = await fetch(`${s.url}${route}`, {
    method,
    headers: body !== undefined ? { 'content-type': 'application/json' } : {},
    body: body !== undefined ? JSON.stringify(body) : undefined,
  });
  return { status: res.status, json: (await res.json()) as Record<string, unknown>, headers: res.headers };
}

async function until(what: string, ok: () => Promise<boolean> | boolean): Promise<void> {
  for (let i = 0; i < 2000; i++) {
    if (await ok()) return;
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error(`timed out waiting for ${what}`);
}

const pngs = async (): Promise<string[]> => (await readdir(outDir)).filter((f) => f.endsWith('.png')).sort();

describe('server queue (fake engine)', () => {
  it('answers 503 while the model loads, then 200', async () => {
    let finishLoad = (_e: Engine): void => {};
    const s = await startWith(new Promise<Engine>((r) => (finishLoad = r)));
    const loading = await call(s, 'GET', '/health');
    expect(loading.status).toBe(503);
    expect(loading.json.status).toBe('loading');
    const work = await call(s, 'POST', '/inference', { prompt: 'x' });
    expect(work.status).toBe(503);
    expect(work.headers.get('retry-after')).toBe('5');
    finishLoad(new GatedEngine(true));
    await s.ready();
    const ok = await call(s, 'GET', '/health');
    expect(ok.status).toBe(200);
    expect(ok.json).toMatchObject({ status: 'ok', model_loaded: true, queue_depth: 0, running: 0, max_queue: 8 });
  });

  it('admits exactly 1 running + max-queue waiting; the rest get 429 with Retry-After', async () => {
    const engine = new GatedEngine();
    const s = await startWith(engine);
    await s.ready();
    const answers = Array.from({ length: 20 }, (_, i) => call(s, 'POST', '/inference', { prompt: `p${i}`, steps: 2, seed: i }));
    let refused: Awaited<(typeof answers)[number]>[] = [];
    // The 429s come back at once; the admitted ones wait on the gate.
    await until('11 refusals', async () => {
      refused = (await Promise.all(answers.map((a) => Promise.race([a, Promise.resolve(null)])))).filter((a) => a?.status === 429) as typeof refused;
      return refused.length === 11;
    });
    expect(refused.every((r) => Number(r.headers.get('retry-after')) >= 1)).toBe(true);
    const h = await call(s, 'GET', '/health');
    expect(h.json).toMatchObject({ queue_depth: 8, running: 1 });
    engine.open();
    const all = await Promise.all(answers);
    const ok = all.filter((a) => a.status === 200);
    expect(ok).toHaveLength(9);
    expect(await pngs()).toEqual(ok.map((a) => `${String(a.json.uid)}.png`).sort());
  });

  it('cancels a queued job at once and a running one at its next step', async () => {
    const engine = new GatedEngine();
    const s = await startWith(engine);
    await s.ready();
    const first = await call(s, 'POST', '/jobs', { prompt: 'a', steps: 3 });
    const second = await call(s, 'POST', '/jobs', { prompt: 'b', steps: 3 });
    expect([first.status, second.status]).toEqual([202, 202]);
    const queued = await call(s, 'GET', `/jobs/${String(second.json.id)}`);
    expect(queued.json).toMatchObject({ status: 'queued', position: 1 });
    const c2 = await call(s, 'DELETE', `/jobs/${String(second.json.id)}`);
    expect(c2.status).toBe(200);
    expect(c2.json.status).toBe('cancelled');
    const c1 = await call(s, 'DELETE', `/jobs/${String(first.json.id)}`);
    expect(c1.status).toBe(202);
    engine.open();
    await until('cancelled', async () => (await call(s, 'GET', `/jobs/${String(first.json.id)}`)).json.status === 'cancelled');
    expect((await call(s, 'DELETE', `/jobs/${String(first.json.id)}`)).status).toBe(409);
    expect(await pngs()).toEqual([]);
  });

  it('`model` without a queue: the loaded model by name, title, file or A1111 title with hash; any other is 400 naming it', async () => {
    const s = await startWith(new GatedEngine(true), { weights: path.join(tmpdir(), 'v1-5-pruned.safetensors') });
    await s.ready();
    for (const model of ['v1-5-pruned', 'v1-5-pruned.safetensors', 'V1-5-PRUNED.safetensors [6ce0161689]', path.join(tmpdir(), 'v1-5-pruned.safetensors')]) {
      const ok = await call(s, 'POST', '/inference', { prompt: 'a', steps: 1, model });
      expect(ok.status, model).toBe(200);
      expect((ok.json.parameters as Record<string, unknown>).model).toBe('v1-5-pruned');
    }
    const bad = await call(s, 'POST', '/jobs', { prompt: 'a', steps: 1, model: 'sdxl_base' });
    expect(bad.status).toBe(400);
    expect(bad.json).toMatchObject({ field: 'model', message: 'model: no model "sdxl_base" here: this server has one model, v1-5-pruned.safetensors' });
    expect((await call(s, 'POST', '/jobs', { prompt: 'a', model: '' })).status).toBe(400); // the schema: a name, not empty
    expect((await call(s, 'POST', '/jobs', { prompt: 'a', model: 3 })).status).toBe(400);
    const models = (await call(s, 'GET', '/sdapi/v1/sd-models')).json as unknown as Record<string, unknown>[];
    expect(models).toMatchObject([{ title: 'v1-5-pruned.safetensors', model_name: 'v1-5-pruned' }]);
    const a1111 = await call(s, 'POST', '/sdapi/v1/txt2img', { prompt: 'a', steps: 1, override_settings: { sd_model_checkpoint: 'v1-5-pruned.safetensors [6ce0161689]' } });
    expect(a1111.status).toBe(200);
    const other = await call(s, 'POST', '/sdapi/v1/options', { sd_model_checkpoint: 'sdxl_base.safetensors' });
    expect(other.status).toBe(422);
    expect(other.json.message).toMatch(/"sdxl_base\.safetensors" is not loaded; this server has one model, v1-5-pruned\.safetensors/);
  });

  it('forgets finished jobs after --job-ttl (404)', async () => {
    const s = await startWith(new GatedEngine(true), { jobTtlS: 0.2 });
    await s.ready();
    const { json } = await call(s, 'POST', '/jobs', { prompt: 'a', steps: 1, uid: 'ttl' });
    await until('succeeded', async () => (await call(s, 'GET', `/jobs/${String(json.id)}`)).json.status === 'succeeded');
    await until('expired', async () => (await call(s, 'GET', `/jobs/${String(json.id)}`)).status === 404);
    expect(await pngs()).toEqual(['ttl.png']);
  });

  it('refuses a uid whose files exist or that a job in flight holds (409)', async () => {
    const engine = new GatedEngine();
    const s = await startWith(engine);
    await s.ready();
    expect((await call(s, 'POST', '/jobs', { prompt: 'a', steps: 1, uid: 'same' })).status).toBe(202);
    const busy = await call(s, 'POST', '/jobs', { prompt: 'a', steps: 1, uid: 'same' });
    expect(busy.status).toBe(409);
    expect(busy.json.field).toBe('uid');
    engine.open();
    await until('saved', async () => (await pngs()).length === 1);
    await until('released', async () => s.queue.runningCount === 0);
    expect((await call(s, 'POST', '/inference', { prompt: 'a', steps: 1, uid: 'same' })).status).toBe(409);
  });

  it('shutdown: new work 503, queued jobs cancelled, the running one finishes within the grace period', async () => {
    const engine = new GatedEngine();
    const s = await startWith(engine, { graceS: 60 });
    await s.ready();
    const running = call(s, 'POST', '/inference', { prompt: 'a', steps: 2, uid: 'finishes' });
    await until('running', () => s.queue.runningCount === 1);
    const waiting = call(s, 'POST', '/inference', { prompt: 'b', steps: 2, uid: 'never' });
    await until('queued', () => s.queue.depth === 1);
    const stopped = s.shutdown();
    expect((await waiting).status).toBe(503);
    engine.open();
    expect((await running).status).toBe(200);
    await stopped;
    expect(s.state).toBe('stopped');
    expect(engine.disposed).toBe(true);
    expect((await readdir(outDir)).sort()).toEqual(['finishes.json', 'finishes.png']);
  });

  it('a client that hangs up on POST /inference cancels its job and frees its uid', async () => {
    const s = await startWith(new GatedEngine());
    await s.ready();
    const client = new AbortController();
    const request = fetch(`${s.url}/inference`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ prompt: 'a', steps: 2, uid: 'hung-up' }),
      signal: client.signal,
    }).catch((e: unknown) => e);
    await until('running', () => s.queue.runningCount === 1);
    client.abort();
    expect(await request).toBeInstanceOf(Error);
    await until('cancelled', () => s.queue.runningCount === 0);
    expect(await readdir(outDir)).toEqual([]);
    expect((await call(s, 'POST', '/jobs', { prompt: 'a', steps: 1, uid: 'hung-up' })).status).toBe(202);
  });

  it('a second shutdown call (second signal) cancels the running job without waiting for the grace period', async () => {
    const engine = new GatedEngine();
    const s = await startWith(engine, { graceS: 600 });
    await s.ready();
    const running = call(s, 'POST', '/inference', { prompt: 'a', steps: 2, uid: 'interrupted' });
    await until('running', () => s.queue.runningCount === 1);
    const first = s.shutdown();
    const second = s.shutdown({ graceS: 0 });
    engine.open();
    const answer = await running;
    expect(answer.status).toBe(503);
    expect(answer.json.message).toMatch(/shutting down/);
    await Promise.all([first, second]);
    expect(await readdir(outDir)).toEqual([]);
  });
});
