/**
 * What a running job shows while it runs: its latest preview (kept as bytes from the engine, encoded to PNG only
 * when asked for, once per step; in queue mode a PNG its worker put into Redis, read only when asked for) and the
 * listeners of its event stream (GET /jobs/:id/events). The server feeds it progress, previews and status changes;
 * it forgets a job's preview once the job is finished.
 *
 * Event stream clients are bounded (`maxClients`, default 32): one beyond is refused with 503, so a crowd of open
 * connections cannot hold the server's memory.
 */
import { encodePng } from '../image/codec.js';
import type { StepPreview } from '../pipeline/api.js';

/** What is said of a preview without its pixels. */
export type PreviewFacts = Omit<StepPreview, 'rgb'>;

export type LiveEventName = 'status' | 'progress' | 'preview' | 'succeeded' | 'failed' | 'cancelled';

export interface LiveEvent {
  readonly event: LiveEventName;
  readonly data: Readonly<Record<string, unknown>>;
}

export type LiveListener = (e: LiveEvent) => void;

interface Preview {
  readonly p: PreviewFacts;
  readonly make: () => Promise<Buffer | null>;
  png: Promise<Buffer | null> | null;
}

export const DEFAULT_MAX_EVENT_CLIENTS = 32;

export class LiveJobs {
  private readonly previews = new Map<string, Preview>();
  private readonly listeners = new Map<string, Set<LiveListener>>();
  private clients = 0;

  constructor(readonly maxClients = DEFAULT_MAX_EVENT_CLIENTS) {}

  hasPreview(id: string): boolean {
    return this.previews.has(id);
  }

  /** The latest preview of job `id` as PNG, with its step; null when there is none. */
  async previewPng(id: string): Promise<{ png: Buffer; step: number; total: number } | null> {
    const entry = this.previews.get(id);
    if (entry === undefined) return null;
    entry.png ??= entry.make();
    const png = await entry.png;
    return png === null ? null : { png, step: entry.p.step, total: entry.p.total };
  }

  progress(id: string, data: Readonly<Record<string, unknown>>): void {
    this.publish(id, { event: 'progress', data });
  }

  preview(id: string, p: StepPreview): void {
    const { rgb, ...facts } = p;
    this.show(id, facts, () => encodePng({ rgb, width: p.width, height: p.height }));
  }

  /** A preview made elsewhere (a queue worker's): `load` reads its PNG when it is first asked for (null: gone). */
  remotePreview(id: string, p: PreviewFacts, load: () => Promise<Buffer | null>): void {
    this.show(id, p, load);
  }

  private show(id: string, p: PreviewFacts, make: () => Promise<Buffer | null>): void {
    this.previews.set(id, { p, make, png: null });
    this.publish(id, { event: 'preview', data: { step: p.step, total: p.total, image: p.image, width: p.width, height: p.height, decoder: p.decoder, url: `/jobs/${id}/preview.png?step=${p.step}` } });
  }

  /** A status change; a finished one is the stream's last event (its listeners are then dropped) and drops the preview. */
  status(id: string, finished: boolean, event: LiveEventName, view: Readonly<Record<string, unknown>>): void {
    this.publish(id, { event, data: view });
    if (!finished) return;
    this.previews.delete(id);
    this.listeners.delete(id);
  }

  /** Take an event-stream slot; false when `maxClients` are open. Give it back with `release`. */
  acquire(): boolean {
    if (this.clients >= this.maxClients) return false;
    this.clients++;
    return true;
  }

  release(): void {
    this.clients = Math.max(0, this.clients - 1);
  }

  get openClients(): number {
    return this.clients;
  }

  /** Listen to job `id`'s events; returns the function that stops listening. */
  subscribe(id: string, listener: LiveListener): () => void {
    let set = this.listeners.get(id);
    if (set === undefined) this.listeners.set(id, (set = new Set()));
    set.add(listener);
    return () => {
      set.delete(listener);
      if (set.size === 0 && this.listeners.get(id) === set) this.listeners.delete(id);
    };
  }

  private publish(id: string, e: LiveEvent): void {
    for (const listener of [...(this.listeners.get(id) ?? [])]) listener(e);
  }
}
