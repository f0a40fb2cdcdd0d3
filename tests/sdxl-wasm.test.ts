/**
 * SDXL on wasm (#16, "Memory and speed"): on the fixture's tiny SDXL (per-level transformer depth [0, 1, 2], linear
 * proj_in/out, label_emb; two text encoders; the VAE), in this process's wasm backend: the UNet streams by default
 * and computes what the resident one does, holding no tensors between calls; the text encoders stream (built at each
 * prompt from a host copy) with the same conditioning; three generations in a row leave the live tensors, their
 * bytes and the heap unchanged. Then the heap plan of a full-size SDXL base 1024x1024 generation (wasm-plan.ts):
 * what is resident, what streams, each phase's projected peak against the 4 GiB heap.
 */
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as tf from '../src/backend/tf.js';
import { initBackend } from '../src/backend/select.js';
import { wasmHeapBytes } from '../src/backend/heap.js';
import { SD15_PIPELINE } from '../src/pipeline/config.js';
import { disposeGuided, SdxlConditioner } from '../src/pipeline/conditioning.js';
import { StableDiffusion, SDXL_BASE_PIPELINE, sdxlConfigFromJson } from '../src/pipeline/pipeline.js';
import { StreamedTextConditioner, sdxlTextConditioner } from '../src/pipeline/streamed-text.js';
import { WASM_HEAP_LIMIT, formatHeapPlan, wasmHeapPlan } from '../src/pipeline/wasm-plan.js';
import { ClipTokenizer } from '../src/tokenizer/index.js';
import { UNet } from '../src/unet/index.js';
import { openWeights } from '../src/weights/open.js';
import type { TensorSource } from '../src/weights/types.js';

const PIPELINE = 'tests/fixtures/sdxl/pipeline';
const WEIGHTS = `${PIPELINE}/model-fp16.safetensors`;
const fixture = JSON.parse(readFileSync(`${PIPELINE}/fixture.json`, 'utf8')) as { config: Record<string, unknown> };
const CFG = sdxlConfigFromJson(fixture.config);
const GiB = 2 ** 30;

let src: TensorSource;
let tokenizer: ClipTokenizer;

beforeAll(async () => {
  await initBackend({ backend: 'wasm', threads: 1, log: null });
  src = openWeights(WEIGHTS);
  tokenizer = ClipTokenizer.fromFile('tests/fixtures/tokenizer');
});

afterAll(() => src.close());

const micro = { originalSize: [64, 96], cropTopLeft: [0, 0], targetSize: [64, 96] } as const;
const encodeOptions = { guidance: true, clipSkip: 1, micro, promptSyntax: 'plain', warn: () => undefined } as const;

describe('the streamed path covers SDXL', () => {
  it('UNet (per-level depth, linear projections, label_emb): streamed by default on wasm, equal to resident, no tensors held', async () => {
    const u = CFG.unet;
    expect([u.transformerDepth, u.projection, u.addedEmbeddingDim > 0]).toEqual([[0, 1, 2], 'linear', true]);
    const before = tf.memory().numTensors;
    const streamed = UNet.load(src, u);
    expect(streamed.residency).toBe('streamed');
    expect(tf.memory().numTensors).toBe(before); // nothing on the heap between calls
    const resident = UNet.load(src, u, undefined, { residency: 'resident' });
    const x = tf.randomNormal([2, 8, 12, 4], 0, 1, 'float32', 1) as tf.Tensor4D;
    const context = tf.randomNormal([2, 7, u.contextDim], 0, 1, 'float32', 2) as tf.Tensor3D;
    const added = tf.randomNormal([2, u.addedEmbeddingDim], 0, 1, 'float32', 3) as tf.Tensor2D;
    const live = tf.memory().numTensors;
    const a = streamed.forward(x, [700, 700], { context, added });
    const b = resident.forward(x, [700, 700], { context, added });
    expect(tf.memory().numTensors).toBe(live + 2);
    expect(Array.from(await a.data())).toEqual(Array.from(await b.data()));
    tf.dispose([a, b, x, context, added]);
    resident.dispose();
    streamed.dispose();
    expect(tf.memory().numTensors).toBe(before);
  });

  it('text encoders (ViT-L + bigG): streamed on wasm, the same conditioning as resident, no tensors held', async () => {
    const before = tf.memory().numTensors;
    const streamed = sdxlTextConditioner(src, tokenizer, CFG);
    expect(streamed).toBeInstanceOf(StreamedTextConditioner);
    expect(tf.memory().numTensors).toBe(before);
    const resident = sdxlTextConditioner(src, tokenizer, CFG, 'resident');
    expect(resident).toBeInstanceOf(SdxlConditioner);
    const prompts = { prompt: String(fixture.config.prompt), negative: 'blurry' };
    const live = tf.memory().numTensors;
    const s = streamed.encode(prompts, encodeOptions);
    const r = resident.encode(prompts, encodeOptions);
    expect(Array.from(await s.context.data())).toEqual(Array.from(await r.context.data()));
    expect(Array.from(await (s.added as tf.Tensor).data())).toEqual(Array.from(await (r.added as tf.Tensor).data()));
    disposeGuided(s);
    disposeGuided(r);
    expect(tf.memory().numTensors).toBe(live);
    resident.dispose();
    streamed.dispose();
    expect(tf.memory().numTensors).toBe(before);
  });

  it('three generations in a row leave the live tensors, their bytes and the heap as after the first', async () => {
    const sd = await StableDiffusion.load({ weights: WEIGHTS, config: CFG, tokenizer: 'tests/fixtures/tokenizer' });
    const after: [number, number, number | null][] = [];
    try {
      for (let g = 0; g < 3; g++) {
        await sd.generate({ prompt: 'a lighthouse', negativePrompt: 'blurry', seed: g, steps: 2, width: 96, height: 64 });
        const m = tf.memory();
        after.push([m.numTensors, m.numBytes, wasmHeapBytes()]);
      }
    } finally {
      sd.dispose();
    }
    expect(after[1]).toEqual(after[0]);
    expect(after[2]).toEqual(after[0]);
  });
});

