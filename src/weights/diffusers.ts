/**
 * A diffusers pipeline folder (`unet/`, `vae/`, `text_encoder/`, each one weight file) seen as one
 * TensorSource under the original single-file key names (layout.ts has the map), so model loaders know only
 * one naming. Each component file may be safetensors or a PyTorch zip checkpoint (`.bin`).
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { decodeToFloat32, isFloatDType } from './dtypes.js';
import { diffusersToOriginal, type Component, type DiffusersName } from './layout.js';
import { WeightsError, type TensorInfo, type TensorSource } from './types.js';

/** File names diffusers saves a component's weights under, in the order they are tried. */
const COMPONENT_FILES: Readonly<Record<Component, readonly string[]>> = {
  unet: ['diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.fp16.safetensors', 'diffusion_pytorch_model.bin', 'diffusion_pytorch_model.fp16.bin'],
  vae: ['diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.fp16.safetensors', 'diffusion_pytorch_model.bin', 'diffusion_pytorch_model.fp16.bin'],
  text_encoder: ['model.safetensors', 'model.fp16.safetensors', 'pytorch_model.bin', 'pytorch_model.fp16.bin'],
};
export const COMPONENTS = Object.keys(COMPONENT_FILES) as Component[];

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
    /** The component files that were opened, for inspect and error messages. */
    readonly files: Readonly<Record<Component, string>>,
    private readonly sources: Readonly<Record<Component, TensorSource>>,
    private readonly names: ReadonlyMap<string, Mapped>,
  ) {}

  /** `openFile` opens one weight file (open.ts's openWeightFile; passed in to keep imports one way). */
  static open(dir: string, openFile: (path: string) => TensorSource): DiffusersFolder {
    const files = {} as Record<Component, string>;
    const sources = {} as Record<Component, TensorSource>;
    try {
      for (const c of COMPONENTS) {
        files[c] = componentFile(dir, c);
        sources[c] = openFile(files[c]);
      }
      const names = new Map<string, Mapped>();
      for (const c of COMPONENTS) {
        for (const [name, d] of diffusersToOriginal(c, sources[c].keys(), files[c])) {
          names.set(name, { ...d, shape: originalShape(files[c], d, sources[c].info(d.key).shape) });
        }
      }
      return new DiffusersFolder(dir, files, sources, names);
    } catch (e) {
      for (const s of Object.values(sources)) s.close();
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
    return { dtype: this.sources[m.component].info(m.key).dtype, shape: m.shape };
  }

  bytes(key: string): Uint8Array {
    const m = this.mapped(key);
    return this.sources[m.component].bytes(m.key);
  }

  float32(key: string): Float32Array {
    const { dtype } = this.info(key);
    if (!isFloatDType(dtype)) throw new WeightsError(`${this.path}: tensor ${key} is ${dtype}, not floating point`);
    return decodeToFloat32(this.bytes(key), dtype);
  }

  close(): void {
    for (const s of Object.values(this.sources)) s.close();
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

/** Diffusers' VAE attention weights are linear [out, in]; the original 1x1 convs are [out, in, 1, 1]. */
function originalShape(file: string, d: DiffusersName, shape: readonly number[]): readonly number[] {
  if (!d.linearAsConv) return shape;
  if (shape.length === 4 && shape[2] === 1 && shape[3] === 1) return shape; // saved as convs already
  if (shape.length !== 2) throw new WeightsError(`${file}: ${d.key} has shape [${shape.join(', ')}], expected a linear weight [out, in]`);
  return [...shape, 1, 1];
}
