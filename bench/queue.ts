/**
 * `npm run bench:queue [-- --jobs N --redis redis://...]`: the Redis queue's own overhead per job, with a stub engine
 * that answers at once (a ready-made 8x8 PNG), so everything measured is the queue: the front's admission (uid
 * reservation, BullMQ add), a worker taking the job, its progress and completion, and
 * the front's mirror learning of it (QueueEvents, then one read of the job). Jobs run one after another; the figure
 * to compare with a generation (seconds) is the median. Outputs go to memory (`--outputs DIR` for a folder, whose fsyncs
 * then count too). Without --redis (or SD_TEST_REDIS) it starts a redis-server
 * of its own on a free loopback port.
 */
import { spawn } from 'node:child_process';
import { createServer } from 'node:net';
import { pino } from 'pino';
import { encodePng } from '../src/image/codec.js';
import type { GenerateParams, GenerateResult } from '../src/pipeline/api.js';
import { resolveParams, type ParamLimits } from '../src/pipeline/params.js';
import { QueueFront } from '../src/queue/front.js';
import { QueueWorker } from '../src/queue/worker.js';
import type { Engine } from '../src/server/engine.js';
import { openOutputs, type OutputKind, type OutputStorage } from '../src/storage/outputs.js';

const arg = (name: string, fallback: string): string => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
};

async function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}

async function redisUrl(): Promise<{ url: string; stop: () => void }> {
  const given = arg('redis', process.env.SD_TEST_REDIS ?? '');
  if (given !== '') return { url: given, stop: () => undefined };
  const port = await freePort();
  const proc = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' });
  await new Promise((r) => setTimeout(r, 300));
  return { url: `redis://127.0.0.1:${port}`, stop: () => proc.kill('SIGKILL') };
}

class StubEngine implements Engine {
  readonly limits: ParamLimits = { width: 8, height: 8, minSize: 8, clipLayers: 2 };
  constructor(private readonly png: Buffer) {}
  async generate(p: GenerateParams, o: { onProgress?: (s: number, t: number) => void }): Promise<GenerateResult> {
    const r = resolveParams(p, this.limits);
    for (let s = 1; s <= r.steps; s++) o.onProgress?.(s, r.steps);
    return { images: [{ png: this.png, rgb: new Uint8Array(8 * 8 * 3), seed: r.seed }], params: r };
  }
  dispose(): void {}
}

/** Outputs kept in memory: the bench measures the queue, not the disk. */
class MemoryOutputs implements OutputStorage {
  readonly location = 'memory';
  private readonly files = new Map<string, Buffer>();
  async exists(uid: string): Promise<boolean> {
    return this.files.has(`${uid}.json`);
  }
  async save(uid: string, png: Uint8Array, sidecar: unknown): Promise<void> {
    this.files.set(`${uid}.json`, Buffer.from(JSON.stringify(sidecar)));
    this.files.set(`${uid}.png`, Buffer.from(png));
  }
  async read(uid: string, kind: OutputKind): Promise<Buffer | null> {
    return this.files.get(`${uid}.${kind}`) ?? null;
  }
}

const quantile = (xs: number[], q: number): number => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(q * xs.length))];

async function main(): Promise<void> {
  const jobs = Number(arg('jobs', '200'));
  const redis = await redisUrl();
  const png = await encodePng({ rgb: new Uint8Array(8 * 8 * 3).fill(128), width: 8, height: 8 });
  const dir = arg('outputs', '');
  const outputs = dir !== '' ? await openOutputs(dir) : new MemoryOutputs();
  const model = `bench${process.pid}`;
  const worker = await QueueWorker.start({ url: redis.url, model: { name: model, engine: new StubEngine(png) }, outputs, log: pino({ level: 'silent' }) });
  const front = new QueueFront({ url: redis.url, defaultModel: model, maxQueue: jobs + 1, ttlS: 600 });
  await front.connect();
  const ms: number[] = [];
  const parts = { toWorker: [] as number[], inWorker: [] as number[], toFront: [] as number[] };
  for (let i = 0; i < jobs + 10; i++) {
    const t0 = performance.now();
    const job = front.submit({ uid: `bench-${process.pid}-${i}`, params: { prompt: 'x', steps: 2, width: 8, height: 8, seed: i } });
    await job.done;
    if (job.status !== 'succeeded') throw new Error(`job ${i} ${job.status}: ${job.error?.message ?? job.cancelReason ?? ''}`);
    if (i < 10) continue; // the first ten warm the connections up
    const now = Date.now();
    ms.push(performance.now() - t0);
    const started = job.startedAt?.getTime() ?? now;
    const finished = job.finishedAt?.getTime() ?? now;
    parts.toWorker.push(started - job.createdAt.getTime());
    parts.inWorker.push(finished - started);
    parts.toFront.push(now - finished);
  }
  const mean = ms.reduce((a, b) => a + b, 0) / ms.length;
  console.log(`queue overhead per job (${jobs} jobs one at a time, stub engine, outputs to ${outputs.location}, ${redis.url}):`);
  console.log(`  median ${quantile(ms, 0.5).toFixed(2)} ms   mean ${mean.toFixed(2)} ms   p95 ${quantile(ms, 0.95).toFixed(2)} ms   max ${Math.max(...ms).toFixed(2)} ms`);
  console.log(`  of which (medians, ms clock): admitted -> taken ${quantile(parts.toWorker, 0.5)}, taken -> completed (stub run, progress, outputs) ${quantile(parts.inWorker, 0.5)}, completed -> the front knows ${quantile(parts.toFront, 0.5)}`);
  await front.close();
  await worker.stop(0);
  redis.stop();
  process.exit(0);
}

await main();
