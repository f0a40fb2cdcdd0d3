/**
 * Parity for the `tokenizer` fixture kind: every case of cases.json through both vocabulary forms
 * (OpenAI's bpe_simple_vocab_16e6.txt.gz and Hugging Face's vocab.json + merges.txt). A case passes when
 * `encode` gives exactly the 77 `ids` and `bpe` exactly the raw `bpe` ids (maxRelError 0, else 1).
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { ClipTokenizer } from '../tokenizer/index.js';
import type { CaseResult, KindRunner } from './types.js';

interface TokenizerCase {
  readonly text: string;
  readonly ids: readonly number[];
  readonly bpe: readonly number[];
}

const KIND = 'tokenizer';

function readCases(dir: string): TokenizerCase[] {
  const json = JSON.parse(readFileSync(join(dir, 'cases.json'), 'utf8')) as { cases?: TokenizerCase[] };
  if (!Array.isArray(json.cases)) throw new Error(`${join(dir, 'cases.json')}: no "cases" array`);
  return json.cases;
}

/** `gz #3 "café naïve…"`: the form, the case index, the start of the text. */
function caseName(form: string, index: number, text: string): string {
  const chars = Array.from(text);
  const head = chars.length > 24 ? `${chars.slice(0, 24).join('')}…` : text;
  return `${form} #${index} ${JSON.stringify(head)}`;
}

/** Where two id lists first differ, or null when they are equal. */
function firstDifference(got: readonly number[], want: readonly number[]): string | null {
  const n = Math.max(got.length, want.length);
  for (let i = 0; i < n; i++) {
    if (got[i] !== want[i]) return `at ${i}: got ${got[i] ?? '(end)'}, expected ${want[i] ?? '(end)'} (lengths ${got.length} / ${want.length})`;
  }
  return null;
}

function checkCase(tok: ClipTokenizer, c: TokenizerCase): string | null {
  try {
    const ids = firstDifference(tok.encode(c.text), c.ids);
    const bpe = firstDifference(tok.bpe(c.text), c.bpe);
    const problems = [ids && `ids ${ids}`, bpe && `bpe ${bpe}`].filter((p) => p !== null);
    return problems.length > 0 ? problems.join('; ') : null;
  } catch (e) {
    return `threw ${e instanceof Error ? e.message : String(e)}`;
  }
}

function load(form: 'gz' | 'hf', dir: string): ClipTokenizer {
  return form === 'gz'
    ? ClipTokenizer.fromBpeGz(join(dir, 'bpe_simple_vocab_16e6.txt.gz'))
    : ClipTokenizer.fromHfFiles(join(dir, 'vocab.json'), join(dir, 'merges.txt'));
}

export const run: KindRunner = async (dir) => {
  const cases = readCases(dir);
  const results: CaseResult[] = [];
  for (const form of ['gz', 'hf'] as const) {
    let tok: ClipTokenizer | null = null;
    let loadError = '';
    try {
      tok = load(form, dir);
    } catch (e) {
      loadError = `could not load the ${form} tokenizer: ${e instanceof Error ? e.message : String(e)}`;
    }
    cases.forEach((c, i) => {
      const problem = tok === null ? loadError : checkCase(tok, c);
      const name = caseName(form, i, c.text);
      results.push(problem === null ? { kind: KIND, name, passed: true, maxRelError: 0 } : { kind: KIND, name, passed: false, maxRelError: 1, detail: problem });
    });
  }
  return results;
};
