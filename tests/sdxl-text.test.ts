// SDXL's text side against the reference fixtures (tests/fixtures/sdxl, random weights) on the cpu backend: both
// tokenizers, the open_clip names table, both text encoders, the conditioning and force_zeros_for_empty_prompt.
import { readFileSync, readdirSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as tf from '../src/backend/tf.js';
import { initBackend } from '../src/backend/select.js';
import { SDXL_CLIP_G, SDXL_CLIP_L, clipConfigFromLdm, expectedShapes, type ClipConfig } from '../src/clip/index.js';
import { fileName, loadOpenClipText, moduleName, openClipShapes, packedAsModule } from '../src/clip/open-clip.js';
import { SDXL_TEXT_PREFIXES, SdxlTextEncoder, sdxlTextShapes } from '../src/clip/sdxl-text.js';
import { ShapeError } from '../src/nn/errors.js';
import { maxRelError } from '../src/parity/compare.js';
import { PARTS, runPart } from '../src/parity/sdxl.js';
import { ClipTokenizer, OPEN_CLIP_PAD_ID } from '../src/tokenizer/index.js';
import { decodeInt64 } from '../src/weights/dtypes.js';
import { SafetensorsFile } from '../src/weights/safetensors.js';
import type { TensorInfo, TensorSource } from '../src/weights/types.js';

const DIR = 'tests/fixtures/sdxl';
const TE = `${DIR}/text_encoders`;

interface TokenizerCase {
  text: string;
  ids: number[];
  ids_2: number[];
  ids_2_diffusers?: number[];
}
const cases = (JSON.parse(readFileSync(`${DIR}/tokenizer/cases.json`, 'utf8')) as { cases: TokenizerCase[] }).cases;
const fixture = JSON.parse(readFileSync(`${TE}/fixture.json`, 'utf8')) as {
  weights: string;
  config: { text_encoder: unknown; text_encoder_2: unknown };
  prompts: string[];
  tolerance: number;
};
const tol = fixture.tolerance;
const cfgL: ClipConfig = clipConfigFromLdm(fixture.config.text_encoder);
const cfgG: ClipConfig = clipConfigFromLdm(fixture.config.text_encoder_2);
const G = SDXL_TEXT_PREFIXES.clipG;

const tokenizer = ClipTokenizer.fromFile('tests/fixtures/tokenizer');
let weights: SafetensorsFile;
let io: SafetensorsFile;
let text: SdxlTextEncoder;

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: null });
  weights = SafetensorsFile.open(`${TE}/${fixture.weights}`);
  io = SafetensorsFile.open(`${TE}/io.safetensors`);
  text = SdxlTextEncoder.load(weights, tokenizer, { clipL: cfgL, clipG: cfgG });
});

afterAll(() => {
  text.dispose();
  weights.close();
  io.close();
});

/** `src` with some tensors left out or replaced by others of another shape. */
function altered(src: TensorSource, { drop = [], reshape = {} }: { drop?: string[]; reshape?: Record<string, number[]> }): TensorSource {
  const has = (k: string) => src.has(k) && !drop.includes(k);
  return {
    path: src.path,
    keys: () => src.keys().filter(has),
    has,
    info: (k): TensorInfo => (k in reshape ? { dtype: 'F32', shape: reshape[k] } : src.info(k)),
    bytes: (k) => src.bytes(k),
    float32: (k) => src.float32(k),
    close: () => undefined,
  };
}

const int32Ids = (key: string): tf.Tensor2D => tf.tensor2d(Int32Array.from(decodeInt64(io.bytes(key))), io.info(key).shape as [number, number], 'int32');

