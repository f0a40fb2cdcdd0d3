/**
 * Webhooks (src/server/webhooks.ts) against receivers on 127.0.0.1: the signature over the exact body verifies with
 * the secret (and not with another), a receiver that fails twice then succeeds gets three attempts of one delivery
 * with growing gaps, an unreachable one is given up after maxAttempts, a 4xx refusal is not retried, the pending
 * bound drops the oldest, only http(s) URLs are accepted. End to end: POST /jobs with `webhook` on a server with a
 * fake engine posts the finished job (succeeded with its result, failed, cancelled), and a bad URL is 400.
 */
import { createHmac, timingSafeEqual } from 'node:crypto';
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { encodePng } from '../src/image/codec.js';
import { ParamError, type GenerateOptions, type GenerateParams, type GenerateResult } from '../src/pipeline/api.js';
import { resolveParams, type ParamLimits } from '../src/pipeline/params.js';
import type { Engine } from '../src/server/engine.js';
import { SdServer } from '../src/server/server.js';
import { WebhookSender, checkWebhookUrl, signature } from '../src/server/webhooks.js';

interface Received {
  readonly headers: IncomingHttpHeaders;
  readonly body: Buffer;
  readonly at: number;
}

const servers: Server[] = [];

/** A receiver answering `statuses[i]` to the i-th request (the last one after that). */
async function receiver(statuses: number[]): Promise<{ url: string; got: Received[] }> {
  const got: Received[] = [];
  const server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      got.push({ headers: req.headers, body: Buffer.concat(chunks), at: Date.now() });
      res.statusCode = statuses[Math.min(got.length - 1, statuses.length - 1)];
      res.end('ok');
    });
  });
  servers.push(server);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/hook`, got };
}

afterEach(async () => {
  for (const s of servers.splice(0)) await new Promise((r) => s.close(r));
});

/** What a receiver does: HMAC the raw bytes with its secret, compare in constant time. */
function verifies(r: Received, secret: string): boolean {
  const want = Buffer.from(`sha256=${createHmac('sha256', secret).update(r.body).digest('hex')}`);
  const given = Buffer.from(String(r.headers['x-sd-signature'] ?? ''));
  return given.length === want.length && timingSafeEqual(given, want);
}

const fast = { firstDelayMs: 50, maxDelayMs: 400, timeoutMs: 2000 };

describe('WebhookSender', () => {
  it('signs the exact body with the secret, with event, delivery and timestamp headers', async () => {
    const r = await receiver([200]);
    const sender = new WebhookSender({ secret: 's3cret', ...fast });
    sender.send(r.url, 'job.succeeded', { id: 'a', status: 'succeeded', n: 1.5 });
    await sender.idle();
    expect(r.got).toHaveLength(1);
    const [hit] = r.got;
    expect(JSON.parse(hit.body.toString())).toEqual({ id: 'a', status: 'succeeded', n: 1.5 });
    expect(verifies(hit, 's3cret')).toBe(true);
    expect(verifies(hit, 'other')).toBe(false);
    expect(hit.headers['x-sd-signature']).toBe(signature('s3cret', hit.body));
    expect(hit.headers).toMatchObject({ 'content-type': 'application/json', 'x-sd-event': 'job.succeeded' });
    expect(Math.abs(Number(hit.headers['x-sd-timestamp']) - Date.now() / 1000)).toBeLessThan(5);
    expect(String(hit.headers['x-sd-delivery'])).toMatch(/^[0-9a-f-]{36}$/);
  });

  it('a receiver failing twice (500, 503) then answering 204 gets three attempts of one delivery, backing off', async () => {
    const r = await receiver([500, 503, 204]);
    const sender = new WebhookSender({ secret: 'k', ...fast });
    sender.send(r.url, 'job.failed', { id: 'b' });
    await sender.idle();
    expect(r.got).toHaveLength(3);
    expect(new Set(r.got.map((g) => g.headers['x-sd-delivery'])).size).toBe(1);
    const gaps = [r.got[1].at - r.got[0].at, r.got[2].at - r.got[1].at];
    expect(gaps[0]).toBeGreaterThanOrEqual(45);
    expect(gaps[1]).toBeGreaterThanOrEqual(95); // doubled
    expect(r.got.every((g) => verifies(g, 'k'))).toBe(true);
  });

  it('an unreachable receiver is given up after maxAttempts; a 4xx refusal is not retried', async () => {
    const closed = await receiver([200]);
    const url = closed.url;
    await new Promise((res) => servers.pop()?.close(res)); // nothing listens there now
    const logs: string[] = [];
    const sender = new WebhookSender({ secret: null, ...fast, maxAttempts: 3, log: (_l, m) => logs.push(m) });
    sender.send(url, 'job.cancelled', { id: 'c' });
    const refused = await receiver([410]);
    sender.send(refused.url, 'job.cancelled', { id: 'd' });
    await sender.idle();
    expect(logs.filter((m) => m.startsWith('webhook given up'))).toHaveLength(2);
    expect(logs.filter((m) => m.includes('retrying'))).toHaveLength(2); // the unreachable one: 3 attempts, 2 retries
    expect(refused.got).toHaveLength(1);
    expect(refused.got[0].headers['x-sd-signature']).toBeUndefined(); // no secret: unsigned
  });

  it('holds at most maxPending deliveries: the oldest is dropped', async () => {
    const r = await receiver([503]);
    const logs: string[] = [];
    const sender = new WebhookSender({ secret: null, firstDelayMs: 10_000, maxPending: 2, log: (_l, m) => logs.push(m) });
    for (const id of ['1', '2', '3']) sender.send(r.url, 'job.succeeded', { id });
    expect(sender.pending).toBe(2);
    expect(logs.some((m) => m.includes('dropped'))).toBe(true);
    sender.close();
    expect(sender.pending).toBe(0);
  });

  it('only absolute http(s) URLs', () => {
    expect(checkWebhookUrl('https://example.com/a?b=1')).toBe('https://example.com/a?b=1');
    for (const bad of ['ftp://example.com/', 'file:///etc/passwd', 'javascript:alert(1)', '/relative', 'http://u:p@example.com/']) {
      expect(() => checkWebhookUrl(bad), bad).toThrow(/^webhook: /);
    }
  });
});

/** Steps wait `stepMs`; a prompt of 'fail' throws a ParamError at step 1. */
class FakeEngine implements Engine {
  readonly limits: ParamLimits = { width: 16, height: 16, minSize: 8, clipLayers: 3 };
  async generate(p: GenerateParams, o: GenerateOptions): Promise<GenerateResult> {
    const r = resolveParams(p, this.limits);
    for (let step = 1; step <= r.steps; step++) {
      await new Promise((res) => setTimeout(res, 20));
      if (o.signal?.aborted) throw new DOMException('cancelled', 'AbortError');
      if (p.prompt === 'fail') throw new ParamError('prompt', 'refused by the fake engine');
      o.onProgress?.(step, r.steps);
    }
    const rgb = new Uint8Array(16 * 16 * 3).fill(7);
    return { images: [{ png: await encodePng({ rgb, width: 16, height: 16 }), rgb, seed: r.seed }], params: r };
  }
  dispose(): void {}
}

describe('POST /jobs with webhook', () => {
  it('posts the finished job (succeeded with its result, failed, cancelled), signed; a bad URL is 400', async () => {
    const r = await receiver([200]);
    const out = await mkdtemp(path.join(tmpdir(), 'sd-webhooks-'));
    const server = await SdServer.start({ loadEngine: async () => new FakeEngine(), outputs: out, webhooks: { secret: 'hook-key', ...fast } }, { port: 0, host: '127.0.0.1' });
    try {
      await server.ready();
      const post = async (body: unknown) => {
        const res = await fetch(`${server.url}/jobs`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
        return { status: res.status, json: (await res.json()) as Record<string, unknown> };
      };
      const ok = await post({ prompt: 'a', steps: 2, seed: 5, webhook: r.url });
      const failed = await post({ prompt: 'fail', steps: 2, webhook: r.url });
      const cancelled = await post({ prompt: 'c', steps: 50, webhook: r.url });
      expect([ok.status, failed.status, cancelled.status]).toEqual([202, 202, 202]);
      await fetch(`${server.url}/jobs/${String(cancelled.json.id)}`, { method: 'DELETE' });
      const bad = await post({ prompt: 'a', webhook: 'ftp://127.0.0.1/x' });
      expect(bad.status).toBe(400);
      expect(bad.json).toMatchObject({ field: 'webhook' });
      for (let i = 0; i < 500 && r.got.length < 3; i++) await new Promise((res) => setTimeout(res, 20));
      await server.webhooks.idle();
      const byId = new Map(r.got.map((g) => [String(JSON.parse(g.body.toString()).id), g]));
      const body = (id: unknown) => JSON.parse(String(byId.get(String(id))?.body)) as Record<string, unknown>;
      expect(body(ok.json.id)).toMatchObject({ status: 'succeeded', result: { seed: 5, message: 'success' } });
      expect(byId.get(String(ok.json.id))?.headers['x-sd-event']).toBe('job.succeeded');
      expect(body(failed.json.id)).toMatchObject({ status: 'failed', error_status: 400 });
      expect(body(cancelled.json.id)).toMatchObject({ status: 'cancelled', reason: 'client' });
      expect(r.got.every((g) => verifies(g, 'hook-key'))).toBe(true);
    } finally {
      await server.shutdown({ graceS: 0 });
      await rm(out, { recursive: true, force: true });
    }
  });
});
