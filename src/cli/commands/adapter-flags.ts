/**
 * `sd generate`'s adapter flags -> GenerateParams' controlNets, ipAdapter and mask:
 *
 *   --controlnet FILE --control-image IMG [--control-preprocess canny|none] [--control-scale 0.8]
 *     [--control-start 0 --control-end 1] [--control-low 100 --control-high 200]
 *       each repeatable; the n-th value of a --control-* flag goes with the n-th --controlnet (one --control-image
 *       per --controlnet; the others may be left out, leaving their defaults)
 *   --init-image IMG --mask MASK.png [--strength 0.75]            inpainting: white repaints, black keeps
 *   --ip-adapter FILE --ip-image PHOTO [--ip-scale 0.6] [--image-encoder DIR]
 * Files are read here (a missing one is a usage error naming its flag); ranges are checked by the pipeline
 * (params.ts), whose ParamError names the field.
 */
import { existsSync, readFileSync } from 'node:fs';
import type { Argv } from 'yargs';
import { CONTROL_PREPROCESSORS, type ControlNetParams, type ControlPreprocess, type GenerateParams } from '../../pipeline/api.js';
import { UsageError } from '../errors.js';

export interface AdapterArgs {
  controlnet?: string[];
  'control-image'?: string[];
  'control-preprocess'?: ControlPreprocess[];
  'control-scale'?: number[];
  'control-start'?: number[];
  'control-end'?: number[];
  'control-low'?: number[];
  'control-high'?: number[];
  mask?: string;
  'init-image'?: string;
  'ip-adapter'?: string;
  'ip-image'?: string;
  'ip-scale'?: number;
  'image-encoder'?: string;
}

export function adapterOptions<T>(y: Argv<T>): Argv<T> {
  return y
    .option('controlnet', { type: 'string', array: true, describe: 'a ControlNet file (.pth / .safetensors) or diffusers folder; repeatable (their residuals add up)' })
    .option('control-image', { type: 'string', array: true, describe: 'the image guiding the n-th --controlnet (resized to the output size)' })
    .option('control-preprocess', { choices: CONTROL_PREPROCESSORS, array: true, describe: "canny (default): Canny edges of the image; none: the image is the hint as it is (e.g. a map from `sd canny`)" })
    .option('control-scale', { type: 'number', array: true, describe: 'ControlNet conditioning scale (A1111 weight), 0..2 (default 1)' })
    .option('control-start', { type: 'number', array: true, describe: 'fraction of the steps where the ControlNet starts, 0..1 (default 0)' })
    .option('control-end', { type: 'number', array: true, describe: 'fraction of the steps where it stops, 0..1 (default 1)' })
    .option('control-low', { type: 'number', array: true, describe: 'Canny low threshold (default 100)' })
    .option('control-high', { type: 'number', array: true, describe: 'Canny high threshold (default 200)' })
    .option('mask', { type: 'string', describe: 'inpainting (with --init-image): a mask image, white = repaint, black = keep' })
    .option('ip-adapter', { type: 'string', describe: 'an IP-Adapter file (ip-adapter_sd15.safetensors / .bin, -plus too)' })
    .option('ip-image', { type: 'string', describe: 'the photo the IP-Adapter conditions on' })
    .option('ip-scale', { type: 'number', describe: 'IP-Adapter scale, 0..2 (default 1; 0.6 is common)' })
    .option('image-encoder', { type: 'string', describe: "the IP-Adapter's CLIP image encoder folder (default: image_encoder/ beside the adapter, or one folder up)" });
}

function readFile(flag: string, path: string): Uint8Array {
  if (!existsSync(path)) throw new UsageError(`--${flag} ${path}: no such file`);
  return readFileSync(path);
}

/** The n-th value of a per-ControlNet flag; more values than --controlnet flags is a usage error. */
function nth<T>(flag: string, values: readonly T[] | undefined, count: number): (i: number) => T | undefined {
  const v = values ?? [];
  if (v.length > count) throw new UsageError(`--${flag} is given ${v.length} times for ${count} --controlnet: give one per --controlnet, in the same order`);
  return (i) => v[i];
}

function numbers(flag: string, values: readonly number[] | undefined, count: number): (i: number) => number | undefined {
  for (const x of values ?? []) if (!Number.isFinite(x)) throw new UsageError(`--${flag} needs a number, got ${String(x)}`);
  return nth(flag, values, count);
}

