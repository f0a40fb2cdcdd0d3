/**
 * HTML character references, decoded the two ways CLIP's text cleaning does:
 * - `htmlUnescape`: Python's `html.unescape` (numeric references with HTML5's repairs, named entities with
 *   or without the `;` for the legacy names, longest legacy prefix otherwise);
 * - `ftfyUnescapeHtml`: ftfy's stricter pass, which only touches complete `&name;` / `&#N;` references and
 *   also knows all-caps spellings like `&EACUTE;`.
 * The named table is the HTML 4 set (Latin-1, symbols, Greek, typography) rather than all 2,231 HTML5 names.
 */

/** Windows-1252 reading of the C1 bytes 0x80-0x9F (undefined bytes stand for themselves), as browsers do. */
const CP1252_C1 = [
  0x20ac, 0x81, 0x201a, 0x192, 0x201e, 0x2026, 0x2020, 0x2021, 0x2c6, 0x2030, 0x160, 0x2039, 0x152, 0x8d, 0x17d, 0x8f,
  0x90, 0x2018, 0x2019, 0x201c, 0x201d, 0x2022, 0x2013, 0x2014, 0x2dc, 0x2122, 0x161, 0x203a, 0x153, 0x9d, 0x17e, 0x178,
];

/** U+0080..U+009F read as the Windows-1252 byte it most likely was. */
export function cp1252C1(codePoint: number): string {
  return String.fromCodePoint(CP1252_C1[codePoint - 0x80]);
}

/** U+00A0..U+00FF, in order: also valid without the trailing ';' (HTML's legacy names). */
const LATIN1_NAMES = (
  'nbsp iexcl cent pound curren yen brvbar sect uml copy ordf laquo not shy reg macr deg plusmn sup2 sup3 acute ' +
  'micro para middot cedil sup1 ordm raquo frac14 frac12 frac34 iquest Agrave Aacute Acirc Atilde Auml Aring AElig ' +
  'Ccedil Egrave Eacute Ecirc Euml Igrave Iacute Icirc Iuml ETH Ntilde Ograve Oacute Ocirc Otilde Ouml times Oslash ' +
  'Ugrave Uacute Ucirc Uuml Yacute THORN szlig agrave aacute acirc atilde auml aring aelig ccedil egrave eacute ' +
  'ecirc euml igrave iacute icirc iuml eth ntilde ograve oacute ocirc otilde ouml divide oslash ugrave uacute ucirc ' +
  'uuml yacute thorn yuml'
).split(' ');

const LEGACY_ASCII: Readonly<Record<string, number>> = {
  amp: 0x26, lt: 0x3c, gt: 0x3e, quot: 0x22, AMP: 0x26, LT: 0x3c, GT: 0x3e, QUOT: 0x22, COPY: 0xa9, REG: 0xae,
};

/** Greek capitals U+0391.. (no U+03A2) and small letters U+03B1.. (final sigma included). */
const GREEK_UPPER = 'Alpha Beta Gamma Delta Epsilon Zeta Eta Theta Iota Kappa Lambda Mu Nu Xi Omicron Pi Rho - Sigma Tau Upsilon Phi Chi Psi Omega';
const GREEK_LOWER = GREEK_UPPER.toLowerCase().replace('-', 'sigmaf');

/** Named references that need their ';'. */
const WITH_SEMICOLON: Readonly<Record<string, number>> = {
  apos: 0x27, Tab: 0x09, NewLine: 0x0a, OElig: 0x152, oelig: 0x153, Scaron: 0x160, scaron: 0x161, Yuml: 0x178,
  fnof: 0x192, circ: 0x2c6, tilde: 0x2dc, thetasym: 0x3d1, upsih: 0x3d2, piv: 0x3d6, ensp: 0x2002, emsp: 0x2003,
  thinsp: 0x2009, zwnj: 0x200c, zwj: 0x200d, lrm: 0x200e, rlm: 0x200f, hyphen: 0x2010, ndash: 0x2013, mdash: 0x2014,
  lsquo: 0x2018, rsquo: 0x2019, sbquo: 0x201a, ldquo: 0x201c, rdquo: 0x201d, bdquo: 0x201e, dagger: 0x2020,
  Dagger: 0x2021, bull: 0x2022, hellip: 0x2026, permil: 0x2030, prime: 0x2032, Prime: 0x2033, lsaquo: 0x2039,
  rsaquo: 0x203a, oline: 0x203e, frasl: 0x2044, euro: 0x20ac, image: 0x2111, weierp: 0x2118, real: 0x211c,
  trade: 0x2122, alefsym: 0x2135, larr: 0x2190, uarr: 0x2191, rarr: 0x2192, darr: 0x2193, harr: 0x2194,
  crarr: 0x21b5, lArr: 0x21d0, uArr: 0x21d1, rArr: 0x21d2, dArr: 0x21d3, hArr: 0x21d4, forall: 0x2200, part: 0x2202,
  exist: 0x2203, empty: 0x2205, nabla: 0x2207, isin: 0x2208, notin: 0x2209, ni: 0x220b, prod: 0x220f, sum: 0x2211,
  minus: 0x2212, lowast: 0x2217, radic: 0x221a, prop: 0x221d, infin: 0x221e, ang: 0x2220, and: 0x2227, or: 0x2228,
  cap: 0x2229, cup: 0x222a, int: 0x222b, there4: 0x2234, sim: 0x223c, cong: 0x2245, asymp: 0x2248, ne: 0x2260,
  equiv: 0x2261, le: 0x2264, ge: 0x2265, sub: 0x2282, sup: 0x2283, nsub: 0x2284, sube: 0x2286, supe: 0x2287,
  oplus: 0x2295, otimes: 0x2297, perp: 0x22a5, sdot: 0x22c5, lceil: 0x2308, rceil: 0x2309, lfloor: 0x230a,
  rfloor: 0x230b, loz: 0x25ca, spades: 0x2660, clubs: 0x2663, hearts: 0x2665, diams: 0x2666, starf: 0x2605,
  star: 0x2606, check: 0x2713, cross: 0x2717,
};

