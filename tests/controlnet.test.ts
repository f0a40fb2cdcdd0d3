/**
 * ControlNet (src/controlnet): the three file formats (and the no-prefix and ControlNet 1.0 variants) load to the
 * same numbers, the diffusers name map against the fixture's table, SD 1.5's shapes, zero convs at zero give zero
 * residuals (and the plain UNet's eps), the guidance window, several ControlNets summing, refusals naming the bad
 * key or field, tensor lifetime, and every case of tests/fixtures/controlnet through the parity runner.
 */
import { mkdtempSync, mkdirSync, readFileSync, rmSync, writeFileSync, copyFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as tf from '../src/backend/tf.js';
import { initBackend } from '../src/backend/select.js';
import {
  SD15_CONTROLNET, checkFitsUNet, controlNetConfig, controlNetConfigFromDiffusers, hintBlockPlan, type ControlNetConfig,
} from '../src/controlnet/config.js';
import { openControlNet, loadControlNet } from '../src/controlnet/files.js';
import {
  checkControlUnit, controlActive, controlResiduals, controlScales, controlledEps, disposeResiduals, type ControlUnit,
} from '../src/controlnet/guidance.js';
import { controlNetDiffusersToOriginal } from '../src/controlnet/keys.js';
import { hintFromEdges, hintFromRgb } from '../src/controlnet/hint.js';
import { ControlNet, expectedControlNetShapes } from '../src/controlnet/model.js';
import { controlHint } from '../src/image/canny.js';
import { run } from '../src/parity/controlnet.js';
import { formatResult } from '../src/parity/runner.js';
import { UNet, unetConfigFromLdm, type UNetConfig, type UNetResiduals } from '../src/unet/index.js';
import { openWeights } from '../src/weights/open.js';
import { SafetensorsFile, writeSafetensors } from '../src/weights/safetensors.js';
import type { TensorSource } from '../src/weights/types.js';
import { MemorySource } from './helpers.js';

const FIXTURE = 'tests/fixtures/controlnet';
const MODEL = 'tests/fixtures/pipeline/model.safetensors';
const fx = JSON.parse(readFileSync(join(FIXTURE, 'fixture.json'), 'utf8')) as {
  config: { unet: Record<string, unknown> };
  diffusers_key_map: Record<string, string>;
};
const UNET_CFG: UNetConfig = unetConfigFromLdm(fx.config.unet);
const CFG: ControlNetConfig = controlNetConfig(UNET_CFG);

let dir: string;
let unet: UNet;
const owned: tf.Tensor[] = [];
const keep = <T extends tf.Tensor>(t: T): T => (owned.push(t), t);
let x: tf.Tensor4D;
let hint: tf.Tensor4D;
let context: tf.Tensor3D;

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: null });
  dir = mkdtempSync(join(tmpdir(), 'controlnet-test-'));
  const model = openWeights(MODEL);
  unet = UNet.load(model, UNET_CFG);
  model.close();
  x = keep(tf.randomNormal([2, 8, 8, 4], 0, 1, 'float32', 1) as tf.Tensor4D);
  hint = keep(tf.randomUniform([1, 64, 64, 3], 0, 1, 'float32', 2) as tf.Tensor4D);
  context = keep(tf.randomNormal([2, 7, 32], 0, 1, 'float32', 3) as tf.Tensor3D);
});

afterAll(() => {
  unet.dispose();
  tf.dispose(owned);
  rmSync(dir, { recursive: true, force: true });
});

/** Every tensor of `src` (the keys given), as float32, into a new safetensors file named `name`, keys renamed. */
function rewrite(src: TensorSource, name: string, rename: (k: string) => string | null, extra: Record<string, number[]> = {}, change?: (k: string, v: Float32Array) => Float32Array): string {
  const path = join(dir, name);
  const rows: [string, { dtype: 'F32'; shape: readonly number[] }][] = [];
  const data = new Map<string, Float32Array>();
  for (const k of src.keys()) {
    const to = rename(k);
    if (to === null) continue;
    rows.push([to, { dtype: 'F32', shape: src.info(k).shape }]);
    data.set(to, change === undefined ? src.float32(k) : change(k, src.float32(k)));
  }
  for (const [k, shape] of Object.entries(extra)) {
    rows.push([k, { dtype: 'F32', shape }]);
    data.set(k, new Float32Array(shape.reduce((a, d) => a * d, 1)));
  }
  writeSafetensors(path, rows, (k) => data.get(k) as Float32Array);
  return path;
}

