/**
 * Webhooks: when a job with a `webhook` URL finishes (succeeded, failed or cancelled), the server POSTs the job as
 * GET /jobs/:id shows it (./job-view.ts) to that URL:
 *
 *   Content-Type: application/json
 *   X-SD-Event: job.succeeded | job.failed | job.cancelled
 *   X-SD-Delivery: a UUID, the same on every attempt of one delivery
 *   X-SD-Timestamp: Unix seconds of the attempt
 *   X-SD-Signature: sha256=<hex HMAC-SHA256 of the raw body, keyed with --webhook-secret> (absent without a secret)
 *
 * A receiver checks the signature over the exact bytes it received (in constant time), and may refuse an old
 * timestamp. Delivery never blocks the queue: it runs beside it. A 2xx answer is success; a network error, a
 * timeout, 408, 429 or 5xx is retried with exponential backoff (1 s, 2 s, 4 s, ... up to `maxAttempts`); another 4xx
 * is the receiver's refusal and is not retried. At most `maxPending` deliveries are held (waiting or retrying),
 * each body at most `maxBodyBytes`: beyond, the oldest is dropped with a log line, so a slow or dead receiver cannot
 * make the server hold memory without bound.
 */
import { createHmac, randomUUID } from 'node:crypto';
import { HttpError } from './errors.js';

export interface WebhookOptions {
  /** HMAC key of X-SD-Signature; null: deliveries are unsigned. */
  readonly secret: string | null;
  readonly maxAttempts?: number;
  /** Delay before the second attempt; doubled each time, capped by maxDelayMs. */
  readonly firstDelayMs?: number;
  readonly maxDelayMs?: number;
  /** One attempt's limit (connect, send, answer). */
  readonly timeoutMs?: number;
  readonly maxPending?: number;
  readonly maxBodyBytes?: number;
  readonly log?: (level: 'info' | 'warn', message: string, fields: Readonly<Record<string, unknown>>) => void;
}

export const DEFAULT_WEBHOOKS = Object.freeze({
  maxAttempts: 5,
  firstDelayMs: 1000,
  maxDelayMs: 30_000,
  timeoutMs: 10_000,
  maxPending: 64,
  maxBodyBytes: 32 * 2 ** 20,
});

const MAX_URL_CHARS = 2048;

/** The `webhook` field: an absolute http(s) URL, else 400 naming the field. */
export function checkWebhookUrl(s: string): string {
  let url: URL;
  try {
    url = new URL(s);
  } catch {
    throw new HttpError(400, 'webhook: not a URL; give an absolute http:// or https:// URL', 'webhook');
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') {
    throw new HttpError(400, `webhook: only http:// and https:// URLs are allowed, got ${url.protocol}`, 'webhook');
  }
  if (s.length > MAX_URL_CHARS) throw new HttpError(400, `webhook: longer than ${MAX_URL_CHARS} characters`, 'webhook');
  if (url.username !== '' || url.password !== '') throw new HttpError(400, 'webhook: credentials in the URL are not allowed', 'webhook');
  return url.href;
}

/** The X-SD-Signature value of `body`. */
export function signature(secret: string, body: string | Uint8Array): string {
  return `sha256=${createHmac('sha256', secret).update(body).digest('hex')}`;
}

interface Delivery {
  readonly id: string;
  readonly url: string;
  readonly event: string;
  readonly body: string;
  attempt: number;
  timer: NodeJS.Timeout | null;
  controller: AbortController | null;
}

/** Whether an answer's status is worth another attempt. */
const retryable = (status: number): boolean => status === 408 || status === 429 || status >= 500;

export class WebhookSender {
  private readonly o: Required<Omit<WebhookOptions, 'log' | 'secret'>> & Pick<WebhookOptions, 'log' | 'secret'>;
  /** Held deliveries, oldest first. */
  private readonly held = new Map<string, Delivery>();
  private readonly idleWaiters: (() => void)[] = [];
  private closed = false;