describe('wasm heap plan (wasm-plan.ts)', () => {
  it('SD 1.5 at 512x512: text and VAE resident, the UNet streamed, within the heap', () => {
    const p = wasmHeapPlan(SD15_PIPELINE, 512, 512);
    expect(p.networks.map((n) => [n.name, n.granularity])).toEqual([['text', 'resident'], ['unet', 'layer'], ['vae', 'resident']]);
    expect(p.networks[1].largestUnit).toMatch(/^middle_block/);
    expect(p.fits).toBe(true);
    expect(p.peakBytes).toBeLessThan(3.3 * GiB);
  });

  it('SDXL base at 1024x1024 streamed by whole text side and whole UNet block (middle 1.54 GiB): every phase over the heap', () => {
    const p = wasmHeapPlan(SDXL_BASE_PIPELINE, 1024, 1024, { text: 'model', unet: 'block', vae: 'resident', vaeTile: 0 });
    const [text, unet, vae] = p.networks;
    expect([text.granularity, (text.weightBytes / GiB).toFixed(2), (text.largestUnitBytes / GiB).toFixed(2)]).toEqual(['model', '3.05', '3.05']);
    expect([unet.largestUnit, (unet.largestUnitBytes / GiB).toFixed(2), (unet.weightBytes / GiB).toFixed(2)]).toEqual(['middle_block', '1.54', '9.56']);
    expect([vae.granularity, (vae.weightBytes / GiB).toFixed(2)]).toEqual(['resident', '0.31']);
    for (const ph of p.phases) expect(ph.bytes, `${ph.name}: ${formatHeapPlan(p).join('; ')}`).toBeGreaterThan(WASM_HEAP_LIMIT);
  });

  it('SDXL base at 1024x1024 as the code streams now (text and UNet per transformer layer): text and UNet fit, the VAE decode in one piece does not', () => {
    const p = wasmHeapPlan(SDXL_BASE_PIPELINE, 1024, 1024);
    const [text, unet] = p.networks;
    expect([text.granularity, unet.granularity]).toEqual(['layer', 'layer']);
    expect(text.largestUnit).toMatch(/^conditioner\.embedders\.1 \+ one layer/); // bigG's embeddings and one of its layers
    expect(unet.largestUnit).toMatch(/^middle_block \+ one transformer block/);
    expect(text.largestUnitBytes).toBeLessThan(0.35 * GiB);
    expect(unet.largestUnitBytes).toBeLessThan(0.4 * GiB);
    const phase = (name: string) => p.phases.find((ph) => ph.name === name)?.bytes ?? NaN;
    expect(phase('text encode')).toBeLessThan(2 * GiB);
    expect(phase('UNet step')).toBeLessThan(2.5 * GiB);
    expect(phase('VAE decode')).toBeGreaterThan(WASM_HEAP_LIMIT); // 5.1 KiB of feature maps per output pixel: 5.1 GiB
    expect([p.fits, p.peakPhase]).toEqual([false, 'VAE decode']);
  });

  it('SDXL base at 1024x1024 fits with text and UNet streamed per transformer layer and the VAE decoded in 512x512 tiles', () => {
    const p = wasmHeapPlan(SDXL_BASE_PIPELINE, 1024, 1024, { text: 'layer', unet: 'layer', vae: 'resident', vaeTile: 512 });
    expect(p.networks[0].largestUnitBytes).toBeLessThan(0.35 * GiB); // bigG's token embedding and one layer
    expect(p.networks[1].largestUnitBytes).toBeLessThan(0.4 * GiB);
    expect(p.fits).toBe(true);
    expect(p.peakBytes).toBeLessThan(2.5 * GiB);
  });
});