/** Bit-for-bit equality of float arrays (vitest's deep equality is slow on large typed arrays). */
const bits = (a: Float32Array): string => Buffer.from(a.buffer, a.byteOffset, a.byteLength).toString('base64');

function residualValues(r: UNetResiduals): Float32Array[] {
  return [...r.down, r.middle].map((t) => t.dataSync() as Float32Array);
}

function residualsOf(path: string): Float32Array[] {
  const net = loadControlNet(path, UNET_CFG);
  try {
    const r = net.forward(x, [700, 25], { context }, hint, 0.8);
    const v = residualValues(r);
    disposeResiduals(r);
    return v;
  } finally {
    net.dispose();
  }
}

describe('ControlNet files', () => {
  it('opens each format under the original names, with the same tensors', () => {
    const paths = [join(FIXTURE, 'control_tiny.safetensors'), join(FIXTURE, 'control_tiny.pth'), join(FIXTURE, 'diffusers')];
    const opened = paths.map(openControlNet);
    try {
      expect(opened.map((o) => o.format)).toEqual(['single-file', 'single-file', 'diffusers-folder']);
      expect(opened[2].config).toEqual(CFG);
      const keys = [...expectedControlNetShapes(CFG).keys()];
      for (const o of opened) expect(o.source.keys().sort()).toEqual([...keys].sort());
      for (const k of keys) {
        const ref = opened[0].source.float32(k);
        for (const o of opened.slice(1)) expect(bits(o.source.float32(k)), k).toBe(bits(ref));
      }
    } finally {
      for (const o of opened) o.source.close();
    }
  });

  it('gives the same residuals from .safetensors, .pth, the diffusers folder and file, the no-prefix and the ControlNet 1.0 variant', () => {
    const st = SafetensorsFile.open(join(FIXTURE, 'control_tiny.safetensors'));
    let noPrefix: string;
    let v10: string;
    try {
      noPrefix = rewrite(st, 'no-prefix.safetensors', (k) => k.slice('control_model.'.length));
      // ControlNet 1.0 files carry the whole SD model beside control_model.*: only control_model.* is read
      v10 = rewrite(st, 'control_sd15_tiny.safetensors', (k) => k, { 'model.diffusion_model.out.2.bias': [4], 'first_stage_model.quant_conv.bias': [8] });
    } finally {
      st.close();
    }
    expect(openControlNet(noPrefix).format).toBe('single-file-no-prefix');
    const ref = residualsOf(join(FIXTURE, 'control_tiny.safetensors'));
    expect(ref).toHaveLength(7);
    const others = [
      join(FIXTURE, 'control_tiny.pth'), join(FIXTURE, 'diffusers'), join(FIXTURE, 'diffusers', 'diffusion_pytorch_model.safetensors'), noPrefix, v10,
    ];
    for (const p of others) expect(residualsOf(p).map(bits), p).toEqual(ref.map(bits));
  });

  it('maps every diffusers ControlNetModel name as the fixture\'s table does', () => {
    const d = SafetensorsFile.open(join(FIXTURE, 'diffusers', 'diffusion_pytorch_model.safetensors'));
    try {
      const map = controlNetDiffusersToOriginal(d.keys(), d.path);
      expect(Object.fromEntries(map)).toEqual(fx.diffusers_key_map);
      // the no-prefix variant's names
      expect(controlNetDiffusersToOriginal(['controlnet_cond_embedding.blocks.5.bias'], 'x', '')).toEqual(new Map([['input_hint_block.12.bias', 'controlnet_cond_embedding.blocks.5.bias']]));
    } finally {
      d.close();
    }
  });

  it('expects SD 1.5 ControlNet shapes: 12 zero convs + middle_block_out, the hint block 3 -> 320 in 8 convs', () => {
    const s = expectedControlNetShapes(SD15_CONTROLNET);
    expect(s.get('control_model.input_hint_block.0.weight')).toEqual([16, 3, 3, 3]);
    expect(s.get('control_model.input_hint_block.14.weight')).toEqual([320, 256, 3, 3]);
    expect(s.get('control_model.zero_convs.11.0.weight')).toEqual([1280, 1280, 1, 1]);
    expect(s.has('control_model.zero_convs.12.0.weight')).toBe(false);
    expect(s.get('control_model.middle_block_out.0.weight')).toEqual([1280, 1280, 1, 1]);
    expect([...s.keys()].some((k) => k.includes('output_blocks') || k.includes('.out.'))).toBe(false);
    expect(hintBlockPlan(SD15_CONTROLNET).map((c) => c.stride)).toEqual([1, 1, 2, 1, 2, 1, 2, 1]);
    // control_v11p_sd15_canny's diffusers config.json (lllyasviel/control_v11p_sd15_canny)
    const sd15 = controlNetConfigFromDiffusers({
      block_out_channels: [320, 640, 1280, 1280], layers_per_block: 2, attention_head_dim: 8, cross_attention_dim: 768,
      down_block_types: ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
      conditioning_embedding_out_channels: [16, 32, 96, 256],
    }, 'config.json');
    expect(sd15).toEqual(SD15_CONTROLNET);
  });
});

