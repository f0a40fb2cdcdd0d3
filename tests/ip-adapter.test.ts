/**
 * IP-Adapter (src/ip-adapter, src/clip/vision.ts) against tests/fixtures/ip-adapter: Pillow's bicubic resize
 * number for number, the CLIP vision encoder, both adapters from both file formats (the .bin a nested dict read
 * by the restricted unpickler), attach/detach on the tiny UNet of tests/fixtures/pipeline leaving its plain output
 * unchanged bit for bit, and the refusals: an adapter whose layer count or widths do not fit the UNet, a Plus
 * adapter without the penultimate features, a streamed UNet. The whole fixture runs through the parity runner.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as tf from '../src/backend/tf.js';
import { initBackend } from '../src/backend/select.js';
import { ClipVisionEncoder, clipVisionConfigFromJson, expectedVisionShapes } from '../src/clip/vision.js';
import { IpAdapter } from '../src/ip-adapter/adapter.js';
import { decodePhoto, preprocessClipImage, shortestSideSize } from '../src/ip-adapter/preprocess.js';
import { ipAdapterTokens, loadImageEncoder } from '../src/ip-adapter/tokens.js';
import { resizeBicubicPillow } from '../src/ip-adapter/resize.js';
import { ConfigError, ShapeError } from '../src/nn/errors.js';
import { maxRelError } from '../src/parity/compare.js';
import { run } from '../src/parity/ip-adapter.js';
import { pipelineConfigFromLdm } from '../src/pipeline/config.js';
import { UNet } from '../src/unet/unet.js';
import { openWeights } from '../src/weights/open.js';
import { SafetensorsFile } from '../src/weights/safetensors.js';
import type { TensorSource } from '../src/weights/types.js';
import { ZipArchive } from '../src/weights/zip.js';
import { MemorySource } from './helpers.js';
import { buildZip } from './zip-builder.js';

const DIR = 'tests/fixtures/ip-adapter';
const BASIC = ['ip-adapter_sd15.safetensors', 'ip-adapter_sd15.bin'];
const PLUS = ['ip-adapter-plus_sd15.safetensors', 'ip-adapter-plus_sd15.bin'];
const fixture = JSON.parse(readFileSync(join(DIR, 'fixture.json'), 'utf8')) as { tolerance: Record<string, number> };
const TOL = fixture.tolerance;

let io: SafetensorsFile;
let encoder: ClipVisionEncoder;
let unet: UNet;

/** A stored io tensor. */
const stored = (key: string): tf.Tensor => tf.tensor(io.float32(key), [...io.info(key).shape]);
const nhwc = (key: string) => tf.tidy(() => tf.transpose(stored(key), [0, 2, 3, 1]) as tf.Tensor4D);

/** A file's tensors in memory as float32, with `edit` applied (delete or reshape entries). */
function edited(file: string, edit: (m: Map<string, { shape: number[]; data: Float32Array }>) => void): TensorSource {
  const src = openWeights(join(DIR, file));
  const m = new Map(src.keys().map((k) => [k, { shape: [...src.info(k).shape], data: src.float32(k) }]));
  src.close();
  edit(m);
  return new MemorySource(m);
}

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: null });
  io = SafetensorsFile.open(join(DIR, 'io.safetensors'));
  const enc = SafetensorsFile.open(join(DIR, 'image_encoder/model.safetensors'));
  encoder = ClipVisionEncoder.load(enc, clipVisionConfigFromJson(JSON.parse(readFileSync(join(DIR, 'image_encoder/config.json'), 'utf8'))));
  enc.close();
  const model = openWeights('tests/fixtures/pipeline/model.safetensors');
  unet = UNet.load(model, pipelineConfigFromLdm(fixture).unet, undefined, { residency: 'resident' });
  model.close();
});

afterAll(() => {
  unet.dispose();
  encoder.dispose();
  io.close();
});

