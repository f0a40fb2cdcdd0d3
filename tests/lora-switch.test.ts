/**
 * Per-request LoRAs (pipeline/lora-switch.ts) on the tiny fixture model: a request's LoRAs switch on and off in the
 * loaded layers, the base weights come back byte for byte (TensorFlow.js tensors, and the native kernels' packed
 * panels where they are built), images equal those of fresh loads with the same LoRAs, refusals change nothing,
 * and no tensor is left behind.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as tf from '../src/backend/tf.js';
import { initBackend } from '../src/backend/select.js';
import { kernelsProblem } from '../src/backend/kernels.js';
import { bindLoras, loraTargets, LoraError, withLoraFiles, type LoraFile, type LoraSpec } from '../src/lora/index.js';
import { LayerLog } from '../src/nn/reload.js';
import { LoraSwitch } from '../src/pipeline/lora-switch.js';
import { UNet } from '../src/unet/index.js';
import { randomLoraShapes } from '../src/lora/random.js';
import { sd15Shapes } from '../src/pipeline/shapes.js';
import { loraFlag } from '../src/cli/commands/generate.js';
import { UsageError } from '../src/cli/errors.js';
import type { TensorInfo, TensorSource } from '../src/weights/types.js';
import { pipelineConfigFromLdm, StableDiffusion, type PipelineConfig } from '../src/pipeline/pipeline.js';
import type { GenerateParams } from '../src/pipeline/api.js';
import { openWeights } from '../src/weights/open.js';
import { writeSafetensors } from '../src/weights/safetensors.js';
import { rand } from './helpers.js';

const DIR = 'tests/fixtures/lora';
const MODEL = 'tests/fixtures/pipeline/model.safetensors';
const TOKENIZER = 'tests/fixtures/tokenizer';
const config: PipelineConfig = pipelineConfigFromLdm(JSON.parse(readFileSync(join(DIR, 'fixture.json'), 'utf8')), join(DIR, 'fixture.json'));

const A: LoraSpec[] = [{ path: join(DIR, 'botanical.safetensors'), te: 0.8, unet: 0.8 }];
const B: LoraSpec[] = [{ path: join(DIR, 'ink.safetensors'), te: 0.3, unet: 0.9 }];
const PEFT: LoraSpec[] = [{ path: join(DIR, 'botanical_peft.safetensors'), te: 1, unet: 0.5 }];

const REQUEST: GenerateParams = { prompt: 'a botanical illustration of a fern', negativePrompt: 'blurry', seed: 7, steps: 2, sampler: 'euler_a', width: 32, height: 32 };

type Snapshot = Map<string, Float32Array[]>;

/** The keys whose held values differ between two snapshots (byte for byte). */
function changed(a: Snapshot, b: Snapshot): string[] {
  expect([...b.keys()]).toEqual([...a.keys()]);
  const bytes = (v: Float32Array) => Buffer.from(v.buffer, v.byteOffset, v.byteLength);
  return [...a].filter(([k, vs]) => {
    const ws = b.get(k) as Float32Array[];
    return vs.length !== ws.length || vs.some((v, i) => !bytes(v).equals(bytes(ws[i])));
  }).map(([k]) => k);
}

const load = (loras?: readonly LoraSpec[]) => StableDiffusion.load({ weights: MODEL, config, tokenizer: TOKENIZER, loras, warn: () => undefined });

async function pixels(sd: StableDiffusion, loras?: readonly LoraSpec[]): Promise<Uint8Array> {
  const { images } = await sd.generate({ ...REQUEST, loras });
  return images[0].rgb;
}

/** What the layers of a fresh load with `atLoad` merged as it loads hold. */
async function freshSnapshot(atLoad?: readonly LoraSpec[]): Promise<Snapshot> {
  const sd = await load(atLoad);
  try {
    return sd.loras.snapshot();
  } finally {
    sd.dispose();
  }
}

/** The image of a fresh load (`atLoad` merged as it loads), without per-request LoRAs. */
async function freshPixels(atLoad?: readonly LoraSpec[]): Promise<Uint8Array> {
  const sd = await load(atLoad);
  try {
    return await pixels(sd);
  } finally {
    sd.dispose();
  }
}

let tmp: string;