describe('ControlNet refusals', () => {
  const st = () => SafetensorsFile.open(join(FIXTURE, 'control_tiny.safetensors'));

  it('names a key the ControlNet does not have, a missing key and a misshapen one', () => {
    const src = st();
    let extra: string;
    let missing: string;
    let misshapen: string;
    try {
      extra = rewrite(src, 'extra.safetensors', (k) => k, { 'control_model.zero_convs.6.0.weight': [64, 64, 1, 1] });
      missing = rewrite(src, 'missing.safetensors', (k) => (k === 'control_model.middle_block_out.0.bias' ? null : k));
      misshapen = rewrite(src, 'misshapen.safetensors', (k) => (k === 'control_model.zero_convs.3.0.bias' ? null : k), { 'control_model.zero_convs.3.0.bias': [32] });
    } finally {
      src.close();
    }
    expect(() => loadControlNet(extra, UNET_CFG)).toThrow(/unexpected control_model\.zero_convs\.6\.0\.weight/);
    expect(() => loadControlNet(missing, UNET_CFG)).toThrow(/missing control_model\.middle_block_out\.0\.bias \[64\]/);
    expect(() => loadControlNet(misshapen, UNET_CFG)).toThrow(/control_model\.zero_convs\.3\.0\.bias: expected \[64\], got \[32\]/);
  });

  it('refuses a Stable Diffusion checkpoint, an unknown diffusers part and a ControlNet for another base model', () => {
    expect(() => openControlNet(MODEL)).toThrow(/not a ControlNet .*a Stable Diffusion checkpoint without a ControlNet/);
    const d = SafetensorsFile.open(join(FIXTURE, 'diffusers', 'diffusion_pytorch_model.safetensors'));
    try {
      expect(() => controlNetDiffusersToOriginal([...d.keys(), 'controlnet_extra.weight'], 'f')).toThrow(/controlnet_extra\.weight is no part/);
      expect(() => controlNetDiffusersToOriginal([...d.keys(), 'add_embedding.linear_1.weight'], 'f')).toThrow(/SDXL ControlNet/);
      expect(() => controlNetDiffusersToOriginal([...d.keys(), 'up_blocks.0.nonsense.weight'], 'f')).toThrow(/not a diffusers ControlNetModel/);
    } finally {
      d.close();
    }
    expect(() => loadControlNet(join(FIXTURE, 'diffusers'), { ...UNET_CFG, contextDim: 768 })).toThrow(/contextDim is 32, the base model's UNet's 768/);
    expect(() => checkFitsUNet(SD15_CONTROLNET, UNET_CFG, 'sd15.pth')).toThrow(/modelChannels is 320/);
    expect(() => controlNetConfigFromDiffusers({ addition_embed_type: 'text_time' }, 'sdxl/config.json')).toThrow(/SDXL ControlNet/);
    const folder = join(dir, 'not-controlnet');
    mkdirSync(folder);
    writeFileSync(join(folder, 'config.json'), JSON.stringify({ _class_name: 'UNet2DConditionModel' }));
    expect(() => openControlNet(folder)).toThrow(/_class_name is UNet2DConditionModel, not ControlNetModel/);
    copyFileSync(join(FIXTURE, 'diffusers', 'config.json'), join(folder, 'config.json'));
    expect(() => openControlNet(folder)).toThrow(/no ControlNet weights/);
  });

  it('refuses a hint of the wrong size or channels, naming what it needs', () => {
    const net = loadControlNet(join(FIXTURE, 'control_tiny.safetensors'), UNET_CFG);
    try {
      const small = tf.zeros([1, 32, 32, 3]) as tf.Tensor4D;
      const gray = tf.zeros([1, 64, 64, 1]) as tf.Tensor4D;
      expect(() => net.forward(x, 500, { context }, small, 1)).toThrow(/a latent \[2, 8, 8\] needs a hint \[1 or 2, 64, 64, 3\]/);
      expect(() => net.forward(x, 500, { context }, gray, 1)).toThrow(/expected NHWC \[B, H, W, 3\]/);
      tf.dispose([small, gray]);
    } finally {
      net.dispose();
    }
  });
});

