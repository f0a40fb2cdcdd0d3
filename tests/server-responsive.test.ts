/**
 * The server stays responsive: generations run in the engine worker (src/server/engine-worker.ts) with the tiny
 * fixture model on the cpu backend. While a long job runs (many steps), /health, GET /jobs/:id and
 * /sdapi/v1/progress each answer in < 200 ms, several times over. A worker that dies mid-job (the test hook makes it
 * call process.exit) fails that job with "the engine worker stopped", the server stays up, a new worker loads the
 * model and the job queued behind it succeeds with the same bytes as before the crash. Errors thrown in the worker
 * reach the server as the same classes (ParamError: 400 naming the field). Progress as server-sent events, and the
 * preview PNG while it runs.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ParamError } from '../src/pipeline/api.js';
import { pipelineConfigFromLdm } from '../src/pipeline/pipeline.js';
import { WorkerEngine } from '../src/server/engine-worker.js';
import { toHttpError } from '../src/server/errors.js';
import { SdServer } from '../src/server/server.js';
import { readFileSync } from 'node:fs';

const FIXTURE = 'tests/fixtures/pipeline';

let engine: WorkerEngine;
let server: SdServer;
let outDir = '';

async function call(method: string, route: string, body?: unknown): Promise<{ status: number; json: Record<string, unknown>; ms: number }> {
  const t0 = performance.now();
  const res = await fetch(`${server.url}${route}`, {
    method,
    headers: body !== undefined ? { 'content-type': 'application/json' } : {},
    body: body !== undefined ? JSON.stringify(body) : undefined,
  });
  const json = (await res.json()) as Record<string, unknown>;
  return { status: res.status, json, ms: performance.now() - t0 };
}

async function until<T>(what: string, get: () => Promise<T>, ok: (v: T) => boolean, tries = 6000): Promise<T> {
  for (let i = 0; i < tries; i++) {
    const v = await get();
    if (ok(v)) return v;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`timed out waiting for ${what}`);
}

const finished = (a: { json: Record<string, unknown> }) => ['succeeded', 'failed', 'cancelled'].includes(String(a.json.status));

beforeAll(async () => {
  const config = pipelineConfigFromLdm(JSON.parse(readFileSync(`${FIXTURE}/fixture.json`, 'utf8')).config);
  engine = await WorkerEngine.start({ weights: `${FIXTURE}/model.safetensors`, config, tokenizer: 'tests/fixtures/tokenizer', backend: 'cpu' });
  outDir = await mkdtemp(path.join(tmpdir(), 'sd-responsive-'));
  server = await SdServer.start({ loadEngine: async () => engine, outputs: outDir, backend: () => engine.backend }, { port: 0, host: '127.0.0.1' });
  await server.ready();
}, 120_000);

afterAll(async () => {
  await server?.shutdown({ graceS: 0 });
  await rm(outDir, { recursive: true, force: true });
});

describe('engine worker', () => {
  it('the worker chose the backend asked for and reports the model limits', () => {
    expect(engine.backend).toBe('cpu');
    expect(engine.limits).toMatchObject({ width: 32, height: 32 });
  });

  it('while a long job runs, /health, GET /jobs/:id and /sdapi/v1/progress answer in < 200 ms, again and again', async () => {
    const posted = await call('POST', '/jobs', { prompt: 'a fern', steps: 200, do_scale: false, seed: 3, width: 64, height: 64 });
    expect(posted.status).toBe(202);
    const id = String(posted.json.id);
    await until('step 2', () => call('GET', `/jobs/${id}`), (a) => Number(a.json.step) >= 2);
    const times: Record<string, number[]> = { health: [], job: [], progress: [] };
    for (let round = 0; round < 5; round++) {
      const h = await call('GET', '/health');
      expect(h.status).toBe(200);
      times.health.push(h.ms);
      const j = await call('GET', `/jobs/${id}`);
      expect(j.json.status).toBe('running');
      times.job.push(j.ms);
      const p = await call('GET', '/sdapi/v1/progress?skip_current_image=true');
      expect(Number((p.json.state as Record<string, unknown>).sampling_step)).toBeGreaterThan(0);
      times.progress.push(p.ms);
      await new Promise((r) => setTimeout(r, 30));
    }
    const running = await call('GET', `/jobs/${id}`);
    expect(running.json).toMatchObject({ status: 'running', total: 200, preview: `/jobs/${id}/preview.png` });
    expect(Number(running.json.eta_s)).toBeGreaterThan(0);
    for (const [route, ms] of Object.entries(times)) expect(Math.max(...ms), `${route}: ${ms.map((m) => m.toFixed(0)).join(', ')} ms`).toBeLessThan(200);
    const preview = await fetch(`${server.url}/jobs/${id}/preview.png`);
    expect(preview.headers.get('content-type')).toBe('image/png');
    const png = Buffer.from(await preview.arrayBuffer());
    expect([png.readUInt32BE(16), png.readUInt32BE(20)]).toEqual([16, 16]); // latent size: 64 px / the fixture VAE's 4
    expect((await call('DELETE', `/jobs/${id}`)).status).toBe(202);
    const done = await until('cancelled', () => call('GET', `/jobs/${id}`), finished);
    expect(done.json.status).toBe('cancelled');
  }, 300_000);

  it('a worker that dies mid-job fails that job clearly; a new worker runs the next one, same bytes as before', async () => {
    const body = { prompt: 'a fern', steps: 2, seed: 9 };
    const before = await call('POST', '/inference', body);
    expect(before.status).toBe(200);
    engine.testHooks.exitAtStep = 1;
    const doomed = await call('POST', '/jobs', { ...body, steps: 5 });
    const next = await call('POST', '/jobs', body); // queued behind it
    const failed = await until('failed', () => call('GET', `/jobs/${String(doomed.json.id)}`), finished);
    expect(failed.json).toMatchObject({ status: 'failed', error_status: 500 });
    expect(String(failed.json.error)).toContain('the engine worker stopped (exit code 3)');
    expect((await call('GET', '/health')).status).toBe(200);
    const after = await until('next job', () => call('GET', `/jobs/${String(next.json.id)}`), finished, 12_000);
    expect(after.json.status).toBe('succeeded');
    expect((after.json.result as Record<string, unknown>).image).toBe(before.json.image);
  }, 180_000);

  it('errors thrown in the worker come back as the same classes (a ParamError is 400 naming its field)', async () => {
    const e = await engine.generate({ prompt: 'x', steps: 0 }).catch((err: unknown) => err);
    expect(e).toBeInstanceOf(ParamError);
    expect((e as ParamError).field).toBe('steps');
    expect(toHttpError(e)).toMatchObject({ statusCode: 400, field: 'steps' });
  });

  it('the worker loads wasm (and tensorflow with its native kernels, when installed): the same image as on cpu', async () => {
    const params = { prompt: 'a fern', steps: 2, seed: 1 };
    const cpu = await engine.generate(params);
    const config = pipelineConfigFromLdm(JSON.parse(readFileSync(`${FIXTURE}/fixture.json`, 'utf8')).config);
    for (const backend of ['wasm', 'tensorflow'] as const) {
      const other = await WorkerEngine.start({ weights: `${FIXTURE}/model.safetensors`, config, tokenizer: 'tests/fixtures/tokenizer', backend }).catch((e: unknown) => e as Error);
      if (other instanceof Error) {
        expect(backend, other.message).toBe('tensorflow'); // tfjs-node is optional; wasm always loads
        continue;
      }
      try {
        expect(other.backend).toBe(backend);
        const r = await other.generate(params);
        const diff = r.images[0].rgb.reduce((m, v, i) => Math.max(m, Math.abs(v - cpu.images[0].rgb[i])), 0);
        expect(diff, backend).toBeLessThanOrEqual(2);
      } finally {
        other.dispose();
      }
    }
  }, 180_000);

  it('GET /jobs/:id/events streams status, progress and previews, then succeeded, and closes', async () => {
    const posted = await call('POST', '/jobs', { prompt: 'a fern', steps: 3, seed: 4 });
    const res = await fetch(`${server.url}/jobs/${String(posted.json.id)}/events`);
    expect(res.headers.get('content-type')).toContain('text/event-stream');
    const text = await res.text(); // ends when the server closes the stream
    const events = [...text.matchAll(/^event: (\w+)\ndata: (.*)$/gm)].map((m) => ({ event: m[1], data: JSON.parse(m[2]) as Record<string, unknown> }));
    const names = events.map((e) => e.event);
    expect(names[0]).toBe('status');
    expect(names.at(-1)).toBe('succeeded');
    expect(events.filter((e) => e.event === 'progress').map((e) => e.data.step)).toEqual([1, 2, 3]);
    expect(events.filter((e) => e.event === 'preview').map((e) => e.data.step)).toEqual([1, 2, 3]);
    expect((events.at(-1)?.data.result as Record<string, unknown>).seed).toBe(4);
  }, 120_000);
});