describe('sdxl tokenizers', () => {
  it('tokenizer 1 pads with <|endoftext|> (as SD 1.x), tokenizer 2 with 0, on every case', () => {
    for (const c of cases) {
      expect(tokenizer.encode(c.text)).toEqual(c.ids);
      expect(tokenizer.encode(c.text, { padId: OPEN_CLIP_PAD_ID })).toEqual(c.ids_2);
    }
  });

  it('only the padding differs: the same start, text tokens and end, then 0s', () => {
    const ids = tokenizer.encode('a lighthouse', { padId: OPEN_CLIP_PAD_ID });
    expect(ids).toHaveLength(77);
    const end = ids.indexOf(tokenizer.endId);
    expect(ids.slice(0, end + 1)).toEqual(tokenizer.encode('a lighthouse').slice(0, end + 1));
    expect(ids.slice(end + 1).every((id) => id === 0)).toBe(true);
    expect(end).toBe(3);
  });

  it("follows open_clip for '!' (BPE-merged: '!!' is one token), not diffusers' lone 0 per '!'", () => {
    const bangs = cases.filter((c) => c.ids_2_diffusers !== undefined);
    expect(bangs.map((c) => c.text)).toEqual(['wow! a lighthouse!! so bright!!!', '!']);
    for (const c of bangs) {
      const ids = tokenizer.encode(c.text, { padId: OPEN_CLIP_PAD_ID });
      expect(ids).toEqual(c.ids_2);
      expect(ids).not.toEqual(c.ids_2_diffusers);
    }
    expect(tokenizer.encode('!', { padId: OPEN_CLIP_PAD_ID }).slice(0, 3)).toEqual([49406, 256, 49407]); // '!' is 256, not 0
  });

  it('a long prompt keeps its first 75 tokens and still ends with <|endoftext|>', () => {
    const long = cases.find((c) => c.text.startsWith('tower0')) as TokenizerCase;
    const ids = tokenizer.encode(long.text, { padId: OPEN_CLIP_PAD_ID });
    expect(ids[76]).toBe(tokenizer.endId);
    expect(ids.includes(0)).toBe(false);
  });
});

describe('the open_clip names table', () => {
  it('reads every key of the checkpoint under each prefix, with its shape (less position_ids, logit_scale)', () => {
    const shapes = sdxlTextShapes({ clipL: cfgL, clipG: cfgG });
    const keys = weights
      .keys()
      .filter((k) => k.startsWith('conditioner.') && !k.endsWith('.position_ids') && !k.endsWith('.logit_scale'))
      .sort();
    expect([...shapes.keys()].sort()).toEqual(keys);
    for (const k of keys) expect(shapes.get(k), k).toEqual(weights.info(k).shape);
    expect(shapes.get(`${G}.transformer.resblocks.0.attn.in_proj_weight`)).toEqual([24, 8]); // q; k; v of width 8
    expect(shapes.get(`${G}.text_projection`)).toEqual([8, 6]); // [width, projection], used as x @ P
  });

  it('renames only nn.MultiheadAttention\'s packed projection, both ways', () => {
    expect(moduleName('m.transformer.resblocks.3.attn.in_proj_weight')).toBe('m.transformer.resblocks.3.attn.in_proj.weight');
    expect(moduleName('m.transformer.resblocks.3.attn.in_proj_bias')).toBe('m.transformer.resblocks.3.attn.in_proj.bias');
    expect(fileName('m.transformer.resblocks.3.attn.in_proj.weight')).toBe('m.transformer.resblocks.3.attn.in_proj_weight');
    for (const k of [`${G}.attn.out_proj.weight`, `${G}.text_projection`, `${G}.positional_embedding`]) expect(moduleName(k)).toBe(k);
    const view = packedAsModule(weights);
    expect(view.has(`${G}.transformer.resblocks.0.attn.in_proj.weight`)).toBe(true);
    expect(view.keys()).toContain(`${G}.transformer.resblocks.2.attn.in_proj.bias`);
    expect(view.keys()).not.toContain(`${G}.transformer.resblocks.2.attn.in_proj_bias`);
  });

  it('the real sizes: ViT-L 123.1M and ViT-bigG 694.7M parameters, context 2048, pooled 1280', () => {
    const count = (m: Map<string, number[]>) => [...m.values()].reduce((n, s) => n + s.reduce((a, b) => a * b, 1), 0);
    expect(count(expectedShapes(SDXL_CLIP_L, SDXL_TEXT_PREFIXES.clipL))).toBe(123_060_480);
    expect(count(openClipShapes(SDXL_CLIP_G, G))).toBe(694_659_840);
    expect(SDXL_CLIP_L.width + SDXL_CLIP_G.width).toBe(2048);
    expect(SDXL_CLIP_G.projectionDim).toBe(1280);
  });

  it('a missing or mis-shaped tensor is named as the file names it', () => {
    const inProj = `${G}.transformer.resblocks.1.attn.in_proj_weight`;
    expect(() => loadOpenClipText(altered(weights, { drop: [inProj] }), cfgG, G)).toThrow(new RegExp(`missing ${inProj.replace(/\./g, '\\.')} \\[24, 8\\]`));
    const proj = `${G}.text_projection`;
    expect(() => loadOpenClipText(altered(weights, { reshape: { [proj]: [6, 8] } }), cfgG, G)).toThrow(ShapeError);
    expect(() => loadOpenClipText(altered(weights, { reshape: { [proj]: [6, 8] } }), cfgG, G)).toThrow(/text_projection: expected \[8, 6\], got \[6, 8\]/);
    expect(() => loadOpenClipText(weights, { ...cfgG, layers: 2 }, G)).toThrow(/unexpected .*resblocks\.2\.attn\.in_proj_bias/);
    const { projectionDim: _, ...unprojected } = cfgG;
    expect(() => SdxlTextEncoder.load(weights, tokenizer, { clipL: cfgL, clipG: unprojected })).toThrow(/unexpected .*text_projection/);
  });
});

