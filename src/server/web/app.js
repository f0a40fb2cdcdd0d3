/* global document, setTimeout, URL */
/**
 * The page's behaviour: connect (GET /info: the model's samplers and defaults; ask for the API key on a 401, wait
 * while the model loads), generate (POST /jobs, then follow the job, ./follow.js: the progress bar from step/total,
 * the live preview when the server makes one), show the result with its parameters, and the gallery of the outputs
 * folder.
 */
import { ApiError, call, imageUrl, storeKey, storedKey } from './api.js';
import { applyInfo, fillForm, readForm, wireInitImage } from './form.js';
import { followJob } from './follow.js';
import { loadGallery, wireGallery } from './gallery.js';

const $ = (id) => /** @type {any} */ (document.getElementById(id));
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Milliseconds between two tries while the model loads. */
const LOADING_RETRY_MS = 2000;

/** The job being generated: its id, and whether its cancel was asked. */
let running = /** @type {{id: string, cancelled: boolean} | null} */ (null);
/** The parameters of the image shown, for "Use these settings". */
let shownParameters = /** @type {Record<string, unknown> | null} */ (null);
let previewUrl = /** @type {string | null} */ (null);

function status(text) {
  $('server-status').textContent = text;
}

function askForKey(message) {
  $('key-form').hidden = false;
  status(message);
  $('api-key').focus();
}

/** GET /info until the model is loaded; then the form's choices and the gallery. */
async function connect() {
  for (;;) {
    try {
      const info = await call('GET', '/info');
      applyInfo(info);
      status(`Ready: ${info.family} model, ${info.defaults.width}×${info.defaults.height} by default.`);
      $('generate').disabled = false;
      break;
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) return askForKey(storedKey() === '' ? 'This server needs its API key.' : 'The saved API key was refused: enter the right one.');
      if (e instanceof ApiError && e.status === 503) status(`Waiting for the server: ${e.message}`);
      else status(`Cannot reach the server: ${e instanceof Error ? e.message : String(e)}. Retrying…`);
      await sleep(LOADING_RETRY_MS);
    }
  }
  await refreshGallery(true);
}

async function refreshGallery(fresh) {
  try {
    await loadGallery(fresh, showGalleryItem);
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) askForKey('The gallery needs the API key.');
  }
}

/** The labels of the parameters, in the order a reader wants them; the rest follow as named. */
const LABELS = Object.freeze({
  prompt: 'Prompt',
  negative_prompt: 'Negative prompt',
  seed: 'Seed',
  steps: 'Steps',
  sampler: 'Sampler',
  karras: 'Karras',
  scale: 'CFG scale',
  do_scale: 'CFG',
  width: 'Width',
  height: 'Height',
  strength: 'Strength',
  noise: 'Noise',
  prompt_syntax: 'Prompt syntax',
  conventions: 'Conventions',
});

/** @param {string} src @param {Record<string, unknown>} parameters @param {string} uid */
function showResult(src, parameters, uid) {
  shownParameters = parameters;
  const img = $('result-image');
  img.src = src;
  img.alt = `Generated image: ${String(parameters.prompt ?? '')}`;
  const keys = [...Object.keys(LABELS).filter((k) => k in parameters), ...Object.keys(parameters).filter((k) => !(k in LABELS))];
  const rows = [];
  for (const k of [...keys, 'uid']) {
    const dt = document.createElement('dt');
    dt.textContent = LABELS[k] ?? k;
    const dd = document.createElement('dd');
    const v = k === 'uid' ? uid : parameters[k];
    dd.textContent = typeof v === 'string' ? v : JSON.stringify(v);
    dd.dataset.key = k;
    rows.push(dt, dd);
  }
  $('result-parameters').replaceChildren(...rows);
  $('result').hidden = false;
  $('result-empty').hidden = true;
}

function showGalleryItem(item, src) {
  if (src !== '') showResult(src, item.parameters ?? {}, item.uid);
  $('output-title').scrollIntoView({ behavior: 'smooth', block: 'start' });
}

