/**
 * PyTorch zip checkpoints (what torch.save writes since torch 1.6): a zip archive whose top folder (any name)
 * holds `data.pkl`, a pickled dict, and `data/<key>`, one file of raw little-endian bytes per storage.
 * In the pickle a tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
 * hooks)` and a storage is the persistent id `('storage', torch.FloatStorage, key, location, numel)`.
 *
 * The state dict is the top-level dict or its "state_dict" entry; entries that are not tensors (global_step,
 * epoch) are left out. Only contiguous tensors are supported (every state dict torch.save writes has them).
 */
import { DTYPE_BYTES, decodeToFloat32, isFloatDType, type DType } from './dtypes.js';
import { checkTensorBytes } from './files.js';
import { PickleDict, PickleGlobal, PickleObject, unpickle, type PickleHooks, type PickleValue } from './pickle.js';
import { WeightsError, WeightsLimitError, count, type TensorInfo, type TensorSource } from './types.js';
import { printable } from './printable.js';
import { ZipArchive } from './zip.js';

/** torch storage classes -> safetensors dtype names. */
const STORAGE_DTYPES: Readonly<Record<string, DType>> = {
  FloatStorage: 'F32', HalfStorage: 'F16', BFloat16Storage: 'BF16', DoubleStorage: 'F64', LongStorage: 'I64',
  IntStorage: 'I32', ShortStorage: 'I16', CharStorage: 'I8', ByteStorage: 'U8', BoolStorage: 'BOOL',
};

const ALLOWED_CALLS = new Set(['collections.OrderedDict', 'torch._utils._rebuild_tensor_v2', 'torch._utils._rebuild_parameter']);

/**
 * data.pkl is read whole: 64 MiB at most. SD 1.x's is ~0.3-1 MB (~280 bytes a tensor); the 50,000 tensors the
 * unpickler's bounds admit (pickle.ts, PICKLE_LIMITS) take ~15 MB.
 */
const MAX_PICKLE_BYTES = 64 * 1024 * 1024;

class StorageRef extends PickleObject {
  constructor(
    readonly key: string,
    readonly dtype: DType,
    readonly numel: number,
  ) {
    super();
  }

  describe(): string {
    return `storage ${this.key}`;
  }
}

class TensorRef extends PickleObject {
  constructor(
    readonly storage: StorageRef,
    readonly offset: number,
    readonly shape: readonly number[],
    readonly stride: readonly number[],
  ) {
    super();
  }

  describe(): string {
    return `tensor [${this.shape.join(', ')}]`;
  }
}

export class CkptFile implements TensorSource {
  private readonly verified = new Set<string>();

  private constructor(
    readonly path: string,
    private readonly zip: ZipArchive,
    private readonly prefix: string,
    private readonly tensors: ReadonlyMap<string, TensorRef>,
  ) {}

  static open(path: string): CkptFile {
    const zip = ZipArchive.open(path);
    try {
      const prefix = archivePrefix(zip);
      checkByteOrder(zip, prefix);
      const pkl = `${prefix}/data.pkl`;
      if (zip.entry(pkl).size > MAX_PICKLE_BYTES) {
        throw new WeightsLimitError(
          `${path}: ${pkl} is ${count(zip.entry(pkl).size)} bytes, more than the ${count(MAX_PICKLE_BYTES)} a state dict's pickle may have`,
          'pickle.fileBytes',
          MAX_PICKLE_BYTES,
        );
      }
      const root = unpickle(zip.read(pkl), `${path}:${pkl}`, torchHooks(zip, prefix));
      return new CkptFile(path, zip, prefix, stateDictTensors(path, root));
    } catch (e) {
      zip.close();
      throw e;
    }
  }

  keys(): string[] {
    return [...this.tensors.keys()];
  }

  has(key: string): boolean {
    return this.tensors.has(key);
  }

  info(key: string): TensorInfo {
    const t = this.tensor(key);
    return { dtype: t.storage.dtype, shape: t.shape };
  }

