/**
 * `sd convert`: any supported weights (safetensors, PyTorch zip checkpoint, diffusers folder) -> one
 * safetensors file under the original single-file key names, optionally with float tensors stored as fp16.
 * Tensors are read and written one at a time, and the output appears atomically (temp file, then rename), only
 * once it lists every tensor that was read (writeSafetensors reads its header back) and nothing else. A tensor
 * too large to hold in memory is refused before anything is written.
 */
import { existsSync, realpathSync } from 'node:fs';
import { resolve } from 'node:path';
import { DTYPE_BYTES, encodeFloat16, isFloatDType } from './dtypes.js';
import { DiffusersFolder } from './diffusers.js';
import { checkTensorBytes } from './files.js';
import { openWeights } from './open.js';
import { writeSafetensors } from './safetensors.js';
import { WeightsError, type TensorInfo, type TensorSource } from './types.js';

export interface ConvertOptions {
  /** Store floating-point tensors as F16 (integer tensors such as position_ids keep their dtype). */
  readonly half?: boolean;
  /** Replace an existing output file. */
  readonly force?: boolean;
  /** Called after each tensor is written. */
  readonly onTensor?: (name: string, done: number, total: number) => void;
}

export interface ConvertResult {
  readonly tensors: number;
  readonly bytes: number;
}

export function convertWeights(input: string, output: string, opts: ConvertOptions = {}): ConvertResult {
  const src = openWeights(input);
  try {
    refuseOverwrite(src, input, output, opts.force ?? false);
    const names = src.keys();
    for (const name of names) checkFits(src, name, opts.half ?? false);
    const infos = names.map((name): [string, TensorInfo] => [name, outputInfo(src.info(name), opts.half ?? false)]);
    let done = 0;
    writeSafetensors(output, infos, (name) => {
      const data = tensorData(src, name, opts.half ?? false);
      opts.onTensor?.(name, ++done, infos.length);
      return data;
    }, { format: 'pt' });
    const bytes = infos.reduce((a, [, i]) => a + i.shape.reduce((p, d) => p * d, 1) * DTYPE_BYTES[i.dtype], 0);
    return { tensors: infos.length, bytes };
  } finally {
    src.close();
  }
}

/** The input must not be overwritten (the output is written while the input is read), nor any file without --force. */
function refuseOverwrite(src: TensorSource, input: string, output: string, force: boolean): void {
  if (!existsSync(output)) return;
  const out = realpathSync(output);
  const inputs = src instanceof DiffusersFolder ? Object.values(src.files).filter((p) => p !== undefined) : [input];
  if (inputs.some((p) => realpathSync(p) === out) || resolve(input) === resolve(output)) {
    throw new WeightsError(`${output}: is the input being converted; write the output to another file`);
  }
  if (!force) throw new WeightsError(`${output}: already exists; pass --force to replace it`);
}

/** Each tensor is held in memory once (and as float32 when halved): refuse one that cannot be, up front. */
function checkFits(src: TensorSource, name: string, half: boolean): void {
  const { dtype, shape } = src.info(name);
  const n = shape.reduce((a, d) => a * d, 1);
  checkTensorBytes(src.path, name, n * DTYPE_BYTES[dtype]);
  if (half && isFloatDType(dtype) && dtype !== 'F16') checkTensorBytes(src.path, name, n * 4, ' as float32');
}

function outputInfo(info: TensorInfo, half: boolean): TensorInfo {
  return half && isFloatDType(info.dtype) ? { dtype: 'F16', shape: info.shape } : info;
}

function tensorData(src: TensorSource, name: string, half: boolean): Uint8Array | Uint16Array {
  const { dtype } = src.info(name);
  if (!half || !isFloatDType(dtype) || dtype === 'F16') return src.bytes(name);
  return encodeFloat16(src.float32(name));
}
