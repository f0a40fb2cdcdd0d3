/**
 * AUTOMATIC1111's text conditioning for SD 1.x: emphasis weights, BREAK and prompts longer than 75 tokens
 * (modules/sd_hijack_clip.py FrozenCLIPEmbedderWithCustomWords, sd_emphasis.py, and the cond/uncond padding of
 * sd_samplers_cfg_denoiser.py; commits in the prompt-weights fixture). A pure function of tokenizer and encoder.
 *
 *   text -> [text, weight][]                                  parsePromptAttention (tokenizer/prompt-syntax.ts)
 *        -> chunks of 75 BPE ids, each id with its weight      tokenizeLine: comma backtracking, BREAK
 *        -> [start, 75 ids end-padded, end] per chunk          ids [k, 77]
 *        -> CLIP after clipSkip, every chunk on its own        z [k, 77, C]
 *        -> z * multipliers, rescaled to z's mean per chunk    emphasis 'Original'
 *        -> the chunks side by side on the token axis          cond [1, 77k, C]
 *
 * A prompt and its negative prompt may end up with different chunk counts. A1111 (by default) leaves them so and
 * runs the UNet on each separately; reconcileCondUncond gives its two optional paddings.
 * AND (composable diffusion) encodes each part on its own and stacks them: encodeA1111Multicond.
 */
import * as tf from '../backend/tf.js';
import type { ClipTextEncoder } from '../clip/index.js';
import { isBreak, parsePromptAttention, splitMulticond, type WeightedText } from '../tokenizer/prompt-syntax.js';
import type { ClipTokenizer } from '../tokenizer/index.js';

/** Text tokens per chunk; with start and end tokens a chunk is the encoder's 77 positions. */
export const CHUNK_LENGTH = 75;
const CHUNK_IDS = CHUNK_LENGTH + 2;

/**
 * A1111's emphasis option: 'Original' (the default) weights and restores the mean, 'No norm' only weights,
 * 'Ignore' parses the brackets away but applies no weights, 'None' does not parse (brackets are text).
 */
export type Emphasis = 'Original' | 'No norm' | 'Ignore' | 'None';

export interface A1111Options {
  /** CLIP_stop_at_last_layers: 1 = the last layer, 2 = the penultimate one ("clip skip 2"), ... */
  readonly clipSkip: number;
  readonly emphasis: Emphasis;
  /** comma_padding_backtrack: how far back (in tokens) a full chunk may be cut after a comma; 0 = never. */
  readonly commaPaddingBacktrack: number;
}

/** A1111's default options. */
export const A1111_DEFAULTS: A1111Options = Object.freeze({ clipSkip: 1, emphasis: 'Original', commaPaddingBacktrack: 20 });

/** 77 ids and their multipliers: start, up to 75 text tokens end-padded (multiplier 1), end. */
export interface PromptChunk {
  readonly tokens: readonly number[];
  readonly multipliers: readonly number[];
}

export interface TokenizedLine {
  /** The parsed [text, weight] entries ([[line, 1]] with emphasis 'None'). */
  readonly parsed: readonly WeightedText[];
  readonly chunks: readonly PromptChunk[];
  /** 75 per chunk closed before the end plus the tokens of the last one (the web UI's counter). */
  readonly tokenCount: number;
}

/** The web UI's "token_count / target" counter: token counts round up to whole chunks, at least one. */
export const targetTokenCount = (tokenCount: number): number => Math.ceil(Math.max(tokenCount, 1) / CHUNK_LENGTH) * CHUNK_LENGTH;

interface SpecialIds {
  readonly start: number;
  readonly end: number; // SD 1.x pads with the end token
  readonly comma: number;
}

function specialIds(tokenizer: ClipTokenizer): SpecialIds {
  const comma = tokenizer.bpe(',');
  if (comma.length !== 1) throw new Error(`a1111 prompt: ',' must be one token, the tokenizer gives [${comma}]`);
  return { start: tokenizer.startId, end: tokenizer.endId, comma: comma[0] };
}

/** One parsed entry's tokens with its weight, or a chunk break. */
interface TokenRun {
  readonly ids: readonly number[];
  readonly weight: number;
  readonly isBreak: boolean;
}

/**
 * tokenize_line's chunking. Tokens fill chunks of 75; a comma remembers its position; a token arriving at a full
 * chunk whose last comma is at most `backtrack` tokens back cuts the chunk after that comma and carries the tokens
 * after it into the next chunk. BREAK closes the chunk even when empty. After the last run the chunk is closed if
 * it holds tokens or no chunk exists yet.
 */
