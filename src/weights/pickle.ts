/**
 * A restricted unpickler: it understands the opcodes torch.save emits (protocol 2, plus the protocol 4 framing
 * opcodes) and builds plain values from them. It never imports or calls anything: a GLOBAL names a callable
 * only if the caller's `allowGlobal` accepts it, and REDUCE / NEWOBJ hand such a name and its arguments to the
 * caller's `call`, which builds a value of its own. Any other opcode or global is refused with a WeightsError.
 *
 * Opcodes: https://github.com/python/cpython/blob/main/Lib/pickletools.py (names and argument encodings).
 */
import { WeightsError, WeightsLimitError, count } from './types.js';

/** A value built by the caller's hooks (a storage, a tensor). */
export abstract class PickleObject {
  abstract describe(): string;
}

/** A global the caller allowed, e.g. `torch._utils._rebuild_tensor_v2`; it is a name, never something run. */
export class PickleGlobal extends PickleObject {
  constructor(
    readonly module: string,
    readonly name: string,
  ) {
    super();
  }

  describe(): string {
    return `${this.module}.${this.name}`;
  }
}

export type DictKey = string | number | bigint;

/** dict and OrderedDict; attributes set by BUILD (an OrderedDict's `_metadata`) are kept apart from the items. */
export class PickleDict extends PickleObject {
  readonly items = new Map<DictKey, PickleValue>();
  attributes: PickleValue = null;

  describe(): string {
    return `dict of ${this.items.size} items`;
  }
}

/** Tuples are frozen arrays, lists are mutable ones. */
export type PickleValue = null | boolean | number | bigint | string | PickleValue[] | PickleObject;

export interface PickleHooks {
  /** Whether GLOBAL `module name` may be loaded; a refused one stops unpickling. */
  allowGlobal(module: string, name: string): boolean;
  /** REDUCE and NEWOBJ: apply an allowed global to its arguments. */
  call(fn: PickleGlobal, args: readonly PickleValue[]): PickleValue;
  /** BINPERSID: the object a persistent id stands for (in torch, a storage). */
  persistentLoad(pid: PickleValue): PickleValue;
}

/** pickletools names, for messages about refused opcodes. */
const OPCODE_NAMES: Readonly<Record<number, string>> = {
  0x28: 'MARK', 0x2e: 'STOP', 0x30: 'POP', 0x31: 'POP_MARK', 0x32: 'DUP', 0x46: 'FLOAT', 0x49: 'INT', 0x4a: 'BININT',
  0x4b: 'BININT1', 0x4c: 'LONG', 0x4d: 'BININT2', 0x4e: 'NONE', 0x50: 'PERSID', 0x51: 'BINPERSID', 0x52: 'REDUCE',
  0x53: 'STRING', 0x54: 'BINSTRING', 0x55: 'SHORT_BINSTRING', 0x56: 'UNICODE', 0x58: 'BINUNICODE', 0x61: 'APPEND',
  0x62: 'BUILD', 0x63: 'GLOBAL', 0x64: 'DICT', 0x7d: 'EMPTY_DICT', 0x65: 'APPENDS', 0x67: 'GET', 0x68: 'BINGET',
  0x69: 'INST', 0x6a: 'LONG_BINGET', 0x6c: 'LIST', 0x5d: 'EMPTY_LIST', 0x6f: 'OBJ', 0x70: 'PUT', 0x71: 'BINPUT',
  0x72: 'LONG_BINPUT', 0x73: 'SETITEM', 0x74: 'TUPLE', 0x29: 'EMPTY_TUPLE', 0x75: 'SETITEMS', 0x47: 'BINFLOAT',
  0x80: 'PROTO', 0x81: 'NEWOBJ', 0x82: 'EXT1', 0x83: 'EXT2', 0x84: 'EXT4', 0x85: 'TUPLE1', 0x86: 'TUPLE2',
  0x87: 'TUPLE3', 0x88: 'NEWTRUE', 0x89: 'NEWFALSE', 0x8a: 'LONG1', 0x8b: 'LONG4', 0x42: 'BINBYTES',
  0x43: 'SHORT_BINBYTES', 0x8c: 'SHORT_BINUNICODE', 0x8d: 'BINUNICODE8', 0x8e: 'BINBYTES8', 0x8f: 'EMPTY_SET',
  0x90: 'ADDITEMS', 0x91: 'FROZENSET', 0x92: 'NEWOBJ_EX', 0x93: 'STACK_GLOBAL', 0x94: 'MEMOIZE', 0x95: 'FRAME',
  0x96: 'BYTEARRAY8', 0x97: 'NEXT_BUFFER', 0x98: 'READONLY_BUFFER',
};