  bytes(key: string): Uint8Array {
    const t = this.tensor(key);
    const item = DTYPE_BYTES[t.storage.dtype];
    const entry = `${this.prefix}/data/${t.storage.key}`;
    const begin = t.offset * item;
    const length = numel(t.shape) * item;
    checkTensorBytes(this.path, key, length);
    if (begin === 0 && length === t.storage.numel * item) return this.zip.read(entry); // whole storage: CRC-checked
    if (!this.verified.has(entry)) {
      this.zip.checkCrc(entry); // the whole storage, read in chunks, once
      this.verified.add(entry);
    }
    return this.zip.read(entry, begin, length);
  }

  float32(key: string): Float32Array {
    const t = this.tensor(key);
    if (!isFloatDType(t.storage.dtype)) throw new WeightsError(`${this.path}: tensor ${key} is ${t.storage.dtype}, not floating point`);
    checkTensorBytes(this.path, key, numel(t.shape) * 4, ' as float32');
    return decodeToFloat32(this.bytes(key), t.storage.dtype);
  }

  close(): void {
    this.zip.close();
  }

  private tensor(key: string): TensorRef {
    const t = this.tensors.get(key);
    if (t === undefined) throw new WeightsError(`${this.path}: no tensor named ${key}`);
    return t;
  }
}

/** The top folder holding data.pkl: `archive` in torch.save's files, the file's stem in others. */
function archivePrefix(zip: ZipArchive): string {
  const tops = [...zip.entries.keys()].filter((n) => /^[^/]+\/data\.pkl$/.test(n));
  if (tops.length === 0) {
    throw new WeightsError(`${zip.path}: zip archive has no <folder>/data.pkl: not a PyTorch checkpoint`);
  }
  if (tops.length > 1) throw new WeightsError(`${zip.path}: zip archive has several data.pkl (${tops.join(', ')}): not one PyTorch checkpoint`);
  return tops[0].slice(0, -'/data.pkl'.length);
}

function checkByteOrder(zip: ZipArchive, prefix: string): void {
  const name = `${prefix}/byteorder`;
  if (!zip.entries.has(name) || zip.entry(name).size > 16) return;
  const order = new TextDecoder().decode(zip.read(name)).trim();
  if (order !== 'little') throw new WeightsError(`${zip.path}: checkpoint byte order is "${order}"; only little-endian checkpoints are supported`);
}

function torchHooks(zip: ZipArchive, prefix: string): PickleHooks {
  const storages = new Map<string, StorageRef>();
  return {
    allowGlobal: (module, name) => ALLOWED_CALLS.has(`${module}.${name}`) || (module === 'torch' && Object.hasOwn(STORAGE_DTYPES, name)),
    call: (fn, args) => callAllowed(zip.path, fn, args),
    persistentLoad: (pid) => {
      const s = storageOf(zip, prefix, pid);
      const seen = storages.get(s.key);
      if (seen !== undefined && (seen.dtype !== s.dtype || seen.numel !== s.numel)) {
        throw new WeightsError(`${zip.path}: storage ${s.key} is referenced with two different types or sizes`);
      }
      storages.set(s.key, seen ?? s);
      return seen ?? s;
    },
  };
}

/** ('storage', torch.XStorage, key, location, numel) -> the storage, checked against its `data/<key>` entry. */
function storageOf(zip: ZipArchive, prefix: string, pid: PickleValue): StorageRef {
  if (!Array.isArray(pid) || pid.length !== 5 || pid[0] !== 'storage') {
    throw new WeightsError(`${zip.path}: persistent id is not ('storage', type, key, location, numel)`);
  }
  const [, type, key, , count] = pid;
  if (!(type instanceof PickleGlobal) || !Object.hasOwn(STORAGE_DTYPES, type.name)) {
    throw new WeightsError(`${zip.path}: persistent id names storage type ${describeValue(type)}, not a torch storage class`);
  }
  if (typeof key !== 'string' || !isCount(count)) throw new WeightsError(`${zip.path}: persistent id has a bad storage key or size`);
  const dtype = STORAGE_DTYPES[type.name];
  const entry = `${prefix}/data/${key}`;
  if (!zip.entries.has(entry)) throw new WeightsError(`${zip.path}: storage ${key} has no ${entry} in the archive: the checkpoint is incomplete`);
  const size = zip.entry(entry).size;
  if (size !== count * DTYPE_BYTES[dtype]) {
    throw new WeightsError(`${zip.path}: ${entry} is ${size} bytes, its ${count} ${dtype} values need ${count * DTYPE_BYTES[dtype]}`);
  }
  return new StorageRef(key, dtype, count);
}

