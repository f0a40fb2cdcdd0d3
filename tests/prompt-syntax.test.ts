/**
 * A1111 prompt syntax (src/tokenizer/prompt-syntax.ts) and the weighted, chunked encoding built on it
 * (src/pipeline/a1111-prompt.ts): the parser's tricky cases, AND splitting, the 75-token chunking with comma
 * backtracking and BREAK, the emphasis and cond/uncond padding on small tensors, and the prompt-weights fixture
 * (A1111's own outputs on the tiny CLIP of tests/fixtures/clip) through the parity runner, on the cpu backend.
 */
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as tf from '../src/backend/tf.js';
import { initBackend } from '../src/backend/select.js';
import { ClipTextEncoder, clipConfigFromLdm } from '../src/clip/index.js';
import {
  applyEmphasis,
  encodeA1111Multicond,
  encodeA1111Prompt,
  encodeChunks,
  reconcileCondUncond,
  stackConds,
  targetTokenCount,
  tokenizeLine,
} from '../src/pipeline/a1111-prompt.js';
import { runParity } from '../src/parity/runner.js';
import { ClipTokenizer } from '../src/tokenizer/index.js';
import {
  PromptSyntaxError,
  distinctTexts,
  isBreak,
  parsePromptAttention as parse,
  splitMulticond,
  usesPromptEditing,
} from '../src/tokenizer/prompt-syntax.js';
import { SafetensorsFile } from '../src/weights/safetensors.js';

const START = 49406;
const END = 49407;
const COMMA = 267;
const CAT = 2368; // 'cat</w>': one token
const DOG = 1929; // 'dog</w>'

const tokenizer = ClipTokenizer.fromHfFiles('tests/fixtures/tokenizer/vocab.json', 'tests/fixtures/tokenizer/merges.txt');
const words = (word: string, n: number): string => new Array<string>(n).fill(word).join(' ');
/** The text tokens of a chunk: between the start token and the end padding. */
const body = (tokens: readonly number[]): number[] => tokens.slice(1, tokens.indexOf(END));
const values = (t: tf.Tensor): number[] => Array.from(t.dataSync());

describe('parsePromptAttention', () => {
  it('keeps ((a)) = 1.1 * 1.1 apart from (a:1.21): weights are float64 products in A1111 order', () => {
    expect(parse('(a:1.21) ((b))')).toEqual([['a', 1.21], [' ', 1.0], ['b', 1.2100000000000002]]);
    expect(parse('(((three)))')).toEqual([['three', 1.3310000000000004]]);
    expect(parse('[[down]]')).toEqual([['down', 0.8264462809917354]]);
  });

  it('nests round and square brackets, merging neighbours of exactly equal weight', () => {
    expect(parse('(a [b] c)')).toEqual([['a ', 1.1], ['b', 1.0], [' c', 1.1]]);
    expect(parse('(a)(b)')).toEqual([['ab', 1.1]]);
    expect(parse('a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).')).toEqual([
      ['a ', 1.0], ['house', 1.5730000000000004], [' ', 1.1], ['on', 1.0], [' a ', 1.1], ['hill', 0.55],
      [', sun, ', 1.1], ['sky', 1.4641000000000006], ['.', 1.1],
    ]);
  });

  it('reads explicit weights with spaces, signs and bare dots; a colon that ends no weight is text', () => {
    expect(parse('(a:.5) (b:2.) (c:+1.25) (d: -1 )')).toEqual([['a', 0.5], [' ', 1], ['b', 2], [' ', 1], ['c', 1.25], [' ', 1], ['d', -1]]);
    expect(parse('(word:1.2:3)')).toEqual([['word:1.2', 3]]);
    expect(parse('a:b (c:d) e')).toEqual([['a:b ', 1], ['c:d', 1.1], [' e', 1]]);
    expect(() => parse('(a:1.2.3)')).toThrow(PromptSyntaxError); // float() raises in A1111 too
  });

  it('takes escapes literally and drops a lone backslash', () => {
    expect(parse('\\(literal\\) \\[square\\] and back\\\\slash')).toEqual([['(literal) [square] and back\\slash', 1]]);
    expect(parse('\\(word:1.5\\)')).toEqual([['(word:1.5)', 1]]);
    expect(parse('a lone \\ backslash and \\x')).toEqual([['a lone  backslash and x', 1]]);
  });

  it('closes brackets left open at the end and takes a bracket that closes nothing as text', () => {
    expect(parse('(unbalanced')).toEqual([['unbalanced', 1.1]]);
    expect(parse('((a) b')).toEqual([['a', 1.2100000000000002], [' b', 1.1]]);
    expect(parse('unbalanced)')).toEqual([['unbalanced)', 1]]);
    expect(parse('a ] b [ c')).toEqual([['a ] b ', 1], [' c', 1 / 1.1]]);
    expect(parse('(word:1.5')).toEqual([['word:1.5', 1.1]]);
  });

  it('gives [["", 1]] for an empty prompt and keeps whitespace-only text', () => {
    expect(parse('')).toEqual([['', 1]]);
    expect(parse('()[]')).toEqual([['', 1]]);
    expect(parse('   ')).toEqual([['   ', 1]]);
  });

  it('marks BREAK (capitals, whole word, surrounding whitespace dropped) with -1', () => {
    expect(parse('a BREAK b')).toEqual([['a', 1], ['BREAK', -1], ['b', 1]]);
    expect(parse('BREAK')).toEqual([['', 1], ['BREAK', -1], ['', 1]]);
    expect(parse('aBREAKb and a break b')).toEqual([['aBREAKb and a break b', 1]]);
    expect(parse('line one\nBREAK\nline two')).toEqual([['line one', 1], ['BREAK', -1], ['line two', 1]]);
    // Python's \b and \s are Unicode: é is a word character (no break), U+001C is whitespace (dropped)
    expect(parse('caféBREAK')).toEqual([['caféBREAK', 1]]);
    expect(parse('a\x1cBREAK\x1cb')).toEqual([['a', 1], ['BREAK', -1], ['b', 1]]);
  });

  it('multiplies a BREAK inside brackets, which then is the word "break", not a chunk break', () => {
    const parsed = parse('(a BREAK b)');
    expect(parsed).toEqual([['a', 1.1], ['BREAK', -1.1], ['b', 1.1]]);
    expect(parsed.map(isBreak)).toEqual([false, false, false]);
    expect(parse('a BREAK b').map(isBreak)).toEqual([false, true, false]);
  });
});