/** @param {any} job GET /jobs/:id's answer while queued or running */
function showProgress(job) {
  const bar = $('progress');
  if (job.status === 'queued') {
    // position: the 1-based place in line among the waiting jobs
    $('progress-label').textContent = job.position > 1 ? `Queued: number ${job.position} in line` : 'Queued: next in line';
    bar.removeAttribute('value'); // indeterminate
    return;
  }
  const step = job.step ?? 0;
  const total = job.total ?? 0;
  const eta = typeof job.eta_s === 'number' && step > 0 ? `, about ${Math.max(1, Math.round(job.eta_s))} s left` : '';
  $('progress-label').textContent = total > 0 ? `Step ${step} of ${total}${eta}` : 'Starting…';
  if (total > 0) {
    bar.max = total;
    bar.value = step;
  }
}

/** The live preview, one fetch at a time, each step once. @param {string} url @param {number} step */
const preview = { step: -1, busy: false };
async function updatePreview(url, step) {
  if (preview.busy || step === preview.step) return;
  preview.busy = true;
  try {
    const src = await imageUrl(url);
    if (previewUrl !== null) URL.revokeObjectURL(previewUrl);
    previewUrl = src;
    preview.step = step;
    $('preview').src = src;
    $('preview').hidden = false;
  } catch {
    // no preview yet (before the first step) or the job just ended
  } finally {
    preview.busy = false;
  }
}

function setRunning(on) {
  $('generate').disabled = on;
  $('cancel').hidden = !on;
  $('progress-box').hidden = !on;
  if (on) {
    $('result-empty').hidden = true;
    $('progress').removeAttribute('value');
    $('progress-label').textContent = 'Sending…';
    $('preview').hidden = true;
    Object.assign(preview, { step: -1, busy: false });
  }
}

async function generate() {
  const error = $('form-error');
  error.textContent = '';
  const form = readForm();
  if ('error' in form) {
    error.textContent = form.error;
    $(form.field).focus();
    return;
  }
  setRunning(true);
  try {
    const { id } = await call('POST', '/jobs', form.body);
    running = { id, cancelled: false };
    const job = await followJob(id, { progress: showProgress, preview: (url, step) => void updatePreview(url, step) });
    if (job.status === 'succeeded') {
      showResult(`data:image/png;base64,${job.result.image}`, job.result.parameters, job.result.uid);
      await refreshGallery(true);
    } else if (job.status === 'cancelled') {
      error.textContent = `Cancelled${job.reason !== undefined && job.reason !== 'client' ? ` (${job.reason})` : ''}.`;
    } else {
      error.textContent = `Generation failed: ${job.error ?? 'unknown error'}`;
    }
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) askForKey('This server needs its API key: enter it, then press Generate again.');
    else if (e instanceof ApiError && e.field !== undefined && $(e.field) !== null) {
      error.textContent = e.message;
      $(e.field).focus();
    } else error.textContent = e instanceof Error ? e.message : String(e);
  } finally {
    running = null;
    setRunning(false);
  }
}

function wire() {
  $('generate').disabled = true;
  const key = $('key-form');
  key.hidden = storedKey() === '';
  key.addEventListener('submit', (event) => {
    event.preventDefault();
    storeKey($('api-key').value.trim());
    $('api-key').value = '';
    status('Key saved. Connecting…');
    void connect();
  });
  $('forget-key').addEventListener('click', () => {
    storeKey('');
    status('Key forgotten.');
  });
  $('generate-form').addEventListener('submit', (event) => {
    event.preventDefault();
    void generate();
  });
  $('cancel').addEventListener('click', () => {
    if (running === null || running.cancelled) return;
    running.cancelled = true;
    $('progress-label').textContent = 'Cancelling…';
    void call('DELETE', `/jobs/${encodeURIComponent(running.id)}`).catch(() => {});
  });
  $('reuse').addEventListener('click', () => {
    if (shownParameters !== null) fillForm(shownParameters);
    $('prompt').focus();
  });
  wireInitImage();
  wireGallery(showGalleryItem);
}

wire();
void connect();
