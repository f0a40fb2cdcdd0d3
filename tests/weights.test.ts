/**
 * Weight files: the PyTorch zip checkpoint reader (zip, zip64, restricted unpickler) against the fixture
 * safetensors, the converter, hostile and broken files, and corrupted copies of model.ckpt.
 * Checkpoints beyond the fixtures are built here by hand (`buildCheckpoint`), as torch.save lays them out.
 */
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, openSync, closeSync, readFileSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { run as runBadWeights, PWNED_MARKER } from '../src/parity/bad-weights.js';
import { CkptFile } from '../src/weights/ckpt.js';
import { convertWeights } from '../src/weights/convert.js';
import { encodeFloat16, type DType } from '../src/weights/dtypes.js';
import { diffusersToOriginal, originalToDiffusers, type Component } from '../src/weights/layout.js';
import { detectLayout, openWeights, weightsFormat } from '../src/weights/open.js';
import { unpickle, type PickleHooks } from '../src/weights/pickle.js';
import { SafetensorsFile, writeSafetensors } from '../src/weights/safetensors.js';
import { WeightsError, type TensorInfo, type TensorSource } from '../src/weights/types.js';
import { ZipArchive } from '../src/weights/zip.js';
import { DelegatingSource } from '../src/weights/delegating.js';
import { buildZip } from './zip-builder.js';

