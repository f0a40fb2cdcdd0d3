import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import sharp from 'sharp';
import { describe, expect, it } from 'vitest';
import { canny, CannyError, controlHint, edgesToRgb, rgbToGray, type CannyOptions } from '../src/image/canny.js';
import { cannyCommand } from '../src/cli/commands/canny.js';
import { runParity } from '../src/parity/runner.js';

type Rgb = readonly [number, number, number];

/** A width x height RGB image whose pixel (x, y) is colour(x, y). */
function image(width: number, height: number, colour: (x: number, y: number) => Rgb): Uint8Array {
  const rgb = new Uint8Array(width * height * 3);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) rgb.set(colour(x, y), (y * width + x) * 3);
  }
  return rgb;
}

const gray = (v: number): Rgb => [v, v, v];
const DEFAULTS: CannyOptions = { low: 100, high: 200, mode: 'rgb' };

/** The edge pixels of a map as "x,y" strings, for readable failures. */
function edgePixels(edges: Uint8Array, width: number): string[] {
  const out: string[] = [];
  edges.forEach((v, i) => {
    if (v === 255) out.push(`${i % width},${Math.floor(i / width)}`);
  });
  return out;
}

const column = (x: number, height: number) => Array.from({ length: height }, (_, y) => `${x},${y}`);

