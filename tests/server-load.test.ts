/**
 * The server under load and at shutdown, with the real tiny fixture model (cpu backend, 32x32, 1-2 steps):
 * 20 concurrent POST /inference against a queue of 8 all answered (image or 429), none lost, the outputs
 * folder holding exactly the answered images; SIGTERM-style shutdown with a job in flight, with and without
 * time to finish, leaving no partial files (no *.tmp*, every png with its json).
 */
import { readFileSync } from 'node:fs';
import { mkdtemp, readFile, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { initBackend } from '../src/backend/select.js';
import { StableDiffusion, pipelineConfigFromLdm } from '../src/pipeline/pipeline.js';
import { SdServer, type ServerOptions } from '../src/server/server.js';

const FIXTURE = 'tests/fixtures/pipeline';
const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

let server: SdServer | null = null;
let outDir = '';

async function start(extra: Partial<ServerOptions> = {}): Promise<SdServer> {
  const config = pipelineConfigFromLdm(JSON.parse(readFileSync(`${FIXTURE}/fixture.json`, 'utf8')).config);
  outDir = await mkdtemp(path.join(tmpdir(), 'sd-server-load-'));
  server = await SdServer.start(
    {
      loadEngine: () => StableDiffusion.load({ weights: `${FIXTURE}/model.safetensors`, config, tokenizer: 'tests/fixtures/tokenizer' }),
      outputs: outDir,
      ...extra,
    },
    { port: 0, host: '127.0.0.1' },
  );
  await server.ready();
  return server;
}

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: null });
});

afterEach(async () => {
  await server?.shutdown({ graceS: 0 });
  server = null;
  await rm(outDir, { recursive: true, force: true });
});

interface Answer {
  readonly status: number;
  readonly json: Record<string, unknown>;
  readonly headers: Headers;
}

async function call(s: SdServer, method: string, route: string, body?: unknown): Promise<Answer> {
  const res = await fetch(`${s.url}${route}`, {
    method,
    headers: body !== undefined ? { 'content-type': 'application/json' } : {},
    body: body !== undefined ? JSON.stringify(body) : undefined,
  });
  return { status: res.status, json: (await res.json()) as Record<string, unknown>, headers: res.headers };
}

async function until(what: string, ok: () => boolean | Promise<boolean>): Promise<void> {
  for (let i = 0; i < 6000; i++) {
    if (await ok()) return;
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error(`timed out waiting for ${what}`);
}

/** The folder holds only whole results: no temp files, and each png next to its json. */
async function expectOnlyWholeResults(): Promise<string[]> {
  const files = await readdir(outDir);
  expect(files.filter((f) => f.includes('.tmp'))).toEqual([]);
  const uids = files.filter((f) => f.endsWith('.png')).map((f) => f.slice(0, -4)).sort();
  expect(files.filter((f) => f.endsWith('.json')).map((f) => f.slice(0, -5)).sort()).toEqual(uids);
  expect(files).toHaveLength(2 * uids.length);
  return uids;
}

describe('server under load and at shutdown (fixture model)', () => {
  it('20 concurrent POST /inference, queue of 8: each gets an image or a 429; the folder holds exactly the images', async () => {
    const s = await start({ maxQueue: 8, concurrency: 1 });
    const answers = await Promise.all(
      Array.from({ length: 20 }, (_, i) => call(s, 'POST', '/inference', { prompt: `fern ${i}`, seed: i, steps: 1, do_scale: false })),
    );
    const ok = answers.filter((a) => a.status === 200);
    const refused = answers.filter((a) => a.status === 429);
    expect(ok.length + refused.length).toBe(20);
    // 1 running + 8 waiting are always admitted; later arrivals may find a free place once a job finished.
    expect(ok.length).toBeGreaterThanOrEqual(9);
    for (const r of refused) expect(Number(r.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
    for (const a of ok) {
      const png = Buffer.from(String(a.json.image), 'base64');
      expect(png.subarray(0, 8).equals(PNG_SIGNATURE)).toBe(true);
      expect((await readFile(path.join(outDir, `${String(a.json.uid)}.png`))).equals(png)).toBe(true);
    }
    expect(await expectOnlyWholeResults()).toEqual(ok.map((a) => String(a.json.uid)).sort());
    expect((await call(s, 'GET', '/health')).json).toMatchObject({ status: 'ok', queue_depth: 0, running: 0 });
  });

  it('shutdown lets the running job finish, cancels the queued one, refuses new work with 503', async () => {
    const s = await start({ graceS: 600 });
    // Enough steps that the job is still running when the second request queues, however busy the machine.
    const job = await call(s, 'POST', '/jobs', { prompt: 'in flight', uid: 'in-flight', steps: 12, do_scale: false });
    await until('the job running', () => s.queue.runningCount === 1);
    const queued = call(s, 'POST', '/inference', { prompt: 'waiting', uid: 'waiting', steps: 1, do_scale: false });
    await until('one running, one queued', () => s.queue.runningCount === 1 && s.queue.depth === 1);
    const stopped = s.shutdown();
    expect((await call(s, 'POST', '/inference', { prompt: 'too late', steps: 1 })).status).toBe(503);
    expect((await queued).status).toBe(503);
    await stopped;
    expect(s.state).toBe('stopped');
    expect(s.queue.get(String(job.json.id))).toBeUndefined(); // forgotten once stopped
    expect(await expectOnlyWholeResults()).toEqual(['in-flight']);
  });

  it('shutdown past the grace period cancels the running job between steps: no partial files', async () => {
    const s = await start({ graceS: 0 });
    const job = await call(s, 'POST', '/jobs', { prompt: 'cut short', uid: 'cut-short', steps: 200, do_scale: false });
    let status = '';
    await until('a step done', async () => {
      const a = await call(s, 'GET', `/jobs/${String(job.json.id)}`);
      status = String(a.json.status);
      return Number(a.json.step) >= 1;
    });
    expect(status).toBe('running');
    const record = s.queue.get(String(job.json.id));
    await s.shutdown();
    expect(record?.status).toBe('cancelled');
    expect(await expectOnlyWholeResults()).toEqual([]);
  });
});
