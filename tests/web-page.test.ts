/**
 * The web page at / end to end: `sd serve` (bin/sd.js, a child process) with the tiny fixture model on 127.0.0.1,
 * driven in Debian's headless chromium with playwright-core. Without a key: type a prompt, press Generate, see the
 * progress, see the image (the very bytes saved in the outputs folder), reload, find it in the gallery, at desktop
 * and phone width, under the page's Content-Security-Policy with no error in the console. With --api-key: the page
 * asks for the key once, then generates, and remembers it across a reload. The gallery routes' paging, bounds and
 * names (no path traversal) are checked over HTTP without a browser.
 *
 * No chromium at SD_CHROMIUM (default /usr/bin/chromium): the browser part skips, saying so, unless
 * SD_REQUIRE_CHROMIUM is set (CI sets it: there a missing browser fails). SD_WEB_SCREENSHOT=docs/web-page.png
 * writes the README's screenshot after the generation.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, readdir, rm, utimes, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FolderGallerySource } from '../src/server/gallery.js';
import { OutputStore } from '../src/server/outputs.js';
import { chromium, type Browser, type Page, type Response as PageResponse } from 'playwright-core';

const ROOT = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const FIX = path.join(ROOT, 'tests/fixtures/pipeline');
const CHROMIUM = process.env.SD_CHROMIUM || '/usr/bin/chromium';
const REQUIRED = (process.env.SD_REQUIRE_CHROMIUM ?? '') !== '';
const HAVE_CHROMIUM = existsSync(CHROMIUM);
const SCREENSHOT = process.env.SD_WEB_SCREENSHOT ?? '';
const KEY = 'web-test-key-9f2c';
if (!HAVE_CHROMIUM && !REQUIRED) {
  console.warn(`tests/web-page: the browser tests skip: no chromium at ${CHROMIUM} (apt-get install -y chromium, or SD_CHROMIUM=PATH; SD_REQUIRE_CHROMIUM=1 makes this a failure)`);
}
/** Steps of a page generation: enough that the progress shows between two steps on a fast machine. */
const STEPS = 6;
/** Milliseconds any one wait of the browser may take (the tiny model on a loaded 2-core machine: seconds a step). */
const WAIT_MS = 240_000;

interface Serve {
  readonly url: string;
  readonly outputs: string;
  readonly child: ChildProcess;
  readonly log: string[];
}

/** `sd serve` on a free port; resolves once /health answers ok (the model loaded). */
async function startServe(apiKey: string | null): Promise<Serve> {
  const outputs = await mkdtemp(path.join(tmpdir(), 'sd-web-'));
  const args = [
    path.join(ROOT, 'bin/sd.js'), 'serve', '--port', '0', '--host', '127.0.0.1', '--backend', 'cpu',
    '--weights', path.join(FIX, 'model.safetensors'), '--config', path.join(FIX, 'fixture.json'),
    '--tokenizer', path.join(ROOT, 'tests/fixtures/tokenizer'), '--outputs', outputs, '--grace', '0',
    ...(apiKey !== null ? ['--api-key', apiKey] : []),
  ];
  const child = spawn(process.execPath, args, { cwd: ROOT, env: { ...process.env, SD_API_KEY: '', SD_API_AUTH: '', SD_BACKEND: '' }, stdio: ['ignore', 'pipe', 'pipe'] });
  const log: string[] = [];
  const url = await new Promise<string>((resolve, reject) => {
    let buffered = '';
    const timer = setTimeout(() => reject(new Error(`sd serve did not listen within 120 s:\n${log.join('\n')}`)), 120_000);
    child.stdout?.on('data', (chunk: Buffer) => {
      buffered += chunk.toString();
      for (let nl = buffered.indexOf('\n'); nl >= 0; nl = buffered.indexOf('\n')) {
        const line = buffered.slice(0, nl);
        buffered = buffered.slice(nl + 1);
        log.push(line);
        try {
          const j = JSON.parse(line) as { url?: string };
          if (typeof j.url === 'string') {
            clearTimeout(timer);
            resolve(j.url);
          }
        } catch {
          // not a JSON log line
        }
      }
    });
    child.stderr?.on('data', (chunk: Buffer) => log.push(chunk.toString()));
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`sd serve exited with ${code}:\n${log.join('\n')}`));
    });
  });
  for (let i = 0; ; i++) {
    const h = await fetch(`${url}/health`).catch(() => null);
    if (h?.status === 200) break;
    if (i > 600) throw new Error(`sd serve did not load the model within 120 s:\n${log.join('\n')}`);
    await new Promise((r) => setTimeout(r, 200));
  }
  return { url, outputs, child, log };
}