describe('preprocessing', () => {
  it("resizes as Pillow's BICUBIC does, number for number, then crops and normalizes", async () => {
    const photo = await decodePhoto(readFileSync(join(DIR, 'photo.png')));
    expect([photo.height, photo.width]).toEqual([60, 80]);
    expect(Array.from(photo.rgb)).toEqual(Array.from(io.float32('photo')));
    const { resized, pixels } = preprocessClipImage(photo, 32);
    expect([resized.height, resized.width]).toEqual([32, 42]);
    expect(Array.from(resized.rgb)).toEqual(Array.from(io.float32('resized')));
    const nchw = tf.tidy(() => tf.transpose(pixels, [0, 3, 1, 2]));
    expect(maxRelError(nchw.dataSync(), io.float32('pixel_values'))).toBeLessThanOrEqual(TOL.pixel_values);
    tf.dispose([pixels, nchw]);
  });

  it('takes the shorter side to the size (int() of the longer), either orientation; an unchanged size is no pass', () => {
    expect(shortestSideSize(60, 80, 32)).toEqual([32, 42]);
    expect(shortestSideSize(80, 60, 32)).toEqual([42, 32]);
    expect(shortestSideSize(480, 640, 224)).toEqual([224, 298]);
    const img = Uint8Array.from({ length: 4 * 5 * 3 }, (_, i) => (i * 37) % 256);
    expect(resizeBicubicPillow(img, 4, 5, 3, 4, 5)).toEqual(img);
    // a constant image stays constant (weights sum to one in fixed point), up or down
    const flat = new Uint8Array(7 * 9).fill(200);
    for (const [h, w] of [[3, 4], [15, 20]]) expect(new Set(resizeBicubicPillow(flat, 7, 9, 1, h, w))).toEqual(new Set([200]));
  });

  it('refuses a file that is not an image, and a photo over the pixel limit', async () => {
    await expect(decodePhoto(new Uint8Array([1, 2, 3, 4]))).rejects.toThrow(/cannot decode as PNG, JPEG or WebP/);
    await expect(decodePhoto(readFileSync(join(DIR, 'photo.png')), { maxPixels: 4000 })).rejects.toThrow(/pixel limit/);
  });
});

describe('CLIP vision encoder', () => {
  it('gives image_embeds, pooled, last and penultimate hidden states of the fixture', () => {
    const x = nhwc('pixel_values');
    const out = encoder.forward(x);
    const tol = TOL.image_encoder;
    expect(maxRelError(out.imageEmbeds.dataSync(), io.float32('image_embeds'))).toBeLessThanOrEqual(tol);
    expect(maxRelError(out.pooled.dataSync(), io.float32('pooled'))).toBeLessThanOrEqual(tol);
    expect(maxRelError(out.lastHidden.dataSync(), io.float32('last_hidden_state'))).toBeLessThanOrEqual(tol);
    expect(maxRelError(out.penultimate.dataSync(), io.float32('penultimate'))).toBeLessThanOrEqual(tol);
    tf.dispose([x, ...Object.values(out)]);
  });

  it('reads every weight of the file but the position_ids buffer, and refuses a wrong size', () => {
    const file = SafetensorsFile.open(join(DIR, 'image_encoder/model.safetensors'));
    const keys = file.keys().filter((k) => !k.endsWith('position_ids')).sort();
    file.close();
    expect([...expectedVisionShapes(encoder.cfg).keys()].sort()).toEqual(keys);
    const x = tf.zeros([1, 16, 16, 3]) as tf.Tensor4D;
    expect(() => encoder.forward(x)).toThrow(/expected pixel values NHWC \[B, 32, 32, 3\], got \[1,16,16,3\]/);
    x.dispose();
  });
});

