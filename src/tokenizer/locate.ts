/**
 * Where a tokenizer lives: a `.txt.gz` merges file, a vocab.json / merges.txt pair, or a folder holding
 * either (directly or in a `tokenizer/` sub-folder, the diffusers layout).
 */
import { existsSync, statSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { TokenizerError } from './errors.js';

export const BPE_GZ_NAME = 'bpe_simple_vocab_16e6.txt.gz';

export type TokenizerFiles =
  | { readonly kind: 'bpe-gz'; readonly path: string }
  | { readonly kind: 'hf'; readonly vocabJson: string; readonly mergesTxt: string };

const WHAT_TO_DO = `put ${BPE_GZ_NAME} or vocab.json + merges.txt there, or pass --tokenizer`;

function hfPair(dir: string): TokenizerFiles {
  const vocabJson = join(dir, 'vocab.json');
  const mergesTxt = join(dir, 'merges.txt');
  for (const [have, lack] of [[vocabJson, mergesTxt], [mergesTxt, vocabJson]]) {
    if (!existsSync(lack)) throw new TokenizerError(`tokenizer incomplete in ${dir}: found ${basename(have)} but not ${basename(lack)}; ${WHAT_TO_DO}`);
  }
  return { kind: 'hf', vocabJson, mergesTxt };
}

function locateFile(path: string): TokenizerFiles {
  if (path.endsWith('.gz')) return { kind: 'bpe-gz', path };
  const name = basename(path);
  if (name === 'vocab.json' || name === 'merges.txt') return hfPair(dirname(path));
  throw new TokenizerError(`${path} is not a tokenizer file: expected ${BPE_GZ_NAME} (any .gz), vocab.json or merges.txt`);
}

function locateInDir(dir: string): TokenizerFiles {
  for (const d of [dir, join(dir, 'tokenizer')]) {
    if (existsSync(join(d, BPE_GZ_NAME))) return { kind: 'bpe-gz', path: join(d, BPE_GZ_NAME) };
    if (existsSync(join(d, 'vocab.json')) || existsSync(join(d, 'merges.txt'))) return hfPair(d);
  }
  throw new TokenizerError(`tokenizer not found in ${dir}: ${WHAT_TO_DO}`);
}

/** The tokenizer files at a path (file or folder). Throws TokenizerError naming what is missing. */
export function locateTokenizer(pathOrDir: string): TokenizerFiles {
  if (!existsSync(pathOrDir)) throw new TokenizerError(`tokenizer not found: ${pathOrDir} does not exist; ${WHAT_TO_DO}`);
  return statSync(pathOrDir).isDirectory() ? locateInDir(pathOrDir) : locateFile(pathOrDir);
}

/** The first candidate (file or folder) that holds a tokenizer; else a TokenizerError listing every place tried. */
export function findTokenizer(candidates: readonly string[]): string {
  const tried: string[] = [];
  for (const c of candidates) {
    try {
      locateTokenizer(c);
      return c;
    } catch (e) {
      if (!(e instanceof TokenizerError)) throw e;
      tried.push(c);
    }
  }
  const where = tried.length > 0 ? `looked in ${tried.join(', ')}` : 'no place to look was given';
  throw new TokenizerError(`tokenizer not found (${where}): ${WHAT_TO_DO}`);
}