const MAX_PROTOCOL = 5;

/**
 * What unpickling one state dict may build. torch.save's data.pkl builds per tensor ~12 objects (its name, tuples
 * for the storage id, size, stride and arguments, the rebuilt tensor and storage) and ~10 memo entries, and an
 * OrderedDict's `_metadata` adds ~4 objects per module: ~2.2 KB of heap a tensor by the estimate below. SD 1.5
 * has ~1,150 tensors, SDXL ~2,500, a kohya LoRA ~1,000; these bounds admit ~50,000 (20x SDXL), and refuse a
 * pickle that builds an object a byte (24 MB of EMPTY_DICT would be 6 GB of dicts) within 128 MiB and a second.
 */
export const PICKLE_LIMITS = Object.freeze({
  /** Values with a heap object of their own: strings, tuples, lists, dicts, globals and what the hooks build. */
  objects: 2_000_000,
  /** Their estimated heap (HEAP_COST), dict items, list elements and memo entries included. */
  heapBytes: 128 * 2 ** 20,
  memoEntries: 1_000_000,
  /** Values and marks on the stack at once; pickle writes dict items in batches of 1,000. */
  stack: 1_000_000,
  /** One string: tensor names are under 200 bytes; this leaves room for text a trainer stores. */
  stringBytes: 4 * 2 ** 20,
  /** GLOBAL's module and name: Python identifiers (`torch._utils`, `_rebuild_tensor_v2`). */
  globalNameBytes: 1024,
});

/** What each bound counts, for messages. */
const LIMIT_UNITS: Readonly<Record<keyof typeof PICKLE_LIMITS, string>> = {
  objects: 'objects',
  heapBytes: 'bytes of objects (estimated heap)',
  memoEntries: 'memo entries',
  stack: 'values and marks on the stack at once',
  stringBytes: 'bytes in one string',
  globalNameBytes: 'bytes in one global name',
};

/** Estimated V8 heap of what the unpickler builds, in bytes (measured on Node 20, rounded up). */
const HEAP_COST = {
  dict: 240, // PickleDict and its empty Map
  sequence: 48, // a list or tuple, plus 16 an element
  element: 16,
  item: 48, // one entry of a dict's Map
  string: 32, // plus 2 a UTF-16 code unit
  number: 24, // a boxed float or bigint
  object: 240, // a global or what a hook built (a tensor, a storage, an OrderedDict)
  memo: 48,
} as const;

/** Unpickle `data` (the bytes of `where`, e.g. `model.ckpt:archive/data.pkl`) into plain values. */
export function unpickle(data: Uint8Array, where: string, hooks: PickleHooks): PickleValue {
  return new Unpickler(data, where, hooks).run();
}

/** PROTO 2-5, then a known opcode: how a bare pickle (the legacy torch.save format) starts. */
export function looksLikePickle(head: Uint8Array): boolean {
  return head.length >= 3 && head[0] === 0x80 && head[1] >= 2 && head[1] <= MAX_PROTOCOL && Object.hasOwn(OPCODE_NAMES, head[2]);
}

class Unpickler {
  private pos = 0;
  private stack: PickleValue[] = [];
  private readonly marks: number[] = [];
  private readonly memo = new Map<number, PickleValue>();
  private readonly view: DataView;
  private objects = 0;
  private heapBytes = 0;

  constructor(
    private readonly data: Uint8Array,
    private readonly where: string,
    private readonly hooks: PickleHooks,
  ) {
    this.view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  }

  run(): PickleValue {
    while (this.pos < this.data.byteLength) {
      const at = this.pos;
      const op = this.data[this.pos++];
      if (op === 0x2e) return this.finish(at); // STOP
      this.step(op, at);
    }
    throw this.error(`ends without a STOP opcode: the pickle is truncated`);
  }

