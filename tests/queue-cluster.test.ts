/**
 * The cluster for real (issue #21): Redis (a redis-server of this file's own), an S3 server (s3rver), three
 * `sd worker` child processes on the tiny fixture model (two hold it as "tiny", one as "other"), and the HTTP front
 * (`SdServer` with a QueueFront, as `sd serve --queue` runs it, loading no model). Checked across the processes:
 * 20 jobs spread over both "tiny" workers, outputs in S3 byte-identical to the answers, model routing (`model` on our
 * routes, A1111's override_settings and options, /sdapi/v1/sd-models), previews and the event stream of a job run
 * elsewhere, LoRA names found in the workers' --lora-dir (the front has no model folders), cancel and A1111
 * progress/interrupt (the image finished from its last step), a worker SIGKILLed mid-job (its job completes on the other, nothing lost or doubled),
 * the front restarted (jobs and results still readable), Redis restarted (front and workers reconnect), a uid taken
 * in S3 (409 from the conditional PUT), /health and /metrics, and SIGTERM's clean exit.
 */
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { PutObjectCommand } from '@aws-sdk/client-s3';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QueueFront } from '../src/queue/front.js';
import { SdServer } from '../src/server/server.js';
import { ROOT, SKIP_REASON, TestRedis, TestS3, WorkerProcess, until, within } from './queue-services.js';

const PREFIX = 'out';
const SMALL = { prompt: 'a red square', steps: 2, width: 32, height: 32, sampler: 'euler' };
const LONG = { ...SMALL, steps: 200 };

let redis: TestRedis;
let s3: TestS3;
let server: SdServer;
const workers: WorkerProcess[] = [];
const ids: string[] = [];

async function startFront(): Promise<SdServer> {
  const front = new QueueFront({ url: redis.url, defaultModel: 'tiny', maxQueue: 64, ttlS: 600, pollMs: 1000 });
  return SdServer.start(
    { loadEngine: () => Promise.reject(new Error('the front loads no model')), outputs: mkdtempSync(path.join(tmpdir(), 'sd-front-')), front, maxQueue: 64 },
    { port: 0, host: '127.0.0.1' },
  );
}

interface Answer {
  readonly status: number;
  readonly json: Record<string, unknown>;
}

