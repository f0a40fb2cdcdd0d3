/**
 * LoRA (src/lora): both file formats, kohya / PEFT names -> original keys against the fixture's key tables (the tiny
 * model with num_res_blocks 1, the real SD 1.5), refusals (SDXL LoRAs, unknown modules, shapes that do not fit, other
 * adapter types), the merge rule on hand-made numbers, the base weights untouched, A1111 prompt tags, names in a
 * LoRA folder, and every case of tests/fixtures/lora through the parity runner.
 */
import { mkdtempSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { initBackend } from '../src/backend/select.js';
import { expectedShapes as clipShapes, SD15_CLIP } from '../src/clip/index.js';
import { expectedShapes as unetShapes, SD15_UNET } from '../src/unet/index.js';
import {
  addLoraDelta, extractLoraTags, loraTargets, LoraError, parseLora, readLora, resolveLora, withLoras,
  type LoraFile, type LoraModule,
} from '../src/lora/index.js';
import { run } from '../src/parity/lora.js';
import { formatResult } from '../src/parity/runner.js';
import { openWeights } from '../src/weights/open.js';
import { writeSafetensors } from '../src/weights/safetensors.js';
import type { TensorInfo, TensorSource } from '../src/weights/types.js';
import { MemorySource, rand } from './helpers.js';

const FIXTURE = 'tests/fixtures/lora';
const MODEL = 'tests/fixtures/pipeline/model.safetensors';

interface KeyRow {
  readonly kohya?: string;
  readonly kohya_sgm?: string;
  readonly kohya_diffusers?: string;
  readonly peft: string;
  readonly original: string;
  readonly shape: readonly number[];
}
const table = (name: string): KeyRow[] => (JSON.parse(readFileSync(join(FIXTURE, name), 'utf8')) as { modules: KeyRow[] }).modules;

/** A model of shapes only (values zero): SD 1.5's UNet and text encoder, from their loaders' expected shapes. */
class ShapeSource implements TensorSource {
  readonly path = '<sd15 shapes>';
  constructor(private readonly shapes: ReadonlyMap<string, readonly number[]>) {}
  keys = () => [...this.shapes.keys()];
  has = (k: string) => this.shapes.has(k);
  info = (k: string): TensorInfo => ({ dtype: 'F32', shape: this.shape(k) });
  bytes = (k: string) => new Uint8Array(this.float32(k).buffer);
  float32 = (k: string) => new Float32Array(this.shape(k).reduce((a, d) => a * d, 1));
  close = () => undefined;
  private shape(k: string): readonly number[] {
    const s = this.shapes.get(k);
    if (s === undefined) throw new Error(`no ${k}`);
    return s;
  }
}

/** A source that hands out its own arrays (no copy): a merge that wrote into them would show. */
class SharingSource extends MemorySource {
  constructor(private readonly own: Map<string, { shape: number[]; data: Float32Array }>) {
    super(own);
  }
  override float32(k: string): Float32Array {
    return (this.own.get(k) as { data: Float32Array }).data;
  }
}

type Tensors = Record<string, { shape: number[]; data: ArrayLike<number> }>;
const memory = (t: Tensors) => new MemorySource(new Map(Object.entries(t).map(([k, v]) => [k, { shape: v.shape, data: Float32Array.from(v.data) }])));
const lora = (t: Tensors, metadata: Record<string, string> = {}, name = 'test'): LoraFile => parseLora(memory(t), new Map(Object.entries(metadata)), name);

/** A kohya module `stem` for a weight [out, in(, kh, kw)] at rank r, random values. */
function kohya(stem: string, out: number, inner: number[], r: number, alpha?: number): Tensors {
  const k = inner.reduce((a, d) => a * d, 1);
  const conv = inner.length === 3;
  return {
    [`${stem}.lora_down.weight`]: { shape: [r, ...inner], data: rand(r * k) },
    [`${stem}.lora_up.weight`]: { shape: conv ? [out, r, 1, 1] : [out, r], data: rand(out * r) },
    ...(alpha === undefined ? {} : { [`${stem}.alpha`]: { shape: [], data: [alpha] } }),
  };
}

let sd15: ShapeSource;
let dir: string;

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: null });
  sd15 = new ShapeSource(new Map([...unetShapes(SD15_UNET), ...clipShapes(SD15_CLIP)]));
  dir = mkdtempSync(join(tmpdir(), 'lora-test-'));
});

afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('formats', () => {
  it('reads a kohya F16 LoCon file: 146 modules, alpha / rank per module, te and unet', () => {
    const f = readLora(join(FIXTURE, 'botanical.safetensors'));
    expect(f).toMatchObject({ format: 'kohya', name: 'botanical', sdxl: null });
    expect(f.modules.length).toBe(146);
    const byName = new Map(f.modules.map((m) => [m.name, m]));
    const q = byName.get('lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q') as LoraModule;
    expect(q).toMatchObject({ network: 'unet', scale: 0.5 });
    expect(q.down.shape).toEqual([4, 32]);
    const conv = byName.get('lora_unet_up_blocks_2_resnets_1_conv1') as LoraModule;
    expect(conv.scale).toBe(1.5);
    expect(conv.down.shape).toEqual([2, 64, 3, 3]);
    expect(conv.up.shape).toEqual([32, 2, 1, 1]);
    expect(byName.get('lora_te_text_model_encoder_layers_1_self_attn_q_proj')?.network).toBe('te');
    expect(f.metadata.get('ss_output_name')).toBe('botanical');
  });

  it('reads a kohya F32 file and a PEFT file (no alpha: scale 1)', () => {
    const ink = readLora(join(FIXTURE, 'ink.safetensors'));
    expect(ink.format).toBe('kohya');
    expect(new Set(ink.modules.map((m) => m.scale))).toEqual(new Set([0.5]));
    const peft = readLora(join(FIXTURE, 'botanical_peft.safetensors'));
    expect(peft.format).toBe('peft');
    expect(peft.modules.length).toBe(146);
    expect(new Set(peft.modules.map((m) => m.scale))).toEqual(new Set([1]));
    const te = peft.modules.find((m) => m.name === 'text_encoder.text_model.encoder.layers.0.mlp.fc1');
    expect(te?.network).toBe('te');
  });

  it('kohya without an alpha tensor: alpha = rank, scale 1', () => {
    expect(lora(kohya('lora_unet_conv_in', 4, [4, 3, 3], 2)).modules[0].scale).toBe(1);
  });

  it('PEFT lora_adapter_metadata gives lora_alpha / r, alpha_pattern per module, rsLoRA alpha / sqrt(r)', () => {
    const t: Tensors = {
      'unet.down_blocks.0.attentions.0.proj_in.lora_A.weight': { shape: [4, 8], data: rand(32) },
      'unet.down_blocks.0.attentions.0.proj_in.lora_B.weight': { shape: [8, 4], data: rand(32) },
      'unet.down_blocks.0.attentions.0.proj_out.lora_A.weight': { shape: [4, 8], data: rand(32) },
      'unet.down_blocks.0.attentions.0.proj_out.lora_B.weight': { shape: [8, 4], data: rand(32) },
      'text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight': { shape: [4, 8], data: rand(32) },
      'text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_B.weight': { shape: [8, 4], data: rand(32) },
    };
    const meta = JSON.stringify({ 'unet.r': 4, 'unet.lora_alpha': 2, 'unet.alpha_pattern': { proj_out: 8 }, 'text_encoder.r': 4, 'text_encoder.lora_alpha': 16, 'text_encoder.use_rslora': true });
    const path = join(dir, 'peft-meta.safetensors');
    writeSafetensors(path, Object.entries(t).map(([k, v]) => [k, { dtype: 'F32', shape: v.shape }] as const), (k) => Float32Array.from(t[k].data), { lora_adapter_metadata: meta });
    const scales = Object.fromEntries(readLora(path).modules.map((m) => [m.name, m.scale]));
    expect(scales).toEqual({
      'unet.down_blocks.0.attentions.0.proj_in': 0.5,
      'unet.down_blocks.0.attentions.0.proj_out': 2,
      'text_encoder.text_model.encoder.layers.0.mlp.fc1': 8, // 16 / sqrt(4)
    });
  });

  it('unprefixed PEFT names (a UNet saved alone) are UNet modules', () => {
    const f = lora({
      'down_blocks.0.attentions.0.proj_in.lora_A.weight': { shape: [2, 8], data: rand(16) },
      'down_blocks.0.attentions.0.proj_in.lora_B.weight': { shape: [8, 2], data: rand(16) },
    });
    expect(f.modules[0]).toMatchObject({ id: 'unet.down_blocks.0.attentions.0.proj_in', network: 'unet' });
  });

  it('refuses other adapters, stray tensors, half modules and non-LoRA files by name', () => {
    const loha = { 'lora_unet_conv_in.hada_w1_a': { shape: [4, 2], data: rand(8) } };
    expect(() => lora(loha)).toThrow(/hada_w1_a: LoHa \(LyCORIS\) is not supported/);
    const dora = { ...kohya('lora_unet_conv_in', 4, [4, 3, 3], 2), 'lora_unet_conv_in.dora_scale': { shape: [1, 4], data: rand(4) } };
    expect(() => lora(dora)).toThrow(/lora_unet_conv_in.dora_scale: DoRA/);
    const half = kohya('lora_unet_conv_in', 4, [4, 3, 3], 2);
    delete half['lora_unet_conv_in.lora_up.weight'];
    expect(() => lora(half)).toThrow(/lora_unet_conv_in has no lora_up.weight/);
    const rank = { ...kohya('lora_unet_conv_in', 4, [4, 3, 3], 2), 'lora_unet_conv_in.lora_up.weight': { shape: [4, 3, 1, 1], data: rand(12) } };
    expect(() => lora(rank)).toThrow(/not a rank-r pair/);
    expect(() => readLora(MODEL)).toThrow(/not a LoRA file/);
    expect(() => lora(kohya('lora_prior_unet_x', 4, [4], 2))).toThrow(LoraError);
  });
});