/** A kohya LoRA of the given modules (kohya id -> [out, in] or [out, in, k, k] of the weight it claims to change). */
function writeKohya(name: string, modules: Record<string, readonly number[]>, rank = 2): string {
  const tensors = new Map<string, { shape: number[]; data: Float32Array }>();
  for (const [id, [out, ...inner]] of Object.entries(modules)) {
    const k = inner.reduce((a, d) => a * d, 1);
    tensors.set(`${id}.lora_down.weight`, { shape: [rank, ...inner], data: rand(rank * k) });
    tensors.set(`${id}.lora_up.weight`, { shape: inner.length === 3 ? [out, rank, 1, 1] : [out, rank], data: rand(out * rank) });
  }
  const path = join(tmp, `${name}.safetensors`);
  writeSafetensors(path, [...tensors].map(([k, v]) => [k, { dtype: 'F32', shape: v.shape }] as const), (k) => (tensors.get(k) as { data: Float32Array }).data);
  return path;
}

/** A kohya name of the tiny model that changes a weight of `shape`'s rank, and its checkpoint shape. */
function someTarget(rank: 2 | 4): { id: string; shape: readonly number[] } {
  const src = openWeights(MODEL);
  try {
    for (const [id, t] of loraTargets(src.keys())) {
      const shape = src.info(t.key).shape;
      if (id.startsWith('lora_unet_') && shape.length === rank && shape[0] > 1) return { id, shape };
    }
  } finally {
    src.close();
  }
  throw new Error('no target');
}

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: null });
  tmp = mkdtempSync(join(tmpdir(), 'sd-lora-switch-'));
});

afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe('per-request LoRAs', () => {
  let sd: StableDiffusion;
  beforeAll(async () => {
    sd = await load();
  });
  afterAll(() => sd?.dispose());

  it('A, then B, then none give the images of fresh loads with A, with B and without, pixel for pixel', async () => {
    const tensors = tf.memory().numTensors;
    const [withA, withB, without] = [await pixels(sd, A), await pixels(sd, B), await pixels(sd)];
    expect(tf.memory().numTensors).toBe(tensors);
    expect(changed(await freshSnapshot(), sd.loras.snapshot())).toEqual([]); // generate() switched back exactly
    expect(Buffer.from(withA).equals(Buffer.from(await freshPixels(A)))).toBe(true);
    expect(Buffer.from(withB).equals(Buffer.from(await freshPixels(B)))).toBe(true);
    expect(Buffer.from(without).equals(Buffer.from(await freshPixels()))).toBe(true);
    expect(Buffer.from(withA).equals(Buffer.from(without))).toBe(false); // the LoRA changes the image
    expect(Buffer.from(withA).equals(Buffer.from(withB))).toBe(false);
  });

  it('holds, for two LoRAs at once and for a PEFT file, exactly the weights of a fresh load with them', async () => {
    for (const set of [[...A, ...B], PEFT, B]) {
      sd.loras.use(set)();
      expect(changed(await freshSnapshot(set), sd.loras.snapshot())).toEqual([]);
    }
    sd.loras.restore();
    expect(changed(await freshSnapshot(), sd.loras.snapshot())).toEqual([]);
  });

  it('restores every UNet and text-encoder layer byte for byte, and leaks no tensor', async () => {
    const base = sd.loras.snapshot();
    const tensors = tf.memory().numTensors;
    sd.loras.use(A)();
    const onA = sd.loras.snapshot();
    const changedByA = changed(base, onA);
    expect(changedByA.length).toBeGreaterThan(10);
    expect(changedByA.some((k) => k.startsWith('cond_stage_model.'))).toBe(true);
    expect(changedByA.some((k) => k.startsWith('model.diffusion_model.'))).toBe(true);
    expect(changedByA.some((k) => k.startsWith('first_stage_model.'))).toBe(false);
    expect(tf.memory().numTensors).toBeGreaterThan(tensors); // the merged layers, beside the kept base ones
    sd.loras.use(B)(); // straight from A to B
    expect(changed(onA, sd.loras.snapshot()).length).toBeGreaterThan(0);
    sd.loras.use([])();
    expect(changed(base, sd.loras.snapshot())).toEqual([]);
    expect(tf.memory().numTensors).toBe(tensors);
  });

  it('keeps the set on between requests that ask for it, switches only when the set changes', () => {
    sd.loras.use(A)();
    const onA = sd.loras.snapshot();
    const tensors = tf.memory().numTensors;
    sd.loras.use(A)();
    expect(sd.loras.on).toBe(true);
    expect(tf.memory().numTensors).toBe(tensors);
    expect(changed(onA, sd.loras.snapshot())).toEqual([]);
    sd.loras.use([{ ...A[0], unet: 0.5 }])(); // another multiplier is another set
    expect(changed(onA, sd.loras.snapshot()).length).toBeGreaterThan(0);
    sd.loras.restore();
    expect(sd.loras.on).toBe(false);
  });

  it('refuses another set while a generation holds one', () => {
    const release = sd.loras.use(A);
    try {
      expect(() => sd.loras.use(B)).toThrow(LoraError);
      expect(() => sd.loras.use([])).toThrow(/another generation is running/);
      sd.loras.use(A)(); // the same set is fine
    } finally {
      release();
    }
    sd.loras.use(B)();
    sd.loras.restore();
  });

  it('refuses a LoRA that does not fit, naming the first bad module, before any weight changes', async () => {
    sd.loras.use(A)();
    const onA = sd.loras.snapshot();
    const tensors = tf.memory().numTensors;
    const good = someTarget(2);
    const conv = someTarget(4);
    const misfit = writeKohya('misfit', { [good.id]: good.shape, [conv.id]: [conv.shape[0] + 1, ...conv.shape.slice(1)] });
    expect(() => sd.loras.use([{ path: misfit, te: 1, unet: 1 }])).toThrow(new RegExp(`${conv.id}: .*out ${conv.shape[0] + 1} != ${conv.shape[0]}`));
    const stranger = writeKohya('stranger', { [good.id]: good.shape, lora_unet_no_such_block_proj: [4, 4] });
    expect(() => sd.loras.use([{ path: stranger, te: 1, unet: 1 }])).toThrow(/lora_unet_no_such_block_proj: matches no weight of the model/);
    expect(() => sd.loras.use([{ path: join(tmp, 'missing.safetensors'), te: 1, unet: 1 }])).toThrow(/missing\.safetensors: cannot read the LoRA file \(ENOENT\)/);
    expect(() => sd.loras.use([{ ...B[0], unet: Number.NaN }])).toThrow(/ink\.safetensors: multipliers te 0\.3, unet NaN: both must be finite/);
    const sdxl = writeKohya('sdxl', { lora_te1_text_model_encoder_layers_0_self_attn_q_proj: [768, 768] });
    await expect(sd.generate({ ...REQUEST, loras: [{ path: sdxl, te: 1, unet: 1 }] })).rejects.toThrow(/this is an SDXL LoRA; the loaded model is SD 1.x/);
    // A is still on, exactly as it was, and nothing was allocated
    expect(sd.loras.on).toBe(true);
    expect(changed(onA, sd.loras.snapshot())).toEqual([]);
    expect(tf.memory().numTensors).toBe(tensors);
    sd.loras.restore();
  });
});