function chunkRuns(runs: readonly TokenRun[], ids: SpecialIds, backtrack: number): { chunks: PromptChunk[]; tokenCount: number } {
  const chunks: PromptChunk[] = [];
  let tokens: number[] = [];
  let mults: number[] = [];
  let lastComma = -1;
  let tokenCount = 0;
  const close = (isLast: boolean): void => {
    tokenCount += isLast ? tokens.length : CHUNK_LENGTH;
    const pad = CHUNK_LENGTH - tokens.length;
    chunks.push({
      tokens: [ids.start, ...tokens, ...new Array<number>(pad).fill(ids.end), ids.end],
      multipliers: [1.0, ...mults, ...new Array<number>(pad).fill(1.0), 1.0],
    });
    tokens = [];
    mults = [];
    lastComma = -1;
  };
  for (const run of runs) {
    if (run.isBreak) {
      close(false);
      continue;
    }
    for (const id of run.ids) {
      if (id === ids.comma) {
        lastComma = tokens.length;
      } else if (backtrack !== 0 && tokens.length === CHUNK_LENGTH && lastComma !== -1 && CHUNK_LENGTH - lastComma <= backtrack) {
        const movedTokens = tokens.splice(lastComma + 1);
        const movedMults = mults.splice(lastComma + 1);
        close(false);
        tokens = movedTokens;
        mults = movedMults;
      }
      if (tokens.length === CHUNK_LENGTH) close(false);
      tokens.push(id);
      mults.push(run.weight);
    }
  }
  if (tokens.length > 0 || chunks.length === 0) close(true);
  return { chunks, tokenCount };
}

/** tokenize_line: parse (unless emphasis is 'None'), BPE each entry's text on its own, chunk. Pure, no tensors. */
export function tokenizeLine(tokenizer: ClipTokenizer, line: string, opts: Partial<A1111Options> = {}): TokenizedLine {
  const { emphasis, commaPaddingBacktrack } = { ...A1111_DEFAULTS, ...opts };
  const parsed = emphasis === 'None' ? [[line, 1.0] as WeightedText] : parsePromptAttention(line);
  const runs = parsed.map((entry) => ({ ids: isBreak(entry) ? [] : tokenizer.bpe(entry[0]), weight: entry[1], isBreak: isBreak(entry) }));
  return { parsed, ...chunkRuns(runs, specialIds(tokenizer), commaPaddingBacktrack) };
}

/**
 * sd_emphasis.py after_transformers, each chunk on its own. z [k, 77, C], multipliers [k, 77] -> [k, 77, C].
 * 'Original' restores the mean because weighting shifts it; A1111 calls that "likely not correct, but it seems to
 * work well to prevent artifacts". Where the weighted mean is exactly 0 A1111's 0/0 would make the whole context
 * NaN (a black image: it happens with random weights, whose final LayerNorm centres every token); the mean is left
 * as it is there.
 */
export function applyEmphasis(z: tf.Tensor3D, multipliers: tf.Tensor2D, emphasis: Emphasis): tf.Tensor3D {
  return tf.tidy(() => {
    if (emphasis === 'Ignore' || emphasis === 'None') return tf.clone(z);
    const weighted = tf.mul(z, tf.expandDims(multipliers, 2)) as tf.Tensor3D;
    if (emphasis === 'No norm') return weighted;
    const originalMean = tf.mean(z, [1, 2], true);
    const newMean = tf.mean(weighted, [1, 2], true);
    const ratio = tf.where(tf.equal(newMean, 0), tf.onesLike(newMean), tf.div(originalMean, newMean));
    return tf.mul(weighted, ratio) as tf.Tensor3D;
  });
}

/**
 * The chunks through the encoder (one batch; each row is its own [1, 77] sequence, so this is A1111's chunk-by-
 * chunk encoding) and the emphasis. Both results [1, 77k, C]: z before the multipliers, cond after. Caller disposes.
 */
export function encodeChunks(
  clip: ClipTextEncoder,
  chunks: readonly PromptChunk[],
  { clipSkip, emphasis }: Pick<A1111Options, 'clipSkip' | 'emphasis'>,
): { z: tf.Tensor3D; cond: tf.Tensor3D } {
  const k = chunks.length;
  const ids = tf.tensor2d(chunks.flatMap((c) => c.tokens), [k, CHUNK_IDS], 'int32');
  const multipliers = tf.tensor2d(chunks.flatMap((c) => c.multipliers), [k, CHUNK_IDS], 'float32');
  const { hidden, penultimate } = clip.forward(ids, { clipSkip });
  const weighted = applyEmphasis(hidden, multipliers, emphasis);
  const width = hidden.shape[2];
  // [k, 77, C] -> [1, 77k, C]
  const z = tf.reshape(hidden, [1, k * CHUNK_IDS, width]) as tf.Tensor3D;
  const cond = tf.reshape(weighted, [1, k * CHUNK_IDS, width]) as tf.Tensor3D;
  tf.dispose([ids, multipliers, hidden, penultimate, weighted]);
  return { z, cond };
}

