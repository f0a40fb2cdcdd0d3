/**
 * LoRA files -> LoraFile (types.ts): the two formats SD 1.x LoRAs come in, told apart by their tensor names.
 *
 *   kohya-ss / A1111   `<stem>.lora_down.weight` [r, in(, kh, kw)], `<stem>.lora_up.weight` [out, r(, 1, 1)],
 *                      `<stem>.alpha` (0-d, the file's dtype; absent = r): scale = alpha / r. Stems `lora_unet_*`,
 *                      `lora_te_*` (keys.ts). LoCon files add the ResNet, Downsample and Upsample convs (3x3 downs).
 *   diffusers / PEFT   `unet.<path>.lora_A.weight` (= down), `.lora_B.weight` (= up), `text_encoder.<path>...`;
 *                      no alpha tensor: scale = lora_alpha / r from the `lora_adapter_metadata` JSON of the
 *                      safetensors header when present (`unet.lora_alpha`, `unet.alpha_pattern`, ...), else 1
 *                      (diffusers' trainers save lora_alpha = r, or fold alpha / r into lora_B).
 *
 * Every tensor of the file is a part of some module or the file is refused, naming it: LyCORIS's other
 * decompositions (LoHa `hada_*`, LoKr `lokr_*`, CP `lora_mid`) and DoRA (`dora_scale`) compute something else.
 * F16, BF16 and F32 files decode to float32; the whole file is read at once (LoRAs are 10-300 MB).
 */
import { basename, extname } from 'node:path';
import { openWeights } from '../weights/open.js';
import { SafetensorsFile } from '../weights/safetensors.js';
import type { TensorSource } from '../weights/types.js';
import { networkOf, sdxlEvidence } from './keys.js';
import { LoraError, type LoraFile, type LoraFormat, type LoraModule, type LoraNetwork, type LoraTensor } from './types.js';

/** Reads a LoRA file (.safetensors, or a PyTorch zip .pt / .ckpt). */
export function readLora(path: string): LoraFile {
  const src = openWeights(path);
  try {
    const metadata = src instanceof SafetensorsFile ? src.metadata : new Map<string, string>();
    return parseLora(src, metadata, basename(path, extname(path)));
  } finally {
    src.close();
  }
}

/** A LoRA from an open TensorSource (its `__metadata__` given separately). */
export function parseLora(src: TensorSource, metadata: ReadonlyMap<string, string>, name: string): LoraFile {
  const format = formatOf(src);
  const modules = format === 'kohya' ? kohyaModules(src) : peftModules(src, peftAlphas(src.path, metadata));
  if (modules.length === 0) throw new LoraError(`${src.path}: no LoRA modules in the file`);
  const sdxl = sdxlEvidence(modules.map((m) => m.id), metadata);
  return Object.freeze({ path: src.path, name, format, sdxl, modules: Object.freeze(modules), metadata });
}

const KOHYA_PART = /\.(lora_down\.weight|lora_up\.weight|alpha)$/;
const PEFT_PART = /\.(lora_A|lora_B)(\.[^.]+)?\.weight$|\.alpha$/;

/** What other adapters' tensor names look like, and what to call them when refusing one. */
const OTHER_ADAPTERS: ReadonlyArray<readonly [RegExp, string]> = [
  [/\.hada_/, 'LoHa (LyCORIS)'],
  [/\.lokr_/, 'LoKr (LyCORIS)'],
  [/\.lora_mid\./, 'LoCon with a CP decomposition (lora_mid)'],
  [/\.dora_scale$/, 'DoRA (dora_scale)'],
  [/\.(diff|diff_b)$/, 'full weight differences (diff, diff_b)'],
];

function formatOf(src: TensorSource): LoraFormat {
  const keys = src.keys();
  const kohya = keys.some((k) => /\.lora_(down|up)\.weight$/.test(k));
  const peft = keys.some((k) => /\.lora_[AB](\.[^.]+)?\.weight$/.test(k));
  if (kohya && peft) throw new LoraError(`${src.path}: mixes kohya (lora_down/lora_up) and PEFT (lora_A/lora_B) tensors`);
  if (kohya || peft) return kohya ? 'kohya' : 'peft';
  for (const [pattern, what] of OTHER_ADAPTERS) {
    const key = keys.find((k) => pattern.test(k));
    if (key !== undefined) throw new LoraError(`${src.path}: ${key}: ${what} is not supported, only LoRA (lora_down/lora_up)`);
  }
  throw new LoraError(`${src.path}: not a LoRA file (no lora_down/lora_up or lora_A/lora_B tensors; first key: ${keys[0] ?? 'none'})`);
}

