/**
 * The A1111 dialect (/sdapi/v1/*) against the tiny fixture model (tests/fixtures/pipeline, 32x32, cpu backend) on
 * 127.0.0.1, driven by the payloads real clients send, each written from the client's public code with its values
 * made small (steps 2, 32x32) so a generation takes well under a second:
 *   SillyTavern (src/endpoints/stable-diffusion.js forwards the browser's body, with its own `url` and `auth`, and
 *   sends `Authorization: Basic base64(auth)`, "Basic " when no auth is set; its menus read name/title/model_name of
 *   the lists, set-model waits for progress 0 and job_count 0; interrupt is a POST with no body), Open WebUI (its automatic1111 image backend: options, sd-models,
 *   txt2img with batch_size and scheduler), mix1009/sdwebuiapi (webuiapi.py: A1111's whole field set, nulls
 *   included, and override_settings), a GIMP plugin's img2img (init_images, denoising_strength, mask null).
 * A second server with --api-auth, an API key and one place in the queue (maxQueue 1) tests auth and the full queue.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { StableDiffusion } from '../src/pipeline/pipeline.js';
import { parseParameters } from '../src/image/parameters.js';
import { readPngParameters } from '../src/image/codec.js';
import { SdServer } from '../src/server/server.js';
import { borrowed, loadTinyModel } from './helpers.js';

const FIXTURE = 'tests/fixtures/pipeline';
const KEY = 'a1111-test-key';
const USERS = 'alice:wonder:land,bob:builder';
const basic = (userPass: string): string => `Basic ${Buffer.from(userPass).toString('base64')}`;

let engine: StableDiffusion;
let open: SdServer;
let guarded: SdServer;
const dirs: string[] = [];

interface Answer {
  readonly status: number;
  readonly json: Record<string, unknown>;
  readonly headers: Headers;
}

async function call(server: SdServer, method: string, route: string, body?: unknown, headers: Record<string, string> = {}): Promise<Answer> {
  const res = await fetch(`${server.url}${route}`, {
    method,
    headers: body !== undefined ? { 'content-type': 'application/json', ...headers } : headers,
    body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
  });
  const text = await res.text();
  return { status: res.status, json: (text === '' ? {} : JSON.parse(text)) as Record<string, unknown>, headers: res.headers };
}

async function until<T>(what: string, get: () => Promise<T>, ok: (v: T) => boolean): Promise<T> {
  for (let i = 0; i < 3000; i++) {
    const v = await get();
    if (ok(v)) return v;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`timed out waiting for ${what}`);
}

/** What a client does with the answer: images[0] decoded as base64, info parsed as JSON. */
function read(a: Answer): { pngs: Buffer[]; info: Record<string, unknown>; texts: string[] } {
  expect(a.status, JSON.stringify(a.json).slice(0, 300)).toBe(200);
  const images = a.json.images as string[];
  for (const b64 of images) expect(b64).toMatch(/^[A-Za-z0-9+/]+={0,2}$/); // bare base64, no data: prefix
  const pngs = images.map((b64) => Buffer.from(b64, 'base64'));
  expect(typeof a.json.info).toBe('string');
  const info = JSON.parse(String(a.json.info)) as Record<string, unknown>;
  return { pngs, info, texts: pngs.map((p) => readPngParameters(p) ?? '') };
}

async function start(o: { apiKey?: string; apiAuth?: string; maxQueue?: number }): Promise<SdServer> {
  const dir = await mkdtemp(path.join(tmpdir(), 'sd-a1111-'));
  dirs.push(dir);
  const s = await SdServer.start({ loadEngine: async () => borrowed(engine), outputs: dir, weights: `${FIXTURE}/model.safetensors`, ...o }, { port: 0, host: '127.0.0.1' });
  await s.ready();
  return s;
}

beforeAll(async () => {
  engine = await loadTinyModel();
  open = await start({});
  guarded = await start({ apiKey: KEY, apiAuth: USERS, maxQueue: 1 });
});