describe('adapters', () => {
  for (const [file, plus] of [...BASIC.map((f) => [f, false] as const), ...PLUS.map((f) => [f, true] as const)]) {
    it(`${file}: image tokens and negative tokens of the fixture`, () => {
      const adapter = IpAdapter.open(join(DIR, file));
      expect(adapter.kind).toBe(plus ? 'plus' : 'basic');
      expect(adapter.layers.map((l) => l.key)).toEqual([1, 3, 5, 7, 9, 11, 13].map((n) => `ip_adapter.${n}`));
      const features = { imageEmbeds: stored('image_embeds') as tf.Tensor2D, penultimate: stored('penultimate') as tf.Tensor3D };
      const tokens = adapter.imageTokens(features);
      const negative = adapter.negativeTokens(encoder);
      expect(tokens.shape).toEqual(plus ? [1, 16, 32] : [1, 4, 32]);
      expect(maxRelError(tokens.dataSync(), io.float32(plus ? 'plus_tokens' : 'ip_tokens'))).toBeLessThanOrEqual(TOL.image_proj);
      expect(maxRelError(negative.dataSync(), io.float32(plus ? 'plus_tokens_uncond' : 'ip_tokens_uncond'))).toBeLessThanOrEqual(TOL.image_proj);
      tf.dispose([tokens, negative, ...Object.values(features)]);
      adapter.dispose();
    });
  }

  it('reads the same tensors from the .bin (nested dict) as from the .safetensors', () => {
    for (const [a, b] of [BASIC, PLUS]) {
      const s = openWeights(join(DIR, a));
      const p = openWeights(join(DIR, b));
      expect(p.keys().sort()).toEqual(s.keys().sort());
      for (const k of s.keys()) expect(p.float32(k)).toEqual(s.float32(k));
      s.close();
      p.close();
    }
  });

  it('the restricted unpickler still refuses anything but tensors in the nested dicts', () => {
    // the basic .bin with its tensor rebuild global renamed (same length): everything else as torch.save wrote it
    const zip = ZipArchive.open(join(DIR, BASIC[1]));
    const files = zip.names().map((name) => {
      const data = Buffer.from(zip.readEntry(name));
      return { name, data: name.endsWith('data.pkl') ? Buffer.from(data.toString('latin1').replace('torch._utils', 'subprocess__'), 'latin1') : data };
    });
    zip.close();
    const dir = mkdtempSync(join(tmpdir(), 'ip-bin-'));
    try {
      writeFileSync(join(dir, 'hostile.bin'), buildZip(files));
      expect(() => openWeights(join(dir, 'hostile.bin'))).toThrow(/refusing pickle global subprocess__/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('a Plus adapter without the penultimate hidden states errors clearly', () => {
    const adapter = IpAdapter.open(join(DIR, PLUS[0]));
    expect(adapter.needsPenultimate).toBe(true);
    const embeds = stored('image_embeds') as tf.Tensor2D;
    expect(() => adapter.imageTokens({ imageEmbeds: embeds })).toThrow(ConfigError);
    expect(() => adapter.imageTokens({ imageEmbeds: embeds })).toThrow(/penultimate hidden states/);
    embeds.dispose();
    adapter.dispose();
  });

  it('refuses a file that is no IP-Adapter, and full-face adapters by name', () => {
    expect(() => IpAdapter.load(edited(BASIC[0], (m) => m.delete('image_proj.proj.weight')))).toThrow(/not an IP-Adapter file/);
    const mlp = edited(BASIC[0], (m) => {
      const w = m.get('image_proj.proj.weight');
      m.delete('image_proj.proj.weight');
      if (w !== undefined) m.set('image_proj.proj.0.weight', w);
    });
    expect(() => IpAdapter.load(mlp)).toThrow(/MLPProjModel/);
  });
});

describe('attached to the UNet', () => {
  const x = () => nhwc('unet_x');
  const t = () => Array.from(io.float32('unet_t'));

  it('matches the fixture per ip scale, and detach leaves the plain output unchanged bit for bit', () => {
    const [lat, context, tokens] = [x(), stored('unet_text') as tf.Tensor3D, stored('unet_ip_tokens') as tf.Tensor3D];
    const before = unet.forward(lat, t(), { context });
    const adapter = IpAdapter.open(join(DIR, BASIC[1]));
    expect(() => unet.forward(lat, t(), { context, extraTokens: [{ tokens, scale: 1 }] })).toThrow(/key\/value projections for 0/);
    adapter.attach(unet);
    expect(() => unet.forward(lat, t(), { context })).toThrow(ShapeError);
    for (const [scale, key] of [[1, 'eps_scale1'], [0.5, 'eps_scale0.5'], [0, 'eps_scale0']] as const) {
      const eps = tf.tidy(() => tf.transpose(unet.forward(lat, t(), { context, extraTokens: [{ tokens, scale }] }), [0, 3, 1, 2]));
      expect(maxRelError(eps.dataSync(), io.float32(key))).toBeLessThanOrEqual(TOL.eps);
      eps.dispose();
    }
    adapter.detach();
    const after = unet.forward(lat, t(), { context });
    expect(after.dataSync()).toEqual(before.dataSync());
    adapter.dispose();
    tf.dispose([lat, context, tokens, before, after]);
  });

  it('refuses an adapter whose layer count does not fit, naming both counts', () => {
    const fewer = IpAdapter.load(edited(BASIC[0], (m) => {
      m.delete('ip_adapter.13.to_k_ip.weight');
      m.delete('ip_adapter.13.to_v_ip.weight');
    }));
    expect(() => fewer.attach(unet)).toThrow(/the adapter has 6 cross-attention layers \(ip_adapter\.1 \.\.\. ip_adapter\.11\), the UNet 7/);
    fewer.dispose();
  });

  it('refuses an adapter whose widths do not fit, naming the layer', () => {
    const wide = (rows: number, cols: number) => (m: Map<string, { shape: number[]; data: Float32Array }>) => {
      for (const kv of ['k', 'v']) m.set(`ip_adapter.1.to_${kv}_ip.weight`, { shape: [rows, cols], data: new Float32Array(rows * cols) });
    };
    const rows = IpAdapter.load(edited(BASIC[0], wide(64, 32)));
    expect(() => rows.attach(unet)).toThrow(/ip_adapter\.1 is \[64, 32\], but UNet cross-attention 0 has 32 channels/);
    rows.dispose();
    expect(() => IpAdapter.load(edited(BASIC[0], wide(32, 48)))).toThrow(/ip_adapter\.1\.to_k_ip\.weight takes 48 channels, but image_proj makes tokens of 32/);
    // the UNet is left as it was: a fitting adapter still attaches
    const ok = IpAdapter.open(join(DIR, BASIC[0]));
    ok.attach(unet);
    ok.dispose();
    expect(unet.crossAttentions().every((a) => a.extra.length === 0)).toBe(true);
  });

  it('numbers the layers down blocks, up blocks, then the mid block last', () => {
    const widths = unet.crossAttentions().map((a) => a.widths.dim);
    expect(widths).toEqual([32, 64, 64, 64, 32, 32, 64]); // fixture config.layers hidden_size, ip_adapter.1 ... 13
  });

  it('refuses a streamed UNet with a clear error', () => {
    const model = openWeights('tests/fixtures/pipeline/model.safetensors');
    const streamed = UNet.load(model, pipelineConfigFromLdm(fixture).unet, undefined, { residency: 'streamed' });
    model.close();
    const adapter = IpAdapter.open(join(DIR, BASIC[0]));
    expect(() => adapter.attach(streamed)).toThrow(/need the UNet's weights resident; this one is streamed/);
    adapter.dispose();
    streamed.dispose();
  });
});

describe('from a photo to the CFG token set', () => {
  it('gives [negative; photo] tokens with the scale, from an image_encoder folder, leaking no tensors', async () => {
    const enc = loadImageEncoder(join(DIR, 'image_encoder'));
    for (const [file, photoKey, negKey] of [[BASIC[0], 'ip_tokens', 'ip_tokens_uncond'], [PLUS[1], 'plus_tokens', 'plus_tokens_uncond']]) {
      const adapter = IpAdapter.open(join(DIR, file));
      const before = tf.memory().numTensors;
      const { tokens, scale } = await ipAdapterTokens(adapter, enc, readFileSync(join(DIR, 'photo.png')), 0.6);
      expect(scale).toBe(0.6);
      const [neg, photo] = tf.split(tokens, 2);
      // from our own resize: within the encoder's tolerance, as the pixels match exactly
      expect(maxRelError(neg.dataSync(), io.float32(negKey))).toBeLessThanOrEqual(TOL.image_proj);
      expect(maxRelError(photo.dataSync(), io.float32(photoKey))).toBeLessThanOrEqual(TOL.image_proj);
      tf.dispose([tokens, neg, photo]);
      expect(tf.memory().numTensors).toBe(before);
      adapter.dispose();
    }
    enc.dispose();
  });

  it('open, attach, a forward with image tokens, detach and dispose leak no tensors', () => {
    const [lat, context, tokens] = [nhwc('unet_x'), stored('unet_text') as tf.Tensor3D, stored('unet_plus_tokens') as tf.Tensor3D];
    const before = tf.memory().numTensors;
    const adapter = IpAdapter.open(join(DIR, PLUS[0]));
    adapter.attach(unet);
    unet.forward(lat, Array.from(io.float32('unet_t')), { context, extraTokens: [{ tokens, scale: 1 }] }).dispose();
    adapter.dispose(); // detaches
    expect(tf.memory().numTensors).toBe(before);
    expect(unet.crossAttentions().every((a) => a.extra.length === 0)).toBe(true);
    tf.dispose([lat, context, tokens]);
  });
});

describe('parity runner', () => {
  it('passes every case of the fixture', async () => {
    const results = await run(DIR, { backend: 'cpu' });
    expect(results.filter((r) => !r.passed)).toEqual([]);
    expect(results.length).toBeGreaterThanOrEqual(28);
  }, 300_000);
});
