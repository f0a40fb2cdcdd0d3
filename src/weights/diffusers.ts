/**
 * A diffusers pipeline folder (`unet/`, `vae/`, `text_encoder/`, and SDXL's `text_encoder_2/`, each one weight
 * file) seen as one TensorSource under the original single-file key names (layout.ts has the map), so model
 * loaders know only one naming. Each component file may be safetensors or a PyTorch zip checkpoint (`.bin`).
 * A folder with `text_encoder_2/` is SDXL base and shows as sd_xl_base_1.0.safetensors does; encoder 2's stacked
 * q/k/v and transposed text projection are made when their bytes are read.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { DTYPE_BYTES, decodeToFloat32, isFloatDType } from './dtypes.js';
import { diffusersToOriginal, type Component, type DiffusersName, type FolderFamily } from './layout.js';
import { WeightsError, type TensorInfo, type TensorSource } from './types.js';
import { copyInto } from './files.js';

/** File names diffusers saves a component's weights under, in the order they are tried. */
const COMPONENT_FILES: Readonly<Record<Component, readonly string[]>> = {
  unet: ['diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.fp16.safetensors', 'diffusion_pytorch_model.bin', 'diffusion_pytorch_model.fp16.bin'],
  vae: ['diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.fp16.safetensors', 'diffusion_pytorch_model.bin', 'diffusion_pytorch_model.fp16.bin'],
  text_encoder: ['model.safetensors', 'model.fp16.safetensors', 'pytorch_model.bin', 'pytorch_model.fp16.bin'],
  text_encoder_2: ['model.safetensors', 'model.fp16.safetensors', 'pytorch_model.bin', 'pytorch_model.fp16.bin'],
};
export const COMPONENTS = Object.keys(COMPONENT_FILES) as Component[];

/** The components each family's folder must have. */
const FAMILY_COMPONENTS: Readonly<Record<FolderFamily, readonly Component[]>> = {
  sd1: ['unet', 'vae', 'text_encoder'],
  sdxl: ['unet', 'vae', 'text_encoder', 'text_encoder_2'],
};

/** Whether a folder looks like a diffusers pipeline. */
export function isDiffusersFolder(dir: string): boolean {
  return existsSync(join(dir, 'model_index.json')) || COMPONENTS.some((c) => existsSync(join(dir, c)));
}

interface Mapped extends DiffusersName {
  readonly shape: readonly number[];
}

export class DiffusersFolder implements TensorSource {
  private constructor(
    readonly path: string,
    /** Which single file the folder stands for: SD 1.x, or SDXL base when it has `text_encoder_2/`. */
    readonly family: FolderFamily,
    /** The component files that were opened, for inspect and error messages. */
    readonly files: Readonly<Partial<Record<Component, string>>>,
    private readonly sources: Readonly<Partial<Record<Component, TensorSource>>>,
    private readonly names: ReadonlyMap<string, Mapped>,
  ) {}

  /** `openFile` opens one weight file (open.ts's openWeightFile; passed in to keep imports one way). */
  static open(dir: string, openFile: (path: string) => TensorSource): DiffusersFolder {
    const family: FolderFamily = existsSync(join(dir, 'text_encoder_2')) ? 'sdxl' : 'sd1';
    if (family === 'sdxl' && !existsSync(join(dir, 'text_encoder'))) {
      throw new WeightsError(`${dir}: a diffusers folder with text_encoder_2/ but no text_encoder/ is an SDXL refiner: SDXL refiner checkpoints are not supported yet (only SDXL base 1.0)`);
    }
    const files: Partial<Record<Component, string>> = {};
    const sources: Partial<Record<Component, TensorSource>> = {};
    try {
      for (const c of FAMILY_COMPONENTS[family]) {
        const file = componentFile(dir, c);
        files[c] = file;
        sources[c] = openFile(file);
      }
      const names = new Map<string, Mapped>();
      for (const c of FAMILY_COMPONENTS[family]) {
        const src = sources[c] as TensorSource;
        const file = files[c] as string;
        for (const [name, d] of diffusersToOriginal(c, src.keys(), file, family)) {
          names.set(name, { ...d, shape: originalShape(file, d, src) });
        }
      }
      return new DiffusersFolder(dir, family, files, sources, names);
    } catch (e) {
      for (const s of Object.values(sources)) s?.close();
      throw e;
    }
  }

