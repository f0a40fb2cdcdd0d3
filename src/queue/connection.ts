/**
 * Redis connections from a `redis://[user:pass@]host:port[/db]` URL (or `rediss://` for TLS): the options BullMQ's
 * queues and workers connect with, and plain ioredis clients for the keys and the cancel channel of ./protocol.ts.
 * Every client reconnects on its own (backoff up to 2 s) and never gives up on a command while Redis is away
 * (maxRetriesPerRequest: null, which BullMQ's blocking workers require), so a restarted Redis is picked up again.
 */
import { Redis, type RedisOptions } from 'ioredis';

export class QueueUrlError extends Error {
  override name = 'QueueUrlError';
}

const RETRY = (times: number): number => Math.min(100 * times, 2000);

/** Checks the URL's form; throws QueueUrlError saying what a queue URL looks like. */
export function checkRedisUrl(url: string): string {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new QueueUrlError(`--queue: ${JSON.stringify(url)} is not a URL; expected redis://HOST:PORT[/DB], e.g. redis://127.0.0.1:6379`);
  }
  if (u.protocol !== 'redis:' && u.protocol !== 'rediss:') throw new QueueUrlError(`--queue: expected a redis:// or rediss:// URL, got ${u.protocol}//...`);
  if (u.pathname !== '' && u.pathname !== '/' && !/^\/\d+$/.test(u.pathname)) throw new QueueUrlError(`--queue: the path is the database number (/0 .. /15), got ${u.pathname}`);
  return url;
}

/** What BullMQ's Queue, Worker and QueueEvents are given as `connection`. */
export function bullConnection(url: string): { url: string; maxRetriesPerRequest: null; retryStrategy: (times: number) => number; enableOfflineQueue: boolean } {
  return { url: checkRedisUrl(url), maxRetriesPerRequest: null, retryStrategy: RETRY, enableOfflineQueue: true };
}

/** A plain client (keys, publish, subscribe). */
export function redisClient(url: string, extra: RedisOptions = {}): Redis {
  return new Redis(checkRedisUrl(url), { maxRetriesPerRequest: null, retryStrategy: RETRY, lazyConnect: false, ...extra });
}