const PIPELINE = 'tests/fixtures/pipeline';
const BAD = 'tests/fixtures/bad-weights';
const tmp = mkdtempSync(join(tmpdir(), 'sd-weights-test-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

// ---- a hand-written torch.save: protocol-2 pickle of a state dict + one zip entry per storage ----

interface CkptTensor {
  readonly name: string;
  readonly dtype: 'F32' | 'F16' | 'I64';
  readonly shape: readonly number[];
  readonly data: Uint8Array;
  readonly stride?: readonly number[];
}

const STORAGE: Record<CkptTensor['dtype'], string> = { F32: 'FloatStorage', F16: 'HalfStorage', I64: 'LongStorage' };
const ITEM: Record<CkptTensor['dtype'], number> = { F32: 4, F16: 2, I64: 8 };

class PickleWriter {
  readonly out: number[] = [];
  op(...bytes: number[]): this {
    this.out.push(...bytes);
    return this;
  }
  str(s: string): this {
    const b = Buffer.from(s, 'utf-8');
    return this.op(0x58, b.length & 0xff, (b.length >> 8) & 0xff, 0, 0, ...b); // BINUNICODE
  }
  int(n: number): this {
    const b = Buffer.alloc(4);
    b.writeInt32LE(n);
    return this.op(0x4a, ...b); // BININT
  }
  global(module: string, name: string): this {
    return this.op(0x63, ...Buffer.from(`${module}\n${name}\n`, 'latin1')); // GLOBAL
  }
  tuple(values: readonly number[]): this {
    this.op(0x28);
    for (const v of values) this.int(v);
    return this.op(0x74); // MARK ... TUPLE
  }
  bytes(): Uint8Array {
    return Uint8Array.from(this.out);
  }
}

/** {"state_dict": {name: tensor}, "global_step": 7}, as Lightning checkpoints hold it. */
function statePickle(tensors: readonly CkptTensor[], global: [string, string] = ['torch._utils', '_rebuild_tensor_v2']): Uint8Array {
  const p = new PickleWriter().op(0x80, 2, 0x7d, 0x28).str('state_dict').op(0x7d, 0x28); // PROTO 2, {, MARK, key, {, MARK
  tensors.forEach((t, i) => {
    p.str(t.name).global(...global).op(0x28); // name, rebuild, MARK (args)
    p.op(0x28).str('storage').global('torch', STORAGE[t.dtype]).str(String(i)).str('cpu').int(t.data.byteLength / ITEM[t.dtype]).op(0x74, 0x51); // pid, BINPERSID
    p.int(0).tuple(t.shape).tuple(t.stride ?? contiguous(t.shape)).op(0x89); // offset, size, stride, False
    p.global('collections', 'OrderedDict').op(0x29, 0x52, 0x74, 0x52); // OrderedDict(), TUPLE, REDUCE
  });
  return p.op(0x75).str('global_step').int(7).op(0x75, 0x2e).bytes(); // SETITEMS, ..., SETITEMS, STOP
}

function contiguous(shape: readonly number[]): number[] {
  const s = shape.map(() => 1);
  for (let i = shape.length - 2; i >= 0; i--) s[i] = s[i + 1] * shape[i + 1];
  return s;
}

function buildCheckpoint(tensors: readonly CkptTensor[], opts: { zip64?: boolean; prefix?: string; pickle?: Uint8Array } = {}): Uint8Array {
  const prefix = opts.prefix ?? 'archive';
  return buildZip(
    [
      { name: `${prefix}/data.pkl`, data: opts.pickle ?? statePickle(tensors) },
      ...tensors.map((t, i) => ({ name: `${prefix}/data/${i}`, data: t.data })),
      { name: `${prefix}/version`, data: Buffer.from('3\n') },
    ],
    { zip64: opts.zip64 },
  );
}

function writeTemp(name: string, data: Uint8Array): string {
  const p = join(tmp, name);
  writeFileSync(p, data);
  return p;
}

const f32 = (values: number[]) => new Uint8Array(Float32Array.from(values).buffer);
const SMALL: CkptTensor[] = [
  { name: 'w', dtype: 'F32', shape: [2, 3], data: f32([1, 2, 3, 4, 5, -6.5]) },
  { name: 'h', dtype: 'F16', shape: [2], data: new Uint8Array(encodeFloat16(Float32Array.from([0.5, -2])).buffer) },
  { name: 'ids', dtype: 'I64', shape: [1, 3], data: new Uint8Array(BigInt64Array.from([0n, 1n, 2n]).buffer) },
];

function expectSameTensors(actual: TensorSource, expected: TensorSource): void {
  expect(actual.keys().sort()).toEqual(expected.keys().sort());
  for (const k of expected.keys()) {
    expect(actual.info(k), k).toEqual(expected.info(k));
    expect(Buffer.from(actual.bytes(k)).equals(Buffer.from(expected.bytes(k))), `bytes of ${k}`).toBe(true);
  }
}

function weightsErrorOf(f: () => unknown): WeightsError {
  try {
    f();
  } catch (e) {
    if (e instanceof WeightsError) return e;
    throw new Error(`expected a WeightsError, got ${e instanceof Error ? `${e.name}: ${e.message}` : String(e)}`, { cause: e });
  }
  throw new Error('expected a WeightsError, nothing was thrown');
}

describe('PyTorch zip checkpoint', () => {
  it('model.ckpt holds exactly the tensors of model.safetensors', () => {
    const ckpt = openWeights(`${PIPELINE}/model.ckpt`);
    const ref = SafetensorsFile.open(`${PIPELINE}/model.safetensors`);
    expect(weightsFormat(ckpt)).toBe('pytorch-zip');
    expect(detectLayout(ckpt)).toBe('sd1-original');
    expect(ckpt.keys()).not.toContain('global_step'); // non-tensor entries are left out
    expectSameTensors(ckpt, ref);
    ckpt.close();
    ref.close();
  });

  it('model.ckpt halved equals model-fp16.safetensors, integer tensors kept', () => {
    const ckpt = openWeights(`${PIPELINE}/model.ckpt`);
    const half = SafetensorsFile.open(`${PIPELINE}/model-fp16.safetensors`);
    for (const k of half.keys()) {
      const { dtype } = half.info(k);
      const ours = dtype === 'F16' ? new Uint8Array(encodeFloat16(ckpt.float32(k)).buffer) : ckpt.bytes(k);
      expect(Buffer.from(ours).equals(Buffer.from(half.bytes(k))), k).toBe(true);
    }
    ckpt.close();
    half.close();
  });

  it('reads a hand-built checkpoint: any top folder name, F32/F16/I64, state dict under "state_dict"', () => {
    const src = CkptFile.open(writeTemp('small.ckpt', buildCheckpoint(SMALL, { prefix: 'my_model' })));
    expect(src.keys()).toEqual(['w', 'h', 'ids']);
    expect(src.info('w')).toEqual({ dtype: 'F32', shape: [2, 3] });
    expect([...src.float32('w')]).toEqual([1, 2, 3, 4, 5, -6.5]);
    expect([...src.float32('h')]).toEqual([0.5, -2]);
    expect(src.info('ids').dtype).toBe('I64');
    expect(() => src.float32('ids')).toThrow(WeightsError);
    src.close();
  });

  it('reads a zip64 archive (sizes and offsets in zip64 extra fields and end records)', () => {
    const bytes = buildCheckpoint(SMALL, { zip64: true });
    expect(Buffer.from(bytes).includes(Buffer.from([0x50, 0x4b, 0x06, 0x06]))).toBe(true); // zip64 EOCD present
    const src = openWeights(writeTemp('small64.ckpt', bytes));
    expect([...src.float32('w')]).toEqual([1, 2, 3, 4, 5, -6.5]);
    expect(src.info('ids')).toEqual({ dtype: 'I64', shape: [1, 3] });
    src.close();
  });

  it('finds the end of central directory behind an archive comment', () => {
    const zip = ZipArchive.open(writeTemp('comment.zip', buildZip([{ name: 'a/b', data: f32([3]) }], { comment: 'x'.repeat(1000) })));
    expect([...new Float32Array(zip.read('a/b').buffer)]).toEqual([3]);
    zip.close();
  });

  it('refuses a compressed entry, naming it', () => {
    const bytes = buildCheckpoint(SMALL);
    const central = Buffer.from(bytes).indexOf(Buffer.from([0x50, 0x4b, 0x01, 0x02])); // first central entry: data.pkl
    bytes[central + 10] = 8; // method deflate
    const e = weightsErrorOf(() => CkptFile.open(writeTemp('deflate.ckpt', bytes)));
    expect(e.message).toMatch(/archive\/data\.pkl is compressed \(method 8\)/);
  });

  it('refuses a pickle global that is not a torch state-dict one, without running it', () => {
    const pickle = statePickle(SMALL, ['posix', 'system']);
    const e = weightsErrorOf(() => CkptFile.open(writeTemp('global.ckpt', buildCheckpoint(SMALL, { pickle }))));
    expect(e.message).toMatch(/refusing pickle global posix\.system: only torch state-dict globals are allowed/);
  });

  it('refuses an opcode torch.save does not use, naming it', () => {
    const inst = Uint8Array.from([0x80, 2, 0x69, ...Buffer.from('os\nsystem\n'), 0x2e]); // INST os.system
    const e = weightsErrorOf(() => CkptFile.open(writeTemp('opcode.ckpt', buildCheckpoint(SMALL, { pickle: inst }))));
    expect(e.message).toMatch(/refusing pickle opcode INST \(0x69\) at byte 2/);
  });

  it('refuses a non-contiguous tensor', () => {
    const t: CkptTensor = { ...SMALL[0], stride: [1, 2] };
    const e = weightsErrorOf(() => CkptFile.open(writeTemp('strided.ckpt', buildCheckpoint([t]))));
    expect(e.message).toMatch(/tensor w is not contiguous \(shape \[2, 3\], stride \[1, 2\]\)/);
  });

  it('refuses a legacy (non-zip) pickle checkpoint', () => {
    const e = weightsErrorOf(() => openWeights(writeTemp('legacy.pt', Uint8Array.from([0x80, 2, 0x8a, 0x0a]))));
    expect(e.message).toMatch(/legacy \(non-zip\) PyTorch checkpoint: not supported/);
  });
});

describe('restricted unpickler', () => {
  const hooks: PickleHooks = {
    allowGlobal: () => false,
    call: () => null,
    persistentLoad: () => null,
  };
  const load = (bytes: number[]) => unpickle(Uint8Array.from(bytes), 'test.pkl', hooks);

  it('decodes integers, floats, strings, tuples and lists', () => {
    // (LONG1 -2, BININT2 513, BINFLOAT 1.5, SHORT_BINUNICODE 'hi', [NONE, TRUE]) as a 5-tuple... built with MARK/TUPLE
    const v = load([0x80, 2, 0x28, 0x8a, 1, 0xfe, 0x4d, 1, 2, 0x47, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0, 0x8c, 2, 0x68, 0x69, 0x5d, 0x28, 0x4e, 0x88, 0x65, 0x74, 0x2e]);
    expect(v).toEqual([-2, 513, 1.5, 'hi', [null, true]]);
  });

  it('refuses truncated and malformed pickles with WeightsError', () => {
    expect(() => load([0x80, 2, 0x7d])).toThrow(/ends without a STOP opcode/);
    expect(() => load([0x80, 2, 0x58, 9, 0, 0, 0, 0x61])).toThrow(/runs past the end/);
    expect(() => load([0x80, 2, 0x52, 0x2e])).toThrow(/stack underflow/);
    expect(() => load([0x80, 2, 0x68, 5, 0x2e])).toThrow(/memo index 5 read before it was written/);
    expect(() => load([0x80, 2, 0x63, ...Buffer.from('builtins\neval\n'), 0x2e])).toThrow(/refusing pickle global builtins\.eval/);
  });
});

describe('sd convert', () => {
  it('model.ckpt -> safetensors gives exactly model.safetensors; --half gives model-fp16.safetensors', () => {
    const out = join(tmp, 'converted.safetensors');
    const r = convertWeights(`${PIPELINE}/model.ckpt`, out);
    expect(r.tensors).toBe(532);
    const [a, ref] = [SafetensorsFile.open(out), SafetensorsFile.open(`${PIPELINE}/model.safetensors`)];
    expectSameTensors(a, ref);
    a.close();
    ref.close();

    const outHalf = join(tmp, 'converted-fp16.safetensors');
    convertWeights(`${PIPELINE}/model.ckpt`, outHalf, { half: true });
    const [h, refHalf] = [SafetensorsFile.open(outHalf), SafetensorsFile.open(`${PIPELINE}/model-fp16.safetensors`)];
    expectSameTensors(h, refHalf);
    h.close();
    refHalf.close();
  });

  it('refuses an existing output without force, and the input itself even with force', () => {
    const out = join(tmp, 'exists.safetensors');
    writeFileSync(out, 'x');
    expect(weightsErrorOf(() => convertWeights(`${PIPELINE}/model.safetensors`, out)).message).toMatch(/already exists; pass --force/);
    expect(readFileSync(out, 'utf-8')).toBe('x');
    convertWeights(`${PIPELINE}/model.safetensors`, out, { force: true });
    const copy = join(tmp, 'self.safetensors');
    copyFileSync(`${PIPELINE}/model.safetensors`, copy);
    expect(weightsErrorOf(() => convertWeights(copy, copy, { force: true })).message).toMatch(/is the input being converted/);
  });
});

describe('hostile and broken files (tests/fixtures/bad-weights)', () => {
  const { cases } = JSON.parse(readFileSync(`${BAD}/cases.json`, 'utf-8')) as { cases: { file: string; why: string }[] };

  it.each(cases)('$file is refused with a WeightsError ($why)', ({ file }) => {
    const e = weightsErrorOf(() => {
      const src = openWeights(join(BAD, file));
      for (const k of src.keys()) src.bytes(k);
    });
    expect(e.message).toContain(file);
    expect(existsSync(PWNED_MARKER)).toBe(false);
  });

  it('the parity runner passes every case', async () => {
    const results = await runBadWeights(BAD, { backend: 'cpu' });
    expect(results.length).toBe(cases.length);
    expect(results.filter((r) => !r.passed)).toEqual([]);
  });
});

describe('corrupted copies of model.ckpt', () => {
  const ref = SafetensorsFile.open(`${PIPELINE}/model.safetensors`);
  const original = readFileSync(`${PIPELINE}/model.ckpt`);
  const LIMIT = 100 * 1024; // the pickle (77 KB), local headers and the first storages

  /** Either every tensor equals the reference, or a WeightsError; any other outcome fails. */
  function loadsCorrectlyOrRefuses(path: string): 'loaded' | 'refused' {
    let src: TensorSource | null = null;
    try {
      src = openWeights(path);
      for (const k of ref.keys()) {
        if (!src.has(k) || !Buffer.from(src.bytes(k)).equals(Buffer.from(ref.bytes(k)))) throw new Error(`${path}: ${k} loaded wrong`);
      }
      return 'loaded';
    } catch (e) {
      if (e instanceof WeightsError) return 'refused';
      throw e;
    } finally {
      src?.close();
    }
  }

  it('truncated anywhere in the first 100 KB: refused', () => {
    for (let n = 0; n < LIMIT; n += 3079) {
      const p = writeTemp('cut.ckpt', original.subarray(0, n));
      expect(loadsCorrectlyOrRefuses(p), `cut at ${n}`).toBe('refused');
    }
  });

  it('one byte changed at many offsets of the first 100 KB: loads correctly or is refused', () => {
    const p = join(tmp, 'corrupt.ckpt');
    copyFileSync(`${PIPELINE}/model.ckpt`, p);
    const offsets = [0, 1, 2, 3, 4, 8, 14, 18, 22, 26, 28, 30, 40, 46, 60, 100];
    for (let o = 150; o < LIMIT; o += 2503) offsets.push(o);
    const seen = new Set<string>();
    const fd = openSync(p, 'r+');
    try {
      for (const o of offsets) {
        for (const value of [original[o] ^ 0xff, 0x2e, 0x00]) {
          writeSync(fd, Uint8Array.of(value), 0, 1, o);
          seen.add(loadsCorrectlyOrRefuses(p));
          writeSync(fd, original.subarray(o, o + 1), 0, 1, o);
        }
      }
    } finally {
      closeSync(fd);
    }
    expect([...seen].sort()).toEqual(['loaded', 'refused']); // bytes no reader uses (timestamps) change nothing
  });
});

describe('openWeights dispatch', () => {
  it('recognizes safetensors by content and reports its layout', () => {
    const src = openWeights(`${PIPELINE}/model-fp16.safetensors`);
    expect(weightsFormat(src)).toBe('safetensors');
    expect(detectLayout(src)).toBe('sd1-original');
    src.close();
  });

  it('opens safetensors whose header length starts with byte 0x80 (not a pickle)', () => {
    const json = Buffer.from('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'.padEnd(0x180, ' '));
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(json.length));
    const src = openWeights(writeTemp('x80.safetensors', Buffer.concat([len, json, f32([2.5])])));
    expect(len[0]).toBe(0x80);
    expect([...src.float32('a')]).toEqual([2.5]);
    src.close();
  });

  it('says what a missing path or a plain folder is', () => {
    expect(() => openWeights(join(tmp, 'nope.ckpt'))).toThrow(/cannot open \(ENOENT\)/);
    expect(() => openWeights(tmp)).toThrow(/not a diffusers pipeline/);
  });

  it('finds no layout in unrelated names', () => {
    const p = join(tmp, 'plain.safetensors');
    convertWeights(writeTemp('plain.ckpt', buildCheckpoint(SMALL)), p);
    const src = openWeights(p);
    expect(detectLayout(src)).toBe('unknown');
    expect(src.info('h').dtype satisfies DType).toBe('F16');
    src.close();
  });
});

describe('diffusers folder', () => {
  /**
   * The fixture model written as a diffusers folder with the forward map (original -> diffusers names, VAE
   * attention as linear [out, in]); the UNet as a zip checkpoint `.bin`, the others as safetensors.
   */
  function writeDiffusersFolder(dir: string): void {
    const ref = SafetensorsFile.open(`${PIPELINE}/model.safetensors`);
    const parts = new Map<Component, [string, TensorInfo, Uint8Array][]>();
    for (const [name, d] of originalToDiffusers(ref.keys())) {
      const info = ref.info(name);
      const shape = d.linearAsConv ? info.shape.slice(0, 2) : info.shape;
      parts.set(d.component, [...(parts.get(d.component) ?? []), [d.key, { dtype: info.dtype, shape }, ref.bytes(name)]]);
    }
    ref.close();
    const files: Partial<Record<Component, string>> = { unet: 'diffusion_pytorch_model.bin', vae: 'diffusion_pytorch_model.safetensors', text_encoder: 'model.safetensors' };
    for (const [c, tensors] of parts) {
      mkdirSync(join(dir, c), { recursive: true });
      const path = join(dir, c, files[c] ?? '');
      if (c === 'unet') {
        const ckpt = tensors.map(([name, info, data]) => ({ name, dtype: info.dtype as CkptTensor['dtype'], shape: info.shape, data }));
        writeFileSync(path, buildCheckpoint(ckpt));
      } else {
        const data = new Map(tensors.map(([k, , b]) => [k, b]));
        writeSafetensors(path, tensors.map(([k, info]) => [k, info] as const), (k) => data.get(k) as Uint8Array);
      }
    }
    writeFileSync(join(dir, 'model_index.json'), '{"_class_name": "StableDiffusionPipeline"}');
  }

  const dir = join(tmp, 'diffusers');

  it('round trip: the folder shows every network tensor under its original name, shape and bytes', () => {
    writeDiffusersFolder(dir);
    const ref = SafetensorsFile.open(`${PIPELINE}/model.safetensors`);
    const src = openWeights(dir);
    expect(weightsFormat(src)).toBe('diffusers-folder');
    expect(detectLayout(src)).toBe('diffusers');
    const networks = ref.keys().filter((k) => /^(model\.diffusion_model|first_stage_model|cond_stage_model)\./.test(k));
    expect(src.keys().sort()).toEqual(networks.sort());
    for (const k of networks) {
      expect(src.info(k), k).toEqual(ref.info(k));
      expect(Buffer.from(src.bytes(k)).equals(Buffer.from(ref.bytes(k))), k).toBe(true);
    }
    expect(src.info('first_stage_model.decoder.mid.attn_1.q.weight').shape).toHaveLength(4);
    src.close();
    ref.close();
  });

  it('refuses a diffusers key naming an absurd block index before counting up to it', () => {
    const keys = ['down_blocks.0.resnets.0.conv1.weight', 'down_blocks.99999999999.resnets.0.conv1.weight'];
    expect(() => diffusersToOriginal('unet', keys, 'hostile/unet')).toThrow(/block index 99999999999 is past 1023/);
  });

  it('converts to one safetensors file under the original names', () => {
    const out = join(tmp, 'from-diffusers.safetensors');
    const r = convertWeights(dir, out);
    const ref = SafetensorsFile.open(`${PIPELINE}/model.safetensors`);
    expect(r.tensors).toBe(ref.keys().length - 3); // alphas_cumprod, model_ema.decay, model_ema.num_updates
    const got = SafetensorsFile.open(out);
    for (const k of got.keys()) expect(Buffer.from(got.bytes(k)).equals(Buffer.from(ref.bytes(k))), k).toBe(true);
    got.close();
    ref.close();
  });

  it('maps older diffusers VAE attention names (query/key/value/proj_attn)', () => {
    const keys = ['encoder.down_blocks.0.resnets.0.conv1.weight', 'encoder.mid_block.attentions.0.query.weight', 'encoder.mid_block.attentions.0.proj_attn.bias', 'encoder.mid_block.attentions.0.group_norm.weight'];
    const m = diffusersToOriginal('vae', keys, 'vae');
    expect([...m.keys()]).toEqual([
      'first_stage_model.encoder.down.0.block.0.conv1.weight',
      'first_stage_model.encoder.mid.attn_1.q.weight',
      'first_stage_model.encoder.mid.attn_1.proj_out.bias',
      'first_stage_model.encoder.mid.attn_1.norm.weight',
    ]);
    expect(m.get('first_stage_model.encoder.mid.attn_1.q.weight')?.linearAsConv).toBe(true);
    expect(m.get('first_stage_model.encoder.mid.attn_1.proj_out.bias')?.linearAsConv).toBe(false);
  });

  it('refuses a UNet key with no original name, and a folder missing a component', () => {
    expect(() => diffusersToOriginal('unet', ['class_embedding.linear_1.weight'], 'unet')).toThrow(/has no original \(SD 1\.x or SDXL\) name/);
    expect(diffusersToOriginal('unet', ['add_embedding.linear_1.weight'], 'unet').has('model.diffusion_model.label_emb.0.0.weight')).toBe(true); // SDXL
    const partial = join(tmp, 'partial');
    mkdirSync(join(partial, 'unet'), { recursive: true });
    expect(() => openWeights(partial)).toThrow(/diffusers folder has no unet weights/);
  });
});

describe('reading a tensor in place (bytesInto)', () => {
  const dir = mkdtempSync(join(tmpdir(), 'sd-bytes-into-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  const file = join(dir, 'w.safetensors');
  const values = Float32Array.from({ length: 12 }, (_, i) => i / 8);
  writeSafetensors(file, [['a', { dtype: 'F16', shape: [3, 4] }], ['b', { dtype: 'F32', shape: [12] }]], (n) => (n === 'a' ? encodeFloat16(values) : values));

  it('gives the bytes `bytes` gives, into a buffer of exactly their length', () => {
    const f = SafetensorsFile.open(file);
    try {
      for (const k of ['a', 'b']) {
        const want = f.bytes(k);
        const out = new Uint8Array(want.byteLength).fill(0xee);
        f.bytesInto(k, out);
        expect(Buffer.from(out).equals(Buffer.from(want)), k).toBe(true);
      }
      expect(() => f.bytesInto('a', new Uint8Array(23))).toThrow(/tensor a is 24 bytes, not 23/);
    } finally {
      f.close();
    }
  });

  it('through a delegating source: from the base, unless the source serves bytes of its own', () => {
    const f = SafetensorsFile.open(file);
    try {
      let inPlace = 0;
      const counted = Object.assign(Object.create(f) as SafetensorsFile, {
        bytes: (k: string) => f.bytes(k),
        bytesInto: (k: string, out: Uint8Array) => {
          inPlace++;
          f.bytesInto(k, out);
        },
      });
      const plain = new DelegatingSource(counted);
      const out = new Uint8Array(24);
      plain.bytesInto('a', out);
      expect(inPlace).toBe(1);
      expect(Buffer.from(out).equals(Buffer.from(f.bytes('a')))).toBe(true);
      class Shifted extends DelegatingSource {
        override bytes(key: string): Uint8Array {
          return this.base.bytes(key).map((b) => b ^ 1);
        }
      }
      new Shifted(counted).bytesInto('a', out);
      expect(inPlace).toBe(1); // its own bytes, not the base's read in place
      expect(Buffer.from(out).equals(Buffer.from(f.bytes('a').map((b) => b ^ 1)))).toBe(true);
      expect(() => new Shifted(counted).bytesInto('a', new Uint8Array(8))).toThrow(WeightsError);
    } finally {
      f.close();
    }
  });
});
