/**
 * The adapter fields end to end on the tiny fixture model (cpu backend, 32x32, 2 steps), on a real socket: a
 * request naming models in the server's folders (copies of the fixtures' ControlNet, IP-Adapter and LoRAs) makes
 * byte for byte the image generate() makes with those files' paths, on our API and on A1111's (ControlNet units,
 * <lora:> tags, an img2img mask). The mappings themselves, with a fake engine: tests/server-adapters.test.ts and
 * tests/a1111-controlnet.test.ts.
 */
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, realpathSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { initBackend } from '../src/backend/select.js';
import { StableDiffusion, pipelineConfigFromLdm } from '../src/pipeline/pipeline.js';
import type { GenerateParams } from '../src/pipeline/api.js';
import type { Engine } from '../src/server/engine.js';
import { SdServer } from '../src/server/server.js';

const PIPE = 'tests/fixtures/pipeline';
const root = mkdtempSync(path.join(tmpdir(), 'sd-adapters-model-'));
const dirs = { controlnet: path.join(root, 'cn'), ipAdapter: path.join(root, 'ip'), lora: path.join(root, 'lora'), imageEncoder: 'tests/fixtures/ip-adapter/image_encoder' };
let sd: StableDiffusion;
let server: SdServer;
let sketch: Buffer;
let photo: Buffer;
let initPng: Buffer;
let maskPng: Buffer;
const file: Record<string, string> = {};

function copy(from: string, dir: string): string {
  mkdirSync(dir, { recursive: true });
  const to = path.join(dir, path.basename(from));
  copyFileSync(from, to);
  return realpathSync(to);
}

const b64 = (b: Uint8Array): string => Buffer.from(b).toString('base64');
const QUICK = { prompt: 'a botanical illustration of a fern', seed: 5, steps: 2, width: 32, height: 32 };