describe('ControlNet residuals', () => {
  it('zero convs at zero give zero residuals and leave the UNet\'s eps as it is', () => {
    const st = SafetensorsFile.open(join(FIXTURE, 'control_tiny.safetensors'));
    const m = new Map<string, { shape: number[]; data: Float32Array }>();
    try {
      for (const k of st.keys()) {
        const zero = /\.(zero_convs\.\d+\.0|middle_block_out\.0)\./.test(k);
        const v = st.float32(k);
        m.set(k, { shape: [...st.info(k).shape], data: zero ? new Float32Array(v.length) : v });
      }
    } finally {
      st.close();
    }
    const net = ControlNet.load(new MemorySource(m), CFG);
    try {
      const r = net.forward(x, [700, 25], { context }, hint, 1);
      for (const v of residualValues(r)) expect(v.every((a) => a === 0)).toBe(true);
      const withR = unet.forward(x, [700, 25], { context, residuals: r });
      const plain = unet.forward(x, [700, 25], { context });
      expect(bits(withR.dataSync() as Float32Array)).toBe(bits(plain.dataSync() as Float32Array));
      tf.dispose([withR, plain]);
      disposeResiduals(r);
    } finally {
      net.dispose();
    }
  });

  it('scales every residual by the conditioning scale, and sums several ControlNets', () => {
    const net = loadControlNet(join(FIXTURE, 'control_tiny.safetensors'), UNET_CFG);
    try {
      const one = net.forward(x, 300, { context }, hint, 1);
      const units: ControlUnit[] = [
        { net, hint, scale: 0.25, start: 0, end: 1 },
        { net, hint, scale: 0.5, start: 0, end: 0.5 },
        { net, hint, scale: 0.75, start: 0.5, end: 1 },
      ];
      // step 0 of 4: units 0 and 1 are active; step 3: units 0 and 2
      const early = controlResiduals(units, x, 300, 0, 4, { context }) as UNetResiduals;
      const late = controlResiduals(units, x, 300, 3, 4, { context }) as UNetResiduals;
      const ones = residualValues(one);
      residualValues(early).forEach((v, i) => v.forEach((a, j) => expect(a).toBeCloseTo(0.75 * ones[i][j], 5)));
      residualValues(late).forEach((v, i) => v.forEach((a, j) => expect(a).toBeCloseTo(1.0 * ones[i][j], 5)));
      expect(controlResiduals([units[1]], x, 300, 3, 4, { context })).toBeUndefined();
      for (const r of [one, early, late]) disposeResiduals(r);
    } finally {
      net.dispose();
    }
  });

  it('computes the same residuals with its weights streamed (wasm\'s residency) as resident, and reads the latent alone under an inpainting base', () => {
    const path = join(FIXTURE, 'control_tiny.safetensors');
    const streamed = loadControlNet(path, UNET_CFG, { residency: 'streamed' });
    const inpaintBase = loadControlNet(path, { ...UNET_CFG, inChannels: 9 });
    try {
      expect(streamed.hostBytes).toBeGreaterThan(0);
      expect(inpaintBase.config.unet.inChannels).toBe(4);
      const a = streamed.forward(x, 400, { context }, hint, 0.8);
      const b = inpaintBase.forward(x, 400, { context }, hint, 0.8);
      expect(residualValues(a).map(bits)).toEqual(residualValues(b).map(bits));
      disposeResiduals(a);
      disposeResiduals(b);
    } finally {
      streamed.dispose();
      inpaintBase.dispose();
    }
  });

  it('frees every tensor it makes (forward, guided eps with the window)', () => {
    const net = loadControlNet(join(FIXTURE, 'control_tiny.safetensors'), UNET_CFG);
    try {
      const units: ControlUnit[] = [{ net, hint, hintEmbedding: net.embedHint(hint), scale: 0.8, start: 0, end: 0.5 }];
      const before = tf.memory().numTensors;
      disposeResiduals(net.forward(x, 500, { context }, hint, 0.8));
      const one = tf.slice(x, [0, 0, 0, 0], [1, 8, 8, 4]);
      for (const step of [0, 1]) tf.dispose([controlledEps(unet, units, { context }, 7.5, step, 2)(one, 500)]);
      one.dispose();
      expect(tf.memory().numTensors).toBe(before);
      units[0].hintEmbedding?.dispose();
    } finally {
      net.dispose();
    }
  });
});

