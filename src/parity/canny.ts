/**
 * Parity for the `canny` fixture kind: each case runs canny() on `image_NAME` (uint8 RGB [H, W, 3]) with the case's
 * mode and thresholds and counts the pixels that differ from `edges_NAME_MODE_LOW_HIGH` (uint8 [H, W], 0/255).
 * The rule is a fraction of differing pixels (fixture.json `tolerance.max_fraction`, 0). One more case per image
 * checks rgbToGray against `gray_NAME`, the cv2.cvtColor(RGB2GRAY) the gray mode starts from.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { canny, rgbToGray, type CannyMode } from '../image/canny.js';
import { SafetensorsFile } from '../weights/safetensors.js';
import type { CaseResult, KindRunner } from './types.js';

interface CannyCase {
  readonly image: string;
  readonly mode: CannyMode;
  readonly low: number;
  readonly high: number;
  readonly expected: string;
  readonly shape: readonly [number, number];
}

interface CannyFixture {
  readonly tolerance: { readonly max_fraction: number };
  readonly cases: readonly CannyCase[];
}

const KIND = 'canny';

/** A U8 tensor of io.safetensors with its shape checked. */
function readU8(io: SafetensorsFile, key: string, shape: readonly number[]): Uint8Array {
  const info = io.info(key);
  if (info.dtype !== 'U8' || info.shape.join(',') !== shape.join(',')) {
    throw new Error(`${key}: expected U8 [${shape.join(', ')}], got ${info.dtype} [${info.shape.join(', ')}]`);
  }
  return io.bytes(key);
}

/** How many pixels differ, and where the first one is. */
function compareMaps(actual: Uint8Array, expected: Uint8Array, width: number): { differing: number; first: string } {
  let differing = 0;
  let first = '';
  for (let i = 0; i < expected.length; i++) {
    if (actual[i] === expected[i]) continue;
    if (differing === 0) first = `, first at (x ${i % width}, y ${Math.floor(i / width)}): got ${actual[i]}, expected ${expected[i]}`;
    differing++;
  }
  return { differing, first };
}

function result(name: string, actual: Uint8Array, expected: Uint8Array, width: number, maxFraction: number): CaseResult {
  const { differing, first } = compareMaps(actual, expected, width);
  const fraction = differing / expected.length;
  const passed = fraction <= maxFraction;
  const detail = `${differing} of ${expected.length} pixels differ${first}`;
  return { kind: KIND, name, passed, tolerance: maxFraction, detail };
}

function runCase(c: CannyCase, io: SafetensorsFile, maxFraction: number): CaseResult {
  const name = `${c.image.replace(/^image_/, '')} ${c.mode} ${c.low}/${c.high}`;
  try {
    const [h, w] = c.shape;
    const rgb = readU8(io, c.image, [h, w, 3]);
    const expected = readU8(io, c.expected, [h, w]);
    return result(name, canny(rgb, w, h, { low: c.low, high: c.high, mode: c.mode }), expected, w, maxFraction);
  } catch (e) {
    return { kind: KIND, name, passed: false, detail: e instanceof Error ? e.message : String(e) };
  }
}

function runGray(image: string, shape: readonly [number, number], io: SafetensorsFile): CaseResult {
  const name = `${image.replace(/^image_/, '')} rgbToGray`;
  try {
    const [h, w] = shape;
    const key = image.replace(/^image_/, 'gray_');
    return result(name, rgbToGray(readU8(io, image, [h, w, 3]), w, h), readU8(io, key, [h, w]), w, 0);
  } catch (e) {
    return { kind: KIND, name, passed: false, detail: e instanceof Error ? e.message : String(e) };
  }
}

export const run: KindRunner = async (dir) => {
  const fixture = JSON.parse(readFileSync(join(dir, 'fixture.json'), 'utf8')) as CannyFixture;
  const maxFraction = fixture.tolerance.max_fraction;
  if (typeof maxFraction !== 'number') throw new Error(`${join(dir, 'fixture.json')}: no tolerance.max_fraction`);
  const io = SafetensorsFile.open(join(dir, 'io.safetensors'));
  try {
    const images = new Map(fixture.cases.map((c) => [c.image, c.shape] as const));
    return [
      ...[...images].map(([image, shape]) => runGray(image, shape, io)),
      ...fixture.cases.map((c) => runCase(c, io, maxFraction)),
    ];
  } finally {
    io.close();
  }
};
