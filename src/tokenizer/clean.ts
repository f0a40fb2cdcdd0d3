/**
 * Text cleaning before BPE, as OpenAI CLIP's simple_tokenizer does it:
 *   whitespace_clean(basic_clean(text)).lower(), basic_clean = ftfy.fix_text, html.unescape twice, strip.
 * `ftfyFixText` is ftfy 6's fix_text with its default config minus the mojibake detector (`fix_encoding`,
 * which re-decodes text like 'cafÃ©' -> 'café' by a statistical badness score): HTML entities (only when the
 * text has no '<'), C1 controls as Windows-1252, Latin ligatures, full/half-width forms, curly quotes made
 * straight (dashes are kept), line breaks, lone surrogates, terminal escapes, control characters, NFC.
 */
import { cp1252C1, ftfyUnescapeHtml, htmlUnescape } from './html.js';

/** Python `regex` \s: the Unicode White_Space property (unlike JS \s it has U+0085 and lacks U+FEFF). */
export const WHITE_SPACE = '\\t\\n\\v\\f\\r \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000';
const WHITESPACE_RUN_RE = new RegExp(`[${WHITE_SPACE}]+`, 'g');
/** Python str.strip(): str.isspace(), which adds the separators U+001C..U+001F. */
const STRIP_RE = new RegExp(`^[${WHITE_SPACE}\\x1c-\\x1f]+|[${WHITE_SPACE}\\x1c-\\x1f]+$`, 'g');

const C1_CONTROL_RE = /[\x80-\x9f]/g;
// eslint-disable-next-line no-control-regex -- ftfy strips ESC [ ... m terminal colour codes
const ANSI_ESCAPE_RE = /\x1b\[((?:\d|;)*)([a-zA-Z])/g;
const SINGLE_QUOTE_RE = /[\u02bc\u2018-\u201b]/g;
const DOUBLE_QUOTE_RE = /[\u201c-\u201f]/g;
const LONE_SURROGATE_RE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g;
// eslint-disable-next-line no-control-regex -- ftfy CONTROL_CHARS: removing them is the point
const CONTROL_CHARS_RE = /[\x00-\x08\x0b\x0e-\x1f\x7f\u206a-\u206f\ufeff\ufff9-\ufffc]/g;

/** ftfy LIGATURES: Latin typographic ligatures and legacy digraphs, spelled out. */
const LIGATURES: Readonly<Record<string, string>> = {
  'Ĳ': 'IJ', 'ĳ': 'ij', 'ŉ': 'ʼn', 'Ǳ': 'DZ', 'ǲ': 'Dz', 'ǳ': 'dz', 'Ǆ': 'DŽ', 'ǅ': 'Dž', 'ǆ': 'dž',
  'Ǉ': 'LJ', 'ǈ': 'Lj', 'ǉ': 'lj', 'Ǌ': 'NJ', 'ǋ': 'Nj', 'ǌ': 'nj',
  'ﬀ': 'ff', 'ﬁ': 'fi', 'ﬂ': 'fl', 'ﬃ': 'ffi', 'ﬄ': 'ffl', 'ﬅ': 'ſt', 'ﬆ': 'st',
};
const LIGATURE_RE = new RegExp(`[${Object.keys(LIGATURES).join('')}]`, 'g');

/** ftfy WIDTH_MAP: U+3000 -> ' ', and each U+FF01..U+FFEF whose NFKC form differs -> that form. */
function buildWidthMap(): ReadonlyMap<string, string> {
  const map = new Map<string, string>([['\u3000', ' ']]);
  for (let cp = 0xff01; cp < 0xfff0; cp++) {
    const ch = String.fromCharCode(cp);
    const alt = ch.normalize('NFKC');
    if (alt !== ch) map.set(ch, alt);
  }
  return map;
}
const WIDTH_MAP = buildWidthMap();
const WIDTH_RE = /[\u3000\uff01-\uffef]/g;

/** One pass of ftfy's fixers, in ftfy's order. */
function fixOnce(text: string, unescapeEntities: boolean): string {
  let t = unescapeEntities ? ftfyUnescapeHtml(text) : text;
  t = t.replace(C1_CONTROL_RE, (c) => cp1252C1(c.charCodeAt(0)));
  t = t.replace(LIGATURE_RE, (c) => LIGATURES[c]);
  t = t.replace(WIDTH_RE, (c) => WIDTH_MAP.get(c) ?? c);
  t = t.replace(DOUBLE_QUOTE_RE, '"').replace(SINGLE_QUOTE_RE, "'");
  t = t.replace(/\r\n/g, '\n').replace(/[\r\u2028\u2029\x85]/g, '\n');
  t = t.replace(LONE_SURROGATE_RE, '\ufffd');
  t = t.replace(ANSI_ESCAPE_RE, '');
  t = t.replace(CONTROL_CHARS_RE, '');
  return t.normalize('NFC');
}

/** ftfy.fix_text: line by line, each line fixed until nothing changes; entities stay once a line has a '<'. */
export function ftfyFixText(text: string): string {
  let unescapeEntities = true;
  const out: string[] = [];
  for (const line of text.match(/[^\n]*\n|[^\n]+$/g) ?? []) {
    if (line.includes('<')) unescapeEntities = false;
    let fixed = line;
    for (let prev = ''; prev !== fixed; ) {
      prev = fixed;
      fixed = fixOnce(fixed, unescapeEntities);
    }
    out.push(fixed);
  }
  return out.join('');
}

/** CLIP basic_clean + whitespace_clean + lower(): the text the BPE pre-tokenizer sees. */
export function cleanText(text: string): string {
  const basic = htmlUnescape(htmlUnescape(ftfyFixText(text))).replace(STRIP_RE, '');
  return basic.replace(WHITESPACE_RUN_RE, ' ').replace(STRIP_RE, '').toLowerCase();
}