/** Refuses `key`, a tensor of neither format: names the adapter type when it is a known other one. */
function notAPart(src: TensorSource, key: string, format: string): LoraError {
  const other = OTHER_ADAPTERS.find(([pattern]) => pattern.test(key));
  if (other !== undefined) return new LoraError(`${src.path}: ${key}: ${other[1]} is not supported, only LoRA (lora_down/lora_up)`);
  return new LoraError(`${src.path}: ${key} is not a part of a ${format} LoRA module`);
}

function tensor(src: TensorSource, key: string): LoraTensor {
  const { shape } = src.info(key);
  if (shape.length !== 2 && shape.length !== 4) {
    throw new LoraError(`${src.path}: ${key} is [${shape.join(', ')}]; a LoRA down/up weight is 2-D (Linear) or 4-D (Conv2d)`);
  }
  return { shape, data: src.float32(key) };
}

function scalar(src: TensorSource, key: string): number {
  const { shape } = src.info(key);
  const values = src.float32(key);
  if (values.length !== 1) throw new LoraError(`${src.path}: ${key} is [${shape.join(', ')}], not one number`);
  return values[0];
}

/** down and up of one module agree on the rank, and up's trailing dims are 1 (a 1x1 conv for conv modules). */
function checkPair(src: TensorSource, name: string, down: LoraTensor, up: LoraTensor): number {
  const rank = down.shape[0];
  if (rank < 1 || up.shape[1] !== rank || up.shape.slice(2).some((d) => d !== 1)) {
    throw new LoraError(
      `${src.path}: ${name}: down [${down.shape.join(', ')}] and up [${up.shape.join(', ')}] are not a rank-r pair (down [r, in, ...], up [out, r, 1, 1])`,
    );
  }
  return rank;
}

function moduleNetwork(src: TensorSource, id: string, name: string): LoraNetwork {
  // SDXL's names (lora_te1_, lora_te2_, text_encoder_2.) are read as text-encoder modules, so the file is refused as
  // an SDXL LoRA when applied rather than here.
  const network = networkOf(id) ?? (/^(lora_te[12]_|text_encoder_2\.)/.test(id) ? 'te' : null);
  if (network === null) {
    throw new LoraError(`${src.path}: ${name}: not a UNet or text-encoder module (kohya lora_unet_/lora_te_, PEFT unet./text_encoder.)`);
  }
  return network;
}

function kohyaModules(src: TensorSource): LoraModule[] {
  const stems = new Map<string, Map<string, string>>();
  for (const key of src.keys()) {
    const m = KOHYA_PART.exec(key);
    if (m === null) throw notAPart(src, key, 'kohya');
    const stem = key.slice(0, m.index);
    if (!stems.has(stem)) stems.set(stem, new Map());
    stems.get(stem)?.set(m[1], key);
  }
  return [...stems].map(([stem, parts]) => {
    const downKey = parts.get('lora_down.weight');
    const upKey = parts.get('lora_up.weight');
    if (downKey === undefined || upKey === undefined) {
      throw new LoraError(`${src.path}: ${stem} has no ${downKey === undefined ? 'lora_down' : 'lora_up'}.weight`);
    }
    const down = tensor(src, downKey);
    const up = tensor(src, upKey);
    const rank = checkPair(src, stem, down, up);
    const alphaKey = parts.get('alpha');
    const alpha = alphaKey === undefined ? rank : scalar(src, alphaKey);
    return { name: stem, id: stem, network: moduleNetwork(src, stem, stem), down, up, scale: alpha / rank };
  });
}

/** Unprefixed PEFT names (a UNet or text encoder saved on its own) get the prefix of the network they name. */
function peftId(path: string): string {
  if (/^(down_blocks|mid_block|up_blocks|conv_in|conv_out|time_embedding)\./.test(path)) return `unet.${path}`;
  if (path.startsWith('text_model.')) return `text_encoder.${path}`;
  return path;
}

