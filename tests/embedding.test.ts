/**
 * nn.Embedding from an fp16 file keeps the file's halves and widens the rows it looks up; from anything else it is
 * a float32 tensor and tf.gather. Both must give the same values, bit for bit (widening a half is exact).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as tf from '../src/backend/tf.js';
import { initBackend } from '../src/backend/select.js';
import { Embedding } from '../src/nn/layers.js';
import { WeightView } from '../src/nn/weight-view.js';
import { decodeToFloat32, encodeFloat16 } from '../src/weights/dtypes.js';
import { SafetensorsFile, writeSafetensors } from '../src/weights/safetensors.js';
import { MemorySource, rand } from './helpers.js';

describe('Embedding', () => {
  const dir = mkdtempSync(join(tmpdir(), 'sd-embedding-'));
  const [num, dim] = [50, 24];
  const halves = encodeFloat16(rand(num * dim));
  const file = join(dir, 'e.safetensors');
  beforeAll(async () => {
    await initBackend({ backend: 'cpu', log: () => undefined });
    writeSafetensors(file, [['e.weight', { dtype: 'F16', shape: [num, dim] }]], () => halves);
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('looks up the same values from an fp16 file (halves kept) as from float32 (a tensor), and frees what it makes', () => {
    const src = SafetensorsFile.open(file);
    const decoded = decodeToFloat32(new Uint8Array(halves.buffer), 'F16');
    const before = tf.memory().numTensors;
    const fromHalves = Embedding.load(WeightView.root(src, 'e'), num, dim);
    const fromFloats = Embedding.load(WeightView.root(new MemorySource(new Map([['e.weight', { shape: [num, dim], data: decoded }]])), 'e'), num, dim);
    expect(tf.memory().numTensors).toBe(before + 1); // the float32 one's table; the halves stay on the host
    const ids = tf.tensor2d([[0, 49, 7, 7], [3, 1, 48, 0]], [2, 4], 'int32');
    const a = fromHalves.apply(ids), b = fromFloats.apply(ids);
    expect(a.shape).toEqual([2, 4, dim]);
    expect(Buffer.from((a.dataSync() as Float32Array).buffer).equals(Buffer.from((b.dataSync() as Float32Array).buffer))).toBe(true);
    expect(Array.from(a.dataSync().subarray(dim, 2 * dim))).toEqual(Array.from(decoded.subarray(49 * dim, 50 * dim)));
    const bad = tf.tensor1d([2, 50], 'int32');
    expect(() => fromHalves.apply(bad)).toThrow(/id 50 is not in \[0, 49\]/);
    tf.dispose([a, b, ids, bad]);
    fromHalves.dispose();
    fromFloats.dispose();
    expect(tf.memory().numTensors).toBe(before);
    src.close();
  });
});
