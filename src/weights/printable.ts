/**
 * Names read from a weight file (tensor names, pickle globals, zip entries, metadata keys) are the file author's
 * text. Printed raw, a name holding ESC can drive the terminal, CR can overwrite the line before it, and a bidi
 * override (U+202E) can show a name reversed. `printable` escapes those characters where such text goes into an
 * error message or CLI output: C0 and C1 controls and DEL as `\x1b` (`\n`, `\r`, `\t` by name), the bidi
 * controls (U+061C, U+200E-200F, U+202A-202E, U+2066-2069) and the line and paragraph separators U+2028-2029 as
 * `\u202e`. Everything else, backslashes included, stays as it is, so escaping twice changes nothing.
 */

const NAMED: Readonly<Record<number, string>> = { 0x09: '\\t', 0x0a: '\\n', 0x0d: '\\r' };

function isUnsafe(c: number): boolean {
  return (
    c <= 0x1f ||
    (c >= 0x7f && c <= 0x9f) ||
    c === 0x061c ||
    c === 0x200e ||
    c === 0x200f ||
    (c >= 0x2028 && c <= 0x202e) ||
    (c >= 0x2066 && c <= 0x2069)
  );
}

function escape(c: number): string {
  const named = NAMED[c];
  if (named !== undefined) return named;
  const hex = c.toString(16);
  return c <= 0xff ? `\\x${hex.padStart(2, '0')}` : `\\u${hex.padStart(4, '0')}`;
}

/** `s` with every control, bidi or line-separator character escaped; `s` itself when it has none. */
export function printable(s: string): string {
  let out = '';
  let from = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (!isUnsafe(c)) continue;
    out += s.slice(from, i) + escape(c);
    from = i + 1;
  }
  return from === 0 ? s : out + s.slice(from);
}
