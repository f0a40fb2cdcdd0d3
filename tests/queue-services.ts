/**
 * The real services the queue tests run against, on 127.0.0.1 only: a redis-server of our own per test file (Debian's
 * binary, no persistence, restartable on the same port), an S3 server (the `s3rver` npm package) and `sd worker`
 * child processes on the tiny fixture model. Without redis-server the tests skip, saying why, unless
 * SD_REQUIRE_SERVICES is set (CI sets it), where they fail.
 *
 * s3rver answers the S3 protocol the SDK speaks but ignores `If-None-Match: *` on PUT (it honours it on GET only),
 * so the test server adds that one rule in front of its routes, as S3 does it: 412 PreconditionFailed when the key
 * exists. Everything else is s3rver's.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { CreateBucketCommand, ListObjectsV2Command, S3Client } from '@aws-sdk/client-s3';
import S3rver from 's3rver';

export const ROOT = path.resolve(import.meta.dirname, '..');
const FIX = path.join(ROOT, 'tests/fixtures/pipeline');

export const REDIS_BIN = spawnSync('sh', ['-c', 'command -v redis-server'], { encoding: 'utf8' }).stdout.trim();
export const REQUIRED = (process.env.SD_REQUIRE_SERVICES ?? '') !== '';
/** The reason the queue tests skip, or null when they can run. */
export const SKIP_REASON = REDIS_BIN === '' ? 'redis-server is not installed (apt-get install redis-server; .ci/run does it)' : null;
if (SKIP_REASON !== null && REQUIRED) throw new Error(`SD_REQUIRE_SERVICES is set but ${SKIP_REASON}`);
if (SKIP_REASON !== null) process.stderr.write(`queue tests skipped: ${SKIP_REASON}\n`);

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
    s.on('error', reject);
  });
}

/** `p`, or give up waiting after `ms` (teardown must not hang a run). */
export function within<T>(p: Promise<T>, ms: number): Promise<T | undefined> {
  return Promise.race([p, new Promise<undefined>((r) => setTimeout(() => r(undefined), ms).unref())]);
}

export async function until<T>(what: string, get: () => T | Promise<T>, ok: (v: T) => boolean, timeoutMs = 60_000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await get();
    if (ok(v)) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}: last ${JSON.stringify(v)?.slice(0, 300)}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

/** A redis-server of its own; `restart()` stops it and starts it again on the same port, empty. */
export class TestRedis {
  private proc: ChildProcess | null = null;

  private constructor(readonly port: number) {}

  static async start(): Promise<TestRedis> {
    const r = new TestRedis(await freePort());
    await r.up();
    return r;
  }

  get url(): string {
    return `redis://127.0.0.1:${this.port}`;
  }