  constructor(o: WebhookOptions) {
    this.o = { ...DEFAULT_WEBHOOKS, ...o };
  }

  get pending(): number {
    return this.held.size;
  }

  /** Queue one delivery of `payload` (JSON-serialised once) to `url`; returns its delivery id. Never throws for the receiver. */
  send(url: string, event: string, payload: unknown): string {
    const body = JSON.stringify(payload);
    const id = randomUUID();
    if (this.closed) return id;
    if (Buffer.byteLength(body) > this.o.maxBodyBytes) {
      this.o.log?.('warn', 'webhook not sent: body over the limit', { delivery: id, url, bytes: Buffer.byteLength(body) });
      return id;
    }
    while (this.held.size >= this.o.maxPending) {
      const oldest = this.held.values().next().value as Delivery;
      this.o.log?.('warn', 'webhook dropped: too many deliveries pending', { delivery: oldest.id, url: oldest.url, attempts: oldest.attempt });
      this.drop(oldest);
    }
    const d: Delivery = { id, url, event, body, attempt: 0, timer: null, controller: null };
    this.held.set(id, d);
    void this.attempt(d);
    return id;
  }

  /** Resolves once nothing is held (every delivery succeeded or was given up). */
  idle(): Promise<void> {
    if (this.held.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** Stop: pending retries are dropped, attempts in flight aborted. */
  close(): void {
    this.closed = true;
    for (const d of [...this.held.values()]) this.drop(d);
  }

  private async attempt(d: Delivery): Promise<void> {
    d.timer = null;
    d.attempt++;
    const controller = new AbortController();
    d.controller = controller;
    const timeout = setTimeout(() => controller.abort(new Error(`no answer in ${this.o.timeoutMs} ms`)), this.o.timeoutMs);
    let why: string;
    let again = true;
    try {
      const headers: Record<string, string> = {
        'content-type': 'application/json',
        'user-agent': 'sd-serve-webhooks',
        'x-sd-event': d.event,
        'x-sd-delivery': d.id,
        'x-sd-timestamp': String(Math.floor(Date.now() / 1000)),
      };
      if (this.o.secret !== null && this.o.secret !== undefined) headers['x-sd-signature'] = signature(this.o.secret, d.body);
      const res = await fetch(d.url, { method: 'POST', headers, body: d.body, signal: controller.signal, redirect: 'manual' });
      await res.body?.cancel().catch(() => {});
      if (res.status >= 200 && res.status < 300) {
        this.o.log?.('info', 'webhook delivered', { delivery: d.id, url: d.url, status: res.status, attempts: d.attempt });
        return this.drop(d);
      }
      why = `answered ${res.status}`;
      again = retryable(res.status);
    } catch (e) {
      why = e instanceof Error ? (e.cause instanceof Error ? `${e.message}: ${e.cause.message}` : e.message) : String(e);
    } finally {
      clearTimeout(timeout);
      d.controller = null;
    }
    if (!this.held.has(d.id)) return; // dropped or closed meanwhile
    if (!again || d.attempt >= this.o.maxAttempts) {
      this.o.log?.('warn', `webhook given up: ${why}`, { delivery: d.id, url: d.url, attempts: d.attempt });
      return this.drop(d);
    }
    const delay = Math.min(this.o.maxDelayMs, this.o.firstDelayMs * 2 ** (d.attempt - 1));
    this.o.log?.('info', `webhook failed (${why}): retrying in ${delay} ms`, { delivery: d.id, url: d.url, attempts: d.attempt });
    d.timer = setTimeout(() => void this.attempt(d), delay);
    d.timer.unref();
  }

  private drop(d: Delivery): void {
    if (d.timer !== null) clearTimeout(d.timer);
    d.controller?.abort(new Error('webhook delivery dropped'));
    this.held.delete(d.id);
    if (this.held.size === 0) for (const resolve of this.idleWaiters.splice(0)) resolve();
  }
}
