/**
 * The safetensors header, parsed strictly in one pass over its text instead of with JSON.parse. The header is
 * `{name: {"dtype": string, "shape": [int], "data_offsets": [begin, end]}, "__metadata__"?: {key: string}}` and
 * only that is built, so a hostile header costs no more memory than the entries it declares (JSON.parse of 16 MiB
 * of `[{},{},...]` builds 360 MB of objects). Checked as it is read:
 *
 * - a key given twice (a tensor name, a field of an entry, a metadata key) is refused, as the reference reader
 *   refuses it: which one a reader keeps is up to the reader, so two readers would see two different files;
 * - nesting deeper than MAX_NESTING is refused, as serde_json (the reference reader's parser) refuses it; a field
 *   this reader does not know is checked and skipped with a loop, building nothing;
 * - strings and numbers follow JSON's grammar (no raw control characters in strings, only JSON's escapes).
 *
 * What the values mean (dtype names, offsets in range, shape vs size) is checked by safetensors.ts.
 */
import { WeightsError, WeightsLimitError, count } from './types.js';

/** serde_json stops at its 128th nested container (its recursion limit): 127 levels are the most a file can use. */
export const MAX_NESTING = 127;
/** numpy's NPY_MAXDIMS; no library makes tensors of more dimensions. */
const MAX_DIMS = 64;

export interface RawEntry {
  readonly dtype: string | undefined;
  /** Numbers as JSON wrote them; whether they are non-negative integers is the caller's check. */
  readonly shape: readonly number[] | undefined;
  readonly offsets: readonly number[] | undefined;
}

export interface ParsedHeader<T> {
  /** In the order of the file. */
  readonly entries: Map<string, T>;
  readonly metadata: Map<string, string>;
}

/** The header's entries, each made a T by `toEntry` as soon as it is read, and its metadata. */
export function parseHeaderText<T>(text: string, path: string, toEntry: (name: string, raw: RawEntry) => T): ParsedHeader<T> {
  return new HeaderParser(text, path).header(toEntry);
}

const enum C {
  Tab = 0x09, Newline = 0x0a, Return = 0x0d, Space = 0x20, Quote = 0x22, Comma = 0x2c, Colon = 0x3a,
  Backslash = 0x5c, OpenBracket = 0x5b, CloseBracket = 0x5d, OpenBrace = 0x7b, CloseBrace = 0x7d,
}
const NUMBER = /-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?/y;
const LITERAL = /true|false|null/y;

class HeaderParser {
  private pos = 0;

  constructor(
    private readonly s: string,
    private readonly path: string,
  ) {}

  header<T>(toEntry: (name: string, raw: RawEntry) => T): ParsedHeader<T> {
    this.ws();
    if (this.peek() !== C.OpenBrace) throw new WeightsError(`${this.path}: header is not a JSON object`);
    const header: ParsedHeader<T> = { entries: new Map(), metadata: new Map() };
    let sawMetadata = false;
    this.members(1, 'header', (key) => header.entries.has(key) || (key === '__metadata__' && sawMetadata), (key) => {
      if (key !== '__metadata__') return void header.entries.set(key, toEntry(key, this.entry(key)));
      sawMetadata = true;
      this.metadata(header.metadata);
    });
    this.ws();
    if (this.pos !== this.s.length) this.syntax('text after the header object');
    return header;
  }

  /** `{"dtype": ..., "shape": [...], "data_offsets": [...], other fields skipped}` */
  private entry(name: string): RawEntry {
    const where = `${this.path}: tensor ${name}`;
    if (this.peek() !== C.OpenBrace) throw new WeightsError(`${where}: entry is not an object`);
    let dtype: string | undefined;
    let shape: number[] | undefined;
    let offsets: number[] | undefined;
    let others: Set<string> | null = null; // fields this reader skips, rare enough to cost a Set only when present
    const seen = (field: string) => (field === 'dtype' ? dtype !== undefined : field === 'shape' ? shape !== undefined : field === 'data_offsets' ? offsets !== undefined : others?.has(field) === true);
    this.members(2, `tensor ${name}: entry`, seen, (field) => {
      const start = this.pos;
      if (field === 'dtype') {
        if (this.peek() !== C.Quote) throw new WeightsError(`${where}: unknown dtype ${this.excerpt(start, 2)}`);
        dtype = this.string();
      } else if (field === 'shape') {
        shape = this.numbers(3) ?? this.refuse(`${where}: shape ${this.excerpt(start, 2)} is not a list of at most ${MAX_DIMS} non-negative integers`);
      } else if (field === 'data_offsets') {
        offsets = this.numbers(3) ?? this.refuse(`${where}: data_offsets ${this.excerpt(start, 2)} is not [begin, end]`);
      } else {
        (others ??= new Set()).add(field);
        this.skip(2);
      }
    });
    return { dtype, shape, offsets };
  }

  /** `{key: string}`, into `out` */
  private metadata(out: Map<string, string>): void {
    if (this.peek() !== C.OpenBrace) throw new WeightsError(`${this.path}: __metadata__ is not an object`);
    this.members(2, '__metadata__', (key) => out.has(key), (key) => {
      if (this.peek() !== C.Quote) throw new WeightsError(`${this.path}: __metadata__.${key} is not a string`);
      out.set(key, this.string());
    });
  }