describe('splitMulticond (AND)', () => {
  it('splits on the word AND and reads a trailing :weight outside brackets', () => {
    expect(splitMulticond('a fern :1.5 AND ink on paper:0.5')).toEqual([{ text: 'a fern', weight: 1.5 }, { text: ' ink on paper', weight: 0.5 }]);
    expect(splitMulticond('a (fern:1.5)')).toEqual([{ text: 'a (fern:1.5)', weight: 1 }]);
    expect(splitMulticond('trailing spaces   ')).toEqual([{ text: 'trailing spaces', weight: 1 }]);
  });

  it('needs AND in capitals as a whole word; equal parts are one text', () => {
    const parts = splitMulticond('ANDROID AND android and AND');
    expect(parts.map((p) => p.text)).toEqual(['ANDROID', ' android and', '']);
    expect(distinctTexts(splitMulticond('a AND b AND a'))).toEqual(['a', ' b', ' a']);
    expect(distinctTexts(splitMulticond('a AND a '))).toEqual(['a', ' a']);
    expect(distinctTexts(splitMulticond('a AND a AND a'))).toEqual(['a', ' a']);
  });
});

describe('usesPromptEditing', () => {
  it("sees A1111's [from:to:when], [to:when] and [a|b] (its doctests)", () => {
    for (const t of ['a [b:3]', 'a [b: 3]', 'a [[[b]]:2]', '[(a:2):3]', 'a [b : c : 1] d', 'a[b:[c:d:2]:1]e', 'a [b:.5] c', '((a][:b:c [d:3]', '[a|(b:1.1)]', '[fe|]male', '[word:1.5]']) {
      expect(usesPromptEditing(t), t).toBe(true);
    }
  });

  it('leaves emphasis, unbalanced brackets and texts the grammar cannot parse alone', () => {
    for (const t of ['a [unbalanced', '[down]', '(a:1.5)', '[a:b:c:5]', '[a: 5 x]', 'a | b [c:3]', '[a:3] \\', 'a fern:1.5']) {
      expect(usesPromptEditing(t), t).toBe(false);
    }
  });
});

