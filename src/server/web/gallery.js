/* global document, URL */
/**
 * The gallery of the outputs folder: GET /outputs page by page (newest first), each image fetched with the key as
 * a blob: URL (revoked when the gallery is reloaded); choosing one shows it as the result, with its parameters.
 */
import { call, imageUrl } from './api.js';

const PAGE = 24;
const $ = (id) => /** @type {any} */ (document.getElementById(id));

/** @type {string[]} */
let blobUrls = [];
let nextOffset = /** @type {number | null} */ (0);

/** @param {string} prompt */
const short = (prompt) => (prompt.length > 60 ? `${prompt.slice(0, 57)}…` : prompt);

/**
 * @param {any} item {uid, seed, created_at, parameters, url}
 * @param {(item: any, src: string) => void} onChoose
 * @param {string[]} urls collects the blob: URL made
 */
async function render(item, onChoose, urls) {
  const li = document.createElement('li');
  const button = document.createElement('button');
  button.type = 'button';
  const img = document.createElement('img');
  const prompt = item.parameters?.prompt ?? item.uid;
  img.alt = `${prompt} (seed ${item.seed ?? 'unknown'})`;
  img.loading = 'lazy';
  const caption = document.createElement('span');
  caption.textContent = short(prompt);
  button.append(img, caption);
  button.addEventListener('click', () => onChoose(item, img.src));
  li.dataset.uid = item.uid;
  li.append(button);
  try {
    const src = await imageUrl(item.url);
    urls.push(src);
    img.src = src;
  } catch {
    img.alt = `${img.alt}: the image could not be loaded`;
  }
  return li;
}

/**
 * Load one page (the first one again when `fresh`). Throws the API's error (401 without the key, for one).
 * @param {boolean} fresh @param {(item: any, src: string) => void} onChoose
 */
export async function loadGallery(fresh, onChoose) {
  if (fresh) nextOffset = 0;
  if (nextOffset === null) return;
  const page = await call('GET', `/outputs?offset=${nextOffset}&limit=${PAGE}`);
  /** @type {string[]} */
  const urls = [];
  const items = await Promise.all(page.items.map((item) => render(item, onChoose, urls)));
  const list = $('gallery');
  if (fresh) {
    for (const u of blobUrls) URL.revokeObjectURL(u);
    blobUrls = urls;
    list.replaceChildren(...items);
  } else {
    blobUrls.push(...urls);
    list.append(...items);
  }
  nextOffset = page.next_offset;
  $('gallery-count').textContent = page.total > 0 ? `(${page.total})` : '';
  $('gallery-empty').hidden = page.total > 0;
  $('gallery-more').hidden = nextOffset === null;
}

/** @param {(item: any, src: string) => void} onChoose */
export function wireGallery(onChoose) {
  $('gallery-more').addEventListener('click', () => void loadGallery(false, onChoose).catch(() => {}));
}