  async up(): Promise<void> {
    this.proc = spawn(REDIS_BIN, ['--port', String(this.port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' });
    const proc = this.proc;
    process.once('exit', () => proc.kill('SIGKILL')); // never outlives the test run, even one that stops early
    await until('redis-server to answer', () => spawnSync('redis-cli', ['-p', String(this.port), 'ping'], { encoding: 'utf8' }).stdout.trim(), (s) => s === 'PONG', 10_000);
  }

  async down(): Promise<void> {
    const p = this.proc;
    this.proc = null;
    if (p === null || p.exitCode !== null || p.signalCode !== null) return;
    await new Promise<void>((resolve) => {
      p.once('exit', () => resolve());
      p.kill('SIGKILL');
    });
  }

  async restart(): Promise<void> {
    await this.down();
    await this.up();
  }
}

interface KoaContext {
  readonly method: string;
  readonly path: string;
  get(header: string): string;
  status: number;
  type: string;
  body: unknown;
  readonly app: { readonly context: { readonly store: { existsObject(bucket: string, key: string): Promise<boolean> } } };
}
type Middleware = (ctx: KoaContext, next: () => Promise<void>) => Promise<void>;

export const S3_CREDENTIALS = { AWS_ACCESS_KEY_ID: 'S3RVER', AWS_SECRET_ACCESS_KEY: 'S3RVER', AWS_REGION: 'us-east-1' };

/** s3rver on a free loopback port, with one bucket, and PUT's If-None-Match: * added (see the header). */
export class TestS3 {
  private constructor(
    private readonly server: S3rver,
    readonly endpoint: string,
    readonly bucket: string,
  ) {}

  static async start(bucket = 'sd-test'): Promise<TestS3> {
    const server = new S3rver({ port: 0, address: '127.0.0.1', silent: true, directory: mkdtempSync(path.join(tmpdir(), 'sd-s3-')) });
    // s3rver is a Koa application: a middleware put first runs before its router.
    (server as unknown as { middleware: Middleware[] }).middleware.unshift(async (ctx, next) => {
      const m = /^\/([^/]+)\/(.+)$/.exec(ctx.path);
      if (ctx.method === 'PUT' && ctx.get('if-none-match') === '*' && m !== null && (await ctx.app.context.store.existsObject(m[1], decodeURIComponent(m[2])))) {
        ctx.status = 412;
        ctx.type = 'application/xml';
        ctx.body = '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>PreconditionFailed</Code><Message>At least one of the pre-conditions you specified did not hold</Message><Condition>If-None-Match</Condition></Error>';
        return;
      }
      await next();
    });
    const { port } = await server.run();
    const s3 = new TestS3(server, `http://127.0.0.1:${port}`, bucket);
    await s3.client().send(new CreateBucketCommand({ Bucket: bucket }));
    return s3;
  }

  client(): S3Client {
    return new S3Client({ endpoint: this.endpoint, region: 'us-east-1', forcePathStyle: true, credentials: { accessKeyId: 'S3RVER', secretAccessKey: 'S3RVER' } });
  }

  async keys(prefix = ''): Promise<string[]> {
    const r = await this.client().send(new ListObjectsV2Command({ Bucket: this.bucket, Prefix: prefix, MaxKeys: 1000 }));
    return (r.Contents ?? []).map((o) => o.Key ?? '').sort();
  }

  /** Closes the listener and the clients' keep-alive connections with it (an http server's close waits for them). */
  async close(): Promise<void> {
    const closing = this.server.close();
    (this.server as unknown as { httpServer?: { closeAllConnections(): void } }).httpServer?.closeAllConnections();
    await closing;
  }
}

/** `node bin/sd.js worker` on the tiny fixture model, its JSON log lines kept. */
export class WorkerProcess {
  readonly lines: Record<string, unknown>[] = [];
  private constructor(readonly proc: ChildProcess) {}

  static spawn(redisUrl: string, extra: string[], env: Record<string, string> = {}): WorkerProcess {
    const args = [
      path.join(ROOT, 'bin/sd.js'), 'worker', '--queue', redisUrl,
      '--weights', path.join(FIX, 'model.safetensors'), '--config', path.join(FIX, 'fixture.json'), '--tokenizer', path.join(ROOT, 'tests/fixtures/tokenizer'),
      '--backend', 'cpu', '--lock', '30', '--grace', '5', ...extra,
    ];
    const proc = spawn(process.execPath, args, { cwd: ROOT, env: { ...process.env, SD_BACKEND: '', ...S3_CREDENTIALS, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    const w = new WorkerProcess(proc);
    let buffer = '';
    proc.stdout?.on('data', (chunk: Buffer) => {
      buffer += chunk.toString('utf8');
      const parts = buffer.split('\n');
      buffer = parts.pop() ?? '';
      for (const line of parts) {
        try {
          w.lines.push(JSON.parse(line) as Record<string, unknown>);
        } catch {
          w.lines.push({ msg: line });
        }
      }
    });
    proc.stderr?.on('data', (chunk: Buffer) => w.lines.push({ stderr: chunk.toString('utf8') }));
    return w;
  }

  get pid(): number {
    return this.proc.pid ?? -1;
  }

  /** The worker id it announced, once ready. */
  async ready(timeoutMs = 120_000): Promise<string> {
    const line = await until(`worker ${this.pid} ready`, () => this.lines.find((l) => l.msg === 'worker ready: taking jobs') ?? (this.proc.exitCode !== null ? { exited: this.proc.exitCode, log: this.lines.slice(-5) } : null), (l) => l !== null, timeoutMs);
    if (line !== null && 'exited' in line) throw new Error(`worker exited ${JSON.stringify(line)}`);
    return String(line?.worker);
  }

  kill(signal: NodeJS.Signals): Promise<number | null> {
    return new Promise((resolve) => {
      if (this.proc.exitCode !== null || this.proc.signalCode !== null) return resolve(this.proc.exitCode); // already gone
      this.proc.once('exit', (code) => resolve(code));
      this.proc.kill(signal);
    });
  }
}
