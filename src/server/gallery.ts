/**
 * The outputs folder as a gallery, for the web page (and any client): behind the same auth as every API route.
 *
 *   GET /outputs?offset=0&limit=24   {items: [{uid, seed, created_at, parameters, url}], total, offset, next_offset}
 *                                    newest first (by the time the png was stored), at most GALLERY.maxPage items a page
 *   GET /outputs/:uid.png            the image, as saved (its parameters chunk included)
 *
 * Only names of the outputs store's own form are listed or served (`<uid>.png` with its `<uid>.json`, uid as
 * UID_PATTERN allows), so no request can name a file outside the folder. The gallery reads through a GallerySource:
 * the folder's (FolderGallerySource) rebuilds its sorted listing only when the folder's modification time changes
 * (a save adds two names), so a page read costs a readdir and a stat of every png only after new images; another
 * kind of store needs only a listing of its own.
 */
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import type { FastifyInstance } from 'fastify';
import { UID_PATTERN } from './body.js';
import { HttpError } from './errors.js';
import type { OutputStore } from './outputs.js';

export const GALLERY = Object.freeze({
  /** Items of one page when the request names no limit. */
  defaultPage: 24,
  /** Most items of one page. */
  maxPage: 100,
  /** A sidecar larger than this is not parsed (the item is listed with null parameters). */
  maxSidecarBytes: 256 * 1024,
  /** Milliseconds after a change of the folder during which its listing is not cached. */
  settleMs: 2000,
});

export interface GalleryItem {
  readonly uid: string;
  readonly seed: number | null;
  readonly created_at: string;
  readonly parameters: Record<string, unknown> | null;
  readonly url: string;
}

export interface GalleryPage {
  readonly items: readonly GalleryItem[];
  readonly total: number;
  readonly offset: number;
  /** null on the last page. */
  readonly next_offset: number | null;
}

/** One finished output (png and json both stored) and when its png was stored. */
export interface GalleryEntry {
  readonly uid: string;
  readonly storedMs: number;
}

/**
 * Where the gallery reads from: the outputs folder here (FolderGallerySource); a store of another kind (S3) lists
 * its objects the same way.
 */
export interface GallerySource {
  /** Every finished output, newest first. */
  list(): Promise<readonly GalleryEntry[]>;
  /** The stored bytes of a uid's png or json, or null when absent. Only called with a uid of UID_PATTERN's form. */
  read(uid: string, kind: 'png' | 'json'): Promise<Buffer | null>;
}

const UID = new RegExp(UID_PATTERN.slice(1, -1));
const PNG_NAME = new RegExp(`^(${UID.source})\\.png$`);
const COUNT = /^[0-9]{1,7}$/;

/** The outputs folder (./outputs.ts): its listing cached until the folder changes. */
export class FolderGallerySource implements GallerySource {
  private cache: { readonly dirMtimeMs: number; readonly entries: readonly GalleryEntry[] } | null = null;

  constructor(private readonly store: OutputStore) {}

  async list(): Promise<readonly GalleryEntry[]> {
    const dirMtimeMs = (await fs.stat(this.store.dir)).mtimeMs;
    // A folder changed within the last GALLERY.settleMs is read again: a file system with coarse times (whole
    // seconds) could otherwise show two saves in one tick as one.
    const settled = Date.now() - dirMtimeMs > GALLERY.settleMs;
    if (this.cache !== null && this.cache.dirMtimeMs === dirMtimeMs && settled) return this.cache.entries;
    const names = new Set(await fs.readdir(this.store.dir));
    const found: GalleryEntry[] = [];
    for (const name of names) {
      const uid = PNG_NAME.exec(name)?.[1];
      if (uid === undefined || !names.has(`${uid}.json`)) continue;
      try {
        found.push({ uid, storedMs: (await fs.stat(path.join(this.store.dir, name))).mtimeMs });
      } catch {
        // removed meanwhile
      }
    }
    found.sort((a, b) => b.storedMs - a.storedMs || (a.uid < b.uid ? -1 : 1));
    this.cache = { dirMtimeMs, entries: found };
    return found;
  }

