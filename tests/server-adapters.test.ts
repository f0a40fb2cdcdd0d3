/**
 * The adapter fields of our API (controlnet, mask, ip_adapter, loras, prompt <lora:> tags) on a real socket, with
 * a fake Engine that records the GenerateParams each job hands it: names resolve to files of the server's model
 * folders and nowhere else (traversal, absolute paths, links out of the folder refused), images pass the upload
 * checks, every bad input is a 400 naming its field, the answered parameters echo the fields without images.
 * (The same fields through the real engine on the tiny model: the end-to-end part at the bottom.)
 */
import { mkdirSync, mkdtempSync, realpathSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { GenerateParams } from '../src/pipeline/api.js';
import { encodePng } from '../src/image/codec.js';
import type { SdServer, ServerOptions } from '../src/server/server.js';
import { listModels, resolveModel } from '../src/server/models-dir.js';
import { HttpError } from '../src/server/errors.js';
import { modelDirsOf } from '../src/cli/commands/serve.js';
import { RecordingEngine, b64, callJson, startServer } from './helpers.js';

const root = mkdtempSync(path.join(tmpdir(), 'sd-adapters-'));
const dirs = { controlnet: path.join(root, 'controlnet'), ipAdapter: path.join(root, 'ip'), lora: path.join(root, 'lora'), imageEncoder: path.join(root, 'image_encoder') };
const outside = path.join(root, 'outside');
const engine = new RecordingEngine();
let server: SdServer;
let bare: SdServer;
let png16: Buffer;
let png32x16: Buffer;

function touch(file: string, bytes: Uint8Array | string = 'x'): string {
  mkdirSync(path.dirname(file), { recursive: true });
  writeFileSync(file, bytes);
  return realpathSync(file);
}

/** A safetensors file with no tensors and this `__metadata__`. */
function safetensors(metadata: Record<string, string>): Buffer {
  const header = Buffer.from(JSON.stringify({ __metadata__: metadata }));
  const size = Buffer.alloc(8);
  size.writeBigUInt64LE(BigInt(header.length));
  return Buffer.concat([size, header]);
}

const files: Record<string, string> = {};

const start = (extra: Partial<ServerOptions>): Promise<SdServer> => startServer(engine, root, extra);

beforeAll(async () => {
  files.canny = touch(path.join(dirs.controlnet, 'control_v11p_sd15_canny.safetensors'));
  files.cannyPth = touch(path.join(dirs.controlnet, 'control_v11p_sd15_canny.pth'));
  files.depth = touch(path.join(dirs.controlnet, 'sd15', 'control_depth.pth'));
  touch(path.join(dirs.controlnet, 'diffusers-canny', 'config.json'), '{}');
  files.folder = realpathSync(path.join(dirs.controlnet, 'diffusers-canny'));
  files.evil = touch(path.join(outside, 'evil.safetensors'));
  symlinkSync(files.evil, path.join(dirs.controlnet, 'evil.safetensors'));
  symlinkSync(files.depth, path.join(dirs.controlnet, 'alias.pth')); // a link that stays inside
  files.ip = touch(path.join(dirs.ipAdapter, 'ip-adapter_sd15.safetensors'));
  files.ink = touch(path.join(dirs.lora, 'ink.safetensors'), safetensors({ ss_output_name: 'inkwash' }));
  files.botanical = touch(path.join(dirs.lora, 'styles', 'botanical.safetensors'), safetensors({}));
  mkdirSync(dirs.imageEncoder, { recursive: true });
  png16 = await encodePng({ rgb: new Uint8Array(16 * 16 * 3).fill(200), width: 16, height: 16 });
  png32x16 = await encodePng({ rgb: new Uint8Array(32 * 16 * 3).fill(90), width: 32, height: 16 });
  server = await start({ models: dirs });
  bare = await start({});
});

afterAll(async () => {
  await server?.shutdown({ graceS: 0 });
  await bare?.shutdown({ graceS: 0 });
  rmSync(root, { recursive: true, force: true });
});

const post = (s: SdServer, body: unknown, route = '/inference'): Promise<{ status: number; json: Record<string, unknown> }> => callJson(s, 'POST', route, body);

/** The params of the job a successful POST /inference ran. */
async function ran(body: Record<string, unknown>): Promise<{ params: GenerateParams; answer: Record<string, unknown> }> {
  const before = engine.seen.length;
  const a = await post(server, { prompt: 'a fern', steps: 1, width: 16, height: 16, ...body });
  expect(a.status, JSON.stringify(a.json)).toBe(200);
  expect(engine.seen.length).toBe(before + 1);
  return { params: engine.seen[before], answer: a.json };
}

describe('model folders (models-dir.ts)', () => {
  it('lists files by name without extension, diffusers folders by their name, links only when they stay inside', () => {
    const names = listModels('controlnet', dirs.controlnet).map((m) => `${m.name}:${path.basename(m.path)}`);
    expect(names).toEqual([
      'alias:control_depth.pth',
      'control_depth:control_depth.pth',
      'control_v11p_sd15_canny:control_v11p_sd15_canny.safetensors',
      'control_v11p_sd15_canny:control_v11p_sd15_canny.pth',
      'diffusers-canny:diffusers-canny',
    ]);
  });

  it('resolves a name (the preferred extension, any case, with its extension), never a path', () => {
    expect(resolveModel('controlnet', dirs, 'control_v11p_sd15_canny', 'f')).toBe(files.canny);
    expect(resolveModel('controlnet', dirs, 'CONTROL_V11P_SD15_CANNY', 'f')).toBe(files.canny);
    expect(resolveModel('controlnet', dirs, 'control_v11p_sd15_canny.pth', 'f')).toBe(files.cannyPth);
    expect(resolveModel('controlnet', dirs, 'control_depth', 'f')).toBe(files.depth);
    expect(resolveModel('controlnet', dirs, 'diffusers-canny', 'f')).toBe(files.folder);
    expect(resolveModel('lora', dirs, 'inkwash', 'f')).toBe(files.ink); // kohya's ss_output_name
    // The extension's closest name: the shortest that contains it.
    expect(resolveModel('controlnet', dirs, 'depth', 'f', 400, true)).toBe(files.depth);
    expect(resolveModel('controlnet', dirs, 'canny', 'f', 400, true)).toBe(files.folder);
    for (const name of ['evil', '../outside/evil', `${outside}/evil.safetensors`, 'sd15/control_depth', '..', '', 'a\\b']) {
      expect(() => resolveModel('controlnet', dirs, name, 'controlnet[0].model'), name).toThrow(HttpError);
    }
    expect(() => resolveModel('controlnet', dirs, 'canny', 'f')).toThrow(/no ControlNet named "canny" in this server's --controlnet-dir: it has alias, control_depth/);
    expect(() => resolveModel('ipAdapter', {}, 'x', 'ip_adapter.model')).toThrow(/start sd serve with --ip-adapter-dir DIR/);
  });
});

describe('sd serve flags', () => {
  it('--controlnet-dir, --ip-adapter-dir, --lora-dir, --image-encoder: folders checked at start', () => {
    expect(modelDirsOf({ 'controlnet-dir': dirs.controlnet, 'lora-dir': dirs.lora })).toEqual({ controlnet: dirs.controlnet, ipAdapter: null, lora: dirs.lora, imageEncoder: null });
    expect(() => modelDirsOf({ 'lora-dir': path.join(root, 'missing') })).toThrow(/--lora-dir .*missing: no such folder/);
    expect(() => modelDirsOf({ 'controlnet-dir': files.canny })).toThrow(/--controlnet-dir .*: not a folder/);
  });
});

describe('POST /inference: adapter fields -> GenerateParams', () => {
  it('one controlnet object, ip_adapter, loras and a prompt tag: paths, bytes and multipliers as the engine takes them; echoed without images', async () => {
    const { params, answer } = await ran({
      prompt: 'a fern <lora:botanical:0.5>',
      controlnet: { model: 'control_v11p_sd15_canny', image: b64(png16), preprocess: 'canny', low: 50, high: 150, scale: 0.8, start: 0.1, end: 0.9 },
      ip_adapter: { model: 'ip-adapter_sd15', image: `data:image/png;base64,${b64(png16)}`, scale: 0.6 },
      loras: [{ name: 'ink', multiplier: 0.7 }],
    });
    expect(params.controlNets).toHaveLength(1);
    const c = params.controlNets?.[0];
    expect(c).toMatchObject({ model: files.canny, preprocess: 'canny', low: 50, high: 150, scale: 0.8, start: 0.1, end: 0.9 });
    expect(Buffer.from(c?.image ?? []).equals(png16)).toBe(true);
    expect(params.ipAdapter).toMatchObject({ model: files.ip, scale: 0.6, imageEncoder: dirs.imageEncoder });
    expect(Buffer.from(params.ipAdapter?.image ?? []).equals(png16)).toBe(true);
    expect(params.loras).toEqual([{ path: files.ink, te: 0.7, unet: 0.7 }, { path: files.botanical, te: 0.5, unet: 0.5 }]);
    const parameters = answer.parameters as Record<string, unknown>;
    expect(parameters.controlnet).toEqual([{ model: 'control_v11p_sd15_canny', preprocess: 'canny', low: 50, high: 150, scale: 0.8, start: 0.1, end: 0.9 }]);
    expect(parameters.ip_adapter).toEqual({ model: 'ip-adapter_sd15', scale: 0.6 });
    expect(parameters.loras).toEqual([{ name: 'ink', multiplier: 0.7 }]);
    expect(parameters.prompt).toBe('a fern <lora:botanical:0.5>');
    expect(JSON.stringify(answer.parameters)).not.toContain(b64(png16).slice(0, 40));
  });

  it('a list of ControlNets in order, defaults left to the engine; a mask with its init_image', async () => {
    const { params } = await ran({
      controlnet: [{ model: 'control_depth', image: b64(png16), preprocess: 'none' }, { model: 'diffusers-canny', image: b64(png32x16) }],
      init_image: b64(png16),
      mask: b64(png16),
      strength: 0.75,
    });
    expect(params.controlNets?.map((c) => c.model)).toEqual([files.depth, files.folder]);
    expect(params.controlNets?.[0]).toEqual({ model: files.depth, image: params.controlNets?.[0].image, preprocess: 'none' });
    expect(Buffer.from(params.controlNets?.[1].image ?? []).equals(png32x16)).toBe(true);
    expect(Buffer.from(params.mask ?? []).equals(png16)).toBe(true);
    expect(params.strength).toBe(0.75);
  });

  it('POST /jobs takes the same fields', async () => {
    const before = engine.seen.length;
    const a = await post(server, { prompt: 'x', steps: 1, width: 16, height: 16, loras: [{ name: 'botanical' }] }, '/jobs');
    expect(a.status).toBe(202);
    for (let i = 0; i < 200 && engine.seen.length === before; i++) await new Promise((r) => setTimeout(r, 10));
    expect(engine.seen[before].loras).toEqual([{ path: files.botanical, te: 1, unet: 1 }]);
  });

  it('plain prompt syntax reads no tags; without --lora-dir the tags are left to the engine', async () => {
    const { params } = await ran({ prompt: 'a <lora:ink:1>', prompt_syntax: 'plain' });
    expect(params.loras).toBeUndefined();
    const before = engine.seen.length;
    const a = await post(bare, { prompt: 'a <lora:ink:1>', steps: 1, width: 16, height: 16 });
    expect(a.status).toBe(200);
    expect(engine.seen[before].loras).toBeUndefined();
  });
});

describe('POST /inference: bad adapter fields are 400 naming the field', () => {
  const image = (): string => b64(png16);
  const cases: [string, () => Record<string, unknown>, string, RegExp][] = [
    ['unknown ControlNet', () => ({ controlnet: { model: 'openpose', image: image() } }), 'controlnet[0].model', /no ControlNet named "openpose"/],
    ['traversal', () => ({ controlnet: { model: '../outside/evil', image: image() } }), 'controlnet[0].model', /not a ControlNet name/],
    ['absolute path', () => ({ controlnet: [{ model: '/etc/passwd', image: image() }] }), 'controlnet[0].model', /not a ControlNet name/],
    ['a link out of the folder', () => ({ controlnet: { model: 'evil', image: image() } }), 'controlnet[0].model', /no ControlNet named "evil"/],
    ['second unit', () => ({ controlnet: [{ model: 'control_depth', image: image() }, { model: 'nope', image: image() }] }), 'controlnet[1].model', /nope/],
    ['unknown IP-Adapter', () => ({ ip_adapter: { model: 'ip-adapter-plus', image: image() } }), 'ip_adapter.model', /no IP-Adapter named/],
    ['unknown LoRA', () => ({ loras: [{ name: 'ink' }, { name: 'oil' }] }), 'loras[1].name', /no LoRA named "oil"/],
    ['unknown LoRA tag', () => ({ prompt: 'a <lora:oil:1>' }), 'prompt', /no LoRA named "oil"/],
    ['bad LoRA tag', () => ({ prompt: 'a <lora:ink:lots>' }), 'prompt', /not a finite number/],
    ['mask without init_image', () => ({ mask: image() }), 'mask', /init/],
    ['control image not base64', () => ({ controlnet: { model: 'control_depth', image: '%%%' } }), 'controlnet[0].image', /not base64/],
    ['control image not an image', () => ({ controlnet: { model: 'control_depth', image: b64(Buffer.from('GIF89a-not-really')) } }), 'controlnet[0].image', /gif|GIF|not an image/],
    ['photo truncated', () => ({ ip_adapter: { model: 'ip-adapter_sd15', image: b64(png16.subarray(0, 40)) } }), 'ip_adapter.image', /ip_adapter.image/],
    ['mask corrupt', () => ({ init_image: image(), mask: b64(Buffer.concat([png16.subarray(0, 33), Buffer.alloc(30)])) }), 'mask', /mask/],
    ['unknown unit field', () => ({ controlnet: { model: 'control_depth', image: image(), guess_mode: true } }), 'guess_mode', /unknown field/],
    ['unit without image', () => ({ controlnet: { model: 'control_depth' } }), 'image', /required/],
    ['bad preprocess', () => ({ controlnet: { model: 'control_depth', image: image(), preprocess: 'depth' } }), 'controlnet.0.preprocess', /one of canny, none/],
    ['scale out of range', () => ({ ip_adapter: { model: 'ip-adapter_sd15', image: image(), scale: 11 } }), 'ip_adapter.scale', /<= 10/],
    ['a scale the engine refuses', () => ({ controlnet: { model: 'control_depth', image: image(), scale: 3 } }), 'controlnet[0].scale', /2/],
    ['thresholds without canny', () => ({ controlnet: [{ model: 'control_depth', image: image(), preprocess: 'none', low: 10 }] }), 'controlnet[0].low', /canny/],
    ['too many units', () => ({ controlnet: Array.from({ length: 5 }, () => ({ model: 'control_depth', image: image() })) }), 'controlnet', /more than 4/],
  ];
  for (const [what, body, field, message] of cases) {
    it(what, async () => {
      const before = engine.seen.length;
      const a = await post(server, { prompt: 'a fern', steps: 1, width: 16, height: 16, ...body() });
      expect(a.status, JSON.stringify(a.json)).toBe(400);
      expect(a.json.field).toBe(field);
      expect(String(a.json.message)).toMatch(message);
      expect(engine.seen.length).toBe(before);
    });
  }

  it('a control image over --max-image-pixels is refused from its header, before decoding', async () => {
    const small = await start({ models: dirs, bounds: { maxImagePixels: 100 } });
    try {
      const a = await post(small, { prompt: 'x', steps: 1, width: 16, height: 16, controlnet: { model: 'control_depth', image: b64(png16) } });
      expect(a.status).toBe(400);
      expect(a.json.field).toBe('controlnet[0].image');
      expect(String(a.json.message)).toMatch(/16x16 is 256 pixels, over this server's limit of 100/);
    } finally {
      await small.shutdown({ graceS: 0 });
    }
  });

  it('a kind whose folder is not configured names the flag that enables it', async () => {
    for (const [body, field, flag] of [
      [{ controlnet: { model: 'x', image: b64(png16) } }, 'controlnet[0].model', '--controlnet-dir'],
      [{ ip_adapter: { model: 'x', image: b64(png16) } }, 'ip_adapter.model', '--ip-adapter-dir'],
      [{ loras: [{ name: 'x' }] }, 'loras[0].name', '--lora-dir'],
    ] as const) {
      const a = await post(bare, { prompt: 'x', steps: 1, width: 16, height: 16, ...body });
      expect(a.status).toBe(400);
      expect(a.json.field).toBe(field);
      expect(String(a.json.message)).toContain(`start sd serve with ${flag} DIR`);
    }
  });
});

describe('A1111 listings of the folders', () => {
  it('/sdapi/v1/loras: name, alias (ss_output_name), path relative to --lora-dir, metadata; scripts and cmd-flags', async () => {
    const loras = (await (await fetch(`${server.url}/sdapi/v1/loras`)).json()) as Record<string, unknown>[];
    expect(loras).toEqual([
      { name: 'botanical', alias: 'botanical', path: path.join('styles', 'botanical.safetensors'), metadata: {} },
      { name: 'ink', alias: 'inkwash', path: 'ink.safetensors', metadata: { ss_output_name: 'inkwash' } },
    ]);
    expect(await (await fetch(`${bare.url}/sdapi/v1/loras`)).json()).toEqual([]);
    expect(await (await fetch(`${server.url}/sdapi/v1/scripts`)).json()).toEqual({ txt2img: ['controlnet'], img2img: ['controlnet'] });
    expect(await (await fetch(`${bare.url}/sdapi/v1/scripts`)).json()).toEqual({ txt2img: [], img2img: [] });
  });
});