describe('key mapping', () => {
  it('maps every module of kohya_keys_fixture.json (num_res_blocks 1) to its original key', () => {
    const base = openWeights(MODEL);
    try {
      const targets = loraTargets(base.keys());
      const rows = table('kohya_keys_fixture.json');
      expect(rows.length).toBe(146);
      for (const row of rows) {
        expect(targets.get(row.kohya as string)?.key, row.kohya).toBe(row.original);
        expect(targets.get(row.peft)?.key, row.peft).toBe(row.original);
        expect(base.info(row.original).shape).toEqual(row.shape);
      }
    } finally {
      base.close();
    }
  });

  it('maps every module of kohya_keys_sd15.json (real SD 1.5) to its original key, with its shape', () => {
    const targets = loraTargets(sd15.keys());
    const rows = table('kohya_keys_sd15.json');
    expect(rows.length).toBe(350);
    for (const row of rows) {
      expect(targets.get(row.kohya as string)?.key, row.kohya).toBe(row.original);
      expect(targets.get(row.peft)?.key, row.peft).toBe(row.original);
      expect(sd15.info(row.original).shape).toEqual(row.shape);
    }
  });

  it('derives block numbers from the model, not from A1111\'s num_res_blocks = 2', () => {
    const base = openWeights(MODEL);
    try {
      const targets = loraTargets(base.keys());
      // A1111 hard-codes output_blocks.(3i + j) and input_blocks.(3 + 3i).0.op: 3*1+2 = 5 and 3, not these
      expect(targets.get('lora_unet_up_blocks_1_upsamplers_0_conv')?.key).toBe('model.diffusion_model.output_blocks.3.2.conv.weight');
      expect(targets.get('lora_unet_down_blocks_0_downsamplers_0_conv')?.key).toBe('model.diffusion_model.input_blocks.2.0.op.weight');
      expect(loraTargets(sd15.keys()).get('lora_unet_up_blocks_1_upsamplers_0_conv')?.key).toBe('model.diffusion_model.output_blocks.5.2.conv.weight');
    } finally {
      base.close();
    }
  });
});

