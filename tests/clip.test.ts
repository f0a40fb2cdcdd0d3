// The CLIP text encoder against the reference fixture (tests/fixtures/clip, random weights) on the cpu backend.
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as tf from '../src/backend/tf.js';
import { initBackend } from '../src/backend/select.js';
import { ClipTextEncoder, SD15_CLIP, clipConfigFromLdm, expectedShapes, type ClipConfig, type ClipTextOutput } from '../src/clip/index.js';
import { ConfigError, ShapeError } from '../src/nn/weight-view.js';
import { maxRelError } from '../src/parity/compare.js';
import { SafetensorsFile } from '../src/weights/safetensors.js';
import { decodeInt64 } from '../src/weights/dtypes.js';

const DIR = 'tests/fixtures/clip';
const fixture = JSON.parse(readFileSync(`${DIR}/fixture.json`, 'utf8')) as { config: unknown; tolerance: number };
const cfg: ClipConfig = clipConfigFromLdm(fixture.config);
let weights: SafetensorsFile;
let io: SafetensorsFile;
let encoder: ClipTextEncoder;
let ids: tf.Tensor2D;

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: null });
  weights = SafetensorsFile.open(`${DIR}/weights.safetensors`);
  io = SafetensorsFile.open(`${DIR}/io.safetensors`);
  encoder = ClipTextEncoder.load(weights, cfg);
  const [b, n] = io.info('input_ids').shape;
  ids = tf.tensor2d(Int32Array.from(decodeInt64(io.bytes('input_ids'))), [b, n], 'int32');
});

afterAll(() => {
  ids.dispose();
  encoder.dispose();
  weights.close();
  io.close();
});

describe('clip config', () => {
  it('translates the fixture format, with CLIP defaults for the optional fields', () => {
    expect(cfg).toEqual({ vocabSize: 49408, width: 32, layers: 3, heads: 4, contextLength: 77, mlpWidth: 128, layerNormEps: 1e-5, act: 'quick_gelu' });
    expect(clipConfigFromLdm({ vocab: 10, width: 8, layers: 1, heads: 2, ctx: 5 }).mlpWidth).toBe(32);
    expect(() => clipConfigFromLdm({ vocab: 10, width: 8, layers: 1, heads: 3, ctx: 5 })).toThrow(ConfigError);
    expect(() => clipConfigFromLdm({ width: 8, layers: 1, heads: 2, ctx: 5 })).toThrow(/"vocab"/);
  });

  it('expectedShapes lists exactly the checkpoint keys (less the position_ids buffer); SD 1.5 has 123M parameters', () => {
    const shapes = expectedShapes(cfg);
    const keys = weights.keys().filter((k) => !k.endsWith('position_ids')).sort();
    expect([...shapes.keys()].sort()).toEqual(keys);
    for (const k of keys) expect(shapes.get(k)).toEqual(weights.info(k).shape);
    let params = 0;
    for (const s of expectedShapes(SD15_CLIP).values()) params += s.reduce((a, b) => a * b, 1);
    expect(params).toBe(123_060_480);
  });

  it('refuses a config that does not fit the checkpoint, naming the key', () => {
    expect(() => ClipTextEncoder.load(weights, { ...cfg, mlpWidth: 64 })).toThrow(ShapeError);
    expect(() => ClipTextEncoder.load(weights, { ...cfg, layers: 2 })).toThrow(/unexpected .*encoder\.layers\.2\./);
    expect(() => ClipTextEncoder.load(weights, { ...cfg, layers: 4 })).toThrow(/missing .*encoder\.layers\.3\./);
  });
});

/** Every tensor of an encoder output. */
const all = (o: ClipTextOutput): tf.Tensor[] => [o.hidden, o.penultimate, ...(o.pooled === undefined ? [] : [o.pooled])];