  private finish(at: number): PickleValue {
    if (this.stack.length !== 1 || this.marks.length !== 0) throw this.error(`STOP at byte ${at} with ${this.stack.length} values on the stack: malformed pickle`);
    return this.stack[0];
  }

  private step(op: number, at: number): void {
    switch (op) {
      case 0x80: return this.proto(); // PROTO
      case 0x95: return void this.take(8); // FRAME: a length prefix for buffered reading; nothing to do
      case 0x28: return this.mark(); // MARK
      case 0x30: return void this.pop(); // POP
      case 0x7d: return this.push(this.built(new PickleDict(), HEAP_COST.dict)); // EMPTY_DICT
      case 0x64: return this.push(this.dictOf(this.popMark())); // DICT
      case 0x5d: return this.push(this.sequence([])); // EMPTY_LIST
      case 0x6c: return this.push(this.sequence(this.popMark())); // LIST
      case 0x29: return this.push(this.sequence(tuple([]))); // EMPTY_TUPLE
      case 0x74: return this.push(this.sequence(tuple(this.popMark()))); // TUPLE
      case 0x85: return this.push(this.sequence(tuple(this.popN(1)))); // TUPLE1
      case 0x86: return this.push(this.sequence(tuple(this.popN(2)))); // TUPLE2
      case 0x87: return this.push(this.sequence(tuple(this.popN(3)))); // TUPLE3
      case 0x4e: return this.push(null); // NONE
      case 0x88: return this.push(true); // NEWTRUE
      case 0x89: return this.push(false); // NEWFALSE
      case 0x4a: return this.push(this.view.getInt32(this.take(4), true)); // BININT
      case 0x4b: return this.push(this.data[this.take(1)]); // BININT1
      case 0x4d: return this.push(this.view.getUint16(this.take(2), true)); // BININT2
      case 0x8a: return this.push(this.built(this.long(this.data[this.take(1)]), HEAP_COST.number)); // LONG1
      case 0x47: return this.push(this.built(this.view.getFloat64(this.take(8), false), HEAP_COST.number)); // BINFLOAT (big-endian)
      case 0x58: return this.push(this.text(this.view.getUint32(this.take(4), true))); // BINUNICODE
      case 0x8c: return this.push(this.text(this.data[this.take(1)])); // SHORT_BINUNICODE
      case 0x71: return this.put(this.data[this.take(1)]); // BINPUT
      case 0x72: return this.put(this.view.getUint32(this.take(4), true)); // LONG_BINPUT
      case 0x94: return this.put(this.memo.size); // MEMOIZE
      case 0x68: return this.get(this.data[this.take(1)]); // BINGET
      case 0x6a: return this.get(this.view.getUint32(this.take(4), true)); // LONG_BINGET
      case 0x63: return this.push(this.global(this.line(), this.line())); // GLOBAL
      case 0x93: return this.stackGlobal(); // STACK_GLOBAL
      case 0x52: return this.reduce(); // REDUCE
      case 0x81: return this.reduce(); // NEWOBJ: cls.__new__(cls, *args), the same call for the allowed classes
      case 0x51: return this.push(this.built(this.hooks.persistentLoad(this.pop()), HEAP_COST.object)); // BINPERSID
      case 0x73: return this.setItems(this.popN(2)); // SETITEM
      case 0x75: return this.setItems(this.popMark()); // SETITEMS
      case 0x61: return this.append(this.popN(1)); // APPEND
      case 0x65: return this.append(this.popMark()); // APPENDS
      case 0x62: return this.build(); // BUILD
      default:
        throw this.error(
          `refusing pickle opcode ${OPCODE_NAMES[op] ?? 'unknown'} (0x${op.toString(16).padStart(2, '0')}) at byte ${at}: only the opcodes torch.save uses are allowed; convert the checkpoint to safetensors with a trusted tool`,
        );
    }
  }

  private error(msg: string): WeightsError {
    return new WeightsError(`${this.where}: ${msg}`);
  }

