/**
 * `sd random-weights --model controlnet-sd15 | clip-vision-h | ip-adapter-sd15 | ip-adapter-plus-sd15`
 * (src/cli/random-adapters.ts): the full-size shape maps (counts and parameters of the files people download,
 * without writing them), tiny configs equal to the fixtures' files key for key, and written files that the real
 * loaders open and run with finite, unit-scale activations; the command itself writes a full-size IP-Adapter.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as tf from '../src/backend/tf.js';
import { initBackend } from '../src/backend/select.js';
import { clipVisionConfigFromJson } from '../src/clip/vision.js';
import { randomWeightsCommand } from '../src/cli/commands/random-weights.js';
import {
  IP_ADAPTER_PLUS_SD15,
  IP_ADAPTER_SD15,
  SD15_ADAPTER_CONFIGS,
  adapterShapes,
  clipVisionConfigJson,
  crossAttentionShapes,
  writeRandomAdapter,
  type AdapterConfigs,
  type AdapterModel,
} from '../src/cli/random-adapters.js';
import { controlNetConfig, loadControlNet } from '../src/controlnet/index.js';
import { IpAdapter, loadImageEncoder } from '../src/ip-adapter/index.js';
import { pipelineConfigFromLdm } from '../src/pipeline/config.js';
import { UNet, unetConfigFromLdm, type UNetConfig } from '../src/unet/index.js';
import { openWeights } from '../src/weights/open.js';

const IP = 'tests/fixtures/ip-adapter';
const ipFixture = JSON.parse(readFileSync(join(IP, 'fixture.json'), 'utf8')) as Parameters<typeof pipelineConfigFromLdm>[0];
const TINY_UNET: UNetConfig = pipelineConfigFromLdm(ipFixture).unet; // the pipeline fixture's UNet, which the adapters fit
const TINY_VISION = clipVisionConfigFromJson(JSON.parse(readFileSync(join(IP, 'image_encoder/config.json'), 'utf8')));
const TINY: AdapterConfigs = {
  controlNet: controlNetConfig(TINY_UNET),
  vision: TINY_VISION,
  ipAdapter: { ...IP_ADAPTER_SD15, unet: TINY_UNET, vision: TINY_VISION },
  ipAdapterPlus: { ...IP_ADAPTER_PLUS_SD15, unet: TINY_UNET, vision: TINY_VISION, heads: 2 },
};

const numel = (shapes: Map<string, number[]>) => [...shapes.values()].reduce((a, s) => a + s.reduce((x, d) => x * d, 1), 0);

/** A file's keys and shapes (the int64 position_ids buffer left out: not a weight). */
function fileShapes(path: string): Map<string, number[]> {
  const src = openWeights(path);
  const m = new Map(src.keys().filter((k) => !k.endsWith('position_ids')).map((k) => [k, [...src.info(k).shape]]));
  src.close();
  return m;
}

/** Mean and standard deviation of a tensor's values; throws on a non-finite one. */
async function stats(t: tf.Tensor): Promise<{ mean: number; std: number }> {
  const v = await t.data();
  let s = 0;
  let s2 = 0;
  for (const x of v) {
    if (!Number.isFinite(x)) throw new Error(`non-finite value ${x}`);
    s += x;
    s2 += x * x;
  }
  const mean = s / v.length;
  return { mean, std: Math.sqrt(s2 / v.length - mean * mean) };
}

let tmp: string;
let unet: UNet;

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: null });
  tmp = mkdtempSync(join(tmpdir(), 'random-adapters-'));
  const model = openWeights('tests/fixtures/pipeline/model.safetensors');
  unet = UNet.load(model, TINY_UNET, undefined, { residency: 'resident' });
  model.close();
});

afterAll(() => {
  unet.dispose();
  rmSync(tmp, { recursive: true, force: true });
});