describe('refusals', () => {
  const SDXL = /this is an SDXL LoRA; the loaded model is SD 1.x/;
  const sdxlRows = table('kohya_keys_sdxl.json');

  it('refuses kohya SDXL files on an SD 1.5 model: sgm UNet names, lora_te1_/lora_te2_, metadata', () => {
    const sgm = sdxlRows.find((r) => r.kohya_sgm?.startsWith('lora_unet_input_blocks_4_1_')) as KeyRow;
    const sgmLora = lora(kohya(sgm.kohya_sgm as string, sgm.shape[0], sgm.shape.slice(1), 4, 4));
    expect(() => withLoras(sd15, [{ lora: sgmLora, te: 1, unet: 1 }])).toThrow(SDXL);
    const te2 = sdxlRows.find((r) => r.kohya_sgm?.startsWith('lora_te2_')) as KeyRow;
    expect(() => withLoras(sd15, [{ lora: lora(kohya(te2.kohya_sgm as string, 1280, [1280], 4)), te: 1, unet: 1 }])).toThrow(SDXL);
    const meta = lora(kohya('lora_unet_down_blocks_0_attentions_0_proj_in', 320, [320, 1, 1], 4), { ss_base_model_version: 'sdxl_base_v1-0' });
    expect(() => withLoras(sd15, [{ lora: meta, te: 1, unet: 1 }])).toThrow(SDXL);
  });

  it('refuses diffusers-named SDXL modules that only fit SDXL (deeper transformers, 2048-wide context)', () => {
    const s15 = new Set(table('kohya_keys_sd15.json').map((r) => r.kohya));
    const only = sdxlRows.find((r) => r.kohya_diffusers !== undefined && !s15.has(r.kohya_diffusers)) as KeyRow;
    const deep = lora(kohya(only.kohya_diffusers as string, only.shape[0], only.shape.slice(1), 4));
    expect(() => withLoras(sd15, [{ lora: deep, te: 1, unet: 1 }])).toThrow(SDXL);
    const k = sdxlRows.find((r) => r.kohya_diffusers === 'lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k') as KeyRow;
    expect(k.shape).toEqual([640, 2048]);
    expect(() => withLoras(sd15, [{ lora: lora(kohya(k.kohya_diffusers as string, 640, [2048], 4)), te: 1, unet: 1 }])).toThrow(SDXL);
  });

  it('refuses a module that names no weight of the model, naming it', () => {
    const f = lora({ ...kohya('lora_unet_down_blocks_0_attentions_0_proj_in', 320, [320, 1, 1], 4), ...kohya('lora_unet_down_blocks_9_resnets_0_conv1', 320, [320, 3, 3], 4) });
    expect(() => withLoras(sd15, [{ lora: f, te: 1, unet: 1 }])).toThrow(/lora_unet_down_blocks_9_resnets_0_conv1: matches no weight of the model/);
  });

  it('refuses shapes that do not fit (an SD 1.5 LoRA on the tiny model), naming the module and both shapes', () => {
    const f = lora(kohya('lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q', 320, [320], 4, 4));
    const base = openWeights(MODEL);
    try {
      expect(() => withLoras(base, [{ lora: f, te: 1, unet: 1 }])).toThrow(
        /attn1_to_q: down \[4, 320\], up \[320, 4\] vs the model's \[32, 32\]: out 320 != 32/,
      );
      const kernel = lora(kohya('lora_unet_down_blocks_0_resnets_0_conv1', 32, [32, 1, 1], 2));
      expect(() => withLoras(base, [{ lora: kernel, te: 1, unet: 1 }])).toThrow(/resnets_0_conv1: .*in 32x1x1 != 32x3x3/);
    } finally {
      base.close();
    }
  });
});

