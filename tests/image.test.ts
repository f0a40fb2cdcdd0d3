import { crc32 } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import sharp from 'sharp';
import { decodeImage, encodePng, ImageError, readPngParameters } from '../src/image/codec.js';
import { readChunks } from '../src/image/png-chunks.js';
import { formatParameters, parseParameters, type ImageParameters } from '../src/image/parameters.js';

const PARAMS: ImageParameters = {
  prompt: 'a botanical illustration of a fern',
  negativePrompt: 'blurry, low quality',
  seed: 42,
  steps: 20,
  cfgScale: 7.5,
  cfg: true,
  sampler: 'euler_a',
  karras: false,
  width: 16,
  height: 8,
  clipSkip: 1,
  strength: null,
};

/** A deterministic gradient, 16 x 8 RGB. */
function gradient(width = 16, height = 8): Uint8Array {
  const rgb = new Uint8Array(width * height * 3);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = (y * width + x) * 3;
      rgb[i] = x * 16;
      rgb[i + 1] = y * 32;
      rgb[i + 2] = (x + y) * 8;
    }
  }
  return rgb;
}

describe('crc32 (node:zlib, what PNG chunks and zip entries are checked with)', () => {
  it('matches the standard check value', () => {
    expect(crc32(Buffer.from('123456789', 'latin1'))).toBe(0xcbf43926);
    expect(crc32(Buffer.from('IEND', 'latin1'))).toBe(0xae426082);
  });
});

describe('A1111 parameters text', () => {
  it('writes the web UI format', () => {
    expect(formatParameters(PARAMS)).toBe(
      'a botanical illustration of a fern\nNegative prompt: blurry, low quality\n' +
        'Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 16x8',
    );
  });

  it('omits an empty negative prompt, adds strength, clip skip, karras, model', () => {
    const text = formatParameters({ ...PARAMS, negativePrompt: '', sampler: 'dpmpp_2m', karras: true, strength: 0.6, clipSkip: 2, model: 'v1-5' });
    expect(text).toBe('a botanical illustration of a fern\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 16x8, Model: v1-5, Denoising strength: 0.6, Clip skip: 2');
  });

  it('parses back what it writes, including multi-line prompts and quoted values', () => {
    const p = { ...PARAMS, prompt: 'line one\nline two', model: 'my, model' };
    const parsed = parseParameters(formatParameters(p));
    expect(parsed.prompt).toBe('line one\nline two');
    expect(parsed.negativePrompt).toBe('blurry, low quality');
    expect(parsed.settings).toEqual({ Steps: '20', Sampler: 'Euler a', 'CFG scale': '7.5', Seed: '42', Size: '16x8', Model: 'my, model' });
  });
});

describe('PNG encode / decode', () => {
  it('round-trips pixels and puts the parameters chunk right after IHDR', async () => {
    const rgb = gradient();
    const png = await encodePng({ rgb, width: 16, height: 8 }, PARAMS);
    const chunks = readChunks(png).map((c) => c.type);
    expect(chunks[0]).toBe('IHDR');
    expect(chunks[1]).toBe('tEXt');
    expect(chunks[chunks.length - 1]).toBe('IEND');
    expect(readPngParameters(png)).toBe(formatParameters(PARAMS));
    const { data, info } = await sharp(png).raw().toBuffer({ resolveWithObject: true });
    expect([info.width, info.height, info.channels]).toEqual([16, 8, 3]);
    expect(Buffer.compare(data, Buffer.from(rgb))).toBe(0);
  });

  it('stores non-Latin-1 prompts as UTF-8 iTXt', async () => {
    const p = { ...PARAMS, prompt: '富士山 at dawn ✨' };
    const png = await encodePng({ rgb: gradient(), width: 16, height: 8 }, p);
    expect(readChunks(png)[1].type).toBe('iTXt');
    expect(parseParameters(readPngParameters(png)!).prompt).toBe('富士山 at dawn ✨');
  });

  it('gives byte-identical files for the same input', async () => {
    const a = await encodePng({ rgb: gradient(), width: 16, height: 8 }, PARAMS);
    const b = await encodePng({ rgb: gradient(), width: 16, height: 8 }, PARAMS);
    expect(a.equals(b)).toBe(true);
    expect(readPngParameters(await encodePng({ rgb: gradient(), width: 16, height: 8 }))).toBeNull();
  });

  it('decodes PNG and JPEG to RGB at the requested size, alpha onto white', async () => {
    const rgba = Buffer.alloc(4 * 4 * 4, 0); // fully transparent black
    const png = await sharp(rgba, { raw: { width: 4, height: 4, channels: 4 } }).png().toBuffer();
    const img = await decodeImage(png, 8, 16);
    expect([img.width, img.height, img.rgb.length]).toEqual([8, 16, 8 * 16 * 3]);
    expect(Math.min(...img.rgb)).toBe(255);

    const jpeg = await sharp(Buffer.from(gradient()), { raw: { width: 16, height: 8, channels: 3 } }).jpeg({ quality: 100, chromaSubsampling: '4:4:4' }).toBuffer();
    const fromJpeg = await decodeImage(jpeg, 16, 8);
    const src = gradient();
    let maxDiff = 0;
    for (let i = 0; i < src.length; i++) maxDiff = Math.max(maxDiff, Math.abs(src[i] - fromJpeg.rgb[i]));
    expect(maxDiff).toBeLessThan(8); // JPEG is lossy even at quality 100
  });

  it('refuses bytes that are not an image with an ImageError', async () => {
    await expect(decodeImage(Buffer.from('not an image at all'), 8, 8, 'init.png')).rejects.toThrow(ImageError);
    await expect(decodeImage(Buffer.from('not an image at all'), 8, 8, 'init.png')).rejects.toThrow(/init\.png: cannot decode/);
    expect(() => readPngParameters(Buffer.from('nope'))).toThrow(ImageError);
  });
});