describe('sdxl text encoders match the reference', () => {
  it('the parity runner passes every tokenizer and text_encoders case', async () => {
    for (const part of ['tokenizer', 'text_encoders']) {
      const results = await runPart(DIR, part, { backend: 'cpu' });
      expect(results.length).toBeGreaterThan(5);
      for (const r of results) expect(r.passed, `${r.name}: ${r.detail ?? r.maxRelError}`).toBe(true);
    }
  });

  it('the runner has a part runner for every sub-folder, and reports one it lacks as failed "not implemented yet"', async () => {
    expect(readdirSync(DIR).filter((name) => !(name in PARTS))).toEqual([]);
    expect(await runPart(DIR, 'refiner', { backend: 'cpu' })).toEqual([{ kind: 'sdxl', name: 'refiner', passed: false, detail: 'not implemented yet' }]);
  });

  it('context = [penultimate L, penultimate G] (not final-normed), pooled = G\'s text_embeds, per prompt', () => {
    const { context, pooled } = text.encode(fixture.prompts);
    expect(context.shape).toEqual([3, 77, 12]);
    expect(pooled.shape).toEqual([3, 6]);
    const [c, p, wantC, wantP] = [context.dataSync(), pooled.dataSync(), io.float32('context'), io.float32('text_embeds')];
    for (let i = 0; i < 3; i++) {
      expect(maxRelError(c.subarray(i * 77 * 12, (i + 1) * 77 * 12), wantC.subarray(i * 77 * 12, (i + 1) * 77 * 12))).toBeLessThanOrEqual(tol);
      expect(maxRelError(p.subarray(i * 6, (i + 1) * 6), wantP.subarray(i * 6, (i + 1) * 6))).toBeLessThanOrEqual(tol);
    }
    tf.dispose([context, pooled]);
  });

  it('the pad rule matters: G on ids padded with 49407 is off the reference', () => {
    const idsG = int32Ids('input_ids'); // tokenizer 1's ids: padded with 49407
    const out = text.clipG.forward(idsG, { pooled: true });
    expect(maxRelError(out.penultimate.dataSync(), io.float32('text_encoder_2_hidden_states_penultimate'))).toBeGreaterThan(10 * tol);
    tf.dispose([idsG, out.hidden, out.penultimate, out.pooled as tf.Tensor, out.projected as tf.Tensor]);
  });

  it("G's exact GELU matters: quick_gelu is off the reference", () => {
    const quick = loadOpenClipText(weights, { ...cfgG, act: 'quick_gelu' }, G);
    const idsG = int32Ids('input_ids_2');
    const out = quick.forward(idsG);
    expect(maxRelError(out.hidden.dataSync(), io.float32('text_encoder_2_last_hidden_state'))).toBeGreaterThan(10 * tol);
    tf.dispose([idsG, out.hidden, out.penultimate]);
    quick.dispose();
  });

  it("G's attention is causal: a shorter sequence gives the same prefix", () => {
    const idsG = int32Ids('input_ids_2');
    const short = tf.slice(idsG, [0, 0], [3, 12]);
    const a = text.clipG.forward(short);
    const full = text.clipG.forward(idsG);
    const b = tf.slice(full.hidden, [0, 0, 0], [3, 12, 8]);
    expect(maxRelError(a.hidden.dataSync(), b.dataSync())).toBeLessThan(1e-5);
    tf.dispose([idsG, short, a.hidden, a.penultimate, full.hidden, full.penultimate, b]);
  });

  it('leaks no tensors across repeated encodes', () => {
    tf.dispose(Object.values(text.encode(['warm up'])));
    const before = tf.memory().numTensors;
    for (let i = 0; i < 3; i++) tf.dispose(Object.values(text.encode(['a lighthouse', ''])));
    tf.dispose(Object.values(text.encodeNegative(null, 2)));
    expect(tf.memory().numTensors).toBe(before);
  });
});

