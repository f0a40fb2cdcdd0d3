/**
 * One entry point for every supported weight file: `openWeights(path)` looks at the content, not the file
 * name, and returns a TensorSource: safetensors, a PyTorch zip checkpoint (.ckpt/.pt/.bin), or a diffusers
 * folder presented under the original single-file key names.
 */
import { closeSync, fstatSync, readSync, statSync } from 'node:fs';
import { CkptFile } from './ckpt.js';
import { DiffusersFolder, isDiffusersFolder } from './diffusers.js';
import { cannotOpen, openForReading } from './files.js';
import { TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX } from './layout.js';
import { looksLikePickle } from './pickle.js';
import { MAX_HEADER_BYTES, SafetensorsFile } from './safetensors.js';
import { WeightsError, type TensorSource } from './types.js';

export type WeightsFormat = 'safetensors' | 'pytorch-zip' | 'diffusers-folder';
export type CheckpointLayout = 'sd1-original' | 'diffusers' | 'unknown';

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
 * One file, told by its structure rather than one byte (a safetensors header length's low byte may be 0x80, the
 * pickle protocol opcode): a zip's local header magic is a PyTorch checkpoint; a plausible 8-byte header length
 * followed by a JSON object is safetensors; PROTO 2-5 followed by an opcode is the refused legacy pickle format;
 * anything else goes to the safetensors reader, whose errors say what is wrong with it.
 */
export function openWeightFile(path: string): TensorSource {
  const { head, size } = firstBytes(path, HEAD_BYTES);
  if (size === 0) throw new WeightsError(`${path}: empty file (0 bytes): not a weight file`);
  if (isZip(head)) return CkptFile.open(path);
  if (isSafetensors(head, size)) return SafetensorsFile.open(path);
  if (looksLikePickle(head)) {
    throw new WeightsError(
      `${path}: legacy (non-zip) PyTorch checkpoint: not supported; re-save it with torch>=1.6 or convert it to safetensors`,
    );
  }
  return SafetensorsFile.open(path);
}

/** How much of a file the format is told from: the 8-byte length and the start of a header after any whitespace. */
const HEAD_BYTES = 4096;

/** PK\x03\x04 (a local file header) or PK\x05\x06 (the end record of an empty archive). */
function isZip(head: Uint8Array): boolean {
  return head.length >= 4 && head[0] === 0x50 && head[1] === 0x4b && ((head[2] === 3 && head[3] === 4) || (head[2] === 5 && head[3] === 6));
}

/** A header length that fits the file and the reader's bound, then '{' after JSON whitespace (or only whitespace seen). */
function isSafetensors(head: Uint8Array, size: number): boolean {
  if (head.length < 9) return false;
  const n = new DataView(head.buffer, head.byteOffset).getBigUint64(0, true);
  if (n < 2n || n > BigInt(Math.min(size - 8, MAX_HEADER_BYTES))) return false;
  const end = Math.min(head.length, 8 + Number(n));
  for (let i = 8; i < end; i++) {
    const c = head[i];
    if (c === 0x7b) return true;
    if (c !== 0x20 && c !== 0x0a && c !== 0x0d && c !== 0x09) return false;
  }
  return true;
}

function firstBytes(path: string, n: number): { head: Uint8Array; size: number } {
  const fd = openForReading(path);
  try {
    const buf = new Uint8Array(n);
    return { head: buf.subarray(0, readSync(fd, buf, 0, n, 0)), size: fstatSync(fd).size };
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
export function detectLayout(src: TensorSource): CheckpointLayout {
  if (src instanceof DiffusersFolder) return 'diffusers';
  const keys = src.keys();
  if (keys.some((k) => k.startsWith(UNET_PREFIX) || k.startsWith(VAE_PREFIX) || k.startsWith(TEXT_PREFIX))) return 'sd1-original';
  const diffusersKey = /^(down_blocks\.|mid_block\.|up_blocks\.|encoder\.down_blocks\.|decoder\.up_blocks\.|text_model\.)/;
  if (keys.some((k) => diffusersKey.test(k))) return 'diffusers';
  return 'unknown';
}