describe('full size (shape maps, nothing written)', () => {
  it('control_v11p_sd15_canny: 340 tensors under control_model, 361,279,120 parameters', () => {
    const s = adapterShapes('controlnet-sd15');
    expect([s.size, numel(s)]).toEqual([340, 361_279_120]);
    expect([...s.keys()].every((k) => k.startsWith('control_model.'))).toBe(true);
    expect(s.get('control_model.input_hint_block.0.weight')).toEqual([16, 3, 3, 3]);
    expect(s.get('control_model.input_hint_block.14.weight')).toEqual([320, 256, 3, 3]);
    expect(s.get('control_model.zero_convs.11.0.weight')).toEqual([1280, 1280, 1, 1]);
    expect(s.get('control_model.middle_block_out.0.weight')).toEqual([1280, 1280, 1, 1]);
  });

  it('image_encoder (ViT-H/14): 520 tensors, 632,076,800 parameters, the config.json read back as CLIP_VISION_H', () => {
    const s = adapterShapes('clip-vision-h');
    expect([s.size, numel(s)]).toEqual([520, 632_076_800]);
    expect(s.get('vision_model.embeddings.patch_embedding.weight')).toEqual([1280, 3, 14, 14]);
    expect(s.get('vision_model.embeddings.position_embedding.weight')).toEqual([257, 1280]);
    expect(s.get('vision_model.encoder.layers.31.mlp.fc1.weight')).toEqual([5120, 1280]);
    expect(s.get('visual_projection.weight')).toEqual([1024, 1280]);
    expect(clipVisionConfigFromJson(clipVisionConfigJson(SD15_ADAPTER_CONFIGS.vision))).toEqual(SD15_ADAPTER_CONFIGS.vision);
  });

  it('ip-adapter_sd15: 4 + 32 tensors (22,319,616 parameters); Plus 51 + 32 (49,087,488), one pair per SD 1.5 cross-attention', () => {
    const basic = adapterShapes('ip-adapter-sd15');
    expect([basic.size, numel(basic)]).toEqual([36, 22_319_616]);
    expect(basic.get('image_proj.proj.weight')).toEqual([3072, 1024]);
    const plus = adapterShapes('ip-adapter-plus-sd15');
    expect([plus.size, numel(plus)]).toEqual([83, 49_087_488]);
    expect(plus.get('image_proj.latents')).toEqual([1, 16, 768]);
    expect(plus.get('image_proj.proj_in.weight')).toEqual([768, 1280]);
    expect(plus.get('image_proj.layers.3.0.to_kv.weight')).toEqual([1536, 768]);
    expect(plus.get('image_proj.layers.3.1.1.weight')).toEqual([3072, 768]);
    // diffusers' attn_processors order: down blocks (320, 320, 640, 640, 1280, 1280), up blocks, the middle last
    const dims = crossAttentionShapes(SD15_ADAPTER_CONFIGS.ipAdapter.unet).map(([d]) => d);
    expect(dims).toEqual([320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280]);
    for (const s of [basic, plus]) {
      expect(s.get('ip_adapter.1.to_k_ip.weight')).toEqual([320, 768]);
      expect(s.get('ip_adapter.31.to_v_ip.weight')).toEqual([1280, 768]);
      expect(s.has('ip_adapter.33.to_k_ip.weight')).toBe(false);
    }
  });
});