async function call(method: string, route: string, body?: unknown): Promise<Answer> {
  const res = await fetch(`${server.url}${route}`, {
    method,
    headers: body !== undefined ? { 'content-type': 'application/json' } : {},
    body: body !== undefined ? JSON.stringify(body) : undefined,
  });
  const text = await res.text();
  return { status: res.status, json: /^[[{]/.test(text) ? (JSON.parse(text) as Record<string, unknown>) : { text } };
}

const job = (id: string): Promise<Answer> => call('GET', `/jobs/${id}`);

/** The 'job started' lines a worker logged for `model`. */
const started = (w: WorkerProcess, model: string): number => w.lines.filter((l) => l.msg === 'job started' && l.model === model).length;

/** Server-sent events of GET /jobs/:id/events, until `enough` says so (or the stream ends). */
async function events(id: string, enough: (seen: { event: string; data: Record<string, unknown> }[]) => boolean): Promise<{ event: string; data: Record<string, unknown> }[]> {
  const client = new AbortController();
  const res = await fetch(`${server.url}/jobs/${id}/events`, { signal: client.signal });
  expect(res.headers.get('content-type')).toMatch(/^text\/event-stream/);
  const seen: { event: string; data: Record<string, unknown> }[] = [];
  const decoder = new TextDecoder();
  let text = '';
  try {
    for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
      text += decoder.decode(chunk, { stream: true });
      let at: number;
      while ((at = text.indexOf('\n\n')) >= 0) {
        const frame = text.slice(0, at);
        text = text.slice(at + 2);
        const event = /^event: (.*)$/m.exec(frame)?.[1];
        const data = /^data: (.*)$/m.exec(frame)?.[1];
        if (event !== undefined && data !== undefined) seen.push({ event, data: JSON.parse(data) as Record<string, unknown> });
      }
      if (enough(seen)) break;
    }
  } finally {
    client.abort();
  }
  return seen;
}
const finished = (a: Answer): boolean => ['succeeded', 'failed', 'cancelled'].includes(String(a.json.status));

async function sidecar(uid: string): Promise<Record<string, unknown>> {
  const r = await s3.client().send(new (await import('@aws-sdk/client-s3')).GetObjectCommand({ Bucket: s3.bucket, Key: `${PREFIX}/${uid}.json` }));
  return JSON.parse(await (r.Body as { transformToString(): Promise<string> }).transformToString()) as Record<string, unknown>;
}

async function s3Png(uid: string): Promise<Buffer> {
  const { GetObjectCommand } = await import('@aws-sdk/client-s3');
  const r = await s3.client().send(new GetObjectCommand({ Bucket: s3.bucket, Key: `${PREFIX}/${uid}.png` }));
  return Buffer.from(await (r.Body as { transformToByteArray(): Promise<Uint8Array> }).transformToByteArray());
}

/** The announced worker running `jobId`. */
async function workerRunning(jobId: string): Promise<{ id: string; pid: number }> {
  const front = server.queue as QueueFront;
  const w = await until(`a worker announcing job ${jobId}`, () => front.workers().find((x) => x.current === jobId), (x) => x !== undefined, 30_000);
  return { id: w?.id ?? '', pid: w?.pid ?? -1 };
}

describe.skipIf(SKIP_REASON !== null)('queue: front, Redis, S3 and sd worker processes', () => {
  beforeAll(async () => {
    redis = await TestRedis.start();
    s3 = await TestS3.start();
    const storage = ['--outputs', `s3://${s3.bucket}/${PREFIX}`, '--s3-endpoint', s3.endpoint];
    const loras = ['--lora-dir', path.join(ROOT, 'tests/fixtures/lora')]; // the workers' folder; the front has none
    workers.push(
      WorkerProcess.spawn(redis.url, [...storage, ...loras, '--controlnet-dir', path.join(ROOT, 'tests/fixtures/controlnet'), '--model-name', 'tiny']),
      WorkerProcess.spawn(redis.url, [...storage, ...loras, '--model-name', 'tiny']),
      WorkerProcess.spawn(redis.url, [...storage, '--model-name', 'other']),
    );
    server = await startFront();
    ids.push(...(await Promise.all(workers.map((w) => w.ready()))));
    await until('the front to see the three workers', () => (server.queue as QueueFront).workers().length, (n) => n === 3);
  }, 300_000);

  afterAll(async () => {
    // the workers' logs, for a failure's story
    for (const [i, w] of workers.entries()) writeFileSync(path.join(tmpdir(), `sd-queue-test-worker-${i}.log`), w.lines.map((l) => JSON.stringify(l)).join('\n'));
    await within(server?.shutdown({ graceS: 0 }) ?? Promise.resolve(), 15_000);
    await Promise.all(workers.map((w) => w.kill('SIGKILL')));
    await redis?.down();
    await within(s3?.close() ?? Promise.resolve(), 10_000);
  }, 120_000);

  it('/health says queue mode, no model here, the workers and their models', async () => {
    const h = await call('GET', '/health');
    expect(h.status).toBe(200);
    expect(h.json).toMatchObject({ status: 'ok', mode: 'queue', model_loaded: false, redis: 'connected', workers: 3, models: ['other', 'tiny'], default_model: 'tiny' });
  });

  it('a job naming a model is taken only by a worker holding it', async () => {
    const front = server.queue as QueueFront;
    const j = front.submit({ uid: 'routed-1', params: { ...SMALL, seed: 5 } as never }, 'other');
    await j.done;
    expect({ status: j.status, error: j.error }).toEqual({ status: 'succeeded', error: null });
    expect((await sidecar('routed-1')).worker).toBe(ids[2]);
  }, 120_000);

  it('`model` over HTTP: POST /jobs goes to a worker announcing it; an unknown one is 400 naming those announced', async () => {
    const before = started(workers[2], 'other');
    const s = await call('POST', '/jobs', { ...SMALL, seed: 6, uid: 'routed-2', model: 'other' });
    expect(s.status).toBe(202);
    const end = await until('done', () => job(String(s.json.id)), finished);
    expect(end.json).toMatchObject({ status: 'succeeded', result: { parameters: { model: 'other' } } });
    expect((await sidecar('routed-2')).worker).toBe(ids[2]);
    expect(started(workers[2], 'other')).toBe(before + 1);
    const bad = await call('POST', '/inference', { ...SMALL, model: 'nope' });
    expect(bad.status).toBe(400);
    expect(bad.json).toMatchObject({ field: 'model' });
    expect(String(bad.json.message)).toMatch(/"nope".*workers announce other, tiny/);
  }, 60_000);

  it("A1111: sd-models lists the announced models; override_settings and options' sd_model_checkpoint route the job", async () => {
    const models = (await call('GET', '/sdapi/v1/sd-models')).json as unknown as { title: string; model_name: string }[];
    expect(models.map((m) => [m.title, m.model_name])).toEqual([['other', 'other'], ['tiny', 'tiny']]);
    const a1111 = { prompt: 'a', steps: 2, width: 32, height: 32, sampler_name: 'Euler' };
    const before = started(workers[2], 'other');
    const over = await call('POST', '/sdapi/v1/txt2img', { ...a1111, override_settings: { sd_model_checkpoint: 'other [0123456789]' } });
    expect(over.status).toBe(200);
    expect((over.json.images as string[]).length).toBe(1);
    expect(JSON.parse(String(over.json.info))).toMatchObject({ sd_model_name: 'other' });
    expect(started(workers[2], 'other')).toBe(before + 1);
    const unknown = await call('POST', '/sdapi/v1/txt2img', { ...a1111, override_settings: { sd_model_checkpoint: 'sdxl.safetensors' } });
    expect(unknown.status).toBe(422);
    expect(String(unknown.json.detail ?? unknown.json.message)).toMatch(/sdxl\.safetensors.*other, tiny/);
    // POST options: the model of the requests that follow, as A1111 loads it
    expect((await call('POST', '/sdapi/v1/options', { sd_model_checkpoint: 'other' })).status).toBe(200);
    expect((await call('GET', '/sdapi/v1/options')).json.sd_model_checkpoint).toBe('other');
    const later = await call('POST', '/sdapi/v1/txt2img', a1111);
    expect(later.status).toBe(200);
    expect(started(workers[2], 'other')).toBe(before + 2);
    expect((await call('POST', '/sdapi/v1/options', { sd_model_checkpoint: 'tiny' })).status).toBe(200);
    expect((await call('POST', '/sdapi/v1/options', { sd_model_checkpoint: 'nope' })).status).toBe(422);
    expect((await call('GET', '/sdapi/v1/options')).json.sd_model_checkpoint).toBe('tiny');
  }, 60_000);

  it("previews across processes: GET /jobs/:id's preview, /jobs/:id/preview.png and the event stream's preview events", async () => {
    const s = await call('POST', '/jobs', { ...LONG, width: 64, height: 64, uid: 'preview-1' }); // long enough to watch
    const id = String(s.json.id);
    const running = await until('a preview', () => job(id), (a) => a.json.status === 'running' && a.json.preview !== null && a.json.preview !== undefined);
    expect(running.json.preview).toBe(`/jobs/${id}/preview.png`);
    const png = await fetch(`${server.url}/jobs/${id}/preview.png`);
    expect(png.status).toBe(200);
    expect(png.headers.get('content-type')).toBe('image/png');
    expect(Number(png.headers.get('x-sd-step'))).toBeGreaterThanOrEqual(1);
    expect(png.headers.get('x-sd-total')).toBe('200');
    const bytes = Buffer.from(await png.arrayBuffer());
    expect(bytes.subarray(1, 4).toString()).toBe('PNG');
    expect(bytes.readUInt32BE(16)).toBe(16); // 64 px at the fixture VAE's factor 4: the approx preview
    const seen = await events(id, (e) => e.some((x) => x.event === 'preview') && e.some((x) => x.event === 'progress'));
    expect(seen[0]).toMatchObject({ event: 'status', data: { id, status: 'running' } });
    expect(seen.find((x) => x.event === 'progress')?.data).toMatchObject({ total: 200 });
    expect(seen.find((x) => x.event === 'preview')?.data).toMatchObject({ total: 200, width: 16, height: 16, decoder: 'approx', url: expect.stringMatching(new RegExp(`^/jobs/${id}/preview\\.png\\?step=\\d+$`)) });
    const p = await call('GET', '/sdapi/v1/progress');
    expect(Buffer.from(String(p.json.current_image), 'base64').subarray(1, 4).toString()).toBe('PNG');
    expect((await call('DELETE', `/jobs/${id}`)).status).toBe(202);
    await until('cancelled', () => job(id), finished);
  }, 60_000);

  it('SIGTERM: a worker exits 0 and its announcement is gone', async () => {
    const w = workers[2];
    expect(await w.kill('SIGTERM')).toBe(0);
    await until('the announcement to go', () => (server.queue as QueueFront).workers().map((x) => x.id), (list) => !list.includes(ids[2]), 10_000);
  }, 60_000);

  it('20 jobs are spread over both "tiny" workers; every output lands in S3 byte-identical to its answer', async () => {
    const submitted = await Promise.all(Array.from({ length: 20 }, (_, i) => call('POST', '/jobs', { ...SMALL, seed: 100 + i, uid: `spread-${i}` })));
    expect(submitted.map((s) => s.status)).toEqual(Array(20).fill(202));
    await Promise.all(submitted.map((s) => server.queue.get(String(s.json.id))?.done));
    const done = await Promise.all(submitted.map((s) => job(String(s.json.id))));
    expect(done.map((d) => d.json.status)).toEqual(Array(20).fill('succeeded'));
    const by = new Set<string>();
    for (const [i, d] of done.entries()) {
      const result = d.json.result as { image: string; uid: string; seed: number };
      expect(result.uid).toBe(`spread-${i}`);
      expect(result.seed).toBe(100 + i);
      expect(Buffer.compare(await s3Png(result.uid), Buffer.from(result.image, 'base64'))).toBe(0);
      const meta = await sidecar(result.uid);
      expect(meta.job).toBe(d.json.id);
      by.add(String(meta.worker));
    }
    expect([...by].sort()).toEqual([ids[0], ids[1]].sort()); // both "tiny" workers, never "other"
    const keys = await s3.keys(`${PREFIX}/spread-`);
    expect(keys).toHaveLength(40);
  }, 300_000);

  it("LoRA names resolve in the worker's --lora-dir, the front holding none: applied, an unknown one 400 naming the worker's", async () => {
    const plain = await call('POST', '/inference', { ...SMALL, seed: 11 });
    const named = await call('POST', '/inference', { ...SMALL, seed: 11, loras: [{ name: 'ink', multiplier: 1 }] });
    const tagged = await call('POST', '/inference', { ...SMALL, seed: 11, prompt: `${SMALL.prompt} <lora:ink:1>` });
    expect([plain.status, named.status, tagged.status]).toEqual([200, 200, 200]);
    expect((named.json.parameters as Record<string, unknown>).loras).toEqual([{ name: 'ink', multiplier: 1 }]);
    const pixels = async (a: Answer): Promise<Buffer> => sharp(Buffer.from(String(a.json.image), 'base64')).raw().toBuffer();
    expect(Buffer.compare(await pixels(named), await pixels(plain))).not.toBe(0); // the LoRA changed the image
    expect(Buffer.compare(await pixels(tagged), await pixels(named))).toBe(0); // the tag and the field: the same LoRA
    const unknown = await call('POST', '/inference', { ...SMALL, loras: [{ name: 'nope' }] });
    expect(unknown.status).toBe(400);
    expect(unknown.json.field).toBe('loras[0].name');
    expect(String(unknown.json.message)).toMatch(/^loras\[0\]\.name: no LoRA named "nope" in this worker's --lora-dir: it has .*\bink\b/);
    const traversal = await call('POST', '/jobs', { ...SMALL, loras: [{ name: '../pipeline/model' }] });
    expect(traversal.status).toBe(400); // refused by the front: not a name
    expect(String(traversal.json.message)).toMatch(/is not a LoRA name/);
    // the A1111 listings: what the workers' folders hold (each listed once, by name)
    const listed = (await call('GET', '/sdapi/v1/loras')).json as unknown as { name: string; path: string }[];
    expect(listed.map((l) => l.name)).toEqual(['botanical', 'botanical_peft', 'ink', 'io']);
    expect(listed.find((l) => l.name === 'ink')?.path).toBe('ink.safetensors');
    const cn = (await call('GET', '/controlnet/model_list')).json.model_list as string[];
    expect(cn).toEqual(expect.arrayContaining([expect.stringMatching(/^control_tiny \[[0-9a-f]{8}\]$/)]));
    expect(cn.filter((c) => c.startsWith('control_tiny'))).toHaveLength(1); // .safetensors and .pth: one name
  }, 120_000);

  it('cancel across processes: DELETE stops the running job on its worker; nothing is stored', async () => {
    const s = await call('POST', '/jobs', { ...LONG, uid: 'cancel-1' });
    const id = String(s.json.id);
    await until('the job running', () => job(id), (a) => a.json.status === 'running' && Number(a.json.step) >= 1);
    const d = await call('DELETE', `/jobs/${id}`);
    expect(d.status).toBe(202);
    const end = await until('cancelled', () => job(id), finished);
    expect(end.json).toMatchObject({ status: 'cancelled', reason: 'client' });
    expect(await s3.keys(`${PREFIX}/cancel-1`)).toEqual([]);
  }, 60_000);

  it("A1111's /progress reports the remote job's steps; /interrupt finishes it with its last step's image, as in-process", async () => {
    const pending = call('POST', '/sdapi/v1/txt2img', { prompt: 'a', steps: 200, width: 32, height: 32, sampler_name: 'Euler' });
    const p = await until('progress', () => call('GET', '/sdapi/v1/progress'), (a) => Number(a.json.progress) > 0 && (a.json.state as { sampling_steps: number }).sampling_steps === 200);
    expect(p.json.state).toMatchObject({ sampling_steps: 200, job_count: 1, job: 'txt2img 1/1' });
    expect((await call('POST', '/sdapi/v1/interrupt')).status).toBe(200);
    const answer = await pending;
    expect(answer.status).toBe(200);
    const images = answer.json.images as string[];
    expect(images).toHaveLength(1);
    const png = Buffer.from(images[0], 'base64');
    expect(png.subarray(1, 4).toString()).toBe('PNG');
    expect(png.readUInt32BE(16)).toBe(32); // the full image, decoded from the predicted x0
    expect(JSON.parse(String(answer.json.info))).not.toHaveProperty('images_not_made');
    const interrupted = workers.flatMap((w) => w.lines).filter((l) => l.msg === 'job succeeded (interrupted: the image of its last step)');
    expect(interrupted).toHaveLength(1);
    expect(Number(interrupted[0].stopped_at)).toBeLessThan(200);
  }, 60_000);

  it('a worker SIGKILLed mid-job: the job completes on the other worker, stored once', async () => {
    const s = await call('POST', '/jobs', { ...SMALL, steps: 10, seed: 9, uid: 'killed-1' });
    const id = String(s.json.id);
    await until('the job running', () => job(id), (a) => a.json.status === 'running' && Number(a.json.step) >= 1);
    const victim = await workerRunning(id);
    const w = workers.find((x) => x.pid === victim.pid);
    expect(w).toBeDefined();
    await w?.kill('SIGKILL');
    const end = await until('the job done on the other worker', () => job(id), finished, 120_000);
    expect(end.json).toMatchObject({ status: 'succeeded' });
    const meta = await sidecar('killed-1');
    expect(meta.worker).not.toBe(victim.id);
    expect(await s3.keys(`${PREFIX}/killed-1`)).toEqual([`${PREFIX}/killed-1.json`, `${PREFIX}/killed-1.png`]);
    expect(Buffer.compare(await s3Png('killed-1'), Buffer.from((end.json.result as { image: string }).image, 'base64'))).toBe(0);
  }, 300_000);

  it('the front restarted: jobs and their results are still readable, and one admitted just before completes', async () => {
    const a = await call('POST', '/jobs', { ...SMALL, seed: 1, uid: 'restart-a' });
    const before = await until('done', () => job(String(a.json.id)), finished);
    const b = await call('POST', '/jobs', { ...SMALL, steps: 20, seed: 2, uid: 'restart-b' });
    await server.shutdown({ graceS: 0 });
    server = await startFront();
    await server.ready();
    const again = await job(String(a.json.id));
    expect(again.status).toBe(200);
    expect(again.json.status).toBe('succeeded');
    expect(again.json.result).toEqual(before.json.result);
    const later = await until('the job admitted before the restart', () => job(String(b.json.id)), finished, 60_000);
    expect(later.json).toMatchObject({ status: 'succeeded' });
  }, 120_000);

  it('Redis restarted: the front and the workers reconnect and take new jobs', async () => {
    await redis.restart();
    await until('a worker to announce itself again', () => (server.queue as QueueFront).workers().length, (n) => n >= 1, 30_000);
    const s = await until('the front to admit again', () => call('POST', '/jobs', { ...SMALL, seed: 3, uid: 'after-redis' }), (a) => a.status === 202, 30_000);
    const end = await until('the job after the restart', () => job(String(s.json.id)), finished, 60_000);
    expect(end.json).toMatchObject({ status: 'succeeded' });
    expect((await call('GET', '/health')).json.redis).toBe('connected');
  }, 120_000);

  it('a uid already taken in S3: the conditional PUT refuses it (409) and the existing image is kept', async () => {
    const theirs = Buffer.from('not ours');
    await s3.client().send(new PutObjectCommand({ Bucket: s3.bucket, Key: `${PREFIX}/taken-1.png`, Body: theirs }));
    const s = await call('POST', '/jobs', { ...SMALL, uid: 'taken-1' });
    const end = await until('failed', () => job(String(s.json.id)), finished);
    expect(end.json).toMatchObject({ status: 'failed', error_status: 409 });
    expect(String(end.json.error)).toMatch(/taken-1\.png already exists/);
    expect(await s3.keys(`${PREFIX}/taken-1`)).toEqual([`${PREFIX}/taken-1.png`]);
    expect(Buffer.compare(await s3Png('taken-1'), theirs)).toBe(0);
  }, 60_000);

  it('/metrics: Prometheus text with the queue, the finished jobs, the durations and the workers', async () => {
    const res = await fetch(`${server.url}/metrics`);
    expect(res.headers.get('content-type')).toMatch(/^text\/plain; version=0\.0\.4/);
    // the gauges are Redis' counts and the workers' announcements as of the front's last poll: let them settle
    const scrape = async (): Promise<string> => (await fetch(`${server.url}/metrics`)).text();
    const text = await until('the gauges to settle', scrape, (t) => /^sd_jobs_running 0$/m.test(t) && /^sd_worker_running\{.*\} 0$/m.test(t), 20_000);
    const value = (line: string): number => Number(new RegExp(`^${line.replace(/[{}"=]/g, '\\$&')} (\\S+)$`, 'm').exec(text)?.[1]);
    expect(value('sd_jobs_total{status="succeeded"}')).toBeGreaterThanOrEqual(1); // this front's, since its restart
    expect(value('sd_job_failures_total')).toBeGreaterThanOrEqual(1);
    expect(value('sd_job_duration_seconds_count')).toBe(value('sd_jobs_total{status="succeeded"}'));
    expect(value('sd_queue_depth')).toBe(0);
    expect(value('sd_workers')).toBe(1); // one "tiny" worker left (one SIGTERMed, one SIGKILLed)
    expect(text).toMatch(/^sd_worker_running\{worker="[^"]+",host="[^"]+",model="tiny"\} 0$/m);
  });

});