describe('merge', () => {
  const W = 'model.diffusion_model.input_blocks.1.1.proj_in.weight';
  const T = 'cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight';
  const model = () =>
    memory({
      [W]: { shape: [2, 2, 1, 1], data: [1, 2, 3, 4] },
      [T]: { shape: [2, 3], data: [0, 0, 0, 0, 0, 0] },
      'model.diffusion_model.input_blocks.0.0.weight': { shape: [2, 4, 3, 3], data: new Float32Array(72) },
    });
  // up [2, 1] @ down [1, 2] = [[1*3, 1*5], [2*3, 2*5]] = [[3, 5], [6, 10]], alpha 0.5 / rank 1
  const unetLora = lora({
    'lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight': { shape: [1, 2, 1, 1], data: [3, 5] },
    'lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight': { shape: [2, 1, 1, 1], data: [1, 2] },
    'lora_unet_down_blocks_0_attentions_0_proj_in.alpha': { shape: [], data: [0.5] },
  });
  // rank 2: up [[1, 0], [0, 1]] @ down [[1, 2, 3], [4, 5, 6]] = down; no alpha: scale 1
  const teLora = lora({
    'lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight': { shape: [2, 3], data: [1, 2, 3, 4, 5, 6] },
    'lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight': { shape: [2, 2], data: [1, 0, 0, 1] },
  });

  it('W + m * alpha/r * up @ down, reshaped to a 1x1 conv weight; te multiplier for te modules, unet for unet', () => {
    const src = withLoras(model(), [{ lora: unetLora, te: 100, unet: 2 }, { lora: teLora, te: 0.5, unet: 100 }]);
    expect([...src.float32(W)]).toEqual([1 + 3, 2 + 5, 3 + 6, 4 + 10]); // 2 * 0.5 * delta = delta
    expect([...src.float32(T)]).toEqual([0.5, 1, 1.5, 2, 2.5, 3]);
  });

  it('several LoRAs on one weight add their deltas; multiplier 0 changes nothing', () => {
    const src = withLoras(model(), [{ lora: unetLora, te: 1, unet: 1 }, { lora: unetLora, te: 1, unet: -1 }, { lora: unetLora, te: 1, unet: 0.5 }]);
    expect([...src.float32(W)]).toEqual([1 + 0.75, 2 + 1.25, 3 + 1.5, 4 + 2.5]);
    expect([...withLoras(model(), [{ lora: unetLora, te: 1, unet: 0 }]).float32(W)]).toEqual([1, 2, 3, 4]);
  });

  it('a 3x3 conv module: down [r, in, 3, 3], up [out, r, 1, 1], product reshaped to [out, in, 3, 3]', () => {
    const t = kohya('lora_unet_conv_in', 2, [4, 3, 3], 3, 1.5);
    const src = withLoras(model(), [{ lora: lora(t), te: 1, unet: 0.8 }]);
    const got = src.float32('model.diffusion_model.input_blocks.0.0.weight');
    const down = t['lora_unet_conv_in.lora_down.weight'].data;
    const up = t['lora_unet_conv_in.lora_up.weight'].data;
    for (let o = 0; o < 2; o++) {
      for (let k = 0; k < 36; k++) {
        let sum = 0;
        for (let j = 0; j < 3; j++) sum += up[o * 3 + j] * down[j * 36 + k];
        expect(got[o * 36 + k]).toBeCloseTo(0.8 * 0.5 * sum, 6);
      }
    }
  });

  it('addLoraDelta refuses a weight of another size', () => {
    expect(() => addLoraDelta(new Float32Array(3), unetLora.modules[0], 1)).toThrow(RangeError);
  });

  it('info and bytes agree with float32: merged weights are F32, every other tensor passes through as it is', () => {
    const base = openWeights('tests/fixtures/pipeline/model-fp16.safetensors');
    try {
      const src = withLoras(base, [{ lora: readLora(join(FIXTURE, 'ink.safetensors')), te: 1, unet: 1 }]);
      const merged = 'model.diffusion_model.middle_block.1.proj_in.weight';
      const untouched = 'model.diffusion_model.middle_block.0.in_layers.2.weight';
      expect(src.info(merged)).toEqual({ dtype: 'F32', shape: base.info(merged).shape });
      expect(new Float32Array(src.bytes(merged).slice().buffer)).toEqual(src.float32(merged));
      expect(src.info(untouched)).toEqual(base.info(untouched));
      expect(base.info(untouched).dtype).toBe('F16');
      expect(src.bytes(untouched)).toEqual(base.bytes(untouched));
      expect(src.keys()).toEqual(base.keys());
      expect(withLoras(base, [])).toBe(base);
    } finally {
      base.close();
    }
  });

  it('leaves the base weights bit for bit as they were, also when the base hands out its own arrays', () => {
    const own = new Map(model().keys().map((k) => [k, { shape: [...model().info(k).shape], data: model().float32(k) }]));
    const before = new Map([...own].map(([k, v]) => [k, v.data.slice()]));
    const src = withLoras(new SharingSource(own), [{ lora: unetLora, te: 1, unet: 1 }, { lora: teLora, te: 1, unet: 1 }]);
    src.float32(W);
    src.float32(T);
    src.bytes(W);
    for (const [k, v] of own) expect(Buffer.from(v.data.buffer).equals(Buffer.from((before.get(k) as Float32Array).buffer)), k).toBe(true);

    const base = openWeights(MODEL);
    try {
      const bot = readLora(join(FIXTURE, 'botanical.safetensors'));
      const keys = base.keys().filter((k) => /weight$/.test(k));
      const raw = new Map(keys.map((k) => [k, base.bytes(k)]));
      const merged = withLoras(base, [{ lora: bot, te: 1, unet: 1 }]);
      for (const k of keys) merged.float32(k);
      for (const k of keys) expect(Buffer.from(base.bytes(k)).equals(Buffer.from(raw.get(k) as Uint8Array)), k).toBe(true);
    } finally {
      base.close();
    }
  });
});