describe('tiny configs', () => {
  const cases: [AdapterModel, string][] = [
    ['controlnet-sd15', 'tests/fixtures/controlnet/control_tiny.safetensors'],
    ['clip-vision-h', join(IP, 'image_encoder/model.safetensors')],
    ['ip-adapter-sd15', join(IP, 'ip-adapter_sd15.safetensors')],
    ['ip-adapter-plus-sd15', join(IP, 'ip-adapter-plus_sd15.safetensors')],
  ];
  it.each(cases)('%s: exactly the fixture file\'s keys and shapes', (model, file) => {
    const cfg = model === 'controlnet-sd15' ? { ...TINY, controlNet: controlNetConfig(unetConfigFromLdm(controlFixtureUNet())) } : TINY;
    const want = fileShapes(file);
    const got = adapterShapes(model, cfg);
    expect([...got.keys()].sort()).toEqual([...want.keys()].sort());
    for (const [k, s] of want) expect(got.get(k), k).toEqual(s);
  });

  it('written files load with the real loaders and run with finite, unit-scale activations', async () => {
    const cnPath = join(tmp, 'control_random.safetensors');
    writeRandomAdapter('controlnet-sd15', cnPath, { configs: TINY, seed: 1 });
    const cn = loadControlNet(cnPath, TINY_UNET);
    const encDir = join(tmp, 'image_encoder');
    writeRandomAdapter('clip-vision-h', encDir, { configs: TINY, half: true, seed: 2 });
    const encoder = loadImageEncoder(encDir);
    const basicPath = join(tmp, 'ip-adapter_random.safetensors');
    const plusPath = join(tmp, 'ip-adapter-plus_random.safetensors');
    writeRandomAdapter('ip-adapter-sd15', basicPath, { configs: TINY, seed: 3 });
    writeRandomAdapter('ip-adapter-plus-sd15', plusPath, { configs: TINY, half: true, seed: 4 });
    const before = tf.memory().numTensors;
    const s = TINY_VISION.imageSize;
    const pixels = tf.randomNormal([1, s, s, 3], 0, 1, 'float32', 5) as tf.Tensor4D;
    const features = encoder.forward(pixels);
    expect((await stats(features.imageEmbeds)).std).toBeGreaterThan(0.1);
    expect((await stats(features.penultimate)).std).toBeLessThan(10);
    const x = tf.randomNormal([2, 8, 8, 4], 0, 1, 'float32', 6) as tf.Tensor4D;
    const context = tf.randomNormal([2, 7, TINY_UNET.contextDim], 0, 1, 'float32', 7) as tf.Tensor3D;
    const hint = tf.randomUniform([1, 64, 64, 3], 0, 1, 'float32', 8) as tf.Tensor4D;
    const residuals = cn.forward(x, [500, 500], { context }, hint, 1);
    for (const r of [...residuals.down, residuals.middle]) {
      const { std } = await stats(r);
      expect(std).toBeGreaterThan(1e-2);
      expect(std).toBeLessThan(1e2);
    }
    const plain = unet.forward(x, [500, 500], { context, residuals });
    for (const path of [basicPath, plusPath]) {
      const adapter = IpAdapter.open(path);
      adapter.attach(unet);
      const tokens = tf.tidy(() => tf.concat([adapter.negativeTokens(encoder), adapter.imageTokens(features)]) as tf.Tensor3D);
      expect(tokens.shape).toEqual([2, adapter.kind === 'plus' ? 16 : 4, TINY_UNET.contextDim]);
      const eps = unet.forward(x, [500, 500], { context, residuals, extraTokens: [{ tokens, scale: 1 }] });
      expect((await stats(eps)).std).toBeLessThan(1e2);
      const change = tf.tidy(() => tf.max(tf.abs(tf.sub(eps, plain))).dataSync()[0]);
      expect(change).toBeGreaterThan(1e-3); // the image tokens reach the output
      tf.dispose([tokens, eps]);
      adapter.dispose();
    }
    tf.dispose([pixels, features.imageEmbeds, features.pooled, features.lastHidden, features.penultimate, x, context, hint, plain]);
    tf.dispose([...residuals.down, residuals.middle]);
    expect(tf.memory().numTensors).toBe(before);
    cn.dispose();
    encoder.dispose();
  });
});

describe('sd random-weights --model ip-adapter-sd15 (full size, fp16: 44 MB)', () => {
  it('writes tencent\'s layout, which IpAdapter.open reads as a basic adapter for SD 1.5', async () => {
    const out = join(tmp, 'ip-adapter_sd15.safetensors');
    const write = randomWeightsCommand.handler as (a: object) => Promise<void>;
    await write({ out, model: 'ip-adapter-sd15', half: true, seed: 0, force: false });
    const adapter = IpAdapter.open(out);
    expect([adapter.kind, adapter.layers.length, adapter.tokenDim]).toEqual(['basic', 16, 768]);
    expect(adapter.layers.map((l) => l.dim)).toEqual(crossAttentionShapes(SD15_ADAPTER_CONFIGS.ipAdapter.unet).map(([d]) => d));
    adapter.dispose();
    await expect(write({ out, model: 'ip-adapter-sd15', half: true, seed: 0, force: false })).rejects.toThrow(/exists: pass --force/);
  });
});

/** The controlnet fixture's UNet params (its ControlNet was made for that base model). */
function controlFixtureUNet(): Record<string, unknown> {
  return (JSON.parse(readFileSync('tests/fixtures/controlnet/fixture.json', 'utf8')) as { config: { unet: Record<string, unknown> } }).config.unet;
}
