/**
 * `sd canny IN OUT [--low 100] [--high 200] [--gray]`: ControlNet's Canny annotator on an image file. The image is
 * read at its own size (EXIF orientation applied, transparency composited onto white as ControlNet's HWC3 does),
 * cv2.Canny's edge map computed on its RGB pixels (or its gray with --gray), and OUT written as an RGB PNG with the
 * map on all three channels (HWC3(edges), the hint ControlNet takes), 255 on edges and 0 elsewhere.
 */
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import sharp from 'sharp';
import type { CommandModule } from 'yargs';
import { canny, CannyError, edgesToRgb } from '../../image/canny.js';
import { ImageError, type RgbImage } from '../../image/codec.js';
import { UsageError } from '../errors.js';

interface Args {
  input: string;
  output: string;
  low?: number;
  high?: number;
  gray?: boolean;
}

export const cannyCommand: CommandModule<object, Args> = {
  command: 'canny <input> <output>',
  describe: 'Canny edge map of an image as ControlNet\'s annotator computes it (cv2.Canny), written as an RGB PNG',
  builder: (y) =>
    y
      .positional('input', { type: 'string', demandOption: true, describe: 'PNG, JPEG or WebP image' })
      .positional('output', { type: 'string', demandOption: true, describe: 'PNG to write: the edge map on all 3 channels (255 = edge, 0 = none), the input\'s size' })
      .option('low', { type: 'number', default: 100, describe: 'lower hysteresis threshold on |dx| + |dy| of the 3x3 Sobel' })
      .option('high', { type: 'number', default: 200, describe: 'upper threshold: edges start where the gradient exceeds it' })
      .option('gray', { type: 'boolean', default: false, describe: 'run on the gray image (cvtColor RGB2GRAY) instead of the RGB channels' }) as never,
  handler: async (args) => {
    const low = threshold('--low', args.low ?? 100);
    const high = threshold('--high', args.high ?? 200);
    const mode = args.gray === true ? 'gray' : 'rgb';
    const image = await readRgb(args.input);
    let edges: Uint8Array;
    try {
      edges = canny(image.rgb, image.width, image.height, { low, high, mode });
    } catch (e) {
      throw e instanceof CannyError ? new UsageError(e.message) : e;
    }
    // sharp's default zlib level: codec.encodePng's level 9 with adaptive filtering takes over a second on a busy
    // 1024x1024 edge map (~20x longer) for a file ~15% smaller.
    const png = await sharp(edgesToRgb(edges), { raw: { width: image.width, height: image.height, channels: 3 } }).png().toBuffer();
    try {
      writeFileSync(args.output, png);
    } catch (e) {
      throw new UsageError(`${args.output}: cannot write (${e instanceof Error ? e.message : String(e)})`);
    }
    const count = edges.reduce((n, v) => n + (v === 255 ? 1 : 0), 0);
    process.stdout.write(`wrote ${args.output}: ${image.width}x${image.height}, ${count} edge pixels (${mode}, low ${low}, high ${high})\n`);
  },
};

function threshold(flag: string, v: number): number {
  if (!Number.isFinite(v) || v < 0) throw new UsageError(`${flag} needs a number >= 0 (e.g. --low 100 --high 200), got ${v}`);
  return v;
}

/** The image at its own size as 8-bit sRGB, upright, alpha composited onto white. */
async function readRgb(path: string): Promise<RgbImage> {
  if (!existsSync(path)) throw new UsageError(`${path}: no such file`);
  try {
    const { data, info } = await sharp(readFileSync(path), { failOn: 'error' })
      .rotate() // EXIF orientation
      .flatten({ background: '#ffffff' })
      .toColourspace('srgb')
      .removeAlpha()
      .raw({ depth: 'uchar' })
      .toBuffer({ resolveWithObject: true });
    if (info.channels !== 3 || data.length !== info.width * info.height * 3) {
      throw new Error(`decoded to ${info.channels} channels, ${data.length} bytes for ${info.width}x${info.height}`);
    }
    return { rgb: new Uint8Array(data.buffer, data.byteOffset, data.length), width: info.width, height: info.height };
  } catch (e) {
    throw new ImageError(`${path}: cannot decode as PNG, JPEG or WebP (${e instanceof Error ? e.message : String(e)})`);
  }
}
