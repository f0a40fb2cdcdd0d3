/**
 * GPT-2 / CLIP byte-level alphabet: each of the 256 byte values gets a printable stand-in character, so a
 * token's UTF-8 bytes can be spelled as a string of vocabulary symbols. Printable Latin-1 bytes stand for
 * themselves; the other 68 (controls, space, 0x7F-0xA0, 0xAD) map to U+0100 onwards, in byte order.
 * (openai/CLIP simple_tokenizer.py `bytes_to_unicode`.)
 */

function printableBytes(): number[] {
  const range = (a: number, b: number): number[] => Array.from({ length: b - a + 1 }, (_, i) => a + i);
  return [...range(0x21, 0x7e), ...range(0xa1, 0xac), ...range(0xae, 0xff)];
}

/** Byte -> stand-in character, in vocabulary order: `BYTE_SYMBOLS_IN_VOCAB_ORDER[i]` has id i. */
function buildByteTable(): { byChar: readonly string[]; vocabOrder: readonly string[] } {
  const order = printableBytes();
  const byChar: string[] = new Array<string>(256);
  const vocabOrder: string[] = [];
  for (const b of order) byChar[b] = String.fromCharCode(b);
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (byChar[b] === undefined) {
      byChar[b] = String.fromCharCode(256 + n++);
      order.push(b);
    }
  }
  for (const b of order) vocabOrder.push(byChar[b]);
  return { byChar, vocabOrder };
}

const TABLE = buildByteTable();

/** The 256 byte symbols in the order the vocabulary lists them (ids 0..255; +'</w>' gives ids 256..511). */
export const BYTE_SYMBOLS: readonly string[] = Object.freeze(TABLE.vocabOrder);

const utf8 = new TextEncoder();

/** A pre-token's UTF-8 bytes spelled in the byte alphabet, e.g. 'é' -> 'Ã©'. */
export function toByteSymbols(token: string): string {
  let out = '';
  for (const b of utf8.encode(token)) out += TABLE.byChar[b];
  return out;
}