describe('canny', () => {
  it('marks a vertical step on the column left of it only (m > left, m >= right, as OpenCV)', () => {
    // Columns 7 and 8 both have |dx| = 4 * 255; the tie goes to the left one.
    const edges = canny(image(16, 12, (x) => gray(x < 8 ? 0 : 255)), 16, 12, DEFAULTS);
    expect(edgePixels(edges, 16)).toEqual(column(7, 12));
    expect(new Set(edges)).toEqual(new Set([0, 255]));
  });

  it('marks a horizontal step on the row above it only (m > up, m >= down)', () => {
    const edges = canny(image(10, 12, (_x, y) => gray(y < 6 ? 0 : 255)), 10, 12, DEFAULTS);
    expect(edgePixels(edges, 10)).toEqual(Array.from({ length: 10 }, (_, x) => `${x},5`));
  });

  it('keeps an edge on the image border: outside the image m counts as 0', () => {
    const edges = canny(image(8, 6, (x) => gray(x === 0 ? 0 : 255)), 8, 6, DEFAULTS);
    expect(edgePixels(edges, 8)).toEqual(column(0, 6));
    const top = canny(image(8, 6, (_x, y) => gray(y === 0 ? 0 : 255)), 8, 6, DEFAULTS);
    expect(edgePixels(top, 8)).toEqual(Array.from({ length: 8 }, (_, x) => `${x},0`));
  });

  it('finds no edge in a uniform image: the Sobel border is replicated, not zero', () => {
    expect(edgePixels(canny(image(9, 7, () => [250, 20, 140]), 9, 7, DEFAULTS), 9)).toEqual([]);
  });

  it('starts edges only where m > high and keeps only m > low (both strict)', () => {
    // A step of 50 has m = |dx| = 4 * 50 = 200.
    const step = image(12, 8, (x) => gray(x < 6 ? 100 : 150));
    const count = (low: number, high: number) => edgePixels(canny(step, 12, 8, { low, high, mode: 'rgb' }), 12).length;
    expect(count(100, 199)).toBe(8);
    expect(count(100, 200)).toBe(0);
    expect(count(199, 199)).toBe(8);
    expect(count(200, 200)).toBe(0);
    expect(count(199.9, 199.9)).toBe(8);
  });

  it('grows edges from strong pixels through connected weak ones, and drops weak ones on their own', () => {
    // A step of 40 has m = 160, between low and high: on its own it is no edge, unless high drops below 160.
    const weak = image(12, 8, (x) => gray(x < 6 ? 0 : 40));
    expect(edgePixels(canny(weak, 12, 8, DEFAULTS), 12)).toEqual([]);
    expect(edgePixels(canny(weak, 12, 8, { low: 100, high: 150, mode: 'rgb' }), 12)).toEqual(column(5, 8));
    // The same step, strong (60: m = 240) in rows 0-3: the whole line is one edge (it jogs to x = 6 where the
    // brightness changes, rows 3-4).
    const joined = image(12, 16, (x, y) => gray(x < 6 ? 0 : y < 4 ? 60 : 40));
    const rows = (edges: Uint8Array) => [...new Set(edgePixels(edges, 12).map((p) => Number(p.split(',')[1])))];
    expect(rows(canny(joined, 12, 16, { low: 200, high: 200, mode: 'rgb' }))).toEqual([0, 1, 2, 3, 4]);
    expect(rows(canny(joined, 12, 16, { low: 160, high: 200, mode: 'rgb' }))).toEqual([0, 1, 2, 3, 4]); // m > low, strictly
    expect(rows(canny(joined, 12, 16, { low: 159, high: 200, mode: 'rgb' }))).toHaveLength(16);
    expect(edgePixels(canny(joined, 12, 16, DEFAULTS), 12)).toEqual([...column(5, 16).slice(0, 3), '6,3', '6,4', ...column(5, 16).slice(5)]);
  });

  it('swaps low and high when low > high, as cv2.Canny does', () => {
    const joined = image(12, 16, (x, y) => gray(x < 6 ? 0 : y < 4 ? 60 : 40));
    expect(canny(joined, 12, 16, { low: 200, high: 100, mode: 'rgb' })).toEqual(canny(joined, 12, 16, DEFAULTS));
  });

  it('joins pixels that touch only at a corner (8-connected hysteresis)', () => {
    // Dark left, bright (200) top right, dim (40) bottom right; the dark edge moves one column right at row 6.
    // The weak 200 -> 40 step (m = 4 * 160 = 640 < high) keeps row 5 from x = 8 on; its only link to the strong
    // dark edge is the corner it shares with (7, 6).
    const rgb = image(14, 12, (x, y) => gray(x < (y < 6 ? 6 : 7) ? 0 : y < 6 ? 200 : 40));
    const opts = { low: 100, high: 700, mode: 'rgb' } as const;
    const weakRow = Array.from({ length: 6 }, (_, i) => `${8 + i},5`);
    const edges = edgePixels(canny(rgb, 14, 12, opts), 14);
    expect(edges).toEqual(expect.arrayContaining([...weakRow, '7,6']));
    expect(edges).not.toContain('7,5');
    expect(edgePixels(canny(rgb, 14, 12, { ...opts, low: 700 }), 14)).not.toContain('8,5'); // weak, not strong
  });

  it('gray mode sees only the gray: two colours of equal gray make no edge there, but do in rgb mode', () => {
    // cvtColor: gray(255, 0, 0) = gray(0, 129, 0) = 76.
    expect([...rgbToGray(new Uint8Array([255, 0, 0, 0, 129, 0, 255, 255, 255, 0, 0, 0]), 4, 1)]).toEqual([76, 76, 255, 0]);
    const rgb = image(12, 8, (x) => (x < 6 ? [255, 0, 0] : [0, 129, 0]));
    expect(edgePixels(canny(rgb, 12, 8, { ...DEFAULTS, mode: 'gray' }), 12)).toEqual([]);
    expect(edgePixels(canny(rgb, 12, 8, DEFAULTS), 12)).toEqual(column(5, 8));
  });

  it('rgb mode takes, per pixel, the channel with the largest gradient', () => {
    // Only the blue channel steps; in gray it is a step of 3735 * 255 / 2^15 ~ 29 levels: too weak.
    const rgb = image(12, 8, (x) => [40, 40, x < 6 ? 0 : 255]);
    expect(edgePixels(canny(rgb, 12, 8, DEFAULTS), 12)).toEqual(column(5, 8));
    expect(edgePixels(canny(rgb, 12, 8, { ...DEFAULTS, mode: 'gray' }), 12)).toEqual([]);
  });

  it('refuses bad arguments, saying what was expected', () => {
    const rgb = new Uint8Array(4 * 3 * 3);
    expect(() => canny(rgb, 4, 4, DEFAULTS)).toThrow(/36 bytes is not 4x4 RGB \(48 bytes\)/);
    expect(() => canny(rgb, 4.5, 3, DEFAULTS)).toThrow(/positive integers, got 4.5x3/);
    expect(() => canny(new Uint8Array(0), 0, 0, DEFAULTS)).toThrow(CannyError);
    expect(() => canny(rgb, 4, 3, { ...DEFAULTS, low: NaN })).toThrow(/threshold low must be a finite number >= 0, got NaN/);
    expect(() => canny(rgb, 4, 3, { ...DEFAULTS, high: -1 })).toThrow(/threshold high/);
    expect(() => canny(rgb, 4, 3, { ...DEFAULTS, mode: 'hsv' as 'rgb' })).toThrow(/mode must be 'rgb' or 'gray', got "hsv"/);
  });

  it('makes the ControlNet hint: HWC3 of the map, and /255 as NCHW [1, 3, H, W]', () => {
    const edges = new Uint8Array([0, 255, 255, 0, 0, 0]);
    expect([...edgesToRgb(edges)]).toEqual([0, 0, 0, 255, 255, 255, 255, 255, 255, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    expect([...controlHint(edges)]).toEqual([0, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0]);
  });
});

describe('sd canny', () => {
  it('writes the map of a PNG as an RGB PNG of the same size', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'sd-canny-'));
    const rgb = image(24, 16, (x, y) => [x < 12 ? 0 : 255, y < 8 ? 30 : 220, 90]);
    await sharp(rgb, { raw: { width: 24, height: 16, channels: 3 } }).png().toFile(join(dir, 'in.png'));
    await cannyCommand.handler({ input: join(dir, 'in.png'), output: join(dir, 'out.png'), low: 50, high: 150, gray: true, _: [], $0: 'sd' });
    const { data, info } = await sharp(readFileSync(join(dir, 'out.png'))).raw().toBuffer({ resolveWithObject: true });
    expect([info.width, info.height, info.channels]).toEqual([24, 16, 3]);
    expect(new Uint8Array(data)).toEqual(edgesToRgb(canny(rgb, 24, 16, { low: 50, high: 150, mode: 'gray' })));
  });

  it('names the flag that is wrong', async () => {
    await expect(cannyCommand.handler({ input: 'x.png', output: 'y.png', low: NaN, _: [], $0: 'sd' })).rejects.toThrow(/--low needs a number >= 0/);
    await expect(cannyCommand.handler({ input: 'no/such.png', output: 'y.png', _: [], $0: 'sd' })).rejects.toThrow(/no\/such.png: no such file/);
  });
});

describe('canny fixture', () => {
  it('matches cv2.Canny on every case with 0 differing pixels (tests/fixtures/canny)', async () => {
    const results = await runParity('tests/fixtures/canny', { backend: 'cpu' });
    expect(results.length).toBe(45); // 40 edge maps + 5 gray conversions
    expect(results.filter((r) => !r.passed)).toEqual([]);
    expect(results.every((r) => r.detail?.startsWith('0 of '))).toBe(true);
  });
});
