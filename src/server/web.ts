/**
 * The web page of `sd serve`: static files shipped in the package (./web/: plain HTML, CSS and ES modules, no
 * framework, no CDN, no build step), and the two JSON routes only the page needs besides the API.
 *
 *   GET /              the page (open: it asks for the API key itself, then sends it as a Bearer token)
 *   GET /web/:file     its scripts and style sheet (open)
 *   GET /info          what the form offers: samplers, the model's defaults and ranges (503 while the model loads)
 *   GET /outputs...    the gallery of the outputs folder (./gallery.ts)
 *
 * The files are read once at start and answered from memory with a content hash as ETag (a reload costs a 304).
 * The page carries a Content-Security-Policy that allows only this server's own scripts, styles and connections:
 * no inline script, no third-party anything.
 */
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import * as path from 'node:path';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { SAMPLERS } from '../pipeline/api.js';
import { DEFAULTS, MAX_CFG_SCALE, MAX_PROMPT_CHARS, MAX_SEED, MAX_SIZE, MAX_STEPS } from '../pipeline/params.js';
import type { Engine } from './engine.js';
import { HttpError } from './errors.js';
import { FolderGallerySource, registerGallery } from './gallery.js';
import type { OutputStore } from './outputs.js';

/** What the page's routes need of the server (SdServer is it). */
export interface WebHost {
  readonly outputs: OutputStore;
  /** The engine, or an HttpError 503 while the model loads or the server stops. */
  assertAccepting(): Engine;
}

/** The files of the page: name under /web/ -> content type. Nothing else under ./web/ is ever served. */
const ASSETS: Readonly<Record<string, string>> = Object.freeze({
  'index.html': 'text/html; charset=utf-8',
  'style.css': 'text/css; charset=utf-8',
  'app.js': 'text/javascript; charset=utf-8',
  'api.js': 'text/javascript; charset=utf-8',
  'form.js': 'text/javascript; charset=utf-8',
  'follow.js': 'text/javascript; charset=utf-8',
  'gallery.js': 'text/javascript; charset=utf-8',
});

/** Routes the auth gate lets through without a key (route patterns as fastify names them). */
export const WEB_OPEN_ROUTES: readonly string[] = Object.freeze(['/', '/web/:file']);

export const PAGE_CSP = [
  "default-src 'none'",
  "script-src 'self'",
  "style-src 'self'",
  // data: the finished image (base64 in the job's result); blob: previews and gallery images fetched with the key
  "img-src 'self' data: blob:",
  "connect-src 'self'",
  "form-action 'none'",
  "base-uri 'none'",
  "frame-ancestors 'none'",
].join('; ');

interface Asset {
  readonly body: Buffer;
  readonly type: string;
  readonly etag: string;
}

/**
 * ./web/ beside this module: src/server/web when run from source (tsx), or, when run from the compiled dist/
 * (which tsc does not copy them into), the package's src/server/web.
 */
export function webRoot(): string {
  const here = path.dirname(fileURLToPath(import.meta.url));
  const candidates = [path.join(here, 'web'), path.join(here, '..', '..', 'src', 'server', 'web')];
  const found = candidates.find((dir) => existsSync(path.join(dir, 'index.html')));
  if (found === undefined) throw new Error(`the web page's files are missing: looked for index.html in ${candidates.join(' and ')}; reinstall the package`);
  return found;
}

function loadAssets(root: string): ReadonlyMap<string, Asset> {
  const assets = new Map<string, Asset>();
  for (const [name, type] of Object.entries(ASSETS)) {
    const body = readFileSync(path.join(root, name));
    assets.set(name, { body, type, etag: `"${createHash('sha256').update(body).digest('base64url').slice(0, 22)}"` });
  }
  return assets;
}

function sendAsset(request: FastifyRequest, reply: FastifyReply, asset: Asset, page: boolean): FastifyReply {
  // no-cache: the browser keeps the file but asks each time (a 304 while it is unchanged), so an upgrade shows at once
  void reply.header('etag', asset.etag).header('cache-control', 'no-cache').header('x-content-type-options', 'nosniff');
  if (page) void reply.header('content-security-policy', PAGE_CSP).header('referrer-policy', 'no-referrer');
  if (request.headers['if-none-match'] === asset.etag) return reply.code(304).send();
  return reply.type(asset.type).send(asset.body);
}

/** GET /info: what the page's form offers and its ranges, from the loaded model and the pipeline's defaults. */
export function webInfo(engine: Engine): Record<string, unknown> {
  const l = engine.limits;
  return {
    family: l.family ?? 'sd1',
    samplers: [...SAMPLERS],
    defaults: {
      steps: DEFAULTS.steps,
      scale: DEFAULTS.cfgScale,
      sampler: DEFAULTS.sampler,
      width: l.width,
      height: l.height,
      strength: DEFAULTS.strength,
    },
    ranges: {
      size: { min: l.minSize, max: MAX_SIZE, multiple_of: 8 },
      steps: { min: 1, max: MAX_STEPS },
      scale: { min: 0, max: MAX_CFG_SCALE },
      seed: { min: 0, max: MAX_SEED },
      prompt_chars: MAX_PROMPT_CHARS,
    },
  };
}

/** The page, its files, /info and the gallery. */
export function registerWebPage(app: FastifyInstance, host: WebHost, root = webRoot()): void {
  const assets = loadAssets(root);
  const page = assets.get('index.html');
  if (page === undefined) throw new Error('index.html is not among the web assets');

  app.get('/', async (request, reply) => sendAsset(request, reply, page, true));

  app.get<{ Params: { file: string } }>('/web/:file', async (request, reply) => {
    const asset = request.params.file === 'index.html' ? undefined : assets.get(request.params.file);
    if (asset === undefined) throw new HttpError(404, `no file /web/${request.params.file}`);
    return sendAsset(request, reply, asset, false);
  });

  app.get('/info', async (_request, reply) => reply.header('cache-control', 'no-store').send(webInfo(host.assertAccepting())));

  registerGallery(app, new FolderGallerySource(host.outputs));
}