describe('tokenizeLine (chunks of 75)', () => {
  it('fits 75 tokens in one chunk and opens a second for the 76th', () => {
    expect(tokenizer.bpe('cat dog ,')).toEqual([CAT, DOG, COMMA]);
    const one = tokenizeLine(tokenizer, words('cat', 75));
    expect(one.chunks.length).toBe(1);
    expect(one.chunks[0].tokens).toEqual([START, ...new Array<number>(75).fill(CAT), END]);
    const two = tokenizeLine(tokenizer, words('cat', 76));
    expect(two.chunks.map((c) => c.tokens.length)).toEqual([77, 77]);
    expect(body(two.chunks[1].tokens)).toEqual([CAT]);
    expect([two.tokenCount, targetTokenCount(two.tokenCount)]).toEqual([76, 150]);
  });

  it('gives the empty prompt one chunk [start, end x 76]', () => {
    const { chunks, tokenCount } = tokenizeLine(tokenizer, '');
    expect(chunks).toEqual([{ tokens: [START, ...new Array<number>(76).fill(END)], multipliers: new Array<number>(77).fill(1) }]);
    expect([tokenCount, targetTokenCount(tokenCount)]).toEqual([0, 75]);
  });

  it('moves the tokens after a near comma into the next chunk, unless backtracking is off or the comma is far', () => {
    const text = `${words('cat', 70)}, ${words('dog', 10)}`; // comma is token 71, the chunk fills at dog 4
    const back = tokenizeLine(tokenizer, text);
    expect(body(back.chunks[0].tokens)).toEqual([...new Array<number>(70).fill(CAT), COMMA]);
    expect(body(back.chunks[1].tokens)).toEqual(new Array<number>(10).fill(DOG));
    expect(back.tokenCount).toBe(85);
    const off = tokenizeLine(tokenizer, text, { commaPaddingBacktrack: 0 });
    expect(body(off.chunks[0].tokens)).toEqual([...new Array<number>(70).fill(CAT), COMMA, DOG, DOG, DOG, DOG]);
    expect(body(off.chunks[1].tokens).length).toBe(6);
    const far = tokenizeLine(tokenizer, `${words('cat', 30)}, ${words('dog', 50)}`); // 75 - 30 > 20
    expect(body(far.chunks[0].tokens).length).toBe(75);
  });

  it('carries the weights of moved tokens, and a comma arriving at a full chunk opens the next', () => {
    const moved = tokenizeLine(tokenizer, `${words('cat', 70)}, (${words('dog', 10)}:1.5)`);
    expect(moved.chunks[1].multipliers.slice(0, 12)).toEqual([1, ...new Array<number>(10).fill(1.5), 1]);
    const atBoundary = tokenizeLine(tokenizer, `${words('cat', 75)}, dog`);
    expect(body(atBoundary.chunks[1].tokens)).toEqual([COMMA, DOG]);
  });

  it('closes a chunk at each BREAK, empty ones too, but adds none for a trailing BREAK', () => {
    expect(tokenizeLine(tokenizer, 'cat BREAK dog').chunks.map((c) => body(c.tokens))).toEqual([[CAT], [DOG]]);
    expect(tokenizeLine(tokenizer, 'BREAK cat BREAK BREAK dog').chunks.map((c) => body(c.tokens))).toEqual([[], [CAT], [], [DOG]]);
    const trailing = tokenizeLine(tokenizer, 'cat BREAK');
    expect([trailing.chunks.length, trailing.tokenCount]).toEqual([1, 75]);
    expect(tokenizeLine(tokenizer, '(cat BREAK dog)').chunks.length).toBe(1); // multiplied: the word 'break'
  });

  it("puts each entry's weight on its tokens; emphasis 'None' does not parse", () => {
    expect(tokenizeLine(tokenizer, 'cat (dog:1.5) [cat]').chunks[0].multipliers.slice(0, 5)).toEqual([1, 1, 1.5, 1 / 1.1, 1]);
    const none = tokenizeLine(tokenizer, '(dog:1.5) BREAK cat', { emphasis: 'None' });
    expect(none.parsed).toEqual([['(dog:1.5) BREAK cat', 1]]);
    expect(none.chunks.length).toBe(1);
    expect(none.chunks[0].multipliers.every((m) => m === 1)).toBe(true);
  });
});

describe("applyEmphasis 'Original'", () => {
  it('rescales the weighted chunk to its mean, and leaves a chunk whose weighted mean is exactly 0 as weighted (not 0/0)', () => {
    const z = tf.tensor3d([[[1, 2], [3, 4]]]);
    const w = tf.tensor2d([[1, 2]]);
    const out = applyEmphasis(z, w, 'Original');
    // weighted [[1, 2], [6, 8]] (mean 4.25) scaled by 2.5 / 4.25
    expect(Array.from(out.dataSync())).toEqual(Array.from(new Float32Array([1, 2, 6, 8].map((v) => Math.fround(v * Math.fround(2.5 / 4.25))))));
    const centred = tf.tensor3d([[[1, -1], [2, -2]]]); // mean exactly 0, as random weights' final LayerNorm makes it
    const kept = applyEmphasis(centred, tf.tensor2d([[1, 1]]), 'Original');
    expect(Array.from(kept.dataSync())).toEqual([1, -1, 2, -2]);
    tf.dispose([z, w, out, centred, kept]);
  });
});

