/**
 * One definition per block: every block that has a native execution (backend/native-blocks.ts) is loaded twice
 * from the same random weights, once for TensorFlow.js ops (its definition in the model file) and once for the
 * native kernels, and both must compute the same function. The kernel timer shows which path each one took.
 * Skipped, saying why, where `sd setup-native` has not built the kernels.
 */
import { afterAll, describe, expect, it } from 'vitest';
import * as tf from '../src/backend/tf.js';
import { initBackend } from '../src/backend/select.js';
import { kernelsProblem, setKernelTimer } from '../src/backend/kernels.js';
import { COMPVIS_RESNET, OPENAI_RESNET, ResnetBlock } from '../src/nn/resnet.js';
import { WeightView, probeShapes } from '../src/nn/weight-view.js';
import { maxRelError } from '../src/parity/compare.js';
import { SpatialTransformer } from '../src/unet/transformer.js';
import { AttnBlock } from '../src/vae/blocks.js';
import { rand, source } from './helpers.js';

await initBackend({ backend: 'cpu', log: () => undefined });
const saved = process.env.SD_KERNELS;
process.env.SD_KERNELS = '1';
const problem = kernelsProblem();
if (problem !== null) console.warn(`skipping the native block tests: ${problem}`);

interface Block {
  dispose(): void;
}

/**
 * Random weights for the block `load` builds (its keys and shapes probed from the loader itself), the block loaded
 * both ways, `run` on each: both outputs and how many native kernel calls each made.
 */
function bothPaths<B extends Block>(load: (p: WeightView) => B, run: (b: B) => tf.Tensor) {
  const weights = source(Object.fromEntries(probeShapes('', load)));
  const once = (native: boolean) => {
    let calls = 0;
    setKernelTimer(() => calls++);
    const block = load(WeightView.root(weights, '', { native }));
    const y = run(block);
    const values = y.dataSync() as Float32Array;
    tf.dispose(y);
    block.dispose();
    setKernelTimer(null);
    return { values, calls };
  };
  return { tfjs: once(false), native: once(true) };
}

function expectSame({ tfjs, native }: ReturnType<typeof bothPaths>): void {
  expect(tfjs.calls).toBe(0); // the definition in tfjs ops
  expect(native.calls).toBeGreaterThan(2); // the whole block on the kernels
  expect(native.values.length).toBe(tfjs.values.length);
  expect(maxRelError(native.values, tfjs.values)).toBeLessThan(2e-5);
}

describe.runIf(problem === null)('each block on the native kernels computes its definition', () => {
  afterAll(() => {
    if (saved === undefined) delete process.env.SD_KERNELS;
    else process.env.SD_KERNELS = saved;
  });

  const x = (b: number, h: number, w: number, c: number) => tf.tensor4d(rand(b * h * w * c), [b, h, w, c]);
  const inputs: tf.Tensor[] = [];
  const keep = <T extends tf.Tensor>(t: T): T => {
    inputs.push(t);
    return t;
  };
  afterAll(() => tf.dispose(inputs));

  it.each([
    ['UNet ResBlock with a time embedding and a 1x1 shortcut (32 -> 64)', 32, 64, 128],
    ['UNet ResBlock without a shortcut (32 -> 32)', 32, 32, 128],
    ['VAE ResnetBlock (no time embedding, 64 -> 32)', 64, 32, 0],
  ])('%s', (_name, cin, cout, timeChannels) => {
    const names = timeChannels > 0 ? OPENAI_RESNET : COMPVIS_RESNET;
    const input = keep(x(2, 5, 6, cin));
    const temb = timeChannels > 0 ? keep(tf.tensor2d(rand(2 * timeChannels), [2, timeChannels])) : undefined;
    expectSame(bothPaths(
      (p) => ResnetBlock.load(p, cin, cout, { names, eps: 1e-5, timeChannels }),
      (b) => b.apply(input, temb),
    ));
  });

  it.each([
    ['1x1-conv projections, depth 1, 2 heads (SD 1.x)', 'conv', 1, 2],
    ['Linear projections, depth 2, 4 heads (SD 2.x / SDXL)', 'linear', 2, 4],
  ] as const)('SpatialTransformer with %s', (_name, projection, depth, heads) => {
    const channels = 64;
    const input = keep(x(2, 6, 5, channels));
    const context = keep(tf.tensor3d(rand(2 * 11 * 24), [2, 11, 24]));
    expectSame(bothPaths(
      (p) => SpatialTransformer.load(p, { channels, heads, depth, contextDim: 24, projection }),
      (b) => b.apply(input, { context }),
    ));
  });

  it('VAE AttnBlock (one head over every position)', () => {
    const input = keep(x(1, 7, 6, 64));
    expectSame(bothPaths((p) => AttnBlock.load(p, 64), (b) => b.apply(input)));
  });
});