async function post(route: string, body: unknown): Promise<{ status: number; json: Record<string, unknown> }> {
  const res = await fetch(`${server.url}${route}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
  return { status: res.status, json: (await res.json()) as Record<string, unknown> };
}

/** The PNG of our /inference answer. */
async function inference(body: Record<string, unknown>): Promise<{ png: Buffer; parameters: Record<string, unknown> }> {
  const a = await post('/inference', { ...QUICK, sampler: 'euler_a', ...body });
  expect(a.status, JSON.stringify(a.json).slice(0, 300)).toBe(200);
  return { png: Buffer.from(String(a.json.image), 'base64'), parameters: a.json.parameters as Record<string, unknown> };
}

/** The first image of an A1111 answer. */
async function a1111(route: 'txt2img' | 'img2img', body: Record<string, unknown>): Promise<Buffer> {
  const a = await post(`/sdapi/v1/${route}`, { ...QUICK, sampler_name: 'Euler', ...body });
  expect(a.status, JSON.stringify(a.json).slice(0, 300)).toBe(200);
  return Buffer.from((a.json.images as string[])[0], 'base64');
}

/** What generate() makes of params: PNG bytes. */
const direct = async (p: GenerateParams): Promise<Buffer> => (await sd.generate(p)).images[0].png;
/** A1111's request as the pipeline's params: Euler (uniform), cfg 7, clip skip 1, CPU noise. */
const A1111_AS_OURS = { ...QUICK, sampler: 'euler', karras: false, cfgScale: 7, clipSkip: 1, noise: 'cpu' } as const;

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: null });
  const config = pipelineConfigFromLdm(JSON.parse(readFileSync(`${PIPE}/fixture.json`, 'utf8')).config);
  sd = await StableDiffusion.load({ weights: `${PIPE}/model.safetensors`, config, tokenizer: 'tests/fixtures/tokenizer' });
  file.cn = copy('tests/fixtures/controlnet/control_tiny.safetensors', dirs.controlnet);
  file.ip = copy('tests/fixtures/ip-adapter/ip-adapter_sd15.safetensors', dirs.ipAdapter);
  file.botanical = copy('tests/fixtures/lora/botanical.safetensors', dirs.lora);
  file.ink = copy('tests/fixtures/lora/ink.safetensors', dirs.lora);
  // A 64x64 sketch: a dark square on white (the ControlNet's hint size for a 32x32 image).
  const rgb = Buffer.alloc(64 * 64 * 3, 255);
  for (let y = 16; y < 48; y++) for (let x = 16; x < 48; x++) rgb.fill(30, (y * 64 + x) * 3, (y * 64 + x) * 3 + 3);
  sketch = await sharp(rgb, { raw: { width: 64, height: 64, channels: 3 } }).png().toBuffer();
  photo = readFileSync('tests/fixtures/ip-adapter/photo.png');
  initPng = (await sd.generate({ ...QUICK, seed: 9 })).images[0].png;
  const m = Buffer.alloc(32 * 32);
  for (let y = 0; y < 32; y++) for (let x = 16; x < 32; x++) m[y * 32 + x] = 255;
  maskPng = await sharp(m, { raw: { width: 32, height: 32, channels: 1 } }).png().toBuffer();
  const shared: Engine = { limits: sd.limits, generate: (p, o) => sd.generate(p, o), dispose: () => {} };
  server = await SdServer.start({ loadEngine: async () => shared, outputs: path.join(root, 'out'), models: dirs }, { port: 0, host: '127.0.0.1' });
  await server.ready();
});

afterAll(async () => {
  await server?.shutdown({ graceS: 0 });
  sd?.dispose();
  rmSync(root, { recursive: true, force: true });
});

describe('our API on the tiny model', () => {
  it('controlnet + ip_adapter + loras by name = generate() with their paths, and not the plain image', async () => {
    const a = await inference({
      controlnet: { model: 'control_tiny', image: b64(sketch), scale: 0.8, end: 0.8 },
      ip_adapter: { model: 'ip-adapter_sd15', image: b64(photo), scale: 0.6 },
      loras: [{ name: 'botanical', multiplier: 0.8 }],
    });
    const same = await direct({
      ...QUICK,
      sampler: 'euler_a',
      controlNets: [{ model: file.cn, image: sketch, scale: 0.8, end: 0.8 }],
      ipAdapter: { model: file.ip, image: photo, scale: 0.6, imageEncoder: dirs.imageEncoder },
      loras: [{ path: file.botanical, te: 0.8, unet: 0.8 }],
    });
    expect(a.png.equals(same)).toBe(true);
    expect(a.png.equals(await direct({ ...QUICK, sampler: 'euler_a' }))).toBe(false);
    expect(a.parameters).toMatchObject({ controlnet: [{ model: 'control_tiny', scale: 0.8, end: 0.8 }], ip_adapter: { model: 'ip-adapter_sd15', scale: 0.6 }, loras: [{ name: 'botanical', multiplier: 0.8 }] });
  });

  it('init_image + mask = generate() inpainting with the same bytes', async () => {
    const a = await inference({ init_image: b64(initPng), mask: b64(maskPng), strength: 0.75 });
    expect(a.png.equals(await direct({ ...QUICK, sampler: 'euler_a', initImage: initPng, mask: maskPng, strength: 0.75 }))).toBe(true);
  });
});

describe('A1111 API on the tiny model', () => {
  const unit = (o: Record<string, unknown> = {}) => ({ enabled: true, module: 'canny', model: 'control_tiny [e3b0c442]', image: b64(sketch), weight: 1, ...o });

  it('a canny unit = generate() with the ControlNet; weight 0 = no ControlNet, bit for bit', async () => {
    const withUnit = await a1111('txt2img', { alwayson_scripts: { controlnet: { args: [unit()] } } });
    const controlNets = [{ model: file.cn, image: sketch, preprocess: 'canny', low: 100, high: 200, scale: 1, start: 0, end: 1 }] as const;
    expect(withUnit.equals(await direct({ ...A1111_AS_OURS, controlNets }))).toBe(true);
    const zero = await a1111('txt2img', { alwayson_scripts: { controlnet: { args: [unit({ weight: 0 })] } } });
    const none = await a1111('txt2img', {});
    expect(zero.equals(none)).toBe(false); // the parameters text names the unit
    const pixels = async (png: Buffer) => sharp(png).raw().toBuffer();
    expect((await pixels(zero)).equals(await pixels(none))).toBe(true);
    expect((await pixels(withUnit)).equals(await pixels(none))).toBe(false);
  });

  it('an IP-Adapter unit (ip-adapter_clip_h) = generate() with the adapter and the server\'s image encoder', async () => {
    const img = await a1111('txt2img', { alwayson_scripts: { controlnet: { args: [{ module: 'ip-adapter_clip_h', model: 'ip-adapter_sd15', weight: 0.6, image: b64(photo) }] } } });
    const ipAdapter = { model: file.ip, image: photo, scale: 0.6, imageEncoder: dirs.imageEncoder };
    expect((await sharp(img).raw().toBuffer()).equals(await sharp(await direct({ ...A1111_AS_OURS, ipAdapter })).raw().toBuffer())).toBe(true);
  });

  it('<lora:botanical:0.8> in the prompt = generate() with that LoRA; an img2img mask (mask_blur 0) = generate() inpainting', async () => {
    const prompt = `${QUICK.prompt} <lora:botanical:0.8>`;
    const tagged = await a1111('txt2img', { prompt });
    expect(tagged.equals(await direct({ ...A1111_AS_OURS, prompt, loras: [{ path: file.botanical, te: 0.8, unet: 0.8 }] }))).toBe(true);
    const painted = await a1111('img2img', { init_images: [b64(initPng)], mask: b64(maskPng), mask_blur: 0, inpainting_fill: 1, inpaint_full_res: false, denoising_strength: 0.75 });
    const ours = await direct({ ...A1111_AS_OURS, initImage: initPng, mask: maskPng, strength: 0.75 });
    expect((await sharp(painted).raw().toBuffer()).equals(await sharp(ours).raw().toBuffer())).toBe(true);
  });
});
