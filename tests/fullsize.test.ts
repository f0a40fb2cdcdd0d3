/**
 * Full-size SD 1.5 memory arithmetic, without running anything full-size: the UNet's fp32 weights do not fit the
 * wasm heap (about 3 GiB usable of 4 GiB), so it is streamed block by block (src/nn/residency.ts, one Held
 * per input block, the middle block, each output block, time_embed and out); this checks from the checkpoint
 * shapes (expectedShapes) that every such block, laid out twice while it loads (checkpoint layout + transposed),
 * stays far below the heap, next to the resident CLIP and VAE.
 */
import { describe, expect, it } from 'vitest';
import { SD15_UNET, expectedShapes as unetShapes } from '../src/unet/index.js';
import { SD15_CLIP, expectedShapes as clipShapes } from '../src/clip/index.js';
import { SD15_VAE, expectedShapes as vaeShapes } from '../src/vae/index.js';

const GiB = 2 ** 30;
const fp32Bytes = (shapes: ReadonlyMap<string, readonly number[]>, keep: (k: string) => boolean = () => true) =>
  [...shapes].filter(([k]) => keep(k)).reduce((n, [, s]) => n + 4 * s.reduce((a, b) => a * b, 1), 0);

/** The UNet's Held blocks, as unet.ts groups them. */
function unetBlocks(): Map<string, number> {
  const blocks = new Map<string, number>();
  for (const [key, shape] of unetShapes(SD15_UNET)) {
    const m = /^model\.diffusion_model\.(input_blocks\.\d+|output_blocks\.\d+|middle_block|time_embed|out)\./.exec(key);
    expect(m, `${key} belongs to no block`).not.toBeNull();
    const block = (m as RegExpExecArray)[1];
    blocks.set(block, (blocks.get(block) ?? 0) + 4 * shape.reduce((a, b) => a * b, 1));
  }
  return blocks;
}

describe('SD 1.5 on the wasm heap', () => {
  it('the UNet alone exceeds the usable heap, so it must be streamed', () => {
    expect(fp32Bytes(unetShapes(SD15_UNET))).toBeGreaterThan(3 * GiB);
  });

  it('each streamed UNet block, twice over while it loads, fits beside the resident CLIP and VAE', () => {
    const blocks = unetBlocks();
    expect(blocks.size).toBe(12 + 1 + 12 + 2);
    const largest = Math.max(...blocks.values());
    expect(largest).toBeLessThan(0.5 * GiB);
    const resident = fp32Bytes(clipShapes(SD15_CLIP)) + fp32Bytes(vaeShapes(SD15_VAE));
    expect(resident + 2 * largest).toBeLessThan(2 * GiB);
  });
});