afterAll(async () => {
  await open?.shutdown({ graceS: 0 });
  await guarded?.shutdown({ graceS: 0 });
  engine?.dispose();
  for (const dir of dirs) await rm(dir, { recursive: true, force: true });
});

/** SillyTavern's extension settings become this body (public/scripts/extensions/stable-diffusion), forwarded as is. */
const SILLYTAVERN_TXT2IMG = {
  url: 'http://127.0.0.1:7860',
  auth: '',
  prompt: 'a fern, <lora:fern_style:0.8>, watercolor',
  negative_prompt: 'lowres, bad anatomy',
  sampler_name: 'DDIM',
  scheduler: 'normal',
  steps: 1,
  cfg_scale: 7,
  width: 32,
  height: 32,
  restore_faces: false,
  enable_hr: false,
  hr_upscaler: 'Latent',
  hr_scale: 2,
  hr_additional_modules: [],
  denoising_strength: 0.7,
  hr_second_pass_steps: 0,
  // seed: -1 is sent as undefined, so JSON.stringify leaves it out
  override_settings: { CLIP_stop_at_last_layers: 1 },
  override_settings_restore_afterwards: true,
  clip_skip: 1,
  save_images: true,
  send_images: true,
  do_not_save_grid: false,
  do_not_save_samples: false,
};
const ST_HEADERS = { authorization: basic('') }; // "Basic " with empty credentials

/** webuiapi.WebUIApi().txt2img(prompt=..., seed=1234, n_iter=2, ...): every field of the A1111 model, nulls included. */
const WEBUIAPI_TXT2IMG = {
  enable_hr: false, denoising_strength: 0.7, firstphase_width: 0, firstphase_height: 0, hr_scale: 2, hr_upscaler: 'Latent',
  hr_second_pass_steps: 0, hr_resize_x: 0, hr_resize_y: 0, hr_checkpoint_name: null, hr_sampler_name: null, hr_prompt: '',
  hr_negative_prompt: '', prompt: 'a botanical illustration of a fern', styles: [], seed: 1234, subseed: -1,
  subseed_strength: 0, seed_resize_from_h: 0, seed_resize_from_w: 0, sampler_name: 'Euler a', batch_size: 1, n_iter: 2,
  steps: 1, cfg_scale: 7, width: 32, height: 32, restore_faces: false, tiling: false, do_not_save_samples: false,
  do_not_save_grid: false, negative_prompt: '', eta: 1, s_min_uncond: 0, s_churn: 0, s_tmax: 0, s_tmin: 0, s_noise: 1,
  override_settings: { CLIP_stop_at_last_layers: 2 }, override_settings_restore_afterwards: true, script_args: [],
  script_name: null, sampler_index: 'Euler a', send_images: true, save_images: false, alwayson_scripts: {},
};