describe('prompt tags', () => {
  it('matches every prompt_syntax case of the fixture', () => {
    const fx = JSON.parse(readFileSync(join(FIXTURE, 'fixture.json'), 'utf8')) as {
      cases: { case: string; cases?: { prompt: string; clean_prompt: string; loras: { name: string; te_multiplier: number; unet_multiplier: number; dyn_dim: number | null }[] }[] }[];
    };
    const syntax = fx.cases.find((c) => c.case === 'prompt_syntax')?.cases ?? [];
    expect(syntax.length).toBeGreaterThan(0);
    for (const s of syntax) {
      const got = extractLoraTags(s.prompt);
      expect(got.prompt).toBe(s.clean_prompt);
      expect(got.loras).toEqual(s.loras.map((l) => ({ name: l.name, te: l.te_multiplier, unet: l.unet_multiplier, dyn: l.dyn_dim })));
    }
  });

  it('lyco is lora; unet follows a named te; dyn positional or named; other tags are cut out and listed', () => {
    expect(extractLoraTags('a <lyco:x:0.5> b').loras).toEqual([{ name: 'x', te: 0.5, unet: 0.5, dyn: null }]);
    expect(extractLoraTags('<lora:x:te=0.3>').loras[0]).toMatchObject({ te: 0.3, unet: 0.3 });
    expect(extractLoraTags('<lora:x:1:0.5:8>').loras[0]).toEqual({ name: 'x', te: 1, unet: 0.5, dyn: 8 });
    expect(extractLoraTags('<lora:x:dyn=4: 0.7 >').loras[0]).toEqual({ name: 'x', te: 0.7, unet: 0.7, dyn: 4 });
    // two '=' make an argument positional, as ExtraNetworkParams' split('=', 2) does
    expect(extractLoraTags('<lora:a=b=c:0.2>').loras[0]).toMatchObject({ name: 'a=b=c', te: 0.2 });
    const r = extractLoraTags('(fern:1.2), <hypernet:sketch:0.7>\n<embedding_x:y> [ink] <LoRA:Fern_2:1>');
    expect(r.prompt).toBe('(fern:1.2), \n [ink] ');
    // types are case-sensitive in A1111: 'LoRA' is not 'lora'
    expect(r.others).toEqual([{ type: 'hypernet', args: ['sketch', '0.7'] }, { type: 'embedding_x', args: ['y'] }, { type: 'LoRA', args: ['Fern_2', '1'] }]);
    expect(r.loras).toEqual([]);
    expect(extractLoraTags('no tags <here> or <: x> <lora:>').prompt).toBe('no tags <here> or <: x> <lora:>');
    expect(extractLoraTags('<lora:fougère:0.5>, fern').loras[0].name).toBe('fougère');
  });

  it('refuses multipliers that are not finite numbers and tags without a name', () => {
    expect(() => extractLoraTags('<lora:x:abc>')).toThrow(/<lora:x:abc>: te multiplier "abc" is not a finite number/);
    expect(() => extractLoraTags('<lora:x:1:nan>')).toThrow(LoraError);
    expect(() => extractLoraTags('<lora:x:1:1:1.5>')).toThrow(/dyn "1.5" is not an integer/);
    expect(() => extractLoraTags('<lora:te=1>')).toThrow(/no LoRA name/);
  });
});