describe('clip forward matches the reference', () => {
  for (const [name, clipSkip] of [['last_hidden_state', 1], ['penultimate_hidden_state', 2]] as const) {
    it(`${name} (clip skip ${clipSkip}), each prompt`, () => {
      const out = encoder.forward(ids, { clipSkip });
      expect(out.hidden.shape).toEqual([2, 77, 32]);
      const got = out.hidden.dataSync();
      const want = io.float32(name);
      const per = 77 * 32;
      for (let i = 0; i < 2; i++) {
        const err = maxRelError(got.subarray(i * per, (i + 1) * per), want.subarray(i * per, (i + 1) * per));
        expect(err).toBeLessThanOrEqual(fixture.tolerance);
      }
      tf.dispose(all(out));
    });
  }

  it('clip skips 1 and 2 differ (the test can tell them apart)', () => {
    expect(maxRelError(io.float32('last_hidden_state'), io.float32('penultimate_hidden_state'))).toBeGreaterThan(0.1);
  });

  it('penultimate is the layer before the last, before the final LayerNorm (clip skip 2 is it normed)', () => {
    const out = encoder.forward(ids);
    const skip2 = encoder.forward(ids, { clipSkip: 2 });
    expect(maxRelError(skip2.hidden.dataSync(), io.float32('penultimate_hidden_state'))).toBeLessThanOrEqual(fixture.tolerance);
    expect(maxRelError(out.penultimate.dataSync(), skip2.hidden.dataSync())).toBeGreaterThan(1e-3); // not normed yet
    expect(maxRelError(skip2.penultimate.dataSync(), out.penultimate.dataSync())).toBe(0); // the same layer either way
    tf.dispose([...all(out), ...all(skip2)]);
  });

  it('pooled is the last hidden state at each text\'s first end token (the highest id)', () => {
    const out = encoder.forward(ids, { pooled: true });
    expect(out.pooled?.shape).toEqual([2, 32]);
    const idv = ids.dataSync();
    const want = io.float32('last_hidden_state');
    const pooled = (out.pooled as tf.Tensor2D).dataSync();
    for (let b = 0; b < 2; b++) {
      const row = Array.from(idv.subarray(b * 77, (b + 1) * 77));
      const at = row.indexOf(Math.max(...row));
      const expected = want.subarray((b * 77 + at) * 32, (b * 77 + at + 1) * 32);
      expect(maxRelError(pooled.subarray(b * 32, (b + 1) * 32), expected)).toBeLessThanOrEqual(fixture.tolerance);
    }
    expect(encoder.forward(ids).pooled).toBeUndefined();
    tf.dispose(all(out));
  });

  it('a shorter sequence gives the same prefix (causal attention: later tokens do not leak back)', () => {
    const short = tf.slice(ids, [0, 0], [2, 10]);
    const a = encoder.forward(short);
    const full = encoder.forward(ids);
    const b = tf.slice(full.hidden, [0, 0, 0], [2, 10, 32]);
    expect(maxRelError(a.hidden.dataSync(), b.dataSync())).toBeLessThan(1e-5);
    tf.dispose([short, ...all(a), ...all(full), b]);
  });

  it('rejects a bad clipSkip or sequence length', () => {
    expect(() => encoder.forward(ids, { clipSkip: 0 })).toThrow(/clipSkip/);
    expect(() => encoder.forward(ids, { clipSkip: 4 })).toThrow(/clipSkip/);
    const long = tf.zeros([1, 78], 'int32') as tf.Tensor2D;
    expect(() => encoder.forward(long)).toThrow(/\[batch, 1\.\.77\]/);
    long.dispose();
  });

  it('leaks no tensors across repeated forwards', () => {
    tf.dispose(all(encoder.forward(ids)));
    const before = tf.memory().numTensors;
    for (let i = 0; i < 3; i++) tf.dispose(all(encoder.forward(ids, { clipSkip: 1 + (i % 2), pooled: i === 2 })));
    expect(tf.memory().numTensors).toBe(before);
  });
});
