/**
 * The ControlNet files people download, each opened as a TensorSource under the original names:
 *
 *   lllyasviel single file   control_v11p_sd15_canny.pth / .safetensors: `control_model.*` (ControlNet 1.0 files
 *                            also hold the whole SD model; only `control_model.*` is read), or the same names without
 *                            the prefix (some re-saved files). `.pth` goes through the restricted unpickler.
 *   diffusers folder         config.json + diffusion_pytorch_model[.fp16].{safetensors,bin} (ControlNetModel);
 *                            keys.ts maps the names, config.json gives the config
 *   diffusers single file    that weight file on its own: mapped the same, config from the base model
 * `loadControlNet(path, baseUNet)` opens, picks the config, loads and closes.
 */
import { existsSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { cannotOpen, copyInto } from '../weights/files.js';
import { openWeightFile } from '../weights/open.js';
import { DelegatingSource } from '../weights/delegating.js';
import { WeightsError, type TensorInfo, type TensorSource } from '../weights/types.js';
import type { UNetConfig } from '../unet/config.js';
import { checkFitsUNet, controlNetConfig, controlNetConfigFromDiffusers, type ControlNetConfig, type DiffusersControlNetJson } from './config.js';
import { controlNetDiffusersToOriginal, isDiffusersControlNet } from './keys.js';
import { CONTROL_PREFIX, ControlNet, type ControlNetLoadOptions } from './model.js';

export type ControlNetFormat = 'single-file' | 'single-file-no-prefix' | 'diffusers-file' | 'diffusers-folder';

export interface OpenedControlNet {
  readonly source: TensorSource;
  /** The key prefix the ControlNet is under in `source`: 'control_model', or '' for the no-prefix variant. */
  readonly prefix: string;
  readonly format: ControlNetFormat;
  /** From the folder's config.json; undefined for single files (their config is the base model's). */
  readonly config?: ControlNetConfig;
}

/** The weight file names of a diffusers ControlNetModel folder, in the order tried. */
const FOLDER_FILES = ['diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.fp16.safetensors', 'diffusion_pytorch_model.bin', 'diffusion_pytorch_model.fp16.bin'];

/** A diffusers ControlNetModel weight file under the original names (`control_model.*`). */
class RenamedSource extends DelegatingSource {
  constructor(
    base: TensorSource,
    private readonly names: ReadonlyMap<string, string>,
  ) {
    super(base);
  }

  override keys(): string[] {
    return [...this.names.keys()];
  }

  override has(key: string): boolean {
    return this.names.has(key);
  }

  override info(key: string): TensorInfo {
    return this.base.info(this.mapped(key));
  }

  override bytes(key: string): Uint8Array {
    return this.base.bytes(this.mapped(key));
  }

  override bytesInto(key: string, out: Uint8Array): void {
    const k = this.mapped(key), base = this.base;
    if (base.bytesInto !== undefined) base.bytesInto(k, out);
    else copyInto(this.path, key, base.bytes(k), out);
  }

  override float32(key: string): Float32Array {
    return this.base.float32(this.mapped(key));
  }

  private mapped(key: string): string {
    const k = this.names.get(key);
    if (k === undefined) throw new WeightsError(`${this.path}: no tensor named ${key}`);
    return k;
  }
}

function renamed(src: TensorSource): TensorSource {
  try {
    return new RenamedSource(src, controlNetDiffusersToOriginal(src.keys(), src.path));
  } catch (e) {
    src.close();
    throw e;
  }
}

/** Opens a ControlNet in any of the formats above, telling them apart by content. */
export function openControlNet(path: string): OpenedControlNet {
  let isDir: boolean;
  try {
    isDir = statSync(path).isDirectory();
  } catch (e) {
    throw cannotOpen(path, e);
  }
  if (isDir) return openFolder(path);
  const src = openWeightFile(path);
  const keys = src.keys();
  if (keys.some((k) => k.startsWith(`${CONTROL_PREFIX}.input_hint_block.`))) return { source: src, prefix: CONTROL_PREFIX, format: 'single-file' };
  if (keys.some((k) => k.startsWith('input_hint_block.'))) return { source: src, prefix: '', format: 'single-file-no-prefix' };
  if (isDiffusersControlNet(keys)) return { source: renamed(src), prefix: CONTROL_PREFIX, format: 'diffusers-file' };
  src.close();
  const what = keys.some((k) => k.startsWith('model.diffusion_model.')) ? 'a Stable Diffusion checkpoint without a ControlNet' : `first key ${keys[0] ?? '(none)'}`;
  throw new WeightsError(`${path}: not a ControlNet (no ${CONTROL_PREFIX}.input_hint_block.*, input_hint_block.* or controlnet_cond_embedding.* keys; ${what})`);
}

function openFolder(dir: string): OpenedControlNet {
  const configPath = join(dir, 'config.json');
  if (!existsSync(configPath)) throw new WeightsError(`${dir}: a folder without config.json is not a diffusers ControlNetModel`);
  let json: DiffusersControlNetJson & { _class_name?: string };
  try {
    json = JSON.parse(readFileSync(configPath, 'utf8')) as typeof json;
  } catch (e) {
    throw new WeightsError(`${configPath}: not JSON: ${e instanceof Error ? e.message : String(e)}`);
  }
  if (json._class_name !== undefined && json._class_name !== 'ControlNetModel') {
    throw new WeightsError(`${configPath}: _class_name is ${json._class_name}, not ControlNetModel`);
  }
  const config = controlNetConfigFromDiffusers(json, configPath);
  const file = FOLDER_FILES.map((f) => join(dir, f)).find((f) => existsSync(f));
  if (file === undefined) throw new WeightsError(`${dir}: no ControlNet weights (looked for ${FOLDER_FILES.join(', ')})`);
  return { source: renamed(openWeightFile(file)), prefix: CONTROL_PREFIX, format: 'diffusers-folder', config };
}

/**
 * Opens and loads the ControlNet at `path` for a base model whose UNet config is `base`: a folder's config.json
 * must fit it (checkFitsUNet), a single file is taken to have the base model's shapes and lllyasviel's hint block.
 */
export function loadControlNet(path: string, base: UNetConfig, opts: ControlNetLoadOptions = {}): ControlNet {
  const opened = openControlNet(path);
  try {
    const cfg = opened.config ?? controlNetConfig(base);
    checkFitsUNet(cfg, base, path);
    return ControlNet.load(opened.source, cfg, opened.prefix, opts);
  } finally {
    opened.source.close();
  }
}
