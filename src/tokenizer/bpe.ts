/**
 * Byte-pair encoding of one pre-token (Sennrich et al. 2016, as in openai/CLIP simple_tokenizer `bpe`):
 * start from the token's byte symbols with '</w>' glued to the last one, then repeatedly merge every
 * occurrence of the adjacent pair with the lowest merge rank until no ranked pair is left.
 * Results are cached per token: prompts repeat the same words.
 */
import { TokenizerError } from './errors.js';

/** Above this many cached tokens the cache starts over, so a long-running server cannot grow without bound. */
const MAX_CACHE_ENTRIES = 100_000;

const pairKey = (a: string, b: string): string => `${a} ${b}`; // symbols never contain a space

export class BytePairEncoder {
  private readonly ranks = new Map<string, number>();
  private readonly cache = new Map<string, readonly number[]>();

  /**
   * @param encoder symbol -> id; must hold every byte symbol, byte symbol + '</w>' and merge result.
   * @param merges "a b" pairs in rank order (rank = index).
   * @param specials tokens that map to their own id untouched (`<|startoftext|>`, `<|endoftext|>`).
   */
  constructor(
    private readonly encoder: ReadonlyMap<string, number>,
    merges: readonly string[],
    specials: readonly string[],
  ) {
    merges.forEach((merge, rank) => this.ranks.set(merge, rank));
    for (const s of specials) this.cache.set(s, [this.idOf(s)]);
  }

  /** Ids of one pre-token already spelled in the byte alphabet. */
  encode(token: string): readonly number[] {
    const hit = this.cache.get(token);
    if (hit !== undefined) return hit;
    const ids = this.mergeSymbols(token).map((s) => this.idOf(s));
    if (this.cache.size >= MAX_CACHE_ENTRIES) this.cache.clear();
    this.cache.set(token, ids);
    return ids;
  }

  /** The symbols `token` merges into, e.g. 'lowres' -> ['low', 'res</w>']. */
  mergeSymbols(token: string): string[] {
    if (token === '') return [];
    let word = Array.from(token);
    word[word.length - 1] += '</w>';
    while (word.length > 1) {
      const best = this.lowestRankedPair(word);
      if (best === null) break;
      word = mergePair(word, best[0], best[1]);
    }
    return word;
  }

  private lowestRankedPair(word: readonly string[]): readonly [string, string] | null {
    let bestRank = Infinity;
    let best: readonly [string, string] | null = null;
    for (let i = 0; i + 1 < word.length; i++) {
      const rank = this.ranks.get(pairKey(word[i], word[i + 1]));
      if (rank !== undefined && rank < bestRank) {
        bestRank = rank;
        best = [word[i], word[i + 1]];
      }
    }
    return best;
  }

  private idOf(symbol: string): number {
    const id = this.encoder.get(symbol);
    if (id === undefined) throw new TokenizerError(`BPE symbol ${JSON.stringify(symbol)} is not in the vocabulary`);
    return id;
  }
}

/** Every left-to-right, non-overlapping occurrence of (first, second) joined into one symbol. */
function mergePair(word: readonly string[], first: string, second: string): string[] {
  const out: string[] = [];
  for (let i = 0; i < word.length; i++) {
    if (word[i] === first && i + 1 < word.length && word[i + 1] === second) {
      out.push(first + second);
      i++;
    } else {
      out.push(word[i]);
    }
  }
  return out;
}