describe('negative prompts (force_zeros_for_empty_prompt)', () => {
  const pipe = SafetensorsFile.open(`${DIR}/pipeline/io.safetensors`);
  afterAll(() => pipe.close());

  it('none given: context and pooled are all zeros, as the euler_a case', () => {
    const { context, pooled } = text.encodeNegative(null, 2);
    expect(context.shape).toEqual([2, 77, 12]);
    expect(pooled.shape).toEqual([2, 6]);
    expect(Math.max(...context.dataSync().map(Math.abs)) + Math.max(...pooled.dataSync().map(Math.abs))).toBe(0);
    expect(Math.max(...pipe.float32('euler_a_negative_prompt_embeds').map(Math.abs))).toBe(0);
    expect(Math.max(...pipe.float32('euler_a_negative_pooled_prompt_embeds').map(Math.abs))).toBe(0);
    tf.dispose([context, pooled]);
  });

  it('"" given is encoded (the dpmpp_2m_karras case), and so is any other negative prompt (euler)', () => {
    for (const [negative, name] of [['', 'dpmpp_2m_karras'], ['blurry, low quality', 'euler']] as const) {
      const { context, pooled } = text.encodeNegative([negative], 1);
      expect(maxRelError(context.dataSync(), pipe.float32(`${name}_negative_prompt_embeds`))).toBeLessThanOrEqual(tol);
      expect(maxRelError(pooled.dataSync(), pipe.float32(`${name}_negative_pooled_prompt_embeds`))).toBeLessThanOrEqual(tol);
      expect(Math.max(...pooled.dataSync().map(Math.abs))).toBeGreaterThan(0);
      tf.dispose([context, pooled]);
    }
  });

  it('the prompt side matches the pipeline fixture too', () => {
    const pipeline = JSON.parse(readFileSync(`${DIR}/pipeline/fixture.json`, 'utf8')) as { config: { prompt: string } };
    const { context, pooled } = text.encode([pipeline.config.prompt]);
    expect(maxRelError(context.dataSync(), pipe.float32('prompt_embeds'))).toBeLessThanOrEqual(tol);
    expect(maxRelError(pooled.dataSync(), pipe.float32('pooled_prompt_embeds'))).toBeLessThanOrEqual(tol);
    tf.dispose([context, pooled]);
  });

  it('without force_zeros_for_empty_prompt, none given encodes ""', () => {
    const zeros = text.encodeNegative(null, 1, { forceZerosForEmptyPrompt: false });
    const empty = text.encode(['']);
    expect(maxRelError(zeros.context.dataSync(), empty.context.dataSync())).toBe(0);
    expect(maxRelError(zeros.pooled.dataSync(), empty.pooled.dataSync())).toBe(0);
    tf.dispose([zeros.context, zeros.pooled, empty.context, empty.pooled]);
  });

  it('one negative prompt per row', () => {
    expect(() => text.encodeNegative(['a', 'b'], 3)).toThrow(/2 negative prompts for a batch of 3/);
  });
});

describe('SDXL_CLIP_G with the open_clip names loads the real layout (probe only)', () => {
  it('bigG: 32 resblocks, packed q/k/v [3840, 1280], text_projection [1280, 1280]', () => {
    const shapes = openClipShapes(SDXL_CLIP_G, G);
    expect(shapes.get(`${G}.transformer.resblocks.31.attn.in_proj_weight`)).toEqual([3840, 1280]);
    expect(shapes.get(`${G}.transformer.resblocks.31.mlp.c_fc.weight`)).toEqual([5120, 1280]);
    expect(shapes.has(`${G}.transformer.resblocks.32.ln_1.weight`)).toBe(false);
    expect(shapes.get(`${G}.text_projection`)).toEqual([1280, 1280]);
    expect(shapes.get(`${G}.positional_embedding`)).toEqual([77, 1280]);
  });
});
