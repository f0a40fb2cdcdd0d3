/**
 * One entry point for every supported weight file: `openWeights(path)` looks at the content, not the file
 * name, and returns a TensorSource: safetensors, a PyTorch zip checkpoint (.ckpt/.pt/.bin), or a diffusers
 * folder presented under the original single-file key names.
 */
import { closeSync, readSync, statSync } from 'node:fs';
import { CkptFile } from './ckpt.js';
import { DiffusersFolder, isDiffusersFolder } from './diffusers.js';
import { cannotOpen, openForReading } from './files.js';
import { TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX } from './layout.js';
import { SafetensorsFile } from './safetensors.js';
import { WeightsError, type TensorSource } from './types.js';

export type WeightsFormat = 'safetensors' | 'pytorch-zip' | 'diffusers-folder';
export type Layout = 'sd1-original' | 'diffusers' | 'unknown';

export function openWeights(path: string): TensorSource {
  let isDir: boolean;
  try {
    isDir = statSync(path).isDirectory();
  } catch (e) {
    throw cannotOpen(path, e);
  }
  if (!isDir) return openWeightFile(path);
  if (!isDiffusersFolder(path)) {
    throw new WeightsError(`${path}: folder is not a diffusers pipeline (no model_index.json, unet/, vae/ or text_encoder/)`);
  }
  return DiffusersFolder.open(path, openWeightFile);
}

/**
 * One file, told by its first bytes: safetensors has an 8-byte header length then '{' (checked first: a length's
 * low byte may look like a magic number), a zip is a PyTorch checkpoint, a bare pickle is the refused legacy
 * format; anything else goes to the safetensors reader, whose errors say what is wrong with it.
 */
export function openWeightFile(path: string): TensorSource {
  const head = firstBytes(path, 9);
  if (head.length === 0) throw new WeightsError(`${path}: empty file (0 bytes): not a weight file`);
  if (head.length === 9 && head[8] === 0x7b) return SafetensorsFile.open(path);
  const zipMagic = head.length >= 4 && head[0] === 0x50 && head[1] === 0x4b && (head[2] === 3 || head[2] === 5);
  if (zipMagic) return CkptFile.open(path);
  if (head[0] === 0x80) {
    throw new WeightsError(
      `${path}: legacy (non-zip) PyTorch checkpoint: not supported; re-save it with torch>=1.6 or convert it to safetensors`,
    );
  }
  return SafetensorsFile.open(path);
}

function firstBytes(path: string, n: number): Uint8Array {
  const fd = openForReading(path);
  try {
    const buf = new Uint8Array(n);
    return buf.subarray(0, readSync(fd, buf, 0, n, 0));
  } finally {
    closeSync(fd);
  }
}

export function weightsFormat(src: TensorSource): WeightsFormat {
  if (src instanceof DiffusersFolder) return 'diffusers-folder';
  if (src instanceof CkptFile) return 'pytorch-zip';
  return 'safetensors';
}

/**
 * How the weights were laid out where they came from: a diffusers folder (presented under original names) or
 * a single diffusers component file is 'diffusers'; CompVis single-file names are 'sd1-original'.
 */
export function detectLayout(src: TensorSource): Layout {
  if (src instanceof DiffusersFolder) return 'diffusers';
  const keys = src.keys();
  if (keys.some((k) => k.startsWith(UNET_PREFIX) || k.startsWith(VAE_PREFIX) || k.startsWith(TEXT_PREFIX))) return 'sd1-original';
  const diffusersKey = /^(down_blocks\.|mid_block\.|up_blocks\.|encoder\.down_blocks\.|decoder\.up_blocks\.|text_model\.)/;
  if (keys.some((k) => diffusersKey.test(k))) return 'diffusers';
  return 'unknown';
}