describe('A1111 API: clients as they are', () => {
  it('SillyTavern: txt2img with its url/auth extras, "Basic " auth, no seed; images[0] is a bare base64 PNG with parameters', async () => {
    const a = await call(open, 'POST', '/sdapi/v1/txt2img', SILLYTAVERN_TXT2IMG, ST_HEADERS);
    const { pngs, info, texts } = read(a);
    expect(pngs).toHaveLength(1);
    expect(pngs[0].subarray(1, 4).toString()).toBe('PNG');
    expect(info).toMatchObject({ width: 32, height: 32, steps: 1, cfg_scale: 7, sampler_name: 'DDIM', denoising_strength: null });
    expect(info.all_seeds).toEqual([info.seed]);
    expect(info.all_prompts).toEqual([SILLYTAVERN_TXT2IMG.prompt]);
    expect(info.infotexts).toEqual(texts);
    const p = parseParameters(texts[0]);
    expect(p.settings).toMatchObject({ Steps: '1', Sampler: 'DDIM', Seed: String(info.seed), Size: '32x32' });
    expect(p.settings).not.toHaveProperty('Denoising strength'); // ignored in txt2img
    expect(a.json.parameters).toMatchObject({ prompt: SILLYTAVERN_TXT2IMG.prompt, steps: 1, sampler_name: 'DDIM' });
    expect(a.json.parameters).not.toHaveProperty('auth');
    expect(a.json.parameters).not.toHaveProperty('url');
    // The <lora:> tag reaches the pipeline stripped, as A1111 encodes it: the same image as the prompt without it.
    const plain = await engine.generate({ prompt: 'a fern, , watercolor', negativePrompt: 'lowres, bad anatomy', seed: Number(info.seed), steps: 1, sampler: 'ddim', cfgScale: 7 });
    expect(Buffer.from(plain.images[0].rgb).equals(Buffer.from(await rgbOf(pngs[0])))).toBe(true);
  });

  it('SillyTavern: ping, menus, set-model and its wait on progress, as src/endpoints/stable-diffusion.js does them', async () => {
    expect((await call(open, 'GET', '/sdapi/v1/options', undefined, ST_HEADERS)).json).not.toHaveProperty('forge_preset');
    const names = async (route: string, key: string): Promise<unknown[]> =>
      ((await call(open, 'GET', `/sdapi/v1/${route}`, undefined, ST_HEADERS)).json as unknown as Record<string, unknown>[]).map((x) => x[key]);
    expect(await names('samplers', 'name')).toContain('DDIM');
    expect(await names('schedulers', 'name')).toContain('karras');
    expect(await names('upscalers', 'name')).toEqual([]);
    expect(await names('latent-upscale-modes', 'name')).toEqual([]);
    expect(await names('sd-vae', 'model_name')).toEqual([]);
    const [title] = await names('sd-models', 'title');
    expect((await call(open, 'POST', '/sdapi/v1/options', { sd_model_checkpoint: title }, ST_HEADERS)).status).toBe(200);
    const progress = (await call(open, 'GET', '/sdapi/v1/progress', undefined, ST_HEADERS)).json;
    expect(progress.progress === 0 && (progress.state as Record<string, unknown>).job_count === 0).toBe(true);
  });

  it('interrupt while idle (SillyTavern: no body; others: Content-Type json, empty body) is 200 and does not cut the next job short', async () => {
    expect((await call(open, 'POST', '/sdapi/v1/interrupt', undefined, ST_HEADERS)).status).toBe(200);
    expect((await call(open, 'POST', '/sdapi/v1/interrupt', '', ST_HEADERS)).status).toBe(200);
    const { pngs, info } = read(await call(open, 'POST', '/sdapi/v1/txt2img', { ...SILLYTAVERN_TXT2IMG, seed: 9 }, ST_HEADERS));
    expect(pngs).toHaveLength(1);
    expect(info).not.toHaveProperty('interrupted');
  });

  it('Open WebUI: options -> sd-models -> set the model (the whole options dict posted back) -> txt2img with batch_size 2', async () => {
    const OWUI = { authorization: 'Basic ' }; // get_automatic1111_api_auth() with an empty AUTOMATIC1111_API_AUTH
    const options = await call(open, 'GET', '/sdapi/v1/options', undefined, OWUI);
    expect(options.json).toMatchObject({ sd_model_checkpoint: 'model.safetensors', CLIP_stop_at_last_layers: 1, samples_format: 'png' });
    const models = await call(open, 'GET', '/sdapi/v1/sd-models');
    const model = (models.json as unknown as Record<string, unknown>[])[0];
    expect(Object.keys(model).sort()).toEqual(['config', 'filename', 'hash', 'model_name', 'sha256', 'title']);
    expect(model).toMatchObject({ title: 'model.safetensors', model_name: 'model' });
    expect((await call(open, 'POST', '/sdapi/v1/options', { ...options.json, sd_model_checkpoint: model.title }, OWUI)).status).toBe(200);
    const a = await call(open, 'POST', '/sdapi/v1/txt2img', {
      prompt: 'a fern', batch_size: 2, width: 32, height: 32, steps: 1, negative_prompt: 'blurry', cfg_scale: 7,
      sampler_name: 'DPM++ 2M', scheduler: 'karras',
    }, OWUI);
    const { pngs, info, texts } = read(a);
    expect(pngs).toHaveLength(2);
    const seed = Number(info.seed);
    expect(info.all_seeds).toEqual([seed, seed + 1]);
    expect(texts.map((t) => parseParameters(t).settings.Seed)).toEqual([String(seed), String(seed + 1)]);
    expect(parseParameters(texts[0]).settings.Sampler).toBe('DPM++ 2M Karras');
  });

  it('webuiapi: the whole field set with nulls; n_iter 2 gets seed + i; override_settings for this request only', async () => {
    const { pngs, info, texts } = read(await call(open, 'POST', '/sdapi/v1/txt2img', WEBUIAPI_TXT2IMG));
    expect(pngs).toHaveLength(2);
    expect(info).toMatchObject({ seed: 1234, all_seeds: [1234, 1235], sampler_name: 'Euler a', clip_skip: 2 });
    expect(parseParameters(texts[1]).settings).toMatchObject({ Seed: '1235', 'Clip skip': '2', Sampler: 'Euler a' });
    expect((await call(open, 'GET', '/sdapi/v1/options')).json.CLIP_stop_at_last_layers).toBe(1);
    const single = read(await call(open, 'POST', '/sdapi/v1/txt2img', { ...WEBUIAPI_TXT2IMG, seed: 1235, n_iter: 1 }));
    expect(single.pngs[0].equals(pngs[1])).toBe(true);
  });

  it('GIMP plugin: img2img with init_images, denoising_strength and mask null; png-info reads the result back', async () => {
    const init = read(await call(open, 'POST', '/sdapi/v1/txt2img', { prompt: 'a fern', steps: 1, seed: 3 })).pngs[0];
    const body = {
      init_images: [`data:image/png;base64,${init.toString('base64')}`], resize_mode: 0, denoising_strength: 0.5,
      image_cfg_scale: null, mask: null, mask_blur: 4, inpainting_fill: 1, inpaint_full_res: true, inpaint_full_res_padding: 32,
      inpainting_mask_invert: 0, prompt: 'a fern, watercolor', negative_prompt: '', seed: 11, sampler_index: 'Euler a',
      batch_size: 1, n_iter: 1, steps: 1, cfg_scale: 7.5, width: 32, height: 32, restore_faces: false, tiling: false,
      include_init_images: false, override_settings: {}, script_args: [],
    };
    const a = await call(open, 'POST', '/sdapi/v1/img2img', body);
    const { texts, info } = read(a);
    expect(info).toMatchObject({ seed: 11, denoising_strength: 0.5 });
    expect(parseParameters(texts[0]).settings['Denoising strength']).toBe('0.5');
    expect((a.json.parameters as Record<string, unknown>).init_images).toBeNull();
    const png = await call(open, 'POST', '/sdapi/v1/png-info', { image: (a.json.images as string[])[0] });
    expect(png.json.info).toBe(texts[0]);
    expect(png.json.parameters).toMatchObject({ Prompt: 'a fern, watercolor', Seed: '11' });
  });

  it("pad_cond_uncond (override_settings, then options): prompt and negative prompt padded to one length, the PNG says 'Pad conds: True'", async () => {
    const long = { prompt: Array.from({ length: 90 }, (_, i) => `word${i}`).join(' '), negative_prompt: 'blurry', steps: 1, seed: 3, width: 32, height: 32 };
    const plain = read(await call(open, 'POST', '/sdapi/v1/txt2img', long));
    expect(plain.texts[0]).not.toContain('Pad conds');
    const padded = read(await call(open, 'POST', '/sdapi/v1/txt2img', { ...long, override_settings: { pad_cond_uncond: true } }));
    expect(padded.texts[0]).toContain('Pad conds: True');
    expect((await call(open, 'POST', '/sdapi/v1/options', { pad_cond_uncond: 'true' })).status).toBe(200);
    expect((await call(open, 'GET', '/sdapi/v1/options')).json.pad_cond_uncond).toBe(true);
    try {
      expect(read(await call(open, 'POST', '/sdapi/v1/txt2img', long)).texts[0]).toContain('Pad conds: True');
    } finally {
      expect((await call(open, 'POST', '/sdapi/v1/options', { pad_cond_uncond: false })).status).toBe(200);
    }
  });

  it('numbers as strings and integral floats, sampler_index alone, an unknown sampler falling back to Euler', async () => {
    const { info } = read(await call(open, 'POST', '/sdapi/v1/txt2img', { prompt: 'x', steps: '1', cfg_scale: '7.0', seed: '-1', width: 32.0, height: '32', sampler_index: 'k_euler' }));
    expect(info).toMatchObject({ steps: 1, cfg_scale: 7, width: 32, sampler_name: 'Euler' });
    const fallback = read(await call(open, 'POST', '/sdapi/v1/txt2img', { prompt: 'x', steps: 1, sampler_name: 'UniPC' }));
    expect(fallback.info.sampler_name).toBe('Euler');
    expect(String((fallback.info.warnings as string[])[0])).toContain('UniPC');
  });

  it('progress while a job runs, interrupt answers 200 with what was made; skip goes on with the next image', async () => {
    const long = call(open, 'POST', '/sdapi/v1/txt2img', { prompt: 'x', steps: 200, cfg_scale: 1 });
    const p = await until('running', () => call(open, 'GET', '/sdapi/v1/progress?skip_current_image=true'), (a) => Number((a.json.state as Record<string, unknown>).sampling_step) >= 1);
    expect(p.json).toHaveProperty('current_image', null);
    expect(Number(p.json.progress)).toBeGreaterThan(0);
    expect(Number(p.json.eta_relative)).toBeGreaterThanOrEqual(0);
    expect(p.json.state).toMatchObject({ job_count: 1, job_no: 0, sampling_steps: 200, interrupted: false, skipped: false });
    const withImage = await call(open, 'GET', '/sdapi/v1/progress'); // the live preview: the latent-size approx PNG
    const preview = Buffer.from(String(withImage.json.current_image), 'base64');
    expect(preview.subarray(1, 4).toString()).toBe('PNG');
    expect(preview.readUInt32BE(16)).toBe(8); // 32 px / the fixture VAE's factor 4
    expect((await call(open, 'POST', '/sdapi/v1/interrupt')).status).toBe(200);
    const cut = read(await long);
    expect(cut.pngs).toHaveLength(1); // finished early from its last step's predicted x0, as A1111 answers what it has
    expect(cut.info).not.toHaveProperty('images_not_made');

    // The server answers between two steps, so the skip lands at most a step after progress said step 1 of 8.
    const two = call(open, 'POST', '/sdapi/v1/txt2img', { prompt: 'x', steps: 8, n_iter: 2, seed: 40, cfg_scale: 1 });
    await until('first image', () => call(open, 'GET', '/sdapi/v1/progress'), (a) => Number((a.json.state as Record<string, unknown>).sampling_step) >= 1);
    expect((await call(open, 'POST', '/sdapi/v1/skip', '')).status).toBe(200);
    const skipped = read(await two);
    expect(skipped.pngs).toHaveLength(1);
    expect(parseParameters(skipped.texts[0]).settings.Seed).toBe('41');
    const idle = await call(open, 'GET', '/sdapi/v1/progress');
    expect(idle.json).toMatchObject({ progress: 0, current_image: null, state: { job_count: 0 } });
  });

  it('listing routes answer A1111 shapes; a POST of the whole options dict read back is accepted', async () => {
    const samplers = (await call(open, 'GET', '/sdapi/v1/samplers')).json as unknown as Record<string, unknown>[];
    expect(samplers.map((s) => s.name)).toEqual(expect.arrayContaining(['Euler a', 'Euler', 'DPM++ 2M', 'DDIM', 'Heun', 'LMS']));
    expect(samplers[0]).toHaveProperty('aliases');
    expect(samplers[0]).toHaveProperty('options');
    const schedulers = (await call(open, 'GET', '/sdapi/v1/schedulers')).json as unknown as Record<string, unknown>[];
    expect(schedulers.map((s) => s.name)).toEqual(['automatic', 'uniform', 'karras']);
    for (const route of ['sd-vae', 'upscalers', 'latent-upscale-modes', 'loras', 'hypernetworks', 'face-restorers', 'prompt-styles']) {
      expect((await call(open, 'GET', `/sdapi/v1/${route}`)).json, route).toEqual([]);
    }
    expect((await call(open, 'GET', '/sdapi/v1/embeddings')).json).toEqual({ loaded: {}, skipped: {} });
    expect((await call(open, 'GET', '/sdapi/v1/scripts')).json).toEqual({ txt2img: [], img2img: [] });
    expect((await call(open, 'GET', '/sdapi/v1/cmd-flags')).json).toMatchObject({ api: true });
    expect((await call(open, 'POST', '/sdapi/v1/refresh-checkpoints')).status).toBe(200);
    const all = (await call(open, 'GET', '/sdapi/v1/options')).json;
    expect((await call(open, 'POST', '/sdapi/v1/options', all)).status).toBe(200);
    expect((await call(open, 'GET', '/sdapi/v1/options')).json).toEqual(all);
  });
});