interface EntityTables {
  /** name (with ';' where required, e.g. 'amp;' and 'amp') -> text, as Python's html.entities.html5. */
  readonly html5: ReadonlyMap<string, string>;
  /** '&name;' -> text as ftfy's HTML_ENTITIES: names with ';' plus all-caps spellings of lowercase names. */
  readonly ftfy: ReadonlyMap<string, string>;
}

function buildTables(): EntityTables {
  const html5 = new Map<string, string>();
  const add = (name: string, cp: number, legacy: boolean): void => {
    html5.set(`${name};`, String.fromCodePoint(cp));
    if (legacy) html5.set(name, String.fromCodePoint(cp));
  };
  LATIN1_NAMES.forEach((name, i) => add(name, 0xa0 + i, true));
  for (const [name, cp] of Object.entries(LEGACY_ASCII)) add(name, cp, true);
  GREEK_UPPER.split(' ').forEach((name, i) => name !== '-' && add(name, 0x391 + i, false));
  GREEK_LOWER.split(' ').forEach((name, i) => add(name, 0x3b1 + i, false));
  for (const [name, cp] of Object.entries(WITH_SEMICOLON)) add(name, cp, false);

  const ftfy = new Map<string, string>();
  for (const [name, text] of html5) {
    if (!name.endsWith(';')) continue;
    ftfy.set(`&${name}`, text);
    // ftfy also reads `&EACUTE;` (text upper-cased as ASCII) when that spelling means nothing to html.unescape.
    const upper = `&${name.toUpperCase()}`;
    if (name === name.toLowerCase() && unescapeWith(html5, upper) === upper) ftfy.set(upper, text.toUpperCase());
  }
  return { html5, ftfy };
}

/** Code points html.unescape drops: C0/C1 controls, noncharacters. */
function isInvalidCodePoint(n: number): boolean {
  return (
    (n >= 0x1 && n <= 0x8) || n === 0xb || (n >= 0xe && n <= 0x1f) || (n >= 0x7f && n <= 0x9f) ||
    (n >= 0xfdd0 && n <= 0xfdef) || (n & 0xfffe) === 0xfffe
  );
}

/** `&#N;` / `&#xH;` as HTML5 repairs them (Python html._replace_charref). */
function numericReference(digits: string, hex: boolean): string {
  const n = parseInt(digits, hex ? 16 : 10);
  if (n === 0) return '\ufffd';
  if (n === 0x0d) return '\r';
  if (n >= 0x80 && n <= 0x9f) return cp1252C1(n);
  if ((n >= 0xd800 && n <= 0xdfff) || n > 0x10ffff) return '\ufffd';
  if (isInvalidCodePoint(n)) return '';
  return String.fromCodePoint(n);
}

/** A named reference: exact name, else the longest legacy (no ';') name it starts with, else left as is. */
function namedReference(html5: ReadonlyMap<string, string>, name: string): string {
  const exact = html5.get(name);
  if (exact !== undefined) return exact;
  for (let x = name.length - 1; x > 1; x--) {
    const prefix = html5.get(name.slice(0, x));
    if (prefix !== undefined) return prefix + name.slice(x);
  }
  return `&${name}`;
}

const CHARREF_RE = /&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)/gu;

function unescapeWith(html5: ReadonlyMap<string, string>, text: string): string {
  if (!text.includes('&')) return text;
  return text.replace(CHARREF_RE, (_m, ref: string) => {
    if (ref[0] !== '#') return namedReference(html5, ref);
    const hex = ref[1] === 'x' || ref[1] === 'X';
    return numericReference(ref.slice(hex ? 2 : 1).replace(/;$/, ''), hex);
  });
}

const TABLES = buildTables();

/** Python's `html.unescape`. */
export function htmlUnescape(text: string): string {
  return unescapeWith(TABLES.html5, text);
}

const FTFY_ENTITY_RE = /&#?[0-9A-Za-z]{1,24};/g;

/** ftfy's `unescape_html`: complete references only; a numeric one html.unescape cannot finish stays as is. */
export function ftfyUnescapeHtml(text: string): string {
  if (!text.includes('&')) return text;
  return text.replace(FTFY_ENTITY_RE, (ref) => {
    const named = TABLES.ftfy.get(ref);
    if (named !== undefined) return named;
    if (!ref.startsWith('&#')) return ref;
    const decoded = htmlUnescape(ref);
    return decoded.includes(';') ? ref : decoded;
  });
}