describe('per-request LoRAs on a model loaded with LoRAs', () => {
  it('merges the request on top of the load-time LoRAs and goes back to them', async () => {
    const sd = await load(A);
    try {
      const atLoad = sd.loras.snapshot();
      expect(changed(await freshSnapshot(A), atLoad)).toEqual([]);
      expect(Buffer.from(await pixels(sd, B)).equals(Buffer.from(await freshPixels([...A, ...B])))).toBe(true);
      sd.loras.use([])();
      expect(changed(atLoad, sd.loras.snapshot())).toEqual([]);
    } finally {
      sd.dispose();
    }
  });
});

/** Whether the native kernels are built here (they run on the cpu backend under SD_KERNELS=1). */
function nativeProblem(): string | null {
  const saved = process.env.SD_KERNELS;
  process.env.SD_KERNELS = '1';
  try {
    return kernelsProblem();
  } finally {
    if (saved === undefined) delete process.env.SD_KERNELS;
    else process.env.SD_KERNELS = saved;
  }
}

const problem = nativeProblem();
if (problem !== null) console.warn(`skipping the native-kernel LoRA switch test: ${problem}`);
describe.runIf(problem === null)('per-request LoRAs on the native kernels', () => {
  it('restores the packed panels byte for byte and computes what a fresh load does', async () => {
    const saved = process.env.SD_KERNELS;
    process.env.SD_KERNELS = '1';
    try {
      const sd = await load();
      try {
        const base = sd.loras.snapshot();
        const withA = await pixels(sd, A);
        expect(changed(base, sd.loras.snapshot()).length).toBeGreaterThan(10);
        await pixels(sd);
        expect(changed(base, sd.loras.snapshot())).toEqual([]);
        expect(Buffer.from(withA).equals(Buffer.from(await freshPixels(A)))).toBe(true);
      } finally {
        sd.dispose();
      }
    } finally {
      if (saved === undefined) delete process.env.SD_KERNELS;
      else process.env.SD_KERNELS = saved;
    }
  });
});