function peftModules(src: TensorSource, alphaOf: PeftAlphas): LoraModule[] {
  const modules = new Map<string, { A?: string; B?: string; alpha?: string }>();
  for (const key of src.keys()) {
    const m = PEFT_PART.exec(key);
    if (m === null) throw notAPart(src, key, 'PEFT');
    const path = key.slice(0, m.index);
    const parts = modules.get(path) ?? {};
    modules.set(path, parts);
    const part = m[1] === 'lora_A' ? 'A' : m[1] === 'lora_B' ? 'B' : 'alpha';
    if (parts[part] !== undefined) throw new LoraError(`${src.path}: ${path} has two ${part === 'alpha' ? 'alpha' : `lora_${part}`} tensors (${parts[part]}, ${key})`);
    parts[part] = key;
  }
  return [...modules].map(([path, parts]) => {
    if (parts.A === undefined || parts.B === undefined) {
      throw new LoraError(`${src.path}: ${path} has no ${parts.A === undefined ? 'lora_A' : 'lora_B'}.weight`);
    }
    const down = tensor(src, parts.A);
    const up = tensor(src, parts.B);
    const rank = checkPair(src, path, down, up);
    const id = peftId(path);
    const network = moduleNetwork(src, id, path);
    const scale = parts.alpha !== undefined ? scalar(src, parts.alpha) / rank : alphaOf(network, id, rank);
    return { name: path, id, network, down, up, scale };
  });
}

/** scale of a PEFT module from the file's metadata: (network, id, rank) -> lora_alpha / r. */
type PeftAlphas = (network: LoraNetwork, id: string, rank: number) => number;

interface PeftConfig {
  readonly lora_alpha?: unknown;
  readonly alpha_pattern?: unknown;
  readonly use_rslora?: unknown;
}

/**
 * diffusers' `lora_adapter_metadata`: the PEFT LoraConfig of each network, its fields prefixed with the network
 * (`unet.lora_alpha`, `text_encoder.alpha_pattern`: what StableDiffusionLoraLoaderMixin.save_lora_weights writes), or
 * unprefixed for a single model (save_lora_adapter). Patterns are module-name suffixes (PEFT matches
 * `(.*\.)?<pattern>$`; they are taken literally here, not as regular expressions).
 */
function peftAlphas(path: string, metadata: ReadonlyMap<string, string>): PeftAlphas {
  const text = metadata.get('lora_adapter_metadata');
  if (text === undefined) return () => 1;
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    throw new LoraError(`${path}: __metadata__.lora_adapter_metadata is not JSON`);
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json)) throw new LoraError(`${path}: lora_adapter_metadata is not a JSON object`);
  const fields = new Map(Object.entries(json));
  const configOf = (network: LoraNetwork): PeftConfig => {
    const prefix = network === 'unet' ? 'unet.' : 'text_encoder.';
    const prefixed = [...fields].filter(([k]) => k.startsWith(prefix));
    if (prefixed.length === 0) return Object.fromEntries(fields) as PeftConfig;
    return Object.fromEntries(prefixed.map(([k, v]) => [k.slice(prefix.length), v])) as PeftConfig;
  };
  const configs = { unet: configOf('unet'), te: configOf('te') };
  return (network, id, rank) => {
    const cfg = configs[network];
    const moduleName = id.slice(id.indexOf('.') + 1);
    const patterns = typeof cfg.alpha_pattern === 'object' && cfg.alpha_pattern !== null ? Object.entries(cfg.alpha_pattern) : [];
    const hit = patterns.find(([p]) => moduleName === p || moduleName.endsWith(`.${p}`));
    const alpha = hit !== undefined ? hit[1] : cfg.lora_alpha;
    if (alpha === undefined) return 1;
    if (typeof alpha !== 'number' || !Number.isFinite(alpha)) {
      throw new LoraError(`${path}: lora_adapter_metadata: lora_alpha of ${id} is ${JSON.stringify(alpha)}, not a number`);
    }
    return cfg.use_rslora === true ? alpha / Math.sqrt(rank) : alpha / rank;
  };
}
