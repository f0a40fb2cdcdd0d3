/**
 * Hostile weight files (issue #23, weight files): pickles that build objects until memory runs out, safetensors
 * headers that are huge, deep or repeat a key, files with 150,000 tensors or one of 5 GiB, names that are
 * `__proto__` or carry terminal escapes. Every file is built here, in a temp folder (huge ones sparse, so they cost
 * no disk). Each must be refused with a WeightsError naming the problem, in bounded time; the `sd` cases run the
 * CLI under a 256 MB V8 heap, so that a reader whose memory grows with the file fails here, not on a user's machine.
 */
import { spawnSync } from 'node:child_process';
import { closeSync, existsSync, ftruncateSync, mkdtempSync, openSync, readdirSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { freemem, tmpdir } from 'node:os';
import { join } from 'node:path';
import { crc32 } from 'node:zlib';
import { afterAll, describe, expect, it } from 'vitest';
import { CkptFile } from '../src/weights/ckpt.js';
import { convertWeights } from '../src/weights/convert.js';
import { openWeights } from '../src/weights/open.js';
import { unpickle, type PickleHooks } from '../src/weights/pickle.js';
import { printable } from '../src/weights/printable.js';
import { SafetensorsFile, writeSafetensors } from '../src/weights/safetensors.js';
import { WeightsError, WeightsLimitError } from '../src/weights/types.js';
import { buildZip } from './zip-builder.js';

const CLI = join(import.meta.dirname, '..', 'bin', 'sd.js');
const HEAP_MB = 256;
/** Every refusal here takes well under a second of work; the rest is starting node and tsx on a busy machine. */
const CLI_SECONDS = 60;
const GiB = 2 ** 30;
const MiB = 2 ** 20;
const tmp = mkdtempSync(join(tmpdir(), 'sd-hostile-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

// ---- building files ----

function writeTemp(name: string, data: Uint8Array): string {
  const p = join(tmp, name);
  writeFileSync(p, data);
  return p;
}

/** 8-byte length, the header text as given (no padding added), then `data`. */
function safetensors(header: string, data: Uint8Array = new Uint8Array(0)): Uint8Array {
  const json = Buffer.from(header, 'utf-8');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  return Buffer.concat([len, json, data]);
}

const entry = (dtype: string, shape: readonly number[], begin: number, end: number) =>
  `{"dtype":"${dtype}","shape":[${shape.join(',')}],"data_offsets":[${begin},${end}]}`;

/** A file of `size` bytes whose first bytes are `head` and the rest a hole (reads as zeros, takes no disk). */
function sparseFile(name: string, head: Uint8Array, size: number): string {
  const p = join(tmp, name);
  const fd = openSync(p, 'w');
  try {
    writeSync(fd, head);
    ftruncateSync(fd, size);
  } finally {
    closeSync(fd);
  }
  return p;
}

/** Pickle opcodes, written as torch.save writes them; a plain array of bytes, so any size is built by loops. */
class Pickle {
  readonly out: number[] = [0x80, 2]; // PROTO 2
  private memo = 0;
  private readonly shared = new Map<string, number>();

  op(...bytes: number[]): this {
    for (const b of bytes) this.out.push(b);
    return this;
  }
  put(): this {
    return this.op(0x72, ...u32(this.memo++)); // LONG_BINPUT
  }
  str(s: string): this {
    const b = Buffer.from(s, 'utf-8');
    this.op(0x58, ...u32(b.length)); // BINUNICODE
    for (const x of b) this.out.push(x);
    return this.put();
  }
  int(v: number): this {
    if (v < 2 ** 31) return this.op(0x4a, ...u32(v)); // BININT
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(BigInt(v));
    return this.op(0x8a, 8, ...b); // LONG1
  }
  /** A string or global memoized on first use and fetched with LONG_BINGET after, as pickle does. */
  once(key: string, emit: () => void): this {
    const m = this.shared.get(key);
    if (m !== undefined) return this.op(0x6a, ...u32(m));
    emit();
    this.shared.set(key, this.memo - 1);
    return this;
  }
  global(module: string, name: string): this {
    return this.once(`g ${module}.${name}`, () => this.op(0x63, ...Buffer.from(`${module}\n${name}\n`, 'latin1')).put());
  }
  orderedDict(): this {
    return this.global('collections', 'OrderedDict').op(0x29, 0x52).put(); // OrderedDict()
  }
  /** `_rebuild_tensor_v2(storage, 0, shape, stride, False, OrderedDict())` of a 1-d tensor on storage `key`. */
  tensor(key: string, storage: string, numel: number): this {
    this.global('torch._utils', '_rebuild_tensor_v2').op(0x28);
    this.op(0x28).once('s storage', () => this.str('storage')).global('torch', storage).str(key).once('s cpu', () => this.str('cpu'));
    this.int(numel).op(0x74).put().op(0x51); // MARK ... TUPLE, BINPERSID
    this.int(0).int(numel).op(0x85).put().int(1).op(0x85).put().op(0x89); // offset, (numel,), (1,), False
    return this.orderedDict().op(0x74).put().op(0x52).put(); // TUPLE, REDUCE
  }
  /** SETITEMS in batches of 1,000, as pickle's _batch_setitems does. */
  items(n: number, item: (i: number) => void): this {
    for (let start = 0; start < n; start += 1000) {
      this.op(0x28);
      for (let i = start; i < Math.min(n, start + 1000); i++) item(i);
      this.op(0x75);
    }
    return this;
  }
  bytes(): Uint8Array {
    return Uint8Array.from([...this.out, 0x2e]); // STOP
  }
}

function u32(v: number): number[] {
  return [v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, v >>> 24];
}

/** A 1-byte-opcode flood after PROTO 2: `prefix`, then `body` repeated `n` times, then STOP. */
function flood(prefix: readonly number[], body: readonly number[], n: number): Uint8Array {
  const out = new Uint8Array(2 + prefix.length + body.length * n + 1);
  out.set([0x80, 2, ...prefix]);
  let at = 2 + prefix.length;
  for (let i = 0; i < n; i++, at += body.length) out.set(body, at);
  out[at] = 0x2e;
  return out;
}

function ckptZip(pickle: Uint8Array, storages: readonly { key: string; data: Uint8Array }[] = []): Uint8Array {
  return buildZip([
    { name: 'archive/data.pkl', data: pickle },
    ...storages.map((s) => ({ name: `archive/data/${s.key}`, data: s.data })),
    { name: 'archive/version', data: Buffer.from('3\n') },
  ]);
}

/**
 * A zip64 PyTorch checkpoint with one ByteStorage of `numel` bytes that is a hole in a sparse file: local headers,
 * data.pkl, the hole, then the central directory and zip64 end records, laid out as APPNOTE 4.3 has them.
 */
function sparseCheckpoint(name: string, numel: number): string {
  const pkl = new Pickle().op(0x7d).put().op(0x28).str('big').tensor('0', 'ByteStorage', numel).op(0x75).bytes();
  const files = [
    { name: 'archive/data.pkl', data: pkl, size: pkl.byteLength, crc: crc32(pkl) },
    { name: 'archive/data/0', data: null, size: numel, crc: 0 },
  ];
  const chunks: { at: number; bytes: Uint8Array }[] = [];
  const central: Uint8Array[] = [];
  let at = 0;
  for (const f of files) {
    const nameBytes = Buffer.from(f.name);
    const extra = zip64Extra([f.size, f.size]);
    const local = Buffer.alloc(30);
    local.writeUInt32LE(0x04034b50, 0);
    local.writeUInt16LE(45, 4);
    local.writeUInt32LE(f.crc, 14);
    local.writeUInt32LE(0xffffffff, 18);
    local.writeUInt32LE(0xffffffff, 22);
    local.writeUInt16LE(nameBytes.length, 26);
    local.writeUInt16LE(extra.length, 28);
    const cd = Buffer.alloc(46);
    cd.writeUInt32LE(0x02014b50, 0);
    cd.writeUInt16LE(45, 4);
    cd.writeUInt16LE(45, 6);
    cd.writeUInt32LE(f.crc, 16);
    cd.writeUInt32LE(0xffffffff, 20);
    cd.writeUInt32LE(0xffffffff, 24);
    cd.writeUInt16LE(nameBytes.length, 28);
    cd.writeUInt16LE(extra.length, 30);
    cd.writeUInt32LE(at, 42);
    central.push(cd, nameBytes, extra);
    chunks.push({ at, bytes: Buffer.concat([local, nameBytes, extra, f.data ?? new Uint8Array(0)]) });
    at += local.length + nameBytes.length + extra.length + f.size;
  }
  const cdBytes = Buffer.concat(central);
  const record = Buffer.alloc(56);
  record.writeUInt32LE(0x06064b50, 0);
  record.writeBigUInt64LE(44n, 4);
  record.writeBigUInt64LE(BigInt(files.length), 24);
  record.writeBigUInt64LE(BigInt(files.length), 32);
  record.writeBigUInt64LE(BigInt(cdBytes.length), 40);
  record.writeBigUInt64LE(BigInt(at), 48);
  const locator = Buffer.alloc(20);
  locator.writeUInt32LE(0x07064b50, 0);
  locator.writeBigUInt64LE(BigInt(at + cdBytes.length), 8);
  locator.writeUInt32LE(1, 16);
  const eocd = Buffer.alloc(22);
  eocd.writeUInt32LE(0x06054b50, 0);
  eocd.writeUInt16LE(0xffff, 8);
  eocd.writeUInt16LE(0xffff, 10);
  eocd.writeUInt32LE(0xffffffff, 12);
  eocd.writeUInt32LE(0xffffffff, 16);
  chunks.push({ at, bytes: Buffer.concat([cdBytes, record, locator, eocd]) });
  const p = join(tmp, name);
  const fd = openSync(p, 'w');
  try {
    for (const c of chunks) writeSync(fd, c.bytes, 0, c.bytes.length, c.at);
  } finally {
    closeSync(fd);
  }
  return p;
}

function zip64Extra(values: readonly number[]): Buffer {
  const b = Buffer.alloc(4 + 8 * values.length);
  b.writeUInt16LE(1, 0);
  b.writeUInt16LE(8 * values.length, 2);
  values.forEach((v, i) => b.writeBigUInt64LE(BigInt(v), 4 + 8 * i));
  return b;
}

// ---- running and checking ----

interface Run {
  readonly status: number | null;
  readonly stdout: string;
  readonly stderr: string;
  readonly seconds: number;
}

/** `sd ARGS` in a child process whose V8 heap is capped at HEAP_MB. */
function sd(...args: string[]): Run {
  const t0 = performance.now();
  const r = spawnSync(process.execPath, [CLI, ...args], {
    encoding: 'utf8',
    timeout: 3 * CLI_SECONDS * 1000,
    maxBuffer: 64 * MiB,
    env: { ...process.env, NODE_OPTIONS: `${process.env.NODE_OPTIONS ?? ''} --max-old-space-size=${HEAP_MB}`.trim(), SD_BACKEND: '' },
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr, seconds: (performance.now() - t0) / 1000 };
}

/** Exit 1 with one `sd: ...` line matching `message`: no stack trace, no crash, within CLI_SECONDS. */
function expectRefused(r: Run, message: RegExp): void {
  const detail = `exit ${r.status} after ${r.seconds.toFixed(1)} s\n${r.stderr.slice(0, 2000)}`;
  expect(r.status, detail).toBe(1);
  expect(r.stderr, detail).toMatch(/^sd: [^\n]*\n$/);
  expect(r.stderr, detail).toMatch(message);
  expect(r.seconds, detail).toBeLessThan(CLI_SECONDS);
}

function errorOf(f: () => unknown): WeightsError {
  try {
    f();
  } catch (e) {
    if (e instanceof WeightsError) return e;
    throw new Error(`expected a WeightsError, got ${e instanceof Error ? `${e.name}: ${e.message}` : String(e)}`, { cause: e });
  }
  throw new Error('expected a WeightsError, nothing was thrown');
}

/** A WeightsLimitError naming `limit`, thrown within `seconds`. */
/**
 * Seconds of this process's CPU time since `from` (process.cpuUsage()): a bound on the work done that holds however
 * busy the machine is (the test files run in parallel, beside whatever else CI runs), unlike wall time.
 */
function cpuSeconds(from: NodeJS.CpuUsage): number {
  const u = process.cpuUsage(from);
  return (u.user + u.system) / 1e6;
}

function limitErrorOf(f: () => unknown, limit: RegExp, seconds = 10): WeightsLimitError {
  const t0 = process.cpuUsage();
  const e = errorOf(f);
  expect(e, e.message).toBeInstanceOf(WeightsLimitError);
  expect((e as WeightsLimitError).limit).toMatch(limit);
  expect(e.message).toContain((e as WeightsLimitError).max.toLocaleString('en-US'));
  expect(cpuSeconds(t0)).toBeLessThan(seconds);
  return e as WeightsLimitError;
}

/** The characters of `s` that must never reach a terminal raw: C0 controls but \n, DEL, C1, bidi controls, line separators. */
function rawControls(s: string): string[] {
  return [...s].filter((ch) => {
    const c = ch.charCodeAt(0);
    return (c < 0x20 && c !== 0x0a) || (c >= 0x7f && c <= 0x9f) || c === 0x061c || c === 0x200e || c === 0x200f || (c >= 0x2028 && c <= 0x202e) || (c >= 0x2066 && c <= 0x2069);
  });
}

// ---- the cases ----

describe('pickle memory: bounded objects, heap, memo, stack and string lengths', () => {
  const hooks: PickleHooks = { allowGlobal: () => true, call: () => null, persistentLoad: () => null };
  const load = (data: Uint8Array) => unpickle(data, 'flood.pkl', hooks);

  it('sd inspect of a 24 MB pickle of EMPTY_DICT is refused under a 256 MB heap, naming the limit', () => {
    const path = writeTemp('dicts.ckpt', ckptZip(flood([], [0x7d], 24 * MiB)));
    expectRefused(sd('inspect', path), /dicts\.ckpt:archive\/data\.pkl: pickle builds more than the [\d,]+ .*(heap|objects)/);
  });

  it('refuses floods of 1-byte opcodes by the limit each one reaches first', () => {
    const n = 2_500_000;
    limitErrorOf(() => load(flood([], [0x7d], n)), /heap/); // EMPTY_DICT, ~240 bytes each
    limitErrorOf(() => load(flood([0x5d], [0x7d, 0x61], n)), /heap/); // [] then {} APPEND: the stack stays small
    limitErrorOf(() => load(flood([0x5d], [0x29, 0x61], n)), /objects/); // () APPEND
    limitErrorOf(() => load(flood([], [0x5d], n)), /stack/); // EMPTY_LIST
    limitErrorOf(() => load(flood([], [0x4e], n)), /stack/); // NONE
    limitErrorOf(() => load(flood([], [0x28], n)), /stack/); // MARK
    limitErrorOf(() => load(flood([0x4e], [0x94], n)), /memo/); // MEMOIZE
  });

  it('refuses a list or dict grown item by item past the heap bound', () => {
    limitErrorOf(() => load(flood([0x5d, 0x94], [0x68, 0, 0x61], 9_000_000)), /heap/); // l = []; l.append(l) ...
    const items = new Uint8Array(3_000_000 * 7); // {i: None} for 3M distinct i: BININT i, NONE, SETITEM
    for (let i = 0; i < 3_000_000; i++) items.set([0x4a, ...u32(i), 0x4e, 0x73], 7 * i);
    limitErrorOf(() => load(concat([0x80, 2, 0x7d], items, [0x2e])), /heap/);
  });

  it('refuses an overlong string and an overlong global name', () => {
    const s = 5 * MiB;
    const text = concat([0x80, 2, 0x58, ...u32(s)], new Uint8Array(s).fill(0x61), [0x2e]);
    limitErrorOf(() => load(text), /string/);
    const global = concat([0x80, 2, 0x63], Buffer.from(`torch\n${'A'.repeat(5000)}\n`, 'latin1'), [0x2e]);
    limitErrorOf(() => load(global), /global/);
  });

  it('an SDXL-sized checkpoint with 8x its tensors and a _metadata entry per tensor is far inside every bound', () => {
    const n = 20_000; // SDXL has ~2,500 tensors, a kohya LoRA ~1,000
    const p = new Pickle().orderedDict();
    p.items(n, (i) => p.str(`model.diffusion_model.blocks.${i}.weight`).tensor(String(i), 'FloatStorage', 1));
    p.op(0x7d).put().once('s _metadata', () => p.str('_metadata')).orderedDict();
    p.items(n, (i) => p.str(`model.diffusion_model.blocks.${i}`).op(0x7d).put().once('s version', () => p.str('version')).op(0x4b, 1, 0x73));
    p.op(0x73, 0x62); // state['_metadata'] = ..., BUILD
    const storages = Array.from({ length: n }, (_, i) => ({ key: String(i), data: new Uint8Array(4) }));
    const t0 = process.cpuUsage();
    const src = CkptFile.open(writeTemp('sdxl-sized.ckpt', ckptZip(p.bytes(), storages)));
    expect(src.keys().length).toBe(n);
    expect(src.info(`model.diffusion_model.blocks.${n - 1}.weight`)).toEqual({ dtype: 'F32', shape: [1] });
    src.close();
    expect(cpuSeconds(t0)).toBeLessThan(20);
  });
});

describe('safetensors header: size, nesting and duplicate keys', () => {
  it('sd inspect of a 100 MiB header of nested JSON is refused at once under a 256 MB heap', () => {
    const depth = 50 * MiB;
    const header = Buffer.alloc(2 * depth, 0x5b); // [[[[...]]]]
    header.fill(0x5d, depth);
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(header.length));
    const path = writeTemp('nested.safetensors', Buffer.concat([len, header]));
    expectRefused(sd('inspect', path), /nested\.safetensors: header of 104,857,600 bytes is more than the 16,777,216/);
  });

  it('refuses a header over 16 MiB before reading it (sparse file of that size)', () => {
    const n = 16 * MiB + 8;
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(n));
    const path = sparseFile('big-header.safetensors', Buffer.concat([len, Buffer.from('{')]), 8 + n);
    limitErrorOf(() => SafetensorsFile.open(path), /headerBytes/);
  });

  it('reads 14 MiB of __metadata__ (a kohya LoRA\'s tag frequencies) beside its tensors', () => {
    const frequencies = JSON.stringify({ dataset: Object.fromEntries(Array.from({ length: 700_000 }, (_, i) => [`tag_${i}`, i])) });
    const header = `{"__metadata__":{"ss_tag_frequency":${JSON.stringify(frequencies)}},"w":${entry('F32', [1], 0, 4)}}`;
    expect(header.length).toBeGreaterThan(14 * MiB);
    expect(header.length).toBeLessThan(16 * MiB);
    const src = SafetensorsFile.open(writeTemp('lora-metadata.safetensors', safetensors(header, new Uint8Array(4))));
    expect(src.keys()).toEqual(['w']);
    expect(src.metadata.get('ss_tag_frequency')).toBe(frequencies);
    src.close();
  });

  it('refuses nesting from 128 levels, as the reference reader does, checked before any value is built', () => {
    // the top object, the entry, then d - 2 arrays in a field the reader does not know (and skips)
    const nest = (d: number) => `{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":${'['.repeat(d - 2)}${']'.repeat(d - 2)}}}`;
    const ok = SafetensorsFile.open(writeTemp('depth-127.safetensors', safetensors(nest(127), new Uint8Array(4))));
    expect(ok.keys()).toEqual(['w']);
    ok.close();
    limitErrorOf(() => SafetensorsFile.open(writeTemp('depth-128.safetensors', safetensors(nest(128), new Uint8Array(4)))), /nesting/);
    const deep = `{"w":{"x":${'['.repeat(8 * MiB)}`;
    limitErrorOf(() => SafetensorsFile.open(writeTemp('depth-8M.safetensors', safetensors(deep))), /nesting/, 2);
  });

  it('refuses a key given twice: a tensor name, a tensor field, a metadata key', () => {
    const twice = `{"a":${entry('F32', [1], 0, 4)},"a":${entry('F32', [1], 4, 8)}}`;
    expect(errorOf(() => SafetensorsFile.open(writeTemp('dup.safetensors', safetensors(twice, new Uint8Array(8))))).message).toMatch(
      /dup\.safetensors: header names "a" twice/,
    );
    const field = `{"a":{"dtype":"F32","shape":[1],"dtype":"F16","data_offsets":[0,4]}}`;
    expect(errorOf(() => SafetensorsFile.open(writeTemp('dup-field.safetensors', safetensors(field, new Uint8Array(4))))).message).toMatch(
      /tensor a: entry names "dtype" twice/,
    );
    const meta = `{"__metadata__":{"k":"1","k":"2"},"a":${entry('F32', [1], 0, 4)}}`;
    expect(errorOf(() => SafetensorsFile.open(writeTemp('dup-meta.safetensors', safetensors(meta, new Uint8Array(4))))).message).toMatch(
      /__metadata__ names "k" twice/,
    );
  });

  it('keeps refusing what it refused: not JSON, not an object, trailing text, bad strings', () => {
    for (const [name, header] of [
      ['not-object', '[1,2]'],
      ['trailing', `{"a":${entry('F32', [1], 0, 4)}} x`],
      ['unterminated', '{"a":{"dtype":"F32'],
      ['raw-newline', '{"a\nb":{}}'],
      ['bad-escape', '{"a\\q":{}}'],
      ['metadata-number', '{"__metadata__":{"k":1}}'],
      ['shape-float', `{"a":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}}`],
    ]) {
      expect(() => SafetensorsFile.open(writeTemp(`${name}.safetensors`, safetensors(header, new Uint8Array(4)))), name).toThrow(WeightsError);
    }
  });
});

describe('many tensors', () => {
  const n = 150_000; // past the ~120,000 arguments a spread into Math.max takes before the stack overflows
  const header = `{${Array.from({ length: n }, (_, i) => `"t${i}":${entry('U8', [1], i, i + 1)}`).join(',')}}`;
  const path = writeTemp('many.safetensors', safetensors(header, new Uint8Array(n)));

  it('sd inspect lists 150,000 tensors under a 256 MB heap', () => {
    const r = sd('inspect', path);
    expect(r.status, r.stderr.slice(0, 2000)).toBe(0);
    expect(r.stdout.split('\n').filter((l) => /^t\d+ /.test(l)).length).toBe(n);
    expect(r.stdout).toMatch(/tensors: +150000 \(150000 U8\)/);
  });

  it('sd convert writes all 150,000', () => {
    const out = join(tmp, 'many-out.safetensors');
    const r = sd('convert', path, out);
    expect(r.status, r.stderr.slice(0, 2000)).toBe(0);
    const src = SafetensorsFile.open(out);
    expect(src.keys().length).toBe(n);
    expect([...src.bytes(`t${n - 1}`)]).toEqual([0]);
    src.close();
  });
});

describe('__proto__ and other Object.prototype names', () => {
  const NAMES = ['__proto__', 'constructor', 'toString', 'hasOwnProperty', 'valueOf', 'a'];

  it('sd convert keeps every tensor of a safetensors file, bytes and all', () => {
    const header = `{${NAMES.map((k, i) => `${JSON.stringify(k)}:${entry('F32', [1], 4 * i, 4 * i + 4)}`).join(',')}}`;
    const input = writeTemp('proto.safetensors', safetensors(header, new Uint8Array(Float32Array.from(NAMES.map((_, i) => i)).buffer)));
    const src = SafetensorsFile.open(input);
    expect(src.keys()).toEqual(NAMES);
    src.close();
    const out = join(tmp, 'proto-out.safetensors');
    expect(convertWeights(input, out).tensors).toBe(NAMES.length);
    const back = SafetensorsFile.open(out);
    expect(back.keys()).toEqual(NAMES);
    NAMES.forEach((k, i) => expect([...back.float32(k)], k).toEqual([i]));
    back.close();
  });

  it('sd convert keeps __proto__ from a PyTorch checkpoint', () => {
    const p = new Pickle().op(0x7d).put();
    p.items(NAMES.length, (i) => p.str(NAMES[i]).tensor(String(i), 'FloatStorage', 1));
    const storages = NAMES.map((_, i) => ({ key: String(i), data: new Uint8Array(Float32Array.of(i).buffer) }));
    const out = join(tmp, 'proto-ckpt-out.safetensors');
    convertWeights(writeTemp('proto.ckpt', ckptZip(p.bytes(), storages)), out);
    const back = SafetensorsFile.open(out);
    expect(back.keys()).toEqual(NAMES);
    expect([...back.float32('__proto__')]).toEqual([0]);
    back.close();
  });

  it('metadata keys come from the file only (a Map: no inherited constructor)', () => {
    const header = `{"__metadata__":{"__proto__":"p","format":"pt"},"a":${entry('F32', [1], 0, 4)}}`;
    const src = SafetensorsFile.open(writeTemp('proto-meta.safetensors', safetensors(header, new Uint8Array(4))));
    expect([...src.metadata]).toEqual([['__proto__', 'p'], ['format', 'pt']]);
    expect(src.metadata.get('constructor')).toBeUndefined();
    src.close();
  });

  it('writeSafetensors refuses a name given twice, writing nothing', () => {
    const out = join(tmp, 'twice.safetensors');
    const info = { dtype: 'F32', shape: [1] } as const;
    const e = errorOf(() => writeSafetensors(out, [['a', info], ['a', info]], () => new Float32Array(1)));
    expect(e.message).toMatch(/tensor a is given twice/);
    expect(existsSync(out)).toBe(false);
    expect(readdirSync(tmp).filter((f) => f.startsWith('twice'))).toEqual([]);
  });
});

describe('huge tensors: a clear WeightsError, never a RangeError', () => {
  const big = 5 * GiB;

  it('a tensor declared past the end of a small file is refused at open', () => {
    const header = `{"big":${entry('U8', [big], 0, big)}}`;
    expect(errorOf(() => SafetensorsFile.open(writeTemp('big-small.safetensors', safetensors(header)))).message).toMatch(/data_offsets .* out of range/);
  });

  it('a consistent 5 GiB safetensors tensor: inspect lists it; reading or converting it names the 4 GiB bound', () => {
    const head = safetensors(`{"big":${entry('F16', [big / 2], 0, big)},"small":${entry('U8', [1], big, big + 1)}}`);
    const path = sparseFile('big.safetensors', head, head.byteLength + big + 1);
    const src = SafetensorsFile.open(path);
    expect(src.info('big').shape).toEqual([big / 2]);
    expect(src.bytes('small')).toEqual(Uint8Array.of(0));
    limitErrorOf(() => src.bytes('big'), /tensorBytes/);
    limitErrorOf(() => src.float32('big'), /tensorBytes/);
    src.close();
    expect(sd('inspect', path).stdout).toMatch(/big +F16 +\[2684354560\]/);
    const out = join(tmp, 'big-out.safetensors');
    expectRefused(sd('convert', path, out), /big\.safetensors: tensor big is 5,368,709,120 bytes, more than the 4,294,967,296/);
    expect(existsSync(out)).toBe(false);
    expect(readdirSync(tmp).filter((f) => f.startsWith('big-out'))).toEqual([]);
  });

  it('a consistent 5 GiB storage in a zip64 checkpoint: inspect lists it; converting it names the bound', () => {
    const path = sparseCheckpoint('big.ckpt', big);
    const src = CkptFile.open(path);
    expect(src.info('big')).toEqual({ dtype: 'U8', shape: [big] });
    limitErrorOf(() => src.bytes('big'), /tensorBytes/);
    src.close();
    expect(sd('inspect', path).stdout).toMatch(/big +U8 +\[5368709120\]/);
    expectRefused(sd('convert', path, join(tmp, 'big-ckpt-out.safetensors')), /big\.ckpt: tensor big is 5,368,709,120 bytes, more than the 4,294,967,296/);
  });

  it.skipIf(freemem() < 8 * GiB)('reads a 2 GiB tensor (one read call takes at most 2 GiB - 1 bytes)', () => {
    const n = 2 * GiB + 16;
    const head = safetensors(`{"t":${entry('U8', [n], 0, n)}}`);
    const src = SafetensorsFile.open(sparseFile('2g.safetensors', head, head.byteLength + n));
    const bytes = src.bytes('t');
    expect(bytes.byteLength).toBe(n);
    expect(bytes[n - 1]).toBe(0);
    src.close();
  });
});

describe('format detection by structure, not one byte', () => {
  it('opens safetensors whose header length has low byte 0x80 and whose JSON starts after spaces', () => {
    const json = `   ${`{"a":${entry('F32', [1], 0, 4)}}`.padEnd(0x180 - 3, ' ')}`;
    const file = safetensors(json, new Uint8Array(Float32Array.of(2.5).buffer));
    expect(file[0]).toBe(0x80);
    const src = openWeights(writeTemp('x80-leading.safetensors', file));
    expect([...src.float32('a')]).toEqual([2.5]);
    src.close();
  });

  it('still refuses a legacy pickle as such, and does not call other 0x80 bytes one', () => {
    expect(errorOf(() => openWeights(writeTemp('legacy.pt', Uint8Array.from([0x80, 2, 0x8a, 0x0a, 0x6c, 0xfc])))).message).toMatch(/legacy \(non-zip\)/);
    expect(errorOf(() => openWeights(writeTemp('x80-junk.bin', Uint8Array.from([0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80])))).message).not.toMatch(/legacy/);
  });
});

describe('control characters in names are escaped wherever they are printed', () => {
  const NAMES = ['red\x1b[31mtext', 'over\rwrite', 'rev\u202eersed', 'nel\u0085x', 'iso\u2066x', 'bell\x07'];

  it('printable escapes C0, C1, DEL and bidi controls, and nothing else', () => {
    expect(printable('a\x1b[2Jb\r\n\t\x00\x7f\u0085\u202e\u2066\u2028z')).toBe('a\\x1b[2Jb\\r\\n\\t\\x00\\x7f\\x85\\u202e\\u2066\\u2028z');
    expect(printable('model.diffusion_model.input_blocks.0.0.weight ünïcödé 中文 \\x1b')).toBe('model.diffusion_model.input_blocks.0.0.weight ünïcödé 中文 \\x1b');
    expect(printable(printable('\x1b'))).toBe('\\x1b');
  });

  it('sd inspect prints tensor names escaped', () => {
    const header = `{${NAMES.map((k, i) => `${JSON.stringify(k)}:${entry('U8', [1], i, i + 1)}`).join(',')}}`;
    const r = sd('inspect', writeTemp('escapes.safetensors', safetensors(header, new Uint8Array(NAMES.length))));
    expect(r.status, r.stderr).toBe(0);
    expect(rawControls(r.stdout)).toEqual([]);
    for (const s of ['red\\x1b[31mtext', 'over\\rwrite', 'rev\\u202eersed', 'nel\\x85x', 'iso\\u2066x', 'bell\\x07']) expect(r.stdout).toContain(s);
  });

  it('error messages carry names from a file escaped: tensor names, pickle globals, storage keys', () => {
    const header = `{"x\\u001b]0;pwned\\u0007":${entry('F32', [9], 0, 4)}}`;
    const e1 = errorOf(() => openWeights(writeTemp('esc-shape.safetensors', safetensors(header, new Uint8Array(4)))));
    expect(e1.message).toContain('tensor x\\x1b]0;pwned\\x07');
    const evil = concat([0x80, 2, 0x63], Buffer.from('os\x1b[2J\nsystem\n', 'latin1'), [0x2e]);
    const e2 = errorOf(() => openWeights(writeTemp('esc-global.ckpt', ckptZip(evil))));
    expect(e2.message).toContain('refusing pickle global os\\x1b[2J');
    const p = new Pickle().op(0x7d).put().op(0x28).str('w').tensor('k\r1', 'FloatStorage', 1).op(0x75);
    const e3 = errorOf(() => openWeights(writeTemp('esc-key.ckpt', ckptZip(p.bytes()))));
    expect(e3.message).toContain('storage k\\r1');
    for (const e of [e1, e2, e3]) expect(rawControls(e.message)).toEqual([]);
  });

  it('a path is escaped too', () => {
    expect(() => openWeights(join(tmp, 'missing\x1b.safetensors'))).toThrow(/missing\\x1b\.safetensors: cannot open/);
  });

  it('a refused file never prints raw control characters through the CLI either', () => {
    const header = `{"\\u001b[2J\\r\\u202e":${entry('F32', [9], 0, 4)}}`;
    expectRefused(sd('inspect', writeTemp('esc-cli.safetensors', safetensors(header, new Uint8Array(4)))), /tensor \\x1b\[2J\\r\\u202e/);
  });
});


function concat(...parts: ArrayLike<number>[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}
