/* global TextDecoder, setTimeout */
/**
 * Following a job until it finishes: its server-sent events (GET /jobs/:id/events, read with fetch so the key goes
 * along, which EventSource cannot send), or, where the server has no stream or it breaks off, GET /jobs/:id every
 * POLL_MS. Either way the caller hears `progress` with a job view ({status, step, total, eta_s, position}) and
 * `preview` with a preview URL, and gets the finished job (GET /jobs/:id's shape) back.
 */
import { call, fetchWithKey } from './api.js';

/** Milliseconds between two reads of a running job when polling. */
const POLL_MS = 250;
const FINAL = new Set(['succeeded', 'failed', 'cancelled']);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * @typedef {{progress: (job: any) => void, preview: (url: string, step: number) => void}} Listener
 */

/** @param {string} id @param {Listener} on @returns {Promise<any>} the finished job */
export async function followJob(id, on) {
  const streamed = await followEvents(id, on).catch(() => null);
  return streamed ?? poll(id, on);
}

/** @param {string} id @param {Listener} on */
async function poll(id, on) {
  for (;;) {
    const job = await call('GET', `/jobs/${encodeURIComponent(id)}`);
    if (FINAL.has(job.status)) return job;
    on.progress(job);
    if (typeof job.preview === 'string') on.preview(job.preview, job.step);
    await sleep(POLL_MS);
  }
}

/**
 * The event stream; null when the server has none (404 from a server without it, 503 when its streams are all
 * taken) or it ended before the job did, so the caller polls instead.
 * @param {string} id @param {Listener} on @returns {Promise<any | null>}
 */
async function followEvents(id, on) {
  const res = await fetchWithKey(`/jobs/${encodeURIComponent(id)}/events`, { accept: 'text/event-stream' });
  if (!res.ok || !(res.headers.get('content-type') ?? '').startsWith('text/event-stream') || res.body === null) {
    void res.body?.cancel();
    return null;
  }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffered = '';
  let running = /** @type {any} */ ({ status: 'queued' });
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return null;
      buffered += decoder.decode(value, { stream: true }).replace(/\r\n?/g, '\n');
      for (let end = buffered.indexOf('\n\n'); end >= 0; end = buffered.indexOf('\n\n')) {
        const frame = parseFrame(buffered.slice(0, end));
        buffered = buffered.slice(end + 2);
        if (frame === null) continue;
        const { event, data } = frame;
        if (FINAL.has(event)) return data;
        if (event === 'status') running = data;
        else if (event === 'progress') running = { ...running, status: 'running', ...data };
        else if (event === 'preview' && typeof data.url === 'string') on.preview(data.url, data.step);
        on.progress(running);
      }
    }
  } finally {
    void reader.cancel().catch(() => {});
  }
}

/** One event block: `event:` and `data:` lines (comments start with ':'). @param {string} block */
function parseFrame(block) {
  let event = 'message';
  const data = [];
  for (const line of block.split('\n')) {
    if (line.startsWith(':')) continue;
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
    if (field === 'event') event = value;
    else if (field === 'data') data.push(value);
  }
  if (data.length === 0) return null;
  try {
    return { event, data: JSON.parse(data.join('\n')) };
  } catch {
    return null;
  }
}