/** One prompt (no AND splitting) -> cond [1, 77 * chunks, C]. The caller disposes it. */
export function encodeA1111Prompt(tokenizer: ClipTokenizer, clip: ClipTextEncoder, text: string, opts: Partial<A1111Options> = {}): tf.Tensor3D {
  const o = { ...A1111_DEFAULTS, ...opts };
  const { z, cond } = encodeChunks(clip, tokenizeLine(tokenizer, text, o).chunks, o);
  z.dispose();
  return cond;
}

/**
 * prompt_parser.stack_conds: texts of different lengths [1, L_i, C] -> [n, max L_i, C], each shorter one continued
 * by repeating its last token vector. The inputs stay the caller's.
 */
export function stackConds(conds: readonly tf.Tensor3D[]): tf.Tensor3D {
  const length = Math.max(...conds.map((c) => c.shape[1]));
  return tf.tidy(() => tf.concat(conds.map((c) => repeatLastToken(c, length)), 0) as tf.Tensor3D);
}

/** [B, L, C] -> [B, length, C]: the last token vector repeated (length >= L). */
function repeatLastToken(c: tf.Tensor3D, length: number): tf.Tensor3D {
  const [b, l, width] = c.shape;
  if (l === length) return tf.clone(c);
  const last = tf.slice(c, [0, l - 1, 0], [b, 1, width]);
  return tf.concat([c, tf.tile(last, [1, length - l, 1])], 1) as tf.Tensor3D;
}

/**
 * A positive prompt with AND: each part (splitMulticond) encoded on its own (equal texts once), stacked as
 * cond [parts, 77 * max chunks, C]; `weights[i]` is part i's composable-diffusion weight. A1111's combination:
 * denoised = uncond + sum_i weights[i] * cfgScale * (eps(cond[i]) - uncond). Without AND: one part, weight 1.
 */
export function encodeA1111Multicond(
  tokenizer: ClipTokenizer,
  clip: ClipTextEncoder,
  prompt: string,
  opts: Partial<A1111Options> = {},
): { cond: tf.Tensor3D; weights: number[] } {
  const parts = splitMulticond(prompt);
  const byText = new Map<string, tf.Tensor3D>();
  for (const { text } of parts) if (!byText.has(text)) byText.set(text, encodeA1111Prompt(tokenizer, clip, text, opts));
  const cond = stackConds(parts.map((p) => byText.get(p.text) as tf.Tensor3D));
  tf.dispose([...byText.values()]);
  return { cond, weights: parts.map((p) => p.weight) };
}

/**
 * What to do when cond and uncond differ in length (A1111 options): 'none' (the default) keeps both, so the UNet
 * runs on each separately with its own context length; 'pad_cond_uncond' appends copies of the empty prompt's
 * encoding to the shorter one; 'pad_cond_uncond_v0' (the pre-1.6 DDIM behaviour) changes only uncond: its last
 * token vector repeated, or cut, to cond's length. Padding changes the result (the cross-attention sees more keys).
 */
export type CondUncondPadding = 'none' | 'pad_cond_uncond' | 'pad_cond_uncond_v0';

/**
 * cond [B, Lc, C], uncond [B', Lu, C] -> the pair the UNet sees. `emptyCond` [1, 77, C] is the encoding of ''
 * (A1111 computes it once at model load); only 'pad_cond_uncond' needs it. Returns new tensors; inputs untouched.
 */
export function reconcileCondUncond(
  cond: tf.Tensor3D,
  uncond: tf.Tensor3D,
  padding: CondUncondPadding,
  emptyCond?: tf.Tensor3D,
): { cond: tf.Tensor3D; uncond: tf.Tensor3D } {
  return tf.tidy(() => {
    const [lc, lu] = [cond.shape[1], uncond.shape[1]];
    if (padding === 'none' || lc === lu) return { cond: tf.clone(cond), uncond: tf.clone(uncond) };
    if (padding === 'pad_cond_uncond_v0') {
      const width = uncond.shape[2];
      const u = lu < lc ? repeatLastToken(uncond, lc) : (tf.slice(uncond, [0, 0, 0], [uncond.shape[0], lc, width]) as tf.Tensor3D);
      return { cond: tf.clone(cond), uncond: u };
    }
    if (emptyCond === undefined) throw new Error("reconcileCondUncond: 'pad_cond_uncond' needs the empty prompt's encoding");
    return lc < lu ? { cond: padWithEmpty(cond, lu, emptyCond), uncond: tf.clone(uncond) } : { cond: tf.clone(cond), uncond: padWithEmpty(uncond, lc, emptyCond) };
  });
}

/** sd_samplers_cfg_denoiser.pad_cond: [B, L, C] + (length - L) / 77 copies of empty [1, 77, C] -> [B, length, C]. */
function padWithEmpty(c: tf.Tensor3D, length: number, empty: tf.Tensor3D): tf.Tensor3D {
  const repeats = Math.floor((length - c.shape[1]) / empty.shape[1]);
  return tf.concat([c, tf.tile(empty, [c.shape[0], repeats, 1])], 1) as tf.Tensor3D;
}