  /**
   * The members of the object at `pos`, the `depth`-th container: `value(key)` parses each value, after `seen`
   * says the key is new.
   */
  private members(depth: number, what: string, seen: (key: string) => boolean, value: (key: string) => void): void {
    this.nest(depth);
    this.pos++; // {
    this.ws();
    if (this.peek() === C.CloseBrace) {
      this.pos++;
      return;
    }
    for (;;) {
      this.ws();
      if (this.peek() !== C.Quote) this.syntax('expected a string key');
      const key = this.string();
      if (seen(key)) throw new WeightsError(`${this.path}: ${what} names ${JSON.stringify(key)} twice`);
      this.colon();
      value(key);
      this.ws();
      const c = this.peek();
      this.pos++;
      if (c === C.CloseBrace) return;
      if (c !== C.Comma) this.syntax(`expected ',' or '}'`, this.pos - 1);
    }
  }

  /** `[n, ...]` of at most MAX_DIMS numbers, or null (pos unchanged) when the value is anything else. */
  private numbers(depth: number): number[] | null {
    const start = this.pos;
    if (this.peek() !== C.OpenBracket) return null;
    this.nest(depth);
    this.pos++;
    const out: number[] = [];
    this.ws();
    if (this.peek() === C.CloseBracket) {
      this.pos++;
      return out;
    }
    for (;;) {
      this.ws();
      NUMBER.lastIndex = this.pos;
      const m = NUMBER.exec(this.s);
      if (m === null || out.length === MAX_DIMS) {
        this.pos = start;
        return null;
      }
      out.push(Number(m[0]));
      this.pos += m[0].length;
      this.ws();
      const c = this.peek();
      this.pos++;
      if (c === C.CloseBracket) return out;
      if (c !== C.Comma) {
        this.pos = start;
        return null;
      }
    }
  }

  /**
   * Skips one value of any kind, checking its grammar and nesting, building nothing: a loop over the open
   * containers (at most MAX_NESTING of them), not recursion. `depth` containers enclose the value.
   */
  private skip(depth: number): void {
    const open: number[] = [];
    for (;;) {
      this.ws();
      const c = this.peek();
      if (c === C.OpenBrace || c === C.OpenBracket) {
        this.nest(depth + open.length + 1);
        this.pos++;
        this.ws();
        if (this.peek() === (c === C.OpenBrace ? C.CloseBrace : C.CloseBracket)) {
          this.pos++;
        } else {
          open.push(c);
          if (c === C.OpenBrace) this.key();
          continue;
        }
      } else {
        this.scalar();
      }
      // a value ended: close containers until one takes another value
      for (;;) {
        if (open.length === 0) return;
        this.ws();
        const top = open[open.length - 1];
        const next = this.peek();
        this.pos++;
        if (next === C.Comma) {
          if (top === C.OpenBrace) this.key();
          break;
        }
        if (next !== (top === C.OpenBrace ? C.CloseBrace : C.CloseBracket)) this.syntax(`expected ',' or '${top === C.OpenBrace ? '}' : ']'}'`, this.pos - 1);
        open.pop();
      }
    }
  }

  /** A key of an object being skipped, and its colon. */
  private key(): void {
    this.ws();
    if (this.peek() !== C.Quote) this.syntax('expected a string key');
    this.string();
    this.colon();
  }

  private scalar(): void {
    const c = this.peek();
    if (c === C.Quote) {
      this.string();
      return;
    }
    const re = c === 0x74 || c === 0x66 || c === 0x6e ? LITERAL : NUMBER; // t, f, n
    re.lastIndex = this.pos;
    const m = re.exec(this.s);
    if (m === null) this.syntax('expected a value');
    this.pos += m[0].length;
  }

  /** A JSON string at pos (its opening quote), decoded. */
  private string(): string {
    const start = this.pos;
    let escaped = false;
    for (let i = start + 1; i < this.s.length; i++) {
      const c = this.s.charCodeAt(i);
      if (c === C.Quote) {
        this.pos = i + 1;
        if (!escaped) return this.s.slice(start + 1, i);
        try {
          return JSON.parse(this.s.slice(start, i + 1)) as string;
        } catch {
          this.syntax('bad escape in string', start);
        }
      }
      if (c < 0x20) this.syntax('control character in string', i);
      if (c === C.Backslash) {
        escaped = true;
        i++;
      }
    }
    this.syntax('unterminated string', start);
  }

  private colon(): void {
    this.ws();
    if (this.peek() !== C.Colon) this.syntax(`expected ':'`);
    this.pos++;
    this.ws();
  }

  private ws(): void {
    for (;;) {
      const c = this.s.charCodeAt(this.pos);
      if (c !== C.Space && c !== C.Newline && c !== C.Return && c !== C.Tab) return;
      this.pos++;
    }
  }

  /** The code unit at pos; NaN past the end, which matches nothing. */
  private peek(): number {
    return this.s.charCodeAt(this.pos);
  }

  private nest(depth: number): void {
    if (depth > MAX_NESTING) {
      throw new WeightsLimitError(
        `${this.path}: header nests containers ${count(depth)} deep at character ${count(this.pos)}, more than the ${count(MAX_NESTING)} the reference reader allows`,
        'safetensors.nesting',
        MAX_NESTING,
      );
    }
  }

  /** The JSON text of the value at `start`, cut short, for a message; `depth` containers enclose it. */
  private excerpt(start: number, depth: number): string {
    this.pos = start;
    this.skip(depth);
    const text = this.s.slice(start, this.pos);
    return text.length > 80 ? `${text.slice(0, 80)}...` : text;
  }

  private refuse(message: string): never {
    throw new WeightsError(message);
  }

  private syntax(what: string, at = this.pos): never {
    throw new WeightsError(`${this.path}: header is not JSON (${what} at character ${count(at)})`);
  }
}