/** [what, route, body, the field the message must name]. */
const MALFORMED: readonly (readonly [string, string, unknown, string])[] = [
  ['a list for a body', 'txt2img', [1, 2], 'body'],
  ['steps not a number', 'txt2img', { prompt: 'x', steps: 'many' }, 'steps'],
  ['steps fractional', 'txt2img', { prompt: 'x', steps: 2.5 }, 'steps'],
  ['steps 0', 'txt2img', { prompt: 'x', steps: 0 }, 'steps'],
  ['prompt a number', 'txt2img', { prompt: 5 }, 'prompt'],
  ['seed past 2^32', 'txt2img', { prompt: 'x', seed: 2 ** 40 }, 'seed'],
  ['width too large', 'txt2img', { prompt: 'x', width: 99999 }, 'width'],
  ['width over --max-pixels', 'txt2img', { prompt: 'x', width: 2048, height: 2048, steps: 1 }, 'width'],
  ['too many images', 'txt2img', { prompt: 'x', batch_size: 4, n_iter: 4 }, 'batch_size'],
  ['cfg_scale an object', 'txt2img', { prompt: 'x', cfg_scale: {} }, 'cfg_scale'],
  ['hires fix', 'txt2img', { prompt: 'x', enable_hr: true }, 'enable_hr'],
  ['a script', 'txt2img', { prompt: 'x', alwayson_scripts: { ADetailer: { args: [true] } } }, 'alwayson_scripts.ADetailer'],
  ['clip skip past 12', 'txt2img', { prompt: 'x', override_settings: { CLIP_stop_at_last_layers: 99 } }, 'override_settings.CLIP_stop_at_last_layers'],
  ['clip skip past the model', 'txt2img', { prompt: 'x', override_settings: { CLIP_stop_at_last_layers: 5 } }, 'CLIP_stop_at_last_layers'],
  ['another model', 'txt2img', { prompt: 'x', override_settings: { sd_model_checkpoint: 'sdxl.safetensors' } }, 'sd_model_checkpoint'],
  ['no init image', 'img2img', { prompt: 'x', init_images: [] }, 'init_images'],
  ['init image not base64', 'img2img', { prompt: 'x', init_images: ['not base64!!'] }, 'init_images'],
  ['init image not an image', 'img2img', { prompt: 'x', init_images: [Buffer.from('hello').toString('base64')] }, 'init_images'],
  ['"Only masked" inpainting', 'img2img', { prompt: 'x', init_images: ['iVBORw0KGgo='], mask: 'iVBORw0KGgo=', inpaint_full_res: true }, 'inpaint_full_res'],
  ['denoising_strength 2', 'img2img', { prompt: 'x', init_images: ['iVBORw0KGgo='], denoising_strength: 2 }, 'denoising_strength'],
  ['samples_format jpg', 'options', { samples_format: 'jpg' }, 'samples_format'],
  ['pad_cond_uncond not a boolean', 'txt2img', { prompt: 'x', override_settings: { pad_cond_uncond: 'sometimes' } }, 'override_settings.pad_cond_uncond'],
  ['pad_cond_uncond in options not a boolean', 'options', { pad_cond_uncond: 2 }, 'options.pad_cond_uncond'],
  ['png-info image a number', 'png-info', { image: 5 }, 'image'],
];