async function stopServe(s: Serve | undefined): Promise<void> {
  if (s === undefined) return;
  if (s.child.exitCode === null) {
    const exited = new Promise((r) => s.child.once('exit', r));
    s.child.kill('SIGTERM');
    const timer = setTimeout(() => s.child.kill('SIGKILL'), 10_000);
    await exited;
    clearTimeout(timer);
  }
  await rm(s.outputs, { recursive: true, force: true });
}

/** Console errors, page errors and CSP violations of a page: the test expects none. */
function watchErrors(page: Page): string[] {
  const errors: string[] = [];
  page.on('console', (m) => {
    if (m.type() === 'error' && !/status of 40[14]/.test(m.text())) errors.push(`console: ${m.text()}`);
  });
  page.on('pageerror', (e) => errors.push(`page: ${e.message}`));
  return errors;
}

/** Generate with the page as a user does; the progress it showed, and the result's uid. */
async function generateOnPage(page: Page, prompt: string, seed: number, total: number | null = STEPS): Promise<{ uid: string; progress: string; previews: number }> {
  await page.getByLabel('Prompt', { exact: true }).fill(prompt);
  await page.getByLabel('Seed').fill(String(seed));
  await page.getByLabel('Steps').fill(String(STEPS));
  await page.getByLabel('Sampler').selectOption('euler');
  // Where the server makes previews (GET /jobs/:id's `preview`), the page must show the ones it fetched.
  let previews = 0;
  const onResponse = (r: PageResponse): void => {
    if (/\/jobs\/[^/]+\/preview\.png$/.test(new URL(r.url()).pathname) && r.status() === 200) previews += 1;
  };
  page.on('response', onResponse);
  await page.getByRole('button', { name: 'Generate' }).click();
  // The label while running reads "Step k of N"; polled every animation frame, so a step's state is seen.
  const seen = await page.waitForFunction(
    (steps) => {
      const label = document.getElementById('progress-label')?.textContent ?? '';
      const bar = document.getElementById('progress') as HTMLProgressElement | null;
      const m = /^Step (\d+) of (\d+)/.exec(label);
      const n = Number(m?.[2]);
      return m !== null && Number(m[1]) >= 1 && (steps === null || n === steps) && bar !== null && bar.value >= 1 && bar.max === n ? label : false;
    },
    total,
    { polling: 'raf', timeout: WAIT_MS },
  );
  const progress = String(await seen.jsonValue());
  await page.locator('#result-image[src^="data:image/png;base64,"]').waitFor({ state: 'visible', timeout: WAIT_MS });
  await page.locator('#progress-box').waitFor({ state: 'hidden', timeout: WAIT_MS });
  page.off('response', onResponse);
  if (previews > 0) await page.waitForFunction(() => document.getElementById('preview')?.getAttribute('src')?.startsWith('blob:') === true, undefined, { timeout: 10_000 });
  const uid = (await page.locator('#result-parameters dd[data-key="uid"]').textContent()) ?? '';
  return { uid, progress, previews };
}

const pngOf = (src: string | null): Buffer => Buffer.from((src ?? '').replace(/^data:image\/png;base64,/, ''), 'base64');