describe('sd generate --lora', () => {
  const file = join(DIR, 'ink.safetensors');
  it('reads FILE, FILE:M and FILE:TE:UNET, multipliers off the end', () => {
    expect(loraFlag(file)).toEqual({ path: file, te: 1, unet: 1 });
    expect(loraFlag(`${file}:0.8`)).toEqual({ path: file, te: 0.8, unet: 0.8 });
    expect(loraFlag(`${file}:0.3:-1.5`)).toEqual({ path: file, te: 0.3, unet: -1.5 });
  });

  it('refuses a missing file or a multiplier that is not a number, naming the flag', () => {
    expect(() => loraFlag(`${file}:strong`)).toThrow(UsageError);
    expect(() => loraFlag(`${file}:strong`)).toThrow(/^--lora .*ink\.safetensors:strong: no file .*"strong" after a ':' is not a multiplier/);
    expect(() => loraFlag('nowhere.safetensors:0.5')).toThrow(/^--lora nowhere\.safetensors:0\.5: no file nowhere\.safetensors \(/);
  });
});

describe('sd random-weights --model lora-sd15', () => {
  it('makes a LoCon whose every module fits SD 1.5 (attention, feed-forward, ResNets, text encoder)', () => {
    const model = sd15Shapes();
    const shapes = randomLoraShapes(model, 32);
    const ids = [...shapes.keys()].filter((k) => k.endsWith('.alpha')).map((k) => k.slice(0, -'.alpha'.length));
    const tensor = (key: string) => ({ shape: shapes.get(key) as number[], data: new Float32Array(0) });
    const lora: LoraFile = {
      path: 'random', name: 'random', format: 'kohya', sdxl: null, metadata: new Map(),
      modules: ids.map((id) => ({ name: id, id, network: id.startsWith('lora_te_') ? 'te' : 'unet', down: tensor(`${id}.lora_down.weight`), up: tensor(`${id}.lora_up.weight`), scale: 0.5 })),
    };
    const src: TensorSource = {
      path: 'sd15', keys: () => [...model.keys()], has: (k) => model.has(k), info: (k): TensorInfo => ({ dtype: 'F32', shape: model.get(k) as number[] }),
      bytes: () => new Uint8Array(0), float32: () => new Float32Array(0), close: () => undefined,
    };
    expect(bindLoras(src, [{ lora, te: 1, unet: 1 }]).size).toBe(ids.length); // each fits, none twice
    expect(ids.length).toBe(350);
    expect(ids.filter((id) => id.startsWith('lora_te_')).length).toBe(72); // 12 layers x q, k, v, out, fc1, fc2
    expect(ids.filter((id) => /_attn[12]_to_(q|k|v|out_0)$/.test(id)).length).toBe(16 * 8);
    expect(ids.filter((id) => /_resnets_\d+_conv1$/.test(id)).length).toBe(22);
    expect(shapes.get('lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight')).toEqual([32, 320, 3, 3]);
    expect(shapes.get('lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight')).toEqual([320, 32, 1, 1]);
  });
});

describe('per-request LoRAs on a UNet streamed from its host copy (wasm\'s default)', () => {
  it('serves the merged weights from the copy and puts the held ones back byte for byte', () => {
    const base = openWeights(MODEL);
    const log = new LayerLog();
    const unet = UNet.load(log.source(base), config.unet, undefined, { residency: 'streamed' });
    const unetOnly: LoraSpec[] = [{ ...A[0], te: 0 }]; // no text encoder here: its modules at 0 change nothing
    const fresh = UNet.load(withLoraFiles(base, unetOnly), config.unet, undefined, { residency: 'streamed' });
    const loras = new LoraSwitch(MODEL, () => openWeights(MODEL), [], log);
    const x = tf.randomNormal([2, 4, 4, 4]) as tf.Tensor4D;
    const context = tf.randomNormal([2, 77, config.unet.contextDim]) as tf.Tensor3D;
    const eps = (u: UNet) => {
      const y = u.forward(x, [500, 500], { context });
      const values = y.dataSync() as Float32Array;
      y.dispose();
      return values;
    };
    const same = (a: Float32Array, b: Float32Array) => Buffer.from(a.buffer).equals(Buffer.from(b.buffer));
    try {
      const plain = eps(unet); // the host copy is laid out for its layers at the first use
      const held = loras.snapshot();
      const tensors = tf.memory().numTensors;
      expect(() => loras.use(A)).toThrow(/lora_te_.*held by no layer of this model that can load it again/);
      loras.use(unetOnly)();
      const withA = eps(unet);
      expect(same(withA, eps(fresh))).toBe(true);
      expect(same(withA, plain)).toBe(false);
      expect(changed(held, loras.snapshot()).length).toBeGreaterThan(10);
      loras.use([])();
      expect(same(eps(unet), plain)).toBe(true);
      expect(changed(held, loras.snapshot())).toEqual([]);
      expect(tf.memory().numTensors).toBe(tensors);
    } finally {
      tf.dispose([x, context]);
      unet.dispose();
      fresh.dispose();
      base.close();
    }
  });
});