  private limit(key: keyof typeof PICKLE_LIMITS): WeightsLimitError {
    const max = PICKLE_LIMITS[key];
    return new WeightsLimitError(
      `${this.where}: pickle builds more than the ${count(max)} ${LIMIT_UNITS[key]} a state dict needs (at byte ${count(this.pos)}): refused, it is not a torch state dict or it is a hostile one`,
      `pickle.${key}`,
      max,
    );
  }

  /** Counts `bytes` of estimated heap (and one object when `object`) against PICKLE_LIMITS; returns `v`. */
  private built<T>(v: T, bytes: number, object = true): T {
    this.heapBytes += bytes;
    if (this.heapBytes > PICKLE_LIMITS.heapBytes) throw this.limit('heapBytes');
    if (object && ++this.objects > PICKLE_LIMITS.objects) throw this.limit('objects');
    return v;
  }

  private sequence(values: PickleValue[]): PickleValue[] {
    return this.built(values, HEAP_COST.sequence + HEAP_COST.element * values.length);
  }

  /** Reserve n argument bytes; returns where they start. */
  private take(n: number): number {
    const at = this.pos;
    if (at + n > this.data.byteLength) throw this.error(`opcode argument at byte ${at} runs past the end: the pickle is truncated`);
    this.pos += n;
    return at;
  }

  private proto(): void {
    const v = this.data[this.take(1)];
    if (v < 2 || v > MAX_PROTOCOL) throw this.error(`pickle protocol ${v} is not supported (torch.save writes protocol 2)`);
  }

  private push(v: PickleValue): void {
    if (this.stack.length + this.marks.length >= PICKLE_LIMITS.stack) throw this.limit('stack');
    this.stack.push(v);
  }

  private pop(): PickleValue {
    if (this.stack.length === 0 || this.stack.length <= (this.marks.at(-1) ?? -1)) throw this.error(`stack underflow at byte ${this.pos - 1}: malformed pickle`);
    return this.stack.pop() as PickleValue;
  }

  private popN(n: number): PickleValue[] {
    const floor = this.marks.at(-1) ?? 0;
    if (this.stack.length - n < floor) throw this.error(`stack underflow at byte ${this.pos - 1}: malformed pickle`);
    return this.stack.splice(this.stack.length - n, n);
  }

  private popMark(): PickleValue[] {
    const mark = this.marks.pop();
    if (mark === undefined) throw this.error(`opcode at byte ${this.pos - 1} needs a MARK and there is none: malformed pickle`);
    return this.stack.splice(mark);
  }

  private top(): PickleValue {
    if (this.stack.length <= (this.marks.at(-1) ?? 0)) throw this.error(`stack underflow at byte ${this.pos - 1}: malformed pickle`);
    return this.stack[this.stack.length - 1];
  }

  private mark(): void {
    if (this.stack.length + this.marks.length >= PICKLE_LIMITS.stack) throw this.limit('stack');
    this.marks.push(this.stack.length);
  }

  private text(n: number): string {
    if (n > PICKLE_LIMITS.stringBytes) throw this.limit('stringBytes');
    const at = this.take(n);
    let s: string;
    try {
      s = new TextDecoder('utf-8', { fatal: true }).decode(this.data.subarray(at, at + n));
    } catch {
      throw this.error(`string at byte ${at} is not UTF-8: malformed pickle`);
    }
    return this.built(s, HEAP_COST.string + 2 * s.length);
  }

  /** GLOBAL's two arguments: newline-terminated ASCII. */
  private line(): string {
    const end = this.data.indexOf(0x0a, this.pos);
    if (end < 0) throw this.error(`GLOBAL argument at byte ${this.pos} has no newline: the pickle is truncated`);
    if (end - this.pos > PICKLE_LIMITS.globalNameBytes) throw this.limit('globalNameBytes');
    const s = new TextDecoder('latin1').decode(this.data.subarray(this.pos, end));
    this.pos = end + 1;
    return this.built(s, HEAP_COST.string + 2 * s.length);
  }

  /** Two's complement little-endian integer of n bytes. */
  private long(n: number): number | bigint {
    const at = this.take(n);
    let v = 0n;
    for (let i = n - 1; i >= 0; i--) v = (v << 8n) | BigInt(this.data[at + i]);
    if (n > 0 && this.data[at + n - 1] & 0x80) v -= 1n << BigInt(8 * n);
    return v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
  }