describe('resolveLora', () => {
  it('finds a name by file stem (safetensors first, sub-folders too), then by ss_output_name', () => {
    const loras = join(dir, 'loras');
    mkdirSync(join(loras, 'styles'), { recursive: true });
    const info = [['lora_unet_conv_in.lora_down.weight', { dtype: 'F32', shape: [1, 1] }]] as const;
    const one = () => new Float32Array(1);
    writeSafetensors(join(loras, 'fern.safetensors'), info, one);
    writeFileSync(join(loras, 'fern.pt'), 'x');
    writeSafetensors(join(loras, 'styles', 'ink_v2.safetensors'), info, one, { ss_output_name: 'ink' });
    writeFileSync(join(loras, 'notes.txt'), 'x');
    expect(resolveLora(loras, 'fern')).toBe(join(loras, 'fern.safetensors'));
    expect(resolveLora(loras, 'ink_v2')).toBe(join(loras, 'styles', 'ink_v2.safetensors'));
    expect(resolveLora(loras, 'ink')).toBe(join(loras, 'styles', 'ink_v2.safetensors'));
    expect(() => resolveLora(loras, 'moss')).toThrow(/no LoRA named "moss" in .*: it has fern, ink_v2/);
    expect(() => resolveLora(loras, '../loras/fern')).toThrow(LoraError);
    expect(() => resolveLora(join(dir, 'nowhere'), 'fern')).toThrow(/cannot list it/);
  });

  it('resolves the fixture\'s names in its folder', () => {
    expect(resolveLora(FIXTURE, 'botanical')).toBe(join(FIXTURE, 'botanical.safetensors'));
  });
});

describe('lora parity (cpu)', () => {
  it('passes every case of tests/fixtures/lora', async () => {
    const results = await run(FIXTURE, { backend: 'cpu' });
    expect(results.filter((r) => !r.passed).map(formatResult)).toEqual([]);
    const names = results.map((r) => r.name);
    for (const n of ['merged_weights/m1.0', 'merged_weights/m0.6', 'single/unet_eps', 'single_peft/te_hidden', 'pair/unet_eps', 'split/te_hidden', 'prompt_syntax/3', 'txt2img/latent', 'txt2img/image']) {
      expect(names).toContain(n);
    }
  }, 120_000);
});
