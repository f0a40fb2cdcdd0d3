/**
 * AUTOMATIC1111's prompt syntax for emphasis and composition (modules/prompt_parser.py, commit in the
 * prompt-weights fixture), as plain text -> plain data; no tensors.
 *
 *   parsePromptAttention  "a (fern:1.3), [blurry] BREAK ink" -> [["a ", 1], ["fern", 1.3], [", ", 1],
 *                         ["blurry", 1/1.1], ["", 1], ["BREAK", -1], ["ink", 1]]      (parse_prompt_attention)
 *   splitMulticond        "a fern :1.5 AND ink" -> [{text: "a fern", weight: 1.5}, {text: " ink", weight: 1}]
 *                         (get_multicond_prompt_list: composable-diffusion parts, each with a CFG weight)
 *   usesPromptEditing     whether A1111 would rewrite the text per sampling step ([a:b:N], [a:N], [a|b]); that
 *                         syntax is detected only, never applied
 *
 * Weights are float64 products taken in A1111's order, so ((a)) is 1.1 * 1.1 = 1.2100000000000002 and stays
 * apart from (a:1.21). Python's regex classes are spelled out: \s is str.isspace(), \b a boundary between
 * [\p{L}\p{N}_] and anything else. One known difference: Python's \d also takes non-ASCII decimal digits
 * ("(a:١.٥)" weighs 1.5 there); here only 0-9 are digits.
 */
import { WHITE_SPACE } from './clean.js';

/** A piece of prompt text and the emphasis multiplier of its tokens; ["BREAK", -1] marks a chunk break. */
export type WeightedText = [text: string, weight: number];

/** One AND-separated part of a prompt and its composable-diffusion weight (a CFG scale factor, not an emphasis). */
export interface MulticondPart {
  readonly text: string;
  readonly weight: number;
}

export class PromptSyntaxError extends Error {
  override name = 'PromptSyntaxError';
}

/** Python str.isspace(): Unicode White_Space plus the separators U+001C..U+001F. */
const SPACE = `[${WHITE_SPACE}\\x1c-\\x1f]`;
/** Python's \w for str patterns: alphanumerics (str.isalnum) and '_'. */
const WORD = '[\\p{L}\\p{N}_]';
const wholeWord = (w: string): string => `(?<!${WORD})${w}(?!${WORD})`;

/**
 * re_attention: escapes \( \) \[ \] \\, a lone \, ( and [, ":weight)" (group 1), ) and ], a run of anything
 * else, a single ':'. Every character is matched by one of these, so the scan never skips text.
 */
const ATTENTION_RE = new RegExp(
  `\\\\\\(|\\\\\\)|\\\\\\[|\\\\\\]|\\\\\\\\|\\\\|\\(|\\[|:${SPACE}*([+-]?[.0-9]+)${SPACE}*\\)|\\)|\\]|[^\\\\()[\\]:]+|:`,
  'gu',
);
/** re_break: BREAK in capitals as a whole word, with the whitespace around it. */
const BREAK_RE = new RegExp(`${SPACE}*${wholeWord('BREAK')}${SPACE}*`, 'u');
/** re_AND and re_weight of get_multicond_prompt_list. */
const AND_RE = new RegExp(wholeWord('AND'), 'u');
const PART_WEIGHT_RE = new RegExp(`^([\\s\\S]*?)(?:${SPACE}*:${SPACE}*([-+]?(?:[0-9]+\\.?|[0-9]*\\.[0-9]+)))?${SPACE}*$`, 'u');

const ROUND_MULTIPLIER = 1.1;
const SQUARE_MULTIPLIER = 1 / 1.1;

/** The marker parsePromptAttention leaves where a BREAK was; a multiplied one (inside brackets) is just text. */
export const isBreak = ([text, weight]: readonly [string, number]): boolean => text === 'BREAK' && weight === -1;

/** Python float() of the [+-]?[.0-9]+ that re_attention captured; "1.2.3" or "." raise there and here. */
function pythonFloat(s: string): number {
  const v = Number(s);
  if (Number.isNaN(v)) throw new PromptSyntaxError(`prompt: could not convert emphasis weight "${s}" to a number`);
  return v;
}

/** Literal text: split at each BREAK, every piece (empty ones too) with weight 1 and ["BREAK", -1] between. */
function appendText(res: WeightedText[], text: string): void {
  text.split(BREAK_RE).forEach((piece, i) => {
    if (i > 0) res.push(['BREAK', -1]);
    res.push([piece, 1.0]);
  });
}

function multiplyFrom(res: WeightedText[], start: number, multiplier: number): void {
  for (let p = start; p < res.length; p++) res[p][1] *= multiplier;
}

/** Neighbours whose weights are exactly equal (float64 ==) become one entry. */
function mergeEqualWeights(res: WeightedText[]): WeightedText[] {
  const out: WeightedText[] = [];
  for (const [text, weight] of res) {
    const last = out[out.length - 1];
    if (last !== undefined && last[1] === weight) last[0] += text;
    else out.push([text, weight]);
  }
  return out;
}