  keys(): string[] {
    return [...this.names.keys()];
  }

  has(key: string): boolean {
    return this.names.has(key);
  }

  info(key: string): TensorInfo {
    const m = this.mapped(key);
    return { dtype: this.source(m).info(m.key).dtype, shape: m.shape };
  }

  bytes(key: string): Uint8Array {
    const m = this.mapped(key);
    const src = this.source(m);
    if (m.stack !== undefined) return concatBytes(m.stack.map((k) => src.bytes(k)));
    if (m.transpose === true) return transposeBytes(src.bytes(m.key), src.info(m.key).shape, DTYPE_BYTES[src.info(m.key).dtype]);
    return src.bytes(m.key);
  }

  bytesInto(key: string, out: Uint8Array): void {
    const m = this.mapped(key);
    const src = this.source(m);
    if (m.stack === undefined && m.transpose !== true && src.bytesInto !== undefined) src.bytesInto(m.key, out);
    else copyInto(this.path, key, this.bytes(key), out);
  }

  float32(key: string): Float32Array {
    const { dtype } = this.info(key);
    if (!isFloatDType(dtype)) throw new WeightsError(`${this.path}: tensor ${key} is ${dtype}, not floating point`);
    return decodeToFloat32(this.bytes(key), dtype);
  }

  close(): void {
    for (const s of Object.values(this.sources)) s?.close();
  }

  private source(m: Mapped): TensorSource {
    return this.sources[m.component] as TensorSource; // every mapped name's component was opened
  }

  private mapped(key: string): Mapped {
    const m = this.names.get(key);
    if (m === undefined) throw new WeightsError(`${this.path}: no tensor named ${key}`);
    return m;
  }
}

function componentFile(dir: string, c: Component): string {
  for (const name of COMPONENT_FILES[c]) {
    const p = join(dir, c, name);
    if (existsSync(p)) return p;
  }
  if (COMPONENT_FILES[c].some((n) => existsSync(join(dir, c, `${n}.index.json`)))) {
    throw new WeightsError(`${join(dir, c)}: sharded weights (*.index.json) are not supported: save the ${c} as one file`);
  }
  throw new WeightsError(`${dir}: diffusers folder has no ${c} weights (looked for ${c}/${COMPONENT_FILES[c].join(`, ${c}/`)})`);
}

/**
 * The original shape of a mapped tensor: diffusers' VAE attention weights are linear [out, in] where the original
 * 1x1 convs are [out, in, 1, 1]; a stack is its parts' rows together (each part of the same dtype and row shape);
 * a transpose swaps the two axes of a 2-D tensor.
 */
function originalShape(file: string, d: DiffusersName, src: TensorSource): readonly number[] {
  const { shape, dtype } = src.info(d.key);
  const dims = (s: readonly number[]) => `[${s.join(', ')}]`;
  if (d.stack !== undefined) {
    let rows = 0;
    for (const k of d.stack) {
      const part = src.info(k);
      if (part.dtype !== dtype || part.shape.length !== shape.length || part.shape.some((n, i) => i > 0 && n !== shape[i])) {
        throw new WeightsError(`${file}: ${k} is ${part.dtype} ${dims(part.shape)}, cannot be stacked with ${d.key} (${dtype} ${dims(shape)})`);
      }
      rows += part.shape[0];
    }
    return [rows, ...shape.slice(1)];
  }
  if (d.transpose === true) {
    if (shape.length !== 2) throw new WeightsError(`${file}: ${d.key} has shape ${dims(shape)}, expected a linear weight [out, in]`);
    return [shape[1], shape[0]];
  }
  if (!d.linearAsConv) return shape;
  if (shape.length === 4 && shape[2] === 1 && shape[3] === 1) return shape; // saved as convs already
  if (shape.length !== 2) throw new WeightsError(`${file}: ${d.key} has shape ${dims(shape)}, expected a linear weight [out, in]`);
  return [...shape, 1, 1];
}

function concatBytes(parts: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** A row-major [rows, cols] tensor's bytes as [cols, rows], `size` bytes an element. */
function transposeBytes(data: Uint8Array, shape: readonly number[], size: number): Uint8Array {
  const [rows, cols] = shape;
  const out = new Uint8Array(data.length);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const from = (r * cols + c) * size;
      out.set(data.subarray(from, from + size), (c * rows + r) * size);
    }
  }
  return out;
}