describe('hint', () => {
  it('is HWC3(edges) / 255 in NHWC, the transpose of controlHint\'s planar values; an image / 255 as it is', () => {
    const edges = Uint8Array.from({ length: 6 }, (_, i) => (i % 2 === 0 ? 255 : 0));
    const h = hintFromEdges(edges, 3, 2);
    const planar = tf.tensor4d(controlHint(edges), [1, 3, 2, 3]);
    const want = tf.transpose(planar, [0, 2, 3, 1]);
    expect(h.shape).toEqual([1, 2, 3, 3]);
    expect(h.dataSync()).toEqual(want.dataSync());
    const rgb = hintFromRgb(Uint8Array.of(0, 51, 255), 1, 1);
    expect(Array.from(rgb.dataSync())).toEqual([0, Math.fround(51 / 255), 1]);
    expect(() => hintFromEdges(edges, 4, 2)).toThrow(/not a 4x2 edge map/);
    tf.dispose([h, planar, want, rgb]);
  });
});

describe('guidance window', () => {
  it('is diffusers\' rule: step i of n runs the ControlNet iff i/n >= start and (i+1)/n <= end', () => {
    // the fixture's cases: 8 steps, 0.0-0.8 -> steps 0-5; 5 steps, 0.1-0.7 -> steps 1-2
    expect(Array.from({ length: 8 }, (_, i) => controlActive(i, 8, 0, 0.8))).toEqual([true, true, true, true, true, true, false, false]);
    expect(controlScales(5, { scale: 1, start: 0.1, end: 0.7 })).toEqual([0, 1, 1, 0, 0]);
    expect(controlScales(4, { scale: 0.8, start: 0, end: 1 })).toEqual([0.8, 0.8, 0.8, 0.8]);
    expect(Array.from({ length: 6 }, (_, i) => controlActive(i, 6, 0, 0.5))).toEqual([true, true, true, false, false, false]);
    expect(Array.from({ length: 6 }, (_, i) => controlActive(i, 6, 0.5, 1))).toEqual([false, false, false, true, true, true]);
  });

  it('refuses a window or scale it cannot honour, naming the field', () => {
    expect(() => checkControlUnit({ scale: 1, start: 0.6, end: 0.4 })).toThrow(/start \(0\.6\) must be below end \(0\.4\)/);
    expect(() => checkControlUnit({ scale: 1, start: -0.1, end: 1 })).toThrow(/start: must be in \[0, 1\]/);
    expect(() => checkControlUnit({ scale: 1, start: 0, end: 1.5 })).toThrow(/end: must be in \[0, 1\]/);
    expect(() => checkControlUnit({ scale: NaN, start: 0, end: 1 })).toThrow(/scale: must be a finite number/);
    expect(() => checkControlUnit({ scale: 0.8, start: 0, end: 1 })).not.toThrow();
  });
});

describe('controlnet parity (cpu)', () => {
  it('passes every case of tests/fixtures/controlnet', async () => {
    const results = await run(FIXTURE, { backend: 'cpu' });
    expect(results.filter((r) => !r.passed).map(formatResult)).toEqual([]);
    const names = results.map((r) => r.name);
    for (const n of ['keys/diffusers_key_map', 'pth/unit/mid', 'diffusers/unit/eps', 'multi/down_0', 'ddim_a/window', 'ddim_b/step_2', 'ddim_b/image']) {
      expect(names).toContain(n);
    }
  }, 240_000);
});
