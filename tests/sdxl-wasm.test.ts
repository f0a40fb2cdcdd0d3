/**
 * SDXL on wasm (#16, "Memory and speed"): on the fixture's tiny SDXL (per-level transformer depth [0, 1, 2], linear
 * proj_in/out, label_emb; two text encoders; the VAE), in this process's wasm backend: the UNet streams by default
 * and computes what the resident one does, holding no tensors between calls; the text encoders stream (built at each
 * prompt from a host copy) with the same conditioning; three generations in a row leave the live tensors, their
 * bytes and the heap unchanged; the VAE decodes in tiles past 512x512 (blending checked exactly on a local decode).
 * Then the heap plan of a full-size SDXL base 1024x1024 generation (wasm-plan.ts): what is resident, what streams,
 * each phase's projected peak against the 4 GiB heap.
 */
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as tf from '../src/backend/tf.js';
import { initBackend } from '../src/backend/select.js';
import { wasmHeapBytes } from '../src/backend/heap.js';
import { ClipVisionEncoder, clipVisionConfigFromJson } from '../src/clip/vision.js';
import { SD15_PIPELINE } from '../src/pipeline/config.js';
import { disposeGuided, SdxlConditioner } from '../src/pipeline/conditioning.js';
import { StableDiffusion, SDXL_BASE_PIPELINE, sdxlConfigFromJson } from '../src/pipeline/pipeline.js';
import { StreamedTextConditioner, sdxlTextConditioner } from '../src/pipeline/streamed-text.js';
import { WASM_HEAP_LIMIT, formatHeapPlan, wasmHeapPlan } from '../src/pipeline/wasm-plan.js';
import { ClipTokenizer } from '../src/tokenizer/index.js';
import { UNet } from '../src/unet/index.js';
import { Vae } from '../src/vae/index.js';
import { WASM_TILES, decodeTiled, needsTiles, tileStarts } from '../src/vae/tiled.js';
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

describe('the CLIP vision encoder streams on wasm too (ViT-H: 2.5 GB of layers)', () => {
  it('streamed by default, the same outputs as resident, nothing left after dispose', async () => {
    const dir = 'tests/fixtures/ip-adapter/image_encoder';
    const cfg = clipVisionConfigFromJson(JSON.parse(readFileSync(`${dir}/config.json`, 'utf8')));
    const before = tf.memory().numTensors;
    const file = openWeights(`${dir}/model.safetensors`);
    const streamed = ClipVisionEncoder.load(file, cfg);
    const held = tf.memory().numTensors - before; // embeddings, norms and projection only: no layer
    const resident = ClipVisionEncoder.load(file, cfg, 'resident');
    expect(tf.memory().numTensors - before - held).toBeGreaterThan(held + 16 * cfg.layers - 1); // every layer's 16 tensors
    file.close(); // the streamed one reads its host copy
    const pixels = tf.randomNormal([2, cfg.imageSize, cfg.imageSize, 3], 0, 1, 'float32', 7) as tf.Tensor4D;
    const a = streamed.forward(pixels);
    const b = resident.forward(pixels);
    expect(Array.from(await a.imageEmbeds.data())).toEqual(Array.from(await b.imageEmbeds.data()));
    expect(Array.from(await a.penultimate.data())).toEqual(Array.from(await b.penultimate.data()));
    tf.dispose([pixels, ...Object.values(a), ...Object.values(b)]);
    streamed.dispose();
    resident.dispose();
    expect(tf.memory().numTensors).toBe(before);
  });
});

