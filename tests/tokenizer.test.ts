/**
 * CLIP BPE tokenizer against the reference fixtures (openai/CLIP simple_tokenizer): every case through both
 * vocabulary forms, 77-id truncation and padding, and the errors a missing tokenizer gives.
 */
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ClipTokenizer, TokenizerError, findTokenizer } from '../src/tokenizer/index.js';

const DIR = 'tests/fixtures/tokenizer';
const GZ = join(DIR, 'bpe_simple_vocab_16e6.txt.gz');
const VOCAB = join(DIR, 'vocab.json');
const MERGES = join(DIR, 'merges.txt');

interface Case { text: string; ids: number[]; bpe: number[] }
const CASES = (JSON.parse(readFileSync(join(DIR, 'cases.json'), 'utf8')) as { cases: Case[] }).cases;
const START = 49406;
const END = 49407;

/**
 * Extra reference outputs, made by openai/CLIP simple_tokenizer.py with ftfy 6.3.1 on the same merges file:
 * the cleaning steps the fixture cases do not reach (curly quotes, ligatures, full width, nested entities,
 * a line with '<', combining marks, control characters, line breaks, specials, upper-case contractions).
 */
const CLEANING_CASES: [string, number[]][] = [
  ['\u201cCurly\u201d \u2018quotes\u2019 it\u2019s \u2014 kept \u2013 dashes', [257, 20795, 257, 262, 5808, 262, 585, 568, 2005, 7737, 1224, 925, 2502]],
  ['\ufb01ne \ufb02our \ufb03 \u01c5emal', [3797, 18592, 1021, 328, 67, 129, 122, 908, 566]],
  ['\uff2c\uff2f\uff35\uff24\u3000\uff2e\uff2f\uff29\uff33\uff25\uff33 \uff80\uff70\uff9d', [7464, 31575, 34941, 18584, 367]],
  ['&amp;amp;amp; &quot;q&quot; &#39;s &#x41;&#66; &eacute &EACUTE; &notit; &hellip;', [261, 257, 336, 257, 568, 3937, 4166, 4166, 126, 361, 585, 282, 959]],
  ['line1 &amp;amp; x\nline2 < y &amp;amp; z', [1148, 272, 261, 343, 1148, 273, 283, 344, 261, 345]],
  ['cafe\u0301 A\u030a', [15304, 127, 354]],
  ['\u0001ctrl \u001b[31mred\u001b[0m \u200bzw \ufeffbom \u0093smart\u0094 \u0080', [35602, 331, 736, 9844, 42188, 19469, 257, 4115, 257, 6309]],
  ['tab\there\r\nwin\u2028ls a\u00a0b\u3000c', [14724, 763, 1225, 1268, 320, 321, 322]],
  ['<|startoftext|>hi<|endoftext|>', [49406, 1883, 49407]],
  ["IT'S I'M WE'LL THEY'D YOU'RE", [585, 568, 328, 880, 649, 1342, 889, 1896, 592, 982]],
];

const FORMS: [string, () => ClipTokenizer][] = [
  ['gz', () => ClipTokenizer.fromBpeGz(GZ)],
  ['hf', () => ClipTokenizer.fromHfFiles(VOCAB, MERGES)],
];

describe.each(FORMS)('%s vocabulary', (_form, load) => {
  const tok = load();

  it.each(CASES.map((c, i) => [i, c] as const))('case #%i matches ids and bpe', (_i, c) => {
    expect(tok.encode(c.text)).toEqual(c.ids);
    expect(tok.bpe(c.text)).toEqual(c.bpe);
  });

  it.each(CLEANING_CASES)('cleans %j as CLIP + ftfy do', (text, bpe) => {
    expect(tok.bpe(text)).toEqual(bpe);
  });
});

describe('77-token context', () => {
  const tok = ClipTokenizer.fromBpeGz(GZ);

  it('truncates a long prompt to 75 text tokens between start and end', () => {
    const long = CASES.find((c) => c.bpe.length > 75);
    expect(long).toBeDefined();
    const ids = tok.encode(long!.text);
    expect(tok.contextLength).toBe(77);
    expect(ids).toEqual([START, ...long!.bpe.slice(0, 75), END]);
  });

  it('pads a short prompt with end tokens', () => {
    for (const c of CASES.filter((k) => k.bpe.length < 75)) {
      expect(tok.encode(c.text)).toEqual([START, ...c.bpe, ...new Array<number>(76 - c.bpe.length).fill(END)]);
    }
  });

  it('gives the same ids from a repeated (cached) prompt', () => {
    const text = CASES[0].text;
    expect(tok.bpe(text)).toEqual(tok.bpe(text));
    expect(tok.bpe(`${text} ${text}`)).toEqual([...CASES[0].bpe, ...CASES[0].bpe]);
  });
});

describe('finding and loading the files', () => {
  let tmp = '';
  beforeAll(() => {
    tmp = mkdtempSync(join(tmpdir(), 'sd-tokenizer-'));
  });
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));

  const expectTokenizerError = (f: () => unknown, ...parts: string[]): void => {
    let error: unknown = null;
    try {
      f();
    } catch (e) {
      error = e;
    }
    expect(error).toBeInstanceOf(TokenizerError);
    expect((error as Error).name).toBe('TokenizerError');
    for (const p of parts) expect((error as Error).message).toContain(p);
  };

  it('loads from the folder, the .gz, vocab.json, or a diffusers tokenizer/ sub-folder alike', () => {
    const model = join(tmp, 'model');
    mkdirSync(join(model, 'tokenizer'), { recursive: true });
    copyFileSync(VOCAB, join(model, 'tokenizer', 'vocab.json'));
    copyFileSync(MERGES, join(model, 'tokenizer', 'merges.txt'));
    const c = CASES[5];
    for (const where of [DIR, GZ, VOCAB, model]) expect(ClipTokenizer.fromFile(where).encode(c.text)).toEqual(c.ids);
  });

  it('says where it looked and what to put there when nothing is found', () => {
    const empty = join(tmp, 'empty');
    mkdirSync(empty);
    expectTokenizerError(() => ClipTokenizer.fromFile(empty), empty, 'bpe_simple_vocab_16e6.txt.gz', 'vocab.json + merges.txt', '--tokenizer');
    expectTokenizerError(() => ClipTokenizer.fromFile(join(tmp, 'nope')), join(tmp, 'nope'), 'does not exist');
    expectTokenizerError(() => ClipTokenizer.fromBpeGz(join(tmp, 'nope.gz')), join(tmp, 'nope.gz'), 'no such file');
  });

  it('names the missing half of a vocab.json + merges.txt pair', () => {
    const half = join(tmp, 'half');
    mkdirSync(half);
    copyFileSync(VOCAB, join(half, 'vocab.json'));
    expectTokenizerError(() => ClipTokenizer.fromFile(half), half, 'merges.txt');
  });

  it('refuses a file that is not gzip', () => {
    const bad = join(tmp, 'bad.txt.gz');
    writeFileSync(bad, 'not gzip at all');
    expectTokenizerError(() => ClipTokenizer.fromBpeGz(bad), bad, 'not a gzip file');
  });

  it('findTokenizer returns the first candidate holding one, else lists every candidate', () => {
    const missing = join(tmp, 'missing');
    expect(findTokenizer([missing, DIR, GZ])).toBe(DIR);
    expectTokenizerError(() => findTokenizer([missing, tmp]), missing, tmp, '--tokenizer');
  });
});
