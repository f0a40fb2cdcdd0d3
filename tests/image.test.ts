import { crc32, deflateSync } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import sharp from 'sharp';
import { decodeImage, encodePng, ImageError, readPngParameters } from '../src/image/codec.js';
import { readImageHeader, sniffFormat } from '../src/image/header.js';
import { pngChunk, readChunks, stripPngMetadata } from '../src/image/png-chunks.js';
import { withChunks } from './helpers.js';
import { DecodeBudget, decodeUploadedImage } from '../src/image/upload.js';
import { formatParameters, generationSources, parseParameters, type ImageParameters } from '../src/image/parameters.js';

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

  it("records the noise source as A1111's RNG setting, the conventions, the prompt syntax and SDXL's sizes when not default, and reads them back", () => {
    const defaults = { ...PARAMS, noise: 'gpu', conventions: 'a1111', promptSyntax: 'a1111', originalSize: [8, 16], cropTopLeft: [0, 0], targetSize: [8, 16] } as const;
    expect(formatParameters(defaults)).toBe(formatParameters(PARAMS));
    const text = formatParameters({ ...defaults, noise: 'cpu', conventions: 'diffusers', promptSyntax: 'plain', originalSize: [1024, 768], cropTopLeft: [0, 32], targetSize: [8, 8] });
    expect(text.split('\n').pop()).toBe(
      'Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 16x8, RNG: CPU, Conventions: diffusers, Prompt syntax: plain, ' +
        'Original size: 768x1024, Crop left: 32, Target size: 8x8',
    );
    expect(generationSources(parseParameters(text).settings)).toEqual({ noise: 'cpu', conventions: 'diffusers', promptSyntax: 'plain', padCondUncond: false });
    // A1111's own: no RNG for its GPU default, NV for its CUDA-compatible generator (the same numbers)
    expect(generationSources({}).noise).toBe('gpu');
    expect(generationSources({ RNG: 'NV' })).toEqual({ noise: 'gpu', conventions: 'a1111', promptSyntax: 'a1111', padCondUncond: false });
    expect(() => generationSources({ RNG: 'XPU' })).toThrow(/RNG "XPU"; expected CPU, GPU or NV/);
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

const solid = (width: number, height: number, channels: 3 | 4 = 3) =>
  sharp({ create: { width, height, channels, background: channels === 4 ? '#3a7a' : '#3a7' } });

describe('image headers: format by magic bytes, size without decoding', () => {
  it('reads width, height, bands and sample size of PNG, JPEG and WebP as sharp writes them', async () => {
    const cases: [Buffer, string, number, number, number, number][] = [
      [await solid(40, 24).png().toBuffer(), 'PNG', 40, 24, 4, 1],
      [await solid(40, 24).png({ palette: true }).toBuffer(), 'PNG', 40, 24, 4, 1],
      [await solid(40, 24).toColourspace('rgb16').png().toBuffer(), 'PNG', 40, 24, 4, 2],
      [await solid(40, 24).toColourspace('b-w').png().toBuffer(), 'PNG', 40, 24, 2, 1],
      [await solid(40, 24).jpeg().toBuffer(), 'JPEG', 40, 24, 3, 1],
      [await solid(40, 24).jpeg({ progressive: true }).withMetadata().toBuffer(), 'JPEG', 40, 24, 3, 1],
      [await solid(40, 24).webp().toBuffer(), 'WebP', 40, 24, 4, 1],
      [await solid(40, 24).webp({ lossless: true }).toBuffer(), 'WebP', 40, 24, 4, 1],
      [await solid(40, 24, 4).webp().toBuffer(), 'WebP', 40, 24, 4, 1],
    ];
    for (const [file, format, width, height, bands, bytesPerSample] of cases) {
      expect(readImageHeader(file), format).toEqual({ format, width, height, bands, bytesPerSample });
      expect(await sharp(file).metadata()).toMatchObject({ width, height });
    }
  });

  it('names the formats it refuses', async () => {
    expect(sniffFormat(await solid(8, 8).gif().toBuffer())).toEqual({ other: 'GIF' });
    expect(sniffFormat(await solid(8, 8).tiff().toBuffer())).toEqual({ other: 'TIFF' });
    expect(sniffFormat(Buffer.from('\uFEFF  <svg xmlns="http://www.w3.org/2000/svg"/>'))).toEqual({ other: 'SVG/XML' });
    expect(sniffFormat(Buffer.from('hello'))).toEqual({ other: 'unknown' });
    expect(() => readImageHeader(Buffer.from([0xff, 0xd8, 0xff, 0xda, 0, 2]))).toThrow(/no frame header/);
  });
});

describe('PNG metadata stripped before decoding', () => {
  it('drops text chunks, keeps the chunks that change the pixels; the decode is the same', async () => {
    const base = await solid(16, 8).png().toBuffer();
    const text = pngChunk('tEXt', Buffer.from('parameters\0a fern', 'latin1'));
    const ztxt = pngChunk('zTXt', Buffer.concat([Buffer.from('Comment\0\0', 'latin1'), deflateSync(Buffer.alloc(2 ** 20, 'A'))]));
    const gama = pngChunk('gAMA', Buffer.from([0, 0, 0xb1, 0x8f]));
    const png = withChunks(base, [text, gama, ztxt, pngChunk('prIv', Buffer.from('x'))]);
    const clean = stripPngMetadata(png);
    expect(readChunks(clean).map((c) => c.type)).toEqual(['IHDR', 'gAMA', ...readChunks(base).slice(1).map((c) => c.type)]);
    expect(Buffer.compare(await sharp(clean).raw().toBuffer(), await sharp(png).raw().toBuffer())).toBe(0);
  });

  it('keeps an ICC profile that inflates within the cap, drops one that does not', async () => {
    const p3 = await solid(8, 8).withIccProfile('p3').png().toBuffer();
    expect(readChunks(stripPngMetadata(p3)).map((c) => c.type)).toContain('iCCP');
    const bomb = pngChunk('iCCP', Buffer.concat([Buffer.from('bomb\0\0', 'latin1'), deflateSync(Buffer.alloc(8 * 2 ** 20))]));
    expect(readChunks(stripPngMetadata(withChunks(await solid(8, 8).png().toBuffer(), [bomb]))).map((c) => c.type)).not.toContain('iCCP');
  });

  it('decodeImage never inflates the text: 16 zTXt chunks of 8 MiB cost MBs of RSS, not hundreds', async () => {
    const ztxt = pngChunk('zTXt', Buffer.concat([Buffer.from('Comment\0\0', 'latin1'), deflateSync(Buffer.alloc(8 * 2 ** 20, 'A'))]));
    const png = withChunks(await solid(16, 8).png().toBuffer(), Array<Buffer>(16).fill(ztxt));
    const before = process.memoryUsage().rss;
    const img = await decodeImage(png, 16, 8);
    const grown = (process.memoryUsage().rss - before) / 2 ** 20;
    expect(img.rgb.length).toBe(16 * 8 * 3);
    expect(grown, `RSS grew by ${grown.toFixed(0)} MiB`).toBeLessThan(128);
  });
});

describe('decodeUploadedImage: the one gate of every uploaded image', () => {
  const limits = { maxPixels: 64 * 64, maxDecodeBytes: 2 ** 20 };

  it('returns format, size and the stripped bytes', async () => {
    const png = withChunks(await solid(40, 24).png().toBuffer(), [pngChunk('tEXt', Buffer.from('k\0v', 'latin1'))]);
    const up = await decodeUploadedImage(png, 'mask', limits);
    expect(up).toMatchObject({ format: 'PNG', width: 40, height: 24, decodedBytes: 40 * 24 * 4 });
    expect(readChunks(up.bytes).map((c) => c.type)).not.toContain('tEXt');
  });

  it('refuses other formats, too many pixels and broken files, naming the field', async () => {
    const refusal = (p: Promise<unknown>) => p.then(() => null, (e: unknown) => e as ImageError);
    const gif = await refusal(decodeUploadedImage(await solid(8, 8).gif().toBuffer(), 'mask', limits));
    expect(gif).toBeInstanceOf(ImageError);
    expect(gif?.field).toBe('mask');
    expect(gif?.message).toBe('mask: a GIF file; accepted formats are PNG, JPEG and WebP');
    await expect(decodeUploadedImage(await solid(80, 80).jpeg().toBuffer(), 'mask', limits)).rejects.toThrow(/mask: 80x80 is 6400 pixels, over this server's limit of 4096/);
    const truncated = (await solid(16, 16).png().toBuffer()).subarray(0, 40);
    await expect(decodeUploadedImage(truncated, 'mask', limits)).rejects.toThrow(/^mask: not a readable PNG \(truncated chunk/);
  });

  it('counts the decoded size of all the images of one request against one budget', async () => {
    const png = await solid(32, 32, 4).png().toBuffer(); // 4096 bytes decoded
    const budget = new DecodeBudget(6000);
    await decodeUploadedImage(png, 'init_image', limits, budget);
    await expect(decodeUploadedImage(png, 'mask', limits, budget)).rejects.toThrow(/mask: decodes to .* \(with .* for the request's other images\), over this server's limit/);
    await expect(decodeUploadedImage(png, 'mask', { ...limits, maxDecodeBytes: 4000 })).rejects.toThrow(/--max-decode-mib/);
  });
});