describe('cond/uncond padding and AND stacking (small tensors)', () => {
  beforeAll(async () => {
    await initBackend({ backend: 'cpu', log: null });
  });
  // [1, L, 1] with token i's vector = [base + i]
  const seq = (length: number, base: number): tf.Tensor3D => tf.tensor3d(Array.from({ length }, (_, i) => base + i), [1, length, 1]);

  it("'none' keeps both; 'pad_cond_uncond' appends copies of the empty prompt to the shorter one", () => {
    const [cond, uncond, empty] = [seq(6, 0), seq(2, 100), seq(2, 900)]; // 'chunks' of 2 tokens
    const none = reconcileCondUncond(cond, uncond, 'none');
    expect([none.cond.shape, none.uncond.shape]).toEqual([[1, 6, 1], [1, 2, 1]]);
    const pad = reconcileCondUncond(cond, uncond, 'pad_cond_uncond', empty);
    expect(values(pad.uncond)).toEqual([100, 101, 900, 901, 900, 901]);
    const padCond = reconcileCondUncond(uncond, cond, 'pad_cond_uncond', empty);
    expect(values(padCond.cond)).toEqual([100, 101, 900, 901, 900, 901]);
    expect(() => reconcileCondUncond(cond, uncond, 'pad_cond_uncond')).toThrow(/empty prompt/);
    tf.dispose([cond, uncond, empty, none.cond, none.uncond, pad.cond, pad.uncond, padCond.cond, padCond.uncond]);
  });

  it("'pad_cond_uncond_v0' changes only uncond: last vector repeated up to cond's length, or cut", () => {
    const [cond, short, long] = [seq(4, 0), seq(2, 100), seq(6, 100)];
    expect(values(reconcileCondUncond(cond, short, 'pad_cond_uncond_v0').uncond)).toEqual([100, 101, 101, 101]);
    expect(values(reconcileCondUncond(cond, long, 'pad_cond_uncond_v0').uncond)).toEqual([100, 101, 102, 103]);
    expect(values(reconcileCondUncond(short, cond, 'pad_cond_uncond_v0').cond)).toEqual([100, 101]);
    tf.dispose([cond, short, long]);
  });

  it('stacks parts of different lengths by repeating the last token vector of the shorter ones', () => {
    const [a, b] = [seq(2, 0), seq(4, 10)];
    const stacked = stackConds([a, b]);
    expect(stacked.shape).toEqual([2, 4, 1]);
    expect(values(stacked)).toEqual([0, 1, 1, 1, 10, 11, 12, 13]);
    tf.dispose([a, b, stacked]);
  });
});

describe('encoding on the fixture encoder', () => {
  let weights: SafetensorsFile;
  let clip: ClipTextEncoder;
  beforeAll(async () => {
    await initBackend({ backend: 'cpu', log: null });
    const cfg = clipConfigFromLdm((JSON.parse(readFileSync('tests/fixtures/clip/fixture.json', 'utf8')) as { config: unknown }).config);
    weights = SafetensorsFile.open('tests/fixtures/clip/weights.safetensors');
    clip = ClipTextEncoder.load(weights, cfg);
  });
  afterAll(() => {
    clip.dispose();
    weights.close();
  });

  it('gives [1, 77 * chunks, width], restores each chunk mean, and leaves no tensor behind', () => {
    const before = tf.memory().numTensors;
    const cond = encodeA1111Prompt(tokenizer, clip, `(${words('cat', 40)}:1.4) ${words('dog', 36)}`);
    expect(cond.shape).toEqual([1, 154, 32]);
    cond.dispose();
    const { chunks } = tokenizeLine(tokenizer, `(${words('cat', 40)}:1.4) ${words('dog', 36)}`);
    const chunkMeans = (t: tf.Tensor3D): number[] => [0, 1].map((i) => tf.tidy(() => tf.mean(tf.slice(t, [0, 77 * i, 0], [1, 77, 32])).dataSync()[0]));
    for (const emphasis of ['Original', 'No norm'] as const) {
      const { z, cond: weighted } = encodeChunks(clip, chunks, { clipSkip: 1, emphasis });
      const [zm, cm] = [chunkMeans(z), chunkMeans(weighted)];
      const restored = zm.map((m, i) => Math.abs(cm[i] - m) <= 1e-5 * Math.abs(m));
      expect(restored, emphasis).toEqual(emphasis === 'Original' ? [true, true] : [false, true]); // chunk 2 has no weights
      tf.dispose([z, weighted]);
    }
    const multi = encodeA1111Multicond(tokenizer, clip, `cat AND ${words('dog', 80)} :0.5`);
    expect([multi.cond.shape, multi.weights]).toEqual([[2, 154, 32], [1, 0.5]]);
    multi.cond.dispose();
    expect(tf.memory().numTensors).toBe(before);
  });

  it('matches A1111 on every case of the prompt-weights fixture (tests/fixtures/prompt-weights)', async () => {
    const results = await runParity('tests/fixtures/prompt-weights', { backend: 'cpu' });
    expect(results.length).toBe(65); // 40 parse, 6 multicond, 16 encode, 2 cfg_pad, 1 and_stack
    expect(results.filter((r) => !r.passed)).toEqual([]);
  });
});