function controlNets(a: AdapterArgs): ControlNetParams[] | undefined {
  const files = a.controlnet ?? [];
  const perUnit = ['control-image', 'control-preprocess', 'control-scale', 'control-start', 'control-end', 'control-low', 'control-high'] as const;
  if (files.length === 0) {
    const stray = perUnit.find((f) => a[f] !== undefined);
    if (stray !== undefined) throw new UsageError(`--${stray} applies to a ControlNet: add --controlnet FILE`);
    return undefined;
  }
  const images = a['control-image'] ?? [];
  if (images.length !== files.length) throw new UsageError(`--controlnet needs one --control-image each: ${files.length} --controlnet, ${images.length} --control-image`);
  const preprocess = nth('control-preprocess', a['control-preprocess'], files.length);
  const scale = numbers('control-scale', a['control-scale'], files.length);
  const start = numbers('control-start', a['control-start'], files.length);
  const end = numbers('control-end', a['control-end'], files.length);
  const low = numbers('control-low', a['control-low'], files.length);
  const high = numbers('control-high', a['control-high'], files.length);
  return files.map((model, i) => {
    if (!existsSync(model)) throw new UsageError(`--controlnet ${model}: no such file or folder`);
    return { model, image: readFile('control-image', images[i]), preprocess: preprocess(i), scale: scale(i), start: start(i), end: end(i), low: low(i), high: high(i) };
  });
}

function ipAdapter(a: AdapterArgs): GenerateParams['ipAdapter'] {
  const model = a['ip-adapter'];
  if (model === undefined) {
    const stray = (['ip-image', 'ip-scale', 'image-encoder'] as const).find((f) => a[f] !== undefined);
    if (stray !== undefined) throw new UsageError(`--${stray} applies to an IP-Adapter: add --ip-adapter FILE`);
    return undefined;
  }
  if (!existsSync(model)) throw new UsageError(`--ip-adapter ${model}: no such file`);
  if (a['ip-image'] === undefined) throw new UsageError('--ip-adapter needs --ip-image PHOTO (the image it conditions on)');
  if (a['ip-scale'] !== undefined && !Number.isFinite(a['ip-scale'])) throw new UsageError(`--ip-scale needs a number, got ${String(a['ip-scale'])}`);
  const encoder = a['image-encoder'];
  if (encoder !== undefined && !existsSync(encoder)) throw new UsageError(`--image-encoder ${encoder}: no such folder`);
  return { model, image: readFile('ip-image', a['ip-image']), scale: a['ip-scale'], imageEncoder: encoder };
}

/** The adapter fields of GenerateParams from the flags (undefined where a feature is not asked for). */
export function adapterParams(a: AdapterArgs): Pick<GenerateParams, 'controlNets' | 'ipAdapter' | 'mask'> {
  if (a.mask !== undefined && a['init-image'] === undefined) throw new UsageError('--mask needs --init-image IMG (the image it applies to)');
  return {
    controlNets: controlNets(a),
    ipAdapter: ipAdapter(a),
    mask: a.mask === undefined ? undefined : readFile('mask', a.mask),
  };
}

/** The flag of each adapter field of GenerateParams, for ParamErrors raised by the pipeline. */
const FLAGS: Readonly<Record<string, string>> = Object.freeze({
  model: 'controlnet', image: 'control-image', preprocess: 'control-preprocess', scale: 'control-scale',
  start: 'control-start', end: 'control-end', low: 'control-low', high: 'control-high',
});
const IP_FLAGS: Readonly<Record<string, string>> = Object.freeze({ model: 'ip-adapter', image: 'ip-image', scale: 'ip-scale', imageEncoder: 'image-encoder' });

/** A ParamError on an adapter field as a UsageError naming its flag (`controlNets[1].scale` -> the 2nd --control-scale). */
export function withFlagName(e: unknown): unknown {
  if (!(e instanceof Error) || e.name !== 'ParamError') return e;
  const field = (e as Error & { field?: string }).field ?? '';
  const why = e.message.slice(field.length + 2);
  const cn = /^controlNets\[(\d+)\]\.(\w+)$/.exec(field);
  if (cn !== null && FLAGS[cn[2]] !== undefined) return new UsageError(`--${FLAGS[cn[2]]} (of --controlnet #${Number(cn[1]) + 1}): ${why}`);
  const ip = /^ipAdapter\.(\w+)$/.exec(field);
  if (ip !== null && IP_FLAGS[ip[1]] !== undefined) return new UsageError(`--${IP_FLAGS[ip[1]]}: ${why}`);
  if (field === 'ipAdapter') return new UsageError(`--ip-adapter: ${why}`);
  if (field === 'mask') return new UsageError(`--mask: ${why}`);
  return e;
}
