/**
 * The CLIP vocabulary (49,408 symbols) and merge ranks, read from either form it ships in:
 * - OpenAI's `bpe_simple_vocab_16e6.txt.gz`: a header line, then merges "a b" one a line; the vocabulary is
 *   derived: 256 byte symbols, the same + '</w>', one symbol per merge (the first 48,894), then the specials;
 * - Hugging Face's `vocab.json` (symbol -> id) + `merges.txt` ("#version" header, then the same merges).
 * Both are checked for what the BPE relies on: every byte symbol and merge result has an id, specials present.
 */
import { readFileSync } from 'node:fs';
import { constants as zlibConstants, gunzipSync } from 'node:zlib';
import { BYTE_SYMBOLS } from './bytes.js';
import { TokenizerError } from './errors.js';

export const START_OF_TEXT = '<|startoftext|>';
export const END_OF_TEXT = '<|endoftext|>';
/** CLIP's vocabulary is 49,152 BPE symbols + 256 byte symbols; 49152 - 256 - 2 merges (simple_tokenizer.py). */
export const CLIP_MERGE_COUNT = 49152 - 256 - 2;

export interface Vocabulary {
  readonly encoder: ReadonlyMap<string, number>;
  /** "a b" pairs in rank order (rank = index). */
  readonly merges: readonly string[];
  /** Where it was read from, for messages. */
  readonly source: string;
}

const HOW_TO_GET = 'use the files of openai/CLIP (bpe_simple_vocab_16e6.txt.gz) or of an SD 1.x tokenizer/ folder (vocab.json + merges.txt)';

function readBytes(path: string, what: string): Buffer {
  try {
    return readFileSync(path);
  } catch (e) {
    const reason = (e as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : String(e);
    throw new TokenizerError(`${what} ${path}: ${reason}; ${HOW_TO_GET}, or pass --tokenizer`);
  }
}

const MERGE_RE = /^\S+ \S+$/;

/** Merge lines after the header, as "a b" (the rank-table key); at most CLIP_MERGE_COUNT, as CLIP and HF slice. */
function parseMerges(lines: readonly string[], path: string): string[] {
  const body = lines.slice(1, 1 + CLIP_MERGE_COUNT);
  if (body.length < CLIP_MERGE_COUNT) {
    throw new TokenizerError(`${path}: ${body.length} merges, expected ${CLIP_MERGE_COUNT} (CLIP's vocabulary); ${HOW_TO_GET}`);
  }
  return body.map((line, i) => {
    const merge = MERGE_RE.test(line) ? line : line.trim().split(/\s+/).join(' '); // '\r' of a CRLF file, extra blanks
    if (!MERGE_RE.test(merge)) throw new TokenizerError(`${path} line ${i + 2}: expected a merge "a b", got ${JSON.stringify(line)}`);
    return merge;
  });
}
/** The symbol a merge "a b" makes: "ab". */
export const mergedSymbol = (merge: string): string => merge.replace(' ', '');

/**
 * The first `lineCount` lines of a gzip text file. CLIP's file holds 262k lines of which the vocabulary uses
 * the first 48,895 (the first sixth of the compressed bytes), so a prefix is inflated first, the whole if short.
 */
function gunzipLines(gz: Buffer, lineCount: number, path: string): string[] {
  try {
    for (let n = Math.min(gz.length, 256 * 1024); n < gz.length; n *= 2) {
      const head = gunzipSync(gz.subarray(0, n), { finishFlush: zlibConstants.Z_SYNC_FLUSH }).toString('utf8');
      const lines = head.split('\n', lineCount + 1);
      if (lines.length > lineCount) return lines.slice(0, lineCount); // the last piece may be cut mid-line
    }
    return gunzipSync(gz).toString('utf8').split('\n', lineCount);
  } catch (e) {
    throw new TokenizerError(`${path}: not a gzip file (${e instanceof Error ? e.message : String(e)}); ${HOW_TO_GET}`);
  }
}

/** OpenAI CLIP's gzipped merges list; the vocabulary is derived from it. */
export function readBpeGz(path: string): Vocabulary {
  const gz = readBytes(path, 'tokenizer merges file');
  const merges = parseMerges(gunzipLines(gz, CLIP_MERGE_COUNT + 1, path), path);
  const symbols = [...BYTE_SYMBOLS, ...BYTE_SYMBOLS.map((s) => `${s}</w>`), ...merges.map(mergedSymbol), START_OF_TEXT, END_OF_TEXT];
  const encoder = new Map<string, number>();
  symbols.forEach((s, id) => encoder.set(s, id)); // a repeated symbol keeps its last id, like dict(zip(...))
  return { encoder, merges, source: path }; // complete by construction
}

function parseVocabJson(path: string): Map<string, number> {
  let json: unknown;
  try {
    json = JSON.parse(readBytes(path, 'tokenizer vocabulary').toString('utf8'));
  } catch (e) {
    if (e instanceof TokenizerError) throw e;
    throw new TokenizerError(`${path}: not valid JSON (${e instanceof Error ? e.message : String(e)}); expected {"symbol": id, ...}`);
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json)) {
    throw new TokenizerError(`${path}: expected a JSON object {"symbol": id, ...}`);
  }
  const encoder = new Map<string, number>();
  for (const [symbol, id] of Object.entries(json)) {
    if (!Number.isInteger(id) || (id as number) < 0) throw new TokenizerError(`${path}: id of ${JSON.stringify(symbol)} is ${JSON.stringify(id)}, expected an integer >= 0`);
    encoder.set(symbol, id as number);
  }
  return encoder;
}

/** A Hugging Face tokenizer's vocab.json + merges.txt (the `tokenizer/` folder next to SD weights). */
export function readHfFiles(vocabJson: string, mergesTxt: string): Vocabulary {
  const encoder = parseVocabJson(vocabJson);
  const lines = readBytes(mergesTxt, 'tokenizer merges file').toString('utf8').trim().split('\n');
  if (!lines[0]?.startsWith('#')) lines.unshift('#version: 0.2'); // a merges.txt without its header line
  const merges = parseMerges(lines, mergesTxt);
  return checked({ encoder, merges, source: `${vocabJson} + ${mergesTxt}` });
}

/** Every symbol the BPE can produce must have an id, or encoding would fail mid-prompt. */
function checked(v: Vocabulary): Vocabulary {
  const need = [START_OF_TEXT, END_OF_TEXT, ...BYTE_SYMBOLS, ...BYTE_SYMBOLS.map((s) => `${s}</w>`)];
  const missing = need.find((s) => !v.encoder.has(s)) ?? v.merges.map(mergedSymbol).find((s) => !v.encoder.has(s));
  if (missing !== undefined) {
    throw new TokenizerError(`${v.source}: symbol ${JSON.stringify(missing)} has no id; the vocabulary and merges do not belong together (${HOW_TO_GET})`);
  }
  return v;
}
