/**
 * A1111's prompt syntax on SDXL (pipeline/a1111-sdxl.ts), on the SDXL fixture's tiny text encoders: a plain prompt
 * gives exactly the plain encoding; a weight scales that token's rows of both encoders' states ('No norm') and
 * 'Original' restores each chunk's mean; a prompt past 75 tokens is two chunks side by side with the first
 * chunk's pooled embedding; a negative prompt of another chunk count stays beside the prompt, `added` included.
 */
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as tf from '../src/backend/tf.js';
import { initBackend } from '../src/backend/select.js';
import { clipConfigFromLdm } from '../src/clip/index.js';
import { SdxlTextEncoder, type SdxlTextEmbedding } from '../src/clip/sdxl-text.js';
import { tokenizeLine } from '../src/pipeline/a1111-prompt.js';
import { encodeA1111Sdxl } from '../src/pipeline/a1111-sdxl.js';
import { SdxlConditioner } from '../src/pipeline/conditioning.js';
import { ClipTokenizer, OPEN_CLIP_PAD_ID } from '../src/tokenizer/index.js';
import { SafetensorsFile } from '../src/weights/safetensors.js';

const TE = 'tests/fixtures/sdxl/text_encoders';
const fixture = JSON.parse(readFileSync(`${TE}/fixture.json`, 'utf8')) as { weights: string; config: { text_encoder: unknown; text_encoder_2: unknown }; prompts: string[] };
const tokenizer = ClipTokenizer.fromFile('tests/fixtures/tokenizer');
let weights: SafetensorsFile;
let text: SdxlTextEncoder;

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: null });
  weights = SafetensorsFile.open(`${TE}/${fixture.weights}`);
  text = SdxlTextEncoder.load(weights, tokenizer, { clipL: clipConfigFromLdm(fixture.config.text_encoder), clipG: clipConfigFromLdm(fixture.config.text_encoder_2) });
});

afterAll(() => {
  text.dispose();
  weights.close();
});

const values = async (e: SdxlTextEmbedding) => {
  const out = { context: await e.context.array(), pooled: Array.from(await e.pooled.data()), shape: e.context.shape };
  tf.dispose([e.context, e.pooled]);
  return out;
};

describe('A1111 prompt syntax on SDXL', () => {
  it('a plain prompt gives exactly the plain encoding (context and pooled)', async () => {
    for (const prompt of ['a watercolor painting of a lighthouse at dusk', '', 'wow! a lighthouse!! so bright!!!', 'café naïve façade', "numbers 1234567890 and 3.14159, it's 2nd"]) {
      const a = await values(encodeA1111Sdxl(text, prompt));
      const plain = await values(text.encode([prompt]));
      expect(a).toEqual(plain);
    }
  });

  it("a weight scales that token's rows of both encoders ('No norm'); 'Original' then restores the mean", async () => {
    const plain = await values(text.encode(['a lighthouse at dusk']));
    const weighted = await values(encodeA1111Sdxl(text, 'a (lighthouse:1.5) at dusk', { emphasis: 'No norm' }));
    const lighthouse = 1 + tokenizer.bpe('a').length; // after the start token and "a"
    const n = tokenizer.bpe('lighthouse').length;
    expect(weighted.pooled).toEqual(plain.pooled); // pooled is unweighted
    plain.context[0].forEach((row, i) => {
      const scale = i >= lighthouse && i < lighthouse + n ? 1.5 : 1;
      expect(weighted.context[0][i]).toEqual(row.map((v) => Math.fround(v * scale)));
    });
    const original = encodeA1111Sdxl(text, 'a (lighthouse:1.5) at dusk');
    const wl = text.clipL.cfg.width;
    const meanOf = (t: tf.Tensor3D, from: number, size: number) => tf.tidy(() => tf.mean(tf.slice(t, [0, 0, from], [-1, -1, size])).dataSync()[0]);
    const ref = tf.tensor3d(plain.context);
    for (const [from, size] of [[0, wl], [wl, text.clipG.cfg.width]]) expect(meanOf(original.context, from, size)).toBeCloseTo(meanOf(ref, from, size), 5);
    tf.dispose([original.context, original.pooled, ref]);
  });

  it("a prompt past 75 tokens: its chunks side by side, the first chunk's pooled embedding", async () => {
    const long = fixture.prompts[2];
    const { chunks } = tokenizeLine(tokenizer, long);
    expect(chunks.length).toBe(2);
    const got = await values(encodeA1111Sdxl(text, long));
    expect(got.shape).toEqual([1, 154, text.contextWidth]);
    const end = tokenizer.endId;
    for (const [i, chunk] of chunks.entries()) {
      const idsL = tf.tensor2d([chunk.tokens as number[]], [1, 77], 'int32');
      const idsG = tf.tensor2d([chunk.tokens.map((id, j) => (j > chunk.tokens.indexOf(end) ? OPEN_CLIP_PAD_ID : id))], [1, 77], 'int32');
      const alone = await values(text.encodeIds(idsL, idsG));
      tf.dispose([idsL, idsG]);
      const rows = got.context[0].slice(77 * i, 77 * (i + 1));
      rows.forEach((row, r) => row.forEach((v, c) => expect(Math.abs(v - alone.context[0][r][c])).toBeLessThan(1e-5 * (1 + Math.abs(v)))));
      if (i === 0) alone.pooled.forEach((v, c) => expect(Math.abs(got.pooled[c] - v)).toBeLessThan(1e-5 * (1 + Math.abs(v))));
    }
  });

  it('a negative prompt of another chunk count stays beside the prompt, each with its added embedding', () => {
    const conditioner = new SdxlConditioner(text, 8);
    const micro = { originalSize: [64, 96], cropTopLeft: [0, 0], targetSize: [64, 96] } as const;
    const before = tf.memory().numTensors;
    const c = conditioner.encode({ prompt: fixture.prompts[2], negative: 'blurry' }, { guidance: true, clipSkip: 1, micro, promptSyntax: 'a1111' });
    expect(c.context.shape).toEqual([1, 154, text.contextWidth]);
    expect(c.uncond?.context.shape).toEqual([1, 77, text.contextWidth]);
    expect(c.added?.shape).toEqual([1, text.pooledWidth + 6 * 8]);
    expect(c.uncond?.added?.shape).toEqual([1, text.pooledWidth + 6 * 8]);
    tf.dispose([c.context, c.added as tf.Tensor, c.uncond?.context as tf.Tensor, c.uncond?.added as tf.Tensor]);
    const same = conditioner.encode({ prompt: 'a lighthouse', negative: null }, { guidance: true, clipSkip: 1, micro, promptSyntax: 'a1111' });
    expect(same.context.shape).toEqual([2, 77, text.contextWidth]);
    expect(same.uncond).toBeUndefined();
    const negative = tf.slice(same.context, [0, 0, 0], [1, -1, -1]);
    expect(Array.from(negative.dataSync()).every((v) => v === 0)).toBe(true); // no negative: zeros
    negative.dispose();
    tf.dispose([same.context, same.added as tf.Tensor]);
    expect(tf.memory().numTensors).toBe(before);
  });
});