  private put(index: number): void {
    const v = this.top();
    if (!this.memo.has(index)) {
      if (this.memo.size >= PICKLE_LIMITS.memoEntries) throw this.limit('memoEntries');
      this.built(null, HEAP_COST.memo, false);
    }
    this.memo.set(index, v);
  }

  private get(index: number): void {
    if (!this.memo.has(index)) throw this.error(`memo index ${index} read before it was written: malformed pickle`);
    this.push(this.memo.get(index) as PickleValue);
  }

  private global(module: string, name: string): PickleGlobal {
    if (!this.hooks.allowGlobal(module, name)) {
      throw this.error(
        `refusing pickle global ${module}.${name}: only torch state-dict globals are allowed (the file may be malicious, or holds more than weights; convert it to safetensors with a trusted tool)`,
      );
    }
    return this.built(new PickleGlobal(module, name), HEAP_COST.object);
  }

  private stackGlobal(): void {
    const [module, name] = this.popN(2);
    if (typeof module !== 'string' || typeof name !== 'string') throw this.error(`STACK_GLOBAL needs two strings: malformed pickle`);
    this.push(this.global(module, name));
  }

  private reduce(): void {
    const args = this.pop();
    const fn = this.pop();
    if (!(fn instanceof PickleGlobal)) throw this.error(`call of a non-global (${describe(fn)}) at byte ${this.pos - 1}: malformed pickle`);
    if (!Array.isArray(args)) throw this.error(`call of ${fn.describe()} with arguments that are not a tuple: malformed pickle`);
    this.push(this.built(this.hooks.call(fn, args), HEAP_COST.object));
  }

  private dictOf(items: PickleValue[]): PickleDict {
    const d = this.built(new PickleDict(), HEAP_COST.dict);
    this.fill(d, items);
    return d;
  }

  private setItems(items: PickleValue[]): void {
    const d = this.top();
    if (!(d instanceof PickleDict)) throw this.error(`SETITEM(S) on ${describe(d)}, not a dict: malformed pickle`);
    this.fill(d, items);
  }

  private fill(d: PickleDict, items: PickleValue[]): void {
    if (items.length % 2 !== 0) throw this.error(`odd number of values for dict items: malformed pickle`);
    for (let i = 0; i < items.length; i += 2) {
      const k = items[i];
      if (typeof k !== 'string' && typeof k !== 'number' && typeof k !== 'bigint') {
        throw this.error(`dict key ${describe(k)} is not a string or integer: not a state dict`);
      }
      if (!d.items.has(k)) this.built(null, HEAP_COST.item, false);
      d.items.set(k, items[i + 1]);
    }
  }

  private append(values: PickleValue[]): void {
    const list = this.top();
    if (!Array.isArray(list) || Object.isFrozen(list)) throw this.error(`APPEND(S) on ${describe(list)}, not a list: malformed pickle`);
    this.built(null, HEAP_COST.element * values.length, false);
    for (const v of values) list.push(v);
  }

  /** BUILD sets an object's state. Only dicts get one here: an OrderedDict's attributes (`_metadata`). */
  private build(): void {
    const state = this.pop();
    const target = this.top();
    if (!(target instanceof PickleDict)) throw this.error(`refusing BUILD on ${describe(target)}: only dict state is allowed`);
    const ok = (s: PickleValue) => s === null || s instanceof PickleDict;
    const slots = Array.isArray(state) && state.length === 2 && state.every(ok);
    if (!ok(state) && !slots) throw this.error(`refusing BUILD with state ${describe(state)}: only dict state is allowed`);
    target.attributes = state;
  }
}

/** A tuple: a frozen array, so APPEND cannot grow it. */
function tuple(values: PickleValue[]): PickleValue[] {
  return Object.freeze(values) as PickleValue[];
}

function describe(v: PickleValue): string {
  if (v === null) return 'None';
  if (Array.isArray(v)) return Object.isFrozen(v) ? `a ${v.length}-tuple` : `a ${v.length}-item list`;
  if (v instanceof PickleObject) return v.describe();
  return `${typeof v} ${JSON.stringify(typeof v === 'bigint' ? v.toString() : v)}`;
}