  async read(uid: string, kind: 'png' | 'json'): Promise<Buffer | null> {
    const file = kind === 'png' ? this.store.pngPath(uid) : this.store.jsonPath(uid);
    try {
      if (kind === 'json' && (await fs.stat(file)).size > GALLERY.maxSidecarBytes) return null;
      return await fs.readFile(file);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw e;
    }
  }
}

/** Pages of a source's outputs, each item with what its sidecar says. */
export class Gallery {
  constructor(private readonly source: GallerySource) {}

  async page(offset: number, limit: number): Promise<GalleryPage> {
    const entries = await this.source.list();
    const slice = entries.slice(offset, offset + limit);
    const items = await Promise.all(slice.map((e) => this.item(e)));
    const end = offset + slice.length;
    return { items, total: entries.length, offset, next_offset: end < entries.length ? end : null };
  }

  /** The png of a finished output, or null (also for a name no output can have). */
  async image(uid: string): Promise<Buffer | null> {
    return UID.test(uid) ? this.source.read(uid, 'png') : null;
  }

  private async item(e: GalleryEntry): Promise<GalleryItem> {
    const sidecar = parseSidecar(await this.source.read(e.uid, 'json'));
    return {
      uid: e.uid,
      seed: typeof sidecar?.seed === 'number' ? sidecar.seed : null,
      created_at: typeof sidecar?.created_at === 'string' ? sidecar.created_at : new Date(e.storedMs).toISOString(),
      parameters: isRecord(sidecar?.parameters) ? sidecar.parameters : null,
      url: `/outputs/${e.uid}.png`,
    };
  }
}

/** A sidecar larger than GALLERY.maxSidecarBytes, or not a JSON object, counts as none. */
function parseSidecar(bytes: Buffer | null): Record<string, unknown> | null {
  if (bytes === null || bytes.length > GALLERY.maxSidecarBytes) return null;
  try {
    const v: unknown = JSON.parse(bytes.toString('utf8'));
    return isRecord(v) ? v : null;
  } catch {
    return null;
  }
}

const isRecord = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);

/** `?offset=&limit=` as non-negative integers (query strings are strings: the server's JSON schemas do not coerce). */
function count(name: string, v: unknown, fallback: number, min: number, max: number): number {
  if (v === undefined) return fallback;
  if (typeof v !== 'string' || !COUNT.test(v) || Number(v) < min || Number(v) > max) {
    throw new HttpError(400, `${name}: expected an integer in ${min}..${max}, got ${JSON.stringify(v)}`, name);
  }
  return Number(v);
}

interface GalleryQuery {
  readonly offset?: string;
  readonly limit?: string;
}

/** GET /outputs and GET /outputs/:uid.png. */
export function registerGallery(app: FastifyInstance, source: GallerySource): void {
  const gallery = new Gallery(source);

  app.get<{ Querystring: GalleryQuery }>('/outputs', async (request, reply) => {
    const q = request.query;
    const offset = count('offset', q.offset, 0, 0, 9_999_999);
    const limit = count('limit', q.limit, GALLERY.defaultPage, 1, GALLERY.maxPage);
    return reply.header('cache-control', 'no-store').send(await gallery.page(offset, limit));
  });

  app.get<{ Params: { uid: string } }>('/outputs/:uid.png', async (request, reply) => {
    const { uid } = request.params;
    const png = await gallery.image(uid);
    if (png === null) throw new HttpError(404, `output ${uid}.png not found in the outputs`);
    // Outputs are never overwritten (./outputs.ts), so a client may keep one for good; private: it may need the key.
    return reply
      .type('image/png')
      .header('cache-control', 'private, max-age=31536000, immutable')
      .header('x-content-type-options', 'nosniff')
      .send(png);
  });
}
