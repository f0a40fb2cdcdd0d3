/**
 * The A1111 room's ControlNet, inpainting and LoRA mappings, with a fake Engine that records the GenerateParams of
 * each job, driven by payloads real clients send, written from their public code:
 *   - sd-webui-controlnet's own API example (example/txt2img_example/api_txt2img.py: module "none", model "canny",
 *     resize_mode "Crop and Resize", control_mode "Balanced", enabled true);
 *   - mix1009/sdwebuiapi's ControlNetUnit.to_dict (input_image, mask null, lowvram, guidance, control_mode 0,
 *     resize_mode "Resize and Fill", threshold_a/b 64, and no `enabled`);
 *   - the extension's inpaint example's img2img body (mask, mask_blur, inpainting_fill, inpaint_full_res false).
 * Also the extension's probe routes (/controlnet/version, model_list, module_list), prompt <lora:> tags in
 * --lora-dir (an unknown one skipped with a warning), and every refusal a 422 naming its field.
 */
import { createHash } from 'node:crypto';
import { mkdirSync, mkdtempSync, realpathSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import sharp from 'sharp';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { GenerateParams } from '../src/pipeline/api.js';
import { encodePng } from '../src/image/codec.js';
import type { SdServer } from '../src/server/server.js';
import { blurMask, gaussianKernel } from '../src/server/a1111/mask.js';
import { withoutHash } from '../src/server/a1111/controlnet.js';
import { RecordingEngine, b64, callJson as call, startServer } from './helpers.js';

const root = mkdtempSync(path.join(tmpdir(), 'sd-a1111-cn-'));
const dirs = { controlnet: path.join(root, 'ControlNet'), lora: path.join(root, 'Lora'), ipAdapter: path.join(root, 'ip'), imageEncoder: path.join(root, 'image_encoder') };
const engine = new RecordingEngine(9);
let server: SdServer;
let bare: SdServer;
let canny = '';
let tile = '';
let ink = '';
let ip = '';
/** 16x16: left half black, right half white. */
let halves: Buffer;
let wide: Buffer;

const start = (models: Record<string, string>): Promise<SdServer> => startServer(engine, root, { models });

beforeAll(async () => {
  mkdirSync(dirs.controlnet, { recursive: true });
  mkdirSync(dirs.lora, { recursive: true });
  mkdirSync(dirs.ipAdapter, { recursive: true });
  writeFileSync(path.join(dirs.ipAdapter, 'ip-adapter_sd15.safetensors'), '');
  ip = realpathSync(path.join(dirs.ipAdapter, 'ip-adapter_sd15.safetensors'));
  // Over 1 MiB, so A1111's short hash reads its 64 KiB at 1 MiB.
  const big = Buffer.alloc(0x110000);
  for (let i = 0; i < big.length; i++) big[i] = (i * 31) & 0xff;
  writeFileSync(path.join(dirs.controlnet, 'control_v11p_sd15_canny.pth'), big);
  writeFileSync(path.join(dirs.controlnet, 'control_v11f1e_sd15_tile.safetensors'), 'small');
  writeFileSync(path.join(dirs.lora, 'ink.safetensors'), 'x');
  canny = realpathSync(path.join(dirs.controlnet, 'control_v11p_sd15_canny.pth'));
  tile = realpathSync(path.join(dirs.controlnet, 'control_v11f1e_sd15_tile.safetensors'));
  ink = realpathSync(path.join(dirs.lora, 'ink.safetensors'));
  const rgb = new Uint8Array(16 * 16 * 3);
  for (let y = 0; y < 16; y++) for (let x = 8; x < 16; x++) rgb.fill(255, (y * 16 + x) * 3, (y * 16 + x) * 3 + 3);
  halves = await encodePng({ rgb, width: 16, height: 16 });
  wide = await encodePng({ rgb: new Uint8Array(32 * 16 * 3).fill(60), width: 32, height: 16 });
  server = await start(dirs);
  bare = await start({});
});

afterAll(async () => {
  await server?.shutdown({ graceS: 0 });
  await bare?.shutdown({ graceS: 0 });
  rmSync(root, { recursive: true, force: true });
});

/** The params of the (single) job a 200 request ran, and its info. */
async function ran(route: 'txt2img' | 'img2img', body: Record<string, unknown>): Promise<{ params: GenerateParams; info: Record<string, unknown> }> {
  const before = engine.seen.length;
  const a = await call(server, 'POST', `/sdapi/v1/${route}`, { steps: 1, width: 16, height: 16, ...body });
  expect(a.status, JSON.stringify(a.json).slice(0, 400)).toBe(200);
  expect(engine.seen.length).toBe(before + 1);
  return { params: engine.seen[before], info: JSON.parse(String(a.json.info)) as Record<string, unknown> };
}

async function gray(png: Uint8Array): Promise<{ data: Buffer; width: number; height: number }> {
  const { data, info } = await sharp(png).extractChannel(0).raw().toBuffer({ resolveWithObject: true });
  return { data, width: info.width, height: info.height };
}

/** The extension's example/txt2img_example/api_txt2img.py, sizes made small. */
const extensionExample = (image: string): Record<string, unknown> => ({
  prompt: 'a large avalanche',
  negative_prompt: '',
  batch_size: 1,
  steps: 1,
  cfg_scale: 7,
  width: 16,
  height: 16,
  alwayson_scripts: {
    controlnet: {
      args: [
        {
          enabled: true,
          module: 'none',
          model: 'canny',
          weight: 1.0,
          image,
          resize_mode: 'Crop and Resize',
          lowvram: false,
          processor_res: 64,
          threshold_a: 64,
          threshold_b: 64,
          guidance_start: 0.0,
          guidance_end: 1.0,
          control_mode: 'Balanced',
          pixel_perfect: false,
        },
      ],
    },
  },
});

/** mix1009/sdwebuiapi ControlNetUnit(...).to_dict() with its defaults, module canny. */
const webuiapiUnit = (image: string): Record<string, unknown> => ({
  input_image: image,
  mask: null,
  module: 'canny',
  model: 'control_v11p_sd15_canny [d14c016b]',
  weight: 1.0,
  resize_mode: 'Resize and Fill',
  lowvram: false,
  processor_res: 512,
  threshold_a: 64,
  threshold_b: 64,
  guidance: 1.0,
  guidance_start: 0.0,
  guidance_end: 1.0,
  control_mode: 0,
  pixel_perfect: false,
});

describe('alwayson_scripts.controlnet', () => {
  it("the extension's own example: model 'canny' found by its closest name, module none, the image as sent", async () => {
    const { params } = await ran('txt2img', extensionExample(b64(halves)));
    expect(params.controlNets).toHaveLength(1);
    const c = params.controlNets?.[0];
    expect(c).toMatchObject({ model: canny, preprocess: 'none', scale: 1, start: 0, end: 1 });
    expect(Buffer.from(c?.image ?? []).equals(halves)).toBe(true);
  });

  it("webuiapi's unit (no `enabled`, input_image, guidance): canny with thresholds 64/64, the hash dropped from the model", async () => {
    const { params } = await ran('txt2img', { prompt: 'x', alwayson_scripts: { ControlNet: { args: [webuiapiUnit(b64(halves))] } } });
    expect(params.controlNets?.[0]).toMatchObject({ model: canny, preprocess: 'canny', low: 64, high: 64, scale: 1, start: 0, end: 1 });
  });

  it('several units in order; disabled and null ones skipped; thresholds outside 1..255 are canny defaults; weight and window', async () => {
    const unit = { enabled: true, module: 'canny', image: `data:image/png;base64,${b64(halves)}` };
    const { params } = await ran('txt2img', {
      alwayson_scripts: {
        controlnet: {
          args: [
            { ...unit, model: 'control_v11f1e_sd15_tile', threshold_a: -1, threshold_b: 300, weight: 0.5, guidance_start: 0.2, guidance_end: 0.6 },
            { ...unit, enabled: false, model: 'nonexistent' },
            null,
            { ...unit, model: 'control_v11p_sd15_canny [d14c016b]', module: 'none', image: { image: b64(halves), mask: null } },
          ],
        },
      },
    });
    expect(params.controlNets?.map((c) => [c.model, c.preprocess, c.low, c.high, c.scale, c.start, c.end])).toEqual([
      [tile, 'canny', 100, 200, 0.5, 0.2, 0.6],
      [canny, 'none', undefined, undefined, 1, 0, 1],
    ]);
  });

  it('"Crop and Resize" crops a wider image to the output aspect; invert negates; img2img without a unit image takes the init image', async () => {
    const crop = await ran('txt2img', { alwayson_scripts: { controlnet: { args: [{ model: 'control_v11f1e_sd15_tile', image: b64(wide) }] } } });
    const cropped = await gray(crop.params.controlNets?.[0].image ?? new Uint8Array());
    expect([cropped.width, cropped.height]).toEqual([16, 16]);
    expect([...cropped.data].every((v) => v === 60)).toBe(true);
    const inv = await ran('txt2img', { alwayson_scripts: { controlnet: { args: [{ model: 'control_v11f1e_sd15_tile', module: 'invert (from white bg & black line)', image: b64(halves) }] } } });
    const inverted = await gray(inv.params.controlNets?.[0].image ?? new Uint8Array());
    expect([inverted.data[0], inverted.data[15]]).toEqual([255, 0]);
    expect(inv.params.controlNets?.[0].preprocess).toBe('none');
    const i2i = await ran('img2img', { init_images: [b64(halves)], denoising_strength: 0.5, alwayson_scripts: { controlnet: { args: [{ model: 'control_v11f1e_sd15_tile', module: 'canny' }] } } });
    expect(Buffer.from(i2i.params.controlNets?.[0].image ?? []).equals(Buffer.from(i2i.params.initImage ?? []))).toBe(true);
  });

  it('an IP-Adapter unit (ip-adapter_clip_h, model in --ip-adapter-dir) is the request\'s ipAdapter, beside a ControlNet', async () => {
    const { params } = await ran('txt2img', {
      alwayson_scripts: {
        controlnet: {
          args: [
            { module: 'ip-adapter_clip_h', model: 'ip-adapter_sd15 [e3b0c442]', weight: 0.6, image: b64(wide) },
            { module: 'canny', model: 'control_v11f1e_sd15_tile', image: b64(halves) },
          ],
        },
      },
    });
    expect(params.ipAdapter).toEqual({ model: ip, image: params.ipAdapter?.image, scale: 0.6, imageEncoder: dirs.imageEncoder });
    expect(Buffer.from(params.ipAdapter?.image ?? []).equals(wide)).toBe(true); // not cropped: CLIP's preprocessing crops
    expect(params.controlNets?.map((c) => c.model)).toEqual([tile]);
    const two = await call(server, 'POST', '/sdapi/v1/txt2img', {
      steps: 1,
      alwayson_scripts: { controlnet: { args: [0, 1].map(() => ({ module: 'ip-adapter-auto', model: 'ip-adapter_sd15', image: b64(halves) })) } },
    });
    expect(two.status).toBe(422);
    expect(two.json.field).toBe('alwayson_scripts.controlnet.args[1].module');
    const window = await call(server, 'POST', '/sdapi/v1/txt2img', {
      steps: 1,
      alwayson_scripts: { controlnet: { args: [{ module: 'ip-adapter_clip_sd15', model: 'ip-adapter_sd15', image: b64(halves), guidance_end: 0.5 }] } },
    });
    expect(window.status).toBe(422);
    expect(String(window.json.message)).toMatch(/acts in every step/);
  });

  const refusals: [string, Record<string, unknown>, string, RegExp][] = [
    ['unknown preprocessor', { module: 'depth_midas' }, 'alwayson_scripts.controlnet.args[0].module', /"depth_midas" is not available on this server: canny, none, invert/],
    ['unknown model', { model: 'control_v11p_sd15_openpose [cab727d4]' }, 'alwayson_scripts.controlnet.args[0].model', /no ControlNet named "control_v11p_sd15_openpose"/],
    ['model None', { model: 'None' }, 'alwayson_scripts.controlnet.args[0].model', /no ControlNet model given/],
    ['control mode', { control_mode: 'ControlNet is more important' }, 'alwayson_scripts.controlnet.args[0].control_mode', /only "Balanced"/],
    ['weight over 2', { weight: 2.5 }, 'alwayson_scripts.controlnet.args[0].weight', /<= 2/],
    ['start after end', { guidance_start: 0.8, guidance_end: 0.2 }, 'alwayson_scripts.controlnet.args[0].guidance_start', /guidance_start \(0.8\) > guidance_end \(0.2\)/],
    ['no image in txt2img', { image: '' }, 'alwayson_scripts.controlnet.args[0].image', /no input image/],
    ['image not base64', { image: '***' }, 'alwayson_scripts.controlnet.args[0].image', /not base64/],
    ['resize mode', { resize_mode: 'Stretch' }, 'alwayson_scripts.controlnet.args[0].resize_mode', /not a resize mode/],
  ];
  for (const [what, change, field, message] of refusals) {
    it(`422: ${what}`, async () => {
      const before = engine.seen.length;
      const unit = { enabled: true, module: 'canny', model: 'control_v11p_sd15_canny', image: b64(halves), ...change };
      const a = await call(server, 'POST', '/sdapi/v1/txt2img', { steps: 1, width: 16, height: 16, alwayson_scripts: { controlnet: { args: [unit] } } });
      expect(a.status, JSON.stringify(a.json)).toBe(422);
      expect(a.json.field).toBe(field);
      expect(String(a.json.message)).toMatch(message);
      expect(engine.seen.length).toBe(before);
    });
  }

  it('422: "Resize and Fill" of another aspect; a unit on a server without --controlnet-dir; another script', async () => {
    const fill = await call(server, 'POST', '/sdapi/v1/txt2img', { steps: 1, width: 16, height: 16, alwayson_scripts: { controlnet: { args: [{ ...webuiapiUnit(b64(wide)) }] } } });
    expect(fill.status).toBe(422);
    expect(fill.json.field).toBe('alwayson_scripts.controlnet.args[0].resize_mode');
    const off = await call(bare, 'POST', '/sdapi/v1/txt2img', { steps: 1, alwayson_scripts: { controlnet: { args: [webuiapiUnit(b64(halves))] } } });
    expect(off.status).toBe(422);
    expect(String(off.json.message)).toContain('start sd serve with --controlnet-dir DIR');
    const other = await call(server, 'POST', '/sdapi/v1/txt2img', { steps: 1, alwayson_scripts: { controlnet: { args: [] }, ADetailer: { args: [] } } });
    expect(other.status).toBe(422);
    expect(other.json.field).toBe('alwayson_scripts.ADetailer');
  });
});

describe("the extension's routes", () => {
  it('version 3; model_list "name [A1111 short hash]"; module_list with canny\'s sliders', async () => {
    expect((await call(server, 'GET', '/controlnet/version')).json).toEqual({ version: 3 });
    const hash = (bytes: Buffer): string => createHash('sha256').update(bytes).digest('hex').slice(0, 8);
    const big = Buffer.alloc(0x110000);
    for (let i = 0; i < big.length; i++) big[i] = (i * 31) & 0xff;
    expect((await call(server, 'GET', '/controlnet/model_list')).json).toEqual({
      model_list: [
        `control_v11f1e_sd15_tile [${hash(Buffer.alloc(0))}]`,
        `control_v11p_sd15_canny [${hash(big.subarray(0x100000, 0x110000))}]`,
        `ip-adapter_sd15 [${hash(Buffer.alloc(0))}]`,
      ],
    });
    expect((await call(bare, 'GET', '/controlnet/model_list')).json).toEqual({ model_list: [] });
    const modules = (await call(server, 'GET', '/controlnet/module_list')).json;
    expect(modules.module_list).toEqual(['none', 'canny', 'invert', 'ip-adapter_clip_sd15', 'ip-adapter-auto']);
    expect((modules.module_detail as Record<string, { sliders: { name: string; value: number }[] }>).canny.sliders.map((s) => [s.name, s.value])).toEqual([
      ['Resolution', 512],
      ['Low Threshold', 100],
      ['High Threshold', 200],
    ]);
    expect(withoutHash('control_v11p_sd15_canny [d14c016b]')).toBe('control_v11p_sd15_canny');
  });
});

describe('img2img mask', () => {
  it("the extension's inpaint example body: mask binarised, blurred by mask_blur, inpainting_fill noted; no mask: plain img2img", async () => {
    const { params, info } = await ran('img2img', {
      init_images: [b64(halves)],
      mask: b64(halves),
      mask_blur: 4,
      inpainting_fill: 0,
      inpaint_full_res: false,
      inpaint_full_res_padding: 32,
      inpainting_mask_invert: 0,
      denoising_strength: 1,
      sampler_name: 'DPM++ 2M Karras',
      seed: 42,
    });
    const m = await gray(params.mask ?? new Uint8Array());
    // The 0 | 255 edge between columns 7 and 8, blurred along x (sigma 4) as cv2.GaussianBlur does: symmetric about it.
    const expected = blurMask(new Uint8Array(256).map((_, i) => (i % 16 >= 8 ? 255 : 0)), 16, 16, 4, 4);
    expect([...m.data]).toEqual([...expected]);
    expect(m.data[7] + m.data[8]).toBeGreaterThanOrEqual(254);
    expect(m.data[7] + m.data[8]).toBeLessThanOrEqual(256);
    expect(m.data[0]).toBeGreaterThan(0); // the reflected border of a blur 4 reaches column 0
    expect(info.warnings).toEqual(['inpainting_fill 0 (fill) runs as 1 (original) on this server']);
    const plain = await ran('img2img', { init_images: [b64(halves)], mask: null });
    expect(plain.params.mask).toBeUndefined();
  });

  it('inpainting_mask_invert and mask_blur 0: the exact binary mask, inverted; an alpha mask read by its alpha', async () => {
    const { params } = await ran('img2img', { init_images: [b64(halves)], mask: b64(halves), mask_blur: 0, inpainting_mask_invert: 1, inpainting_fill: 1 });
    const m = await gray(params.mask ?? new Uint8Array());
    expect([...m.data]).toEqual(Array.from({ length: 256 }, (_, i) => (i % 16 >= 8 ? 0 : 255)));
    const rgba = await sharp(Buffer.alloc(16 * 16 * 4).map((_, i) => (i % 4 === 3 ? (Math.floor(i / 4) % 16 < 4 ? 255 : 0) : 255)), { raw: { width: 16, height: 16, channels: 4 } }).png().toBuffer();
    const alpha = await ran('img2img', { init_images: [b64(halves)], mask: b64(rgba), mask_blur: 0 });
    const a = await gray(alpha.params.mask ?? new Uint8Array());
    expect([...a.data]).toEqual(Array.from({ length: 256 }, (_, i) => (i % 16 < 4 ? 255 : 0)));
  });

  it("cv2.getGaussianKernel's numbers: sigma 1 -> 7 taps; sigma 4 -> 21", () => {
    expect([...gaussianKernel(1)].map((v) => Number(v.toFixed(8)))).toEqual([0.00443305, 0.05400558, 0.24203623, 0.39905028, 0.24203623, 0.05400558, 0.00443305]);
    expect(gaussianKernel(4)).toHaveLength(21);
  });

  for (const [field, value, message] of [
    ['inpaint_full_res', true, /"Only masked" inpainting/],
    ['mask_round', false, /binarised/],
    ['mask_blur', 100, /<= 64/],
    ['inpainting_fill', 4, /<= 3/],
  ] as const) {
    it(`422: ${field} ${String(value)}`, async () => {
      const a = await call(server, 'POST', '/sdapi/v1/img2img', { steps: 1, width: 16, height: 16, init_images: [b64(halves)], mask: b64(halves), [field]: value });
      expect(a.status, JSON.stringify(a.json)).toBe(422);
      expect(a.json.field).toBe(field);
      expect(String(a.json.message)).toMatch(message);
    });
  }
});

describe('prompt <lora:> tags', () => {
  it('found in --lora-dir with their multipliers; an unknown one skipped with a warning; without --lora-dir left to the engine', async () => {
    const { params, info } = await ran('txt2img', { prompt: 'a fern <lora:ink:0.7> <lora:oil:1> <lora:ink:0.2:0.4>' });
    expect(params.loras).toEqual([
      { path: ink, te: 0.7, unet: 0.7 },
      { path: ink, te: 0.2, unet: 0.4 },
    ]);
    expect(params.prompt).toBe('a fern <lora:ink:0.7> <lora:oil:1> <lora:ink:0.2:0.4>');
    expect(info.warnings).toEqual([expect.stringMatching(/^<lora:oil> skipped: no LoRA named "oil" in this server's --lora-dir: it has ink$/)]);
    const before = engine.seen.length;
    const a = await call(bare, 'POST', '/sdapi/v1/txt2img', { prompt: 'a <lora:ink:1>', steps: 1, width: 16, height: 16 });
    expect(a.status).toBe(200);
    expect(engine.seen[before].loras).toBeUndefined();
  });
});