function callAllowed(path: string, fn: PickleGlobal, args: readonly PickleValue[]): PickleValue {
  switch (fn.describe()) {
    case 'collections.OrderedDict':
      if (args.length !== 0) throw new WeightsError(`${path}: OrderedDict called with arguments: not a torch state dict`);
      return new PickleDict();
    case 'torch._utils._rebuild_tensor_v2':
      return rebuildTensor(path, args);
    case 'torch._utils._rebuild_parameter':
      if (!(args[0] instanceof TensorRef)) throw new WeightsError(`${path}: _rebuild_parameter of ${describeValue(args[0])}, not a tensor`);
      return args[0];
    default:
      throw new WeightsError(`${path}: refusing to call ${fn.describe()}: only tensor and OrderedDict rebuilds are allowed`);
  }
}

/** _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata]). */
function rebuildTensor(path: string, args: readonly PickleValue[]): TensorRef {
  const [storage, offset, size, stride] = args;
  if (args.length < 4 || !(storage instanceof StorageRef) || !isCount(offset) || !isCounts(size) || !isCounts(stride) || size.length !== stride.length) {
    throw new WeightsError(`${path}: _rebuild_tensor_v2 arguments are not (storage, offset, size, stride, ...): malformed checkpoint`);
  }
  if (offset + numel(size) > storage.numel && numel(size) > 0) {
    throw new WeightsError(`${path}: tensor [${size.join(', ')}] at offset ${offset} runs past its storage ${storage.key} (${storage.numel} values)`);
  }
  return new TensorRef(storage, offset, Object.freeze([...size]), stride);
}

/** The tensors of the state dict, by name; non-tensor entries are left out. */
function stateDictTensors(path: string, root: PickleValue): Map<string, TensorRef> {
  if (!(root instanceof PickleDict)) throw new WeightsError(`${path}: data.pkl holds ${describeValue(root)}, not a state dict`);
  const inner = root.items.get('state_dict');
  const dict = inner instanceof PickleDict ? inner : root;
  const out = new Map<string, TensorRef>();
  const add = (name: string, value: TensorRef) => {
    if (out.has(name)) throw new WeightsError(`${path}: tensor ${printable(name)} is named twice (once in a nested dict): not a state dict`);
    checkContiguous(path, name, value);
    out.set(name, value);
  };
  for (const [name, value] of dict.items) {
    if (typeof name !== 'string') continue;
    if (value instanceof TensorRef) add(name, value);
    // One level of plain dicts of tensors, named `part.key`: tencent's IP-Adapter .bin is {'image_proj': {...}, 'ip_adapter': {...}}
    else if (inner === undefined && value instanceof PickleDict) {
      for (const [key, t] of value.items) if (typeof key === 'string' && t instanceof TensorRef) add(`${name}.${key}`, t);
    }
  }
  if (out.size === 0) throw new WeightsError(`${path}: the checkpoint holds no tensors (neither at top level, nor under "state_dict", nor in a dict of tensors)`);
  return out;
}

/** Row-major strides; a dimension of size 1 may have any stride (torch's own contiguity rule). */
function checkContiguous(path: string, name: string, t: TensorRef): void {
  if (numel(t.shape) === 0) return;
  let expected = 1;
  for (let i = t.shape.length - 1; i >= 0; i--) {
    if (t.shape[i] !== 1 && t.stride[i] !== expected) {
      throw new WeightsError(
        `${path}: tensor ${name} is not contiguous (shape [${t.shape.join(', ')}], stride [${t.stride.join(', ')}]): not supported; re-save it with .contiguous() or convert it to safetensors`,
      );
    }
    expected *= t.shape[i];
  }
}

function numel(shape: readonly number[]): number {
  return shape.reduce((a, d) => a * d, 1);
}

function isCount(v: PickleValue): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
}

function isCounts(v: PickleValue): v is number[] {
  return Array.isArray(v) && v.every(isCount);
}

function describeValue(v: PickleValue): string {
  if (v instanceof PickleObject) return v.describe();
  if (Array.isArray(v)) return `a ${v.length}-element sequence`;
  return v === null ? 'None' : typeof v;
}