describe('FolderGallerySource: the outputs folder listed newest first, cached until the folder changes', () => {
  it('lists only finished outputs, rereads a folder that changed, serves a cached listing of a settled one', async () => {
    const dir = await mkdtemp(path.join(tmpdir(), 'sd-gallery-'));
    try {
      const store = await OutputStore.open(dir);
      const source = new FolderGallerySource(store);
      await store.save('first', Buffer.from('png-1'), { uid: 'first' });
      await writeFile(path.join(dir, 'orphan.png'), 'no json'); // not an output: no sidecar
      await writeFile(path.join(dir, '.first.png.tmp-0a1b'), 'temp');
      expect((await source.list()).map((e) => e.uid)).toEqual(['first']);
      const old = new Date(Date.now() - 60_000);
      await utimes(path.join(dir, 'first.png'), old, old);
      await store.save('second', Buffer.from('png-2'), { uid: 'second' });
      expect((await source.list()).map((e) => e.uid)).toEqual(['second', 'first']);
      expect((await source.read('second', 'png'))?.toString()).toBe('png-2');
      expect(await source.read('third', 'png')).toBeNull();
      // A folder settled (changed over GALLERY.settleMs ago) with the time the cache saw is served from the cache:
      // a file slipped in with the folder's time put back is not seen (what the cache saves: the readdir).
      await utimes(dir, old, old);
      expect(await source.list()).toHaveLength(2);
      await store.save('third', Buffer.from('png-3'), { uid: 'third' });
      await utimes(dir, old, old);
      expect(await source.list()).toHaveLength(2);
      await utimes(dir, new Date(), new Date());
      expect((await source.list()).map((e) => e.uid)).toContain('third');
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe('GET /outputs: the gallery over HTTP', () => {
  let serve: Serve;
  beforeAll(async () => {
    serve = await startServe(KEY);
  });
  afterAll(async () => stopServe(serve));

  const get = (route: string, auth = true): Promise<Response> => fetch(`${serve.url}${route}`, { headers: auth ? { authorization: `Bearer ${KEY}` } : {} });

  it('/ and its files are open, with a CSP, ETags and their content types; the API routes are not', async () => {
    const page = await get('/', false);
    expect(page.status).toBe(200);
    expect(page.headers.get('content-type')).toBe('text/html; charset=utf-8');
    expect(page.headers.get('content-security-policy')).toContain("script-src 'self'");
    expect(page.headers.get('content-security-policy')).toContain("default-src 'none'");
    const html = await page.text();
    expect(html).not.toMatch(/<script(?![^>]*\bsrc=)[^>]*>/); // no inline script
    const js = await get('/web/app.js', false);
    expect(js.headers.get('content-type')).toBe('text/javascript; charset=utf-8');
    const again = await fetch(`${serve.url}/web/app.js`, { headers: { 'if-none-match': js.headers.get('etag') ?? '' } });
    expect(again.status).toBe(304);
    expect((await get('/web/style.css', false)).headers.get('content-type')).toBe('text/css; charset=utf-8');
    for (const route of ['/web/web.ts', '/web/..%2Fweb.ts', '/web/index.html', '/web/']) expect((await get(route, false)).status).toBe(404);
    for (const route of ['/info', '/outputs', '/outputs/x.png']) expect((await get(route, false)).status).toBe(401);
    const info = (await (await get('/info')).json()) as { samplers: string[]; defaults: { width: number } };
    expect(info.samplers).toContain('euler');
    expect(info.defaults.width).toBe(32);
  });

  it('lists the outputs newest first, in bounded pages, and serves each png as saved', async () => {
    const uids = ['gallery-a', 'gallery-b', 'gallery-c'];
    for (const [i, uid] of uids.entries()) {
      const res = await fetch(`${serve.url}/inference`, {
        method: 'POST',
        headers: { authorization: `Bearer ${KEY}`, 'content-type': 'application/json' },
        body: JSON.stringify({ prompt: `gallery ${i}`, uid, seed: 7 + i, steps: 1 }),
      });
      expect(res.status).toBe(200);
    }
    const first = (await (await get('/outputs?limit=2')).json()) as { items: { uid: string; seed: number; url: string; parameters: { prompt: string } }[]; total: number; next_offset: number | null };
    expect(first.total).toBe(3);
    expect(first.items.map((i) => i.uid)).toEqual(['gallery-c', 'gallery-b']);
    expect(first.items[0]).toMatchObject({ seed: 9, url: '/outputs/gallery-c.png', parameters: { prompt: 'gallery 2', steps: 1 } });
    expect(first.next_offset).toBe(2);
    const second = (await (await get('/outputs?limit=2&offset=2')).json()) as typeof first;
    expect(second.items.map((i) => i.uid)).toEqual(['gallery-a']);
    expect(second.next_offset).toBeNull();
    const png = await get('/outputs/gallery-b.png');
    expect(png.headers.get('content-type')).toBe('image/png');
    expect(Buffer.from(await png.arrayBuffer()).equals(await readFile(path.join(serve.outputs, 'gallery-b.png')))).toBe(true);
    for (const bad of ['limit=0', 'limit=101', 'limit=x', 'offset=-1', 'offset=1.5']) expect((await get(`/outputs?${bad}`)).status).toBe(400);
    for (const route of ['/outputs/nope.png', '/outputs/..%2F..%2Fetc%2Fpasswd.png', '/outputs/gallery-b.json', '/outputs/.gallery-b.png']) {
      expect([400, 404]).toContain((await get(route)).status);
    }
  });
});

describe.skipIf(!HAVE_CHROMIUM && !REQUIRED)(`the page in headless chromium (${HAVE_CHROMIUM ? CHROMIUM : `skipped: no chromium at ${CHROMIUM}; apt-get install -y chromium, or set SD_CHROMIUM`})`, () => {
  let browser: Browser;
  let open: Serve;
  let keyed: Serve;

  beforeAll(async () => {
    if (!HAVE_CHROMIUM) throw new Error(`SD_REQUIRE_CHROMIUM is set but there is no chromium at ${CHROMIUM}: apt-get install -y chromium`);
    [browser, open, keyed] = await Promise.all([
      chromium.launch({ executablePath: CHROMIUM, headless: true, args: ['--no-sandbox', '--disable-dev-shm-usage'] }),
      startServe(null),
      startServe(KEY),
    ]);
  });
  afterAll(async () => {
    await browser?.close();
    await Promise.all([stopServe(open), stopServe(keyed)]);
  });

  it('without a key: prompt, Generate, progress, the image and its parameters; after a reload it is in the gallery', async () => {
    const context = await browser.newContext({ viewport: { width: 1200, height: 900 } });
    const page = await context.newPage();
    page.setDefaultTimeout(WAIT_MS);
    const errors = watchErrors(page);
    const answer = await page.goto(open.url);
    expect(answer?.headers()['content-security-policy']).toContain("script-src 'self'");
    await page.getByText(/^Ready: sd1 model/).waitFor();
    expect(await page.locator('#key-form').isHidden()).toBe(true);
    expect(await page.getByLabel('Width').inputValue()).toBe('32'); // the model's default, from /info

    const { uid, progress } = await generateOnPage(page, 'a red fox in the snow', 42);
    expect(progress).toMatch(new RegExp(`^Step [1-${STEPS}] of ${STEPS}`));
    expect(await readdir(open.outputs)).toEqual(expect.arrayContaining([`${uid}.png`, `${uid}.json`]));
    const shown = pngOf(await page.locator('#result-image').getAttribute('src'));
    expect(shown.equals(await readFile(path.join(open.outputs, `${uid}.png`)))).toBe(true);
    const param = (key: string) => page.locator(`#result-parameters dd[data-key="${key}"]`).textContent();
    expect(await param('prompt')).toBe('a red fox in the snow');
    expect(await param('seed')).toBe('42');
    expect(await param('steps')).toBe(String(STEPS));
    expect(await param('sampler')).toBe('euler');
    if (SCREENSHOT !== '') await page.screenshot({ path: SCREENSHOT, fullPage: true });

    await page.reload();
    const item = page.locator(`#gallery li[data-uid="${uid}"] img`);
    await item.waitFor({ state: 'visible' });
    await page.waitForFunction((sel) => (document.querySelector(sel) as HTMLImageElement | null)?.naturalWidth === 32, `#gallery li[data-uid="${uid}"] img`);
    expect(await item.getAttribute('alt')).toContain('a red fox in the snow');
    await item.click();
    expect(await param('uid')).toBe(uid);
    expect(await param('seed')).toBe('42');
    await page.getByRole('button', { name: 'Use these settings' }).click();
    expect(await page.getByLabel('Prompt', { exact: true }).inputValue()).toBe('a red fox in the snow');
    expect(await page.getByLabel('Seed').inputValue()).toBe('42');

    // img2img: the init image from a file (this very output), its strength sent and answered.
    await page.getByLabel('Init image (PNG or JPEG)').setInputFiles(path.join(open.outputs, `${uid}.png`));
    await page.locator('#init-preview[src^="data:image/png;base64,"]').waitFor({ state: 'visible' });
    await page.getByLabel(/^Strength/).fill('0.5');
    const img2img = await generateOnPage(page, 'a red fox in the snow, watercolour', 43, null);
    expect(img2img.uid).not.toBe(uid);
    expect(await param('strength')).toBe('0.5');
    const sidecar = JSON.parse(await readFile(path.join(open.outputs, `${img2img.uid}.json`), 'utf8')) as { parameters: { strength: number; seed: number } };
    expect(sidecar.parameters).toMatchObject({ strength: 0.5, seed: 43 });

    // Phone width: one column, nothing wider than the screen.
    await page.setViewportSize({ width: 375, height: 800 });
    expect(await page.evaluate(() => document.documentElement.scrollWidth)).toBeLessThanOrEqual(375);
    expect(errors).toEqual([]);
    await context.close();
  });

  it('with --api-key: the page asks for the key once, generates with it, and remembers it after a reload', async () => {
    const context = await browser.newContext({ viewport: { width: 390, height: 844 } });
    const page = await context.newPage();
    page.setDefaultTimeout(WAIT_MS);
    const errors = watchErrors(page);
    await page.goto(keyed.url);
    await page.getByText('This server needs its API key.').waitFor();
    expect(await page.getByRole('button', { name: 'Generate' }).isDisabled()).toBe(true);
    await page.getByLabel('API key').fill('wrong-key');
    await page.getByRole('button', { name: 'Save key' }).click();
    await page.getByText('The saved API key was refused: enter the right one.').waitFor();
    await page.getByLabel('API key').fill(KEY);
    await page.getByRole('button', { name: 'Save key' }).click();
    await page.getByText(/^Ready: sd1 model/).waitFor();

    const { uid } = await generateOnPage(page, 'a lighthouse at dawn', 7);
    const shown = pngOf(await page.locator('#result-image').getAttribute('src'));
    expect(shown.equals(await readFile(path.join(keyed.outputs, `${uid}.png`)))).toBe(true);

    await page.reload();
    await page.getByText(/^Ready: sd1 model/).waitFor(); // no second ask: the key was kept
    const img = `#gallery li[data-uid="${uid}"] img`;
    await page.waitForFunction((sel) => (document.querySelector(sel) as HTMLImageElement | null)?.naturalWidth === 32, img);
    expect(await page.evaluate(() => document.documentElement.scrollWidth)).toBeLessThanOrEqual(390);
    expect(errors).toEqual([]);
    await context.close();
  });
});