/**
 * parse_prompt_attention: (x) multiplies by 1.1, [x] by 1/1.1, (x:w) by w, \( \) \[ \] \\ are literal, a bracket
 * that closes nothing is literal, brackets still open at the end apply to the rest (round ones first, in the
 * order they opened). Throws PromptSyntaxError where A1111's float() would raise ("(a:1.2.3)").
 */
export function parsePromptAttention(text: string): WeightedText[] {
  const res: WeightedText[] = [];
  const round: number[] = [];
  const square: number[] = [];
  for (const m of text.matchAll(ATTENTION_RE)) {
    const [token, weight] = m;
    if (token.startsWith('\\')) res.push([token.slice(1), 1.0]);
    else if (token === '(') round.push(res.length);
    else if (token === '[') square.push(res.length);
    else if (weight !== undefined && round.length > 0) multiplyFrom(res, round.pop() as number, pythonFloat(weight));
    else if (token === ')' && round.length > 0) multiplyFrom(res, round.pop() as number, ROUND_MULTIPLIER);
    else if (token === ']' && square.length > 0) multiplyFrom(res, square.pop() as number, SQUARE_MULTIPLIER);
    else appendText(res, token);
  }
  for (const start of round) multiplyFrom(res, start, ROUND_MULTIPLIER);
  for (const start of square) multiplyFrom(res, start, SQUARE_MULTIPLIER);
  if (res.length === 0) res.push(['', 1.0]);
  return mergeEqualWeights(res);
}

/**
 * get_multicond_prompt_list for one prompt: split on the word AND; each part loses its trailing whitespace, and
 * a trailing ":number" (outside brackets) becomes its weight: "a fern:1.5" is the text "a fern" at weight 1.5.
 * Only the positive prompt is split; the negative prompt goes to the encoder whole.
 */
export function splitMulticond(prompt: string): MulticondPart[] {
  return prompt.split(AND_RE).map((sub) => {
    const m = PART_WEIGHT_RE.exec(sub);
    if (m === null) return { text: sub, weight: 1.0 }; // cannot happen: the pattern matches every string
    return { text: m[1], weight: m[2] === undefined ? 1.0 : Number(m[2]) };
  });
}

/** A1111's prompt_flat_list: the distinct part texts in first-seen order (each is encoded once). */
export function distinctTexts(parts: readonly MulticondPart[]): string[] {
  return [...new Set(parts.map((p) => p.text))];
}

/** lark's SIGNED_NUMBER, with the optional whitespace the `scheduled` rule allows around it. */
const SCHEDULE_WHEN_RE = /^\s*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*$/;

/** The parts of a [...] group's content split at its own ':' and '|' (not those inside nested brackets). */
function topLevelParts(content: string): { colonParts: number; bars: number; last: string } | null {
  let depth = 0;
  let colonParts = 1;
  let bars = 0;
  let lastStart = 0;
  for (let i = 0; i < content.length; i++) {
    const c = content[i];
    if (c === '\\') i++;
    else if (c === '(' || c === '[') depth++;
    else if (c === ')' || c === ']') depth--;
    else if (depth === 0 && (c === ':' || c === '|')) {
      if (c === ':') colonParts++;
      else bars++;
      lastStart = i + 1;
    }
    if (depth < 0) return null;
  }
  return depth === 0 ? { colonParts, bars, last: content.slice(lastStart) } : null;
}

/** The index of the ']' closing the '[' at `open`, brackets of both kinds nested, escapes skipped; -1 if none. */
function closingBracket(text: string, open: number): number {
  let depth = 0;
  for (let i = open; i < text.length; i++) {
    const c = text[i];
    if (c === '\\') i++;
    else if (c === '(' || c === '[') depth++;
    else if (c === ')' || c === ']') {
      depth--;
      if (depth === 0) return c === ']' ? i : -1;
    }
  }
  return -1;
}

/**
 * Whether A1111's schedule grammar would see prompt editing in `text`: a [from:to:when] or [to:when] group
 * (when a number), or an alternation [a|b|...]. A1111 then encodes a different text at different sampling steps;
 * this project does not, so a caller can warn that the text is used as written. A text the grammar cannot parse
 * (a '|' outside any [..|..], a backslash escaping nothing) reaches the encoder unchanged in A1111 too.
 */
export function usesPromptEditing(text: string): boolean {
  if (/\\(?:\n|$)/.test(text)) return false;
  let editing = false;
  let alternationBars = 0;
  for (let i = 0; i < text.length; i++) {
    if (text[i] === '\\') i++;
    else if (text[i] === '[') {
      const close = closingBracket(text, i);
      const parts = close < 0 ? null : topLevelParts(text.slice(i + 1, close));
      if (parts === null) continue;
      const scheduled = parts.bars === 0 && parts.colonParts >= 2 && parts.colonParts <= 3 && SCHEDULE_WHEN_RE.test(parts.last);
      const alternate = parts.bars > 0 && parts.colonParts === 1;
      if (alternate) alternationBars += parts.bars;
      editing ||= scheduled || alternate;
    }
  }
  const bars = (text.replace(/\\[\s\S]/g, '').match(/\|/g) ?? []).length;
  return editing && bars === alternationBars;
}
