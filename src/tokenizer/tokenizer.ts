/**
 * CLIP's tokenizer as Stable Diffusion 1.x uses it: text -> 77 token ids for the text encoder.
 * clean (ftfy-style fixes, HTML unescape, whitespace, lowercase) -> split by CLIP's pre-tokenizer regex ->
 * each piece's UTF-8 bytes in the byte alphabet -> BPE -> ids; then <|startoftext|>, at most 75 text
 * tokens, <|endoftext|>, padded to 77 with <|endoftext|> (49406 / 49407 in CLIP's vocabulary).
 *
 * SDXL's second tokenizer (for OpenCLIP ViT-bigG) is the same with padding id 0 (OPEN_CLIP_PAD_ID).
 */
import { BytePairEncoder } from './bpe.js';
import { toByteSymbols } from './bytes.js';
import { WHITE_SPACE, cleanText } from './clean.js';
import { locateTokenizer } from './locate.js';
import { END_OF_TEXT, START_OF_TEXT, readBpeGz, readHfFiles, type Vocabulary } from './vocab.js';

/**
 * openai/CLIP simple_tokenizer.py `pat`: the specials, English contractions, letter runs, single digits,
 * runs of anything else; whitespace separates and is dropped. (Python `regex` \s spelled out: see clean.ts.)
 */
const PRE_TOKEN_RE = new RegExp(
  `<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^${WHITE_SPACE}\\p{L}\\p{N}]+`,
  'giu',
);

/** Text -> the pieces BPE sees, e.g. "it's a cat" -> ['it', "'s", 'a', 'cat']. */
export function preTokenize(text: string): string[] {
  return Array.from(cleanText(text).matchAll(PRE_TOKEN_RE), (m) => m[0]);
}

/**
 * The padding of `open_clip.tokenize`, which Stability's SDXL code uses for its second text encoder: the ids start
 * as zeros, so everything after <|endoftext|> is 0 (the id of `!`). A `!` in the text is BPE-merged as usual
 * (`!!` is one token). diffusers' `tokenizer_2` pads with 0 too but, taking `!` as its pad token, also turns every
 * `!` of the text into a lone 0 (huggingface/diffusers#4153); we follow open_clip, which SDXL was trained with.
 */
export const OPEN_CLIP_PAD_ID = 0;

export interface EncodeOptions {
  /** The id after <|endoftext|> up to 77: <|endoftext|> itself by default; OPEN_CLIP_PAD_ID for SDXL's tokenizer 2. */
  readonly padId?: number;
}

export class ClipTokenizer {
  /** Sequence length of SD 1.x's text encoder (CLIP ViT-L/14 `max_position_embeddings`). */
  readonly contextLength = 77 as const;
  readonly startId: number;
  readonly endId: number;
  /** Where the vocabulary came from. */
  readonly source: string;
  private readonly bpeEncoder: BytePairEncoder;

  constructor(vocab: Vocabulary) {
    this.bpeEncoder = new BytePairEncoder(vocab.encoder, vocab.merges, [START_OF_TEXT, END_OF_TEXT]);
    this.startId = vocab.encoder.get(START_OF_TEXT) as number; // presence checked by the readers
    this.endId = vocab.encoder.get(END_OF_TEXT) as number;
    this.source = vocab.source;
  }

  /** From a .gz merges file, a folder holding one or vocab.json + merges.txt (or their `tokenizer/` sub-folder). */
  static fromFile(pathOrDir: string): ClipTokenizer {
    const files = locateTokenizer(pathOrDir);
    return files.kind === 'bpe-gz' ? ClipTokenizer.fromBpeGz(files.path) : ClipTokenizer.fromHfFiles(files.vocabJson, files.mergesTxt);
  }

  /** From OpenAI CLIP's `bpe_simple_vocab_16e6.txt.gz`. */
  static fromBpeGz(path: string): ClipTokenizer {
    return new ClipTokenizer(readBpeGz(path));
  }

  /** From a Hugging Face `vocab.json` + `merges.txt` pair. */
  static fromHfFiles(vocabJson: string, mergesTxt: string): ClipTokenizer {
    return new ClipTokenizer(readHfFiles(vocabJson, mergesTxt));
  }

  /** The raw token ids of `text`: no start/end tokens, no padding, no truncation. */
  bpe(text: string): number[] {
    const ids: number[] = [];
    for (const piece of preTokenize(text)) ids.push(...this.bpeEncoder.encode(toByteSymbols(piece)));
    return ids;
  }

  /** The 77 ids the text encoder takes: start, up to 75 text tokens (the rest dropped), end, padding. */
  encode(text: string, { padId = this.endId }: EncodeOptions = {}): number[] {
    const body = this.bpe(text).slice(0, this.contextLength - 2);
    const ids = [this.startId, ...body, this.endId];
    while (ids.length < this.contextLength) ids.push(padId);
    return ids;
  }
}