describe('A1111 API: malformed bodies', () => {
  it.each(MALFORMED)('%s -> 4xx naming the field', async (_what, route, body, field) => {
    const a = await call(open, 'POST', `/sdapi/v1/${route}`, body);
    expect(a.status).toBeGreaterThanOrEqual(400);
    expect(a.status).toBeLessThan(500);
    expect(String(a.json.message)).toContain(field);
  });

  it('broken JSON is 400 and the server stays healthy', async () => {
    expect((await call(open, 'POST', '/sdapi/v1/txt2img', '{"prompt": ')).status).toBe(400);
    expect((await call(open, 'GET', '/health')).json).toMatchObject({ status: 'ok', running: 0, queue_depth: 0 });
  });
});

describe('A1111 API: auth and queue', () => {
  it('--api-auth: Basic user:pass or the Bearer key pass; otherwise 401 with WWW-Authenticate: Basic', async () => {
    const refused: Record<string, string>[] = [{}, { authorization: basic('') }, { authorization: basic('alice:wrong') }, { authorization: 'Bearer nope' }];
    for (const headers of refused) {
      const a = await call(guarded, 'GET', '/sdapi/v1/options', undefined, headers);
      expect(a.status, JSON.stringify(headers)).toBe(401);
      expect(a.headers.get('www-authenticate')).toMatch(/^Basic/);
    }
    for (const headers of [{ authorization: basic('alice:wonder:land') }, { authorization: basic('bob:builder') }, { authorization: `Bearer ${KEY}` }]) {
      expect((await call(guarded, 'GET', '/sdapi/v1/options', undefined, headers)).status, JSON.stringify(headers)).toBe(200);
      expect((await call(guarded, 'GET', '/jobs/nope', undefined, headers)).status, JSON.stringify(headers)).toBe(404);
    }
    expect((await call(guarded, 'GET', '/health')).status).toBe(200);
  });

  it('a full queue answers 429 with Retry-After; a batch that does not fit leaves nothing queued', async () => {
    const auth = { authorization: basic('bob:builder') };
    // 1 running + 1 waiting fit; a third image does not, and the two taken places are given back.
    const batch = await call(guarded, 'POST', '/sdapi/v1/txt2img', { prompt: 'x', steps: 1, batch_size: 3 }, auth);
    expect(batch.status).toBe(429);
    expect(Number(batch.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
    await until('idle', () => call(guarded, 'GET', '/health'), (a) => a.json.running === 0 && a.json.queue_depth === 0);
    const long = call(guarded, 'POST', '/sdapi/v1/txt2img', { prompt: 'x', steps: 200, n_iter: 2, cfg_scale: 1 }, auth);
    await until('running', () => call(guarded, 'GET', '/health'), (a) => a.json.running === 1 && a.json.queue_depth === 1);
    for (const route of ['/sdapi/v1/txt2img', '/inference']) {
      const full = await call(guarded, 'POST', route, { prompt: 'x', steps: 1 }, auth);
      expect(full.status, route).toBe(429);
      expect(Number(full.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
    }
    expect((await call(guarded, 'POST', '/sdapi/v1/interrupt', '', auth)).status).toBe(200);
    const cut = read(await long); // the running image finished early with what it had, the waiting one not made
    expect(cut.pngs).toHaveLength(1);
    expect(cut.info).toMatchObject({ interrupted: true, images_not_made: 1 });
    expect(read(await call(guarded, 'POST', '/sdapi/v1/txt2img', { prompt: 'x', steps: 1 }, auth)).pngs).toHaveLength(1);
  });
});

async function rgbOf(png: Buffer): Promise<Uint8Array> {
  const sharp = (await import('sharp')).default;
  return new Uint8Array(await sharp(png).removeAlpha().raw().toBuffer());
}