describe('VAE decode in tiles on wasm (vae/tiled.ts)', () => {
  it('tiles only past 512x512 on wasm; tile starts cover the latent with the overlap', () => {
    expect([needsTiles(512 * 512), needsTiles(768 * 768), needsTiles(1024 * 1024)]).toEqual([false, true, true]);
    expect(tileStarts(64, WASM_TILES)).toEqual([0]);
    expect(tileStarts(128, WASM_TILES)).toEqual([0, 48, 64]);
    expect(tileStarts(100, { tile: 64, overlap: 16 })).toEqual([0, 36]);
  });

  it('blends tiles into exactly the whole decode where the decode is local, and is exact with one tile', async () => {
    const z = tf.randomNormal([1, 10, 13, 4], 0, 1, 'float32', 4) as tf.Tensor4D;
    // a pointwise decode (nearest 2x, then per-pixel channel mixing): every tile gives the whole decode's pixels
    const mix = tf.randomNormal([4, 3], 0, 1, 'float32', 6) as tf.Tensor2D;
    const local = (t: tf.Tensor4D) =>
      tf.tidy(() => {
        const [, h, w] = t.shape;
        const up = tf.reshape(tf.image.resizeNearestNeighbor(t, [2 * h, 2 * w]), [-1, 4]) as tf.Tensor2D;
        return tf.reshape(tf.tanh(tf.matMul(up, mix)), [1, 2 * h, 2 * w, 3]) as tf.Tensor4D;
      });
    const whole = local(z);
    const tiled = decodeTiled(z, 2, local, { tile: 4, overlap: 2 });
    expect(tiled.shape).toEqual([1, 20, 26, 3]);
    const [a, b] = [await whole.data(), await tiled.data()];
    expect(Math.max(...a.map((v, i) => Math.abs(v - b[i])))).toBeLessThan(1e-6);
    // the tiny SDXL VAE: one tile is the whole decode, bit for bit; small tiles decode finite values of the same shape
    const vae = Vae.load(src, CFG.vae);
    const lz = tf.randomNormal([1, 8, 12, 4], 0, 1, 'float32', 5) as tf.Tensor4D;
    const ref = vae.decode(lz);
    const one = decodeTiled(lz, vae.factor, (t) => vae.decode(t), { tile: 12, overlap: 2 });
    expect(Array.from(await one.data())).toEqual(Array.from(await ref.data()));
    const four = decodeTiled(lz, vae.factor, (t) => vae.decode(t), { tile: 6, overlap: 2 });
    expect(four.shape).toEqual(ref.shape);
    expect((await four.data()).every((v) => Number.isFinite(v))).toBe(true);
    tf.dispose([z, mix, whole, tiled, lz, ref, one, four]);
    vae.dispose();
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

  it('SDXL base at 1024x1024 as the code runs now (text and UNet streamed per transformer layer, VAE in 512x512 tiles): within the heap', () => {
    const p = wasmHeapPlan(SDXL_BASE_PIPELINE, 1024, 1024);
    const [text, unet] = p.networks;
    expect([text.granularity, unet.granularity]).toEqual(['layer', 'layer']);
    expect(text.largestUnit).toMatch(/^conditioner\.embedders\.1 \+ one layer/); // bigG's embeddings and one of its layers
    expect(unet.largestUnit).toMatch(/^middle_block \+ one transformer block/);
    expect(text.largestUnitBytes).toBeLessThan(0.35 * GiB);
    expect(unet.largestUnitBytes).toBeLessThan(0.4 * GiB);
    for (const ph of p.phases) expect(ph.bytes, `${ph.name}: ${formatHeapPlan(p).join('; ')}`).toBeLessThan(2.5 * GiB);
    expect([p.fits, p.peakPhase]).toEqual([true, 'UNet step']);
    // the VAE decode in one piece would not fit: 5.1 KiB of feature maps per output pixel
    const whole = wasmHeapPlan(SDXL_BASE_PIPELINE, 1024, 1024, { text: 'layer', unet: 'layer', vae: 'resident', vaeTile: 0 });
    expect(whole.phases.find((ph) => ph.name === 'VAE decode')?.bytes).toBeGreaterThan(WASM_HEAP_LIMIT);
    expect(wasmHeapPlan(SD15_PIPELINE, 512, 512).phases.find((ph) => ph.name === 'VAE decode')?.parts['feature maps']).toBeCloseTo(512 * 512 * 5.1 * 1024); // in one piece
  });
});
