/**
 * Weight residency (src/nn/residency.ts): a streamed UNet holds no tensors between calls, materialises each
 * block only while it runs, frees it afterwards, and computes exactly what the resident UNet computes, on the
 * CompVis reference fixture (tests/fixtures/unet, cpu backend). Also Held's load-once / load-per-use contract and
 * HostTensors as a TensorSource that outlives its file.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import * as tf from '../src/backend/tf.js';
import { initBackend } from '../src/backend/select.js';
import { Held, HostTensors, defaultResidency } from '../src/nn/residency.js';
import { SafetensorsFile } from '../src/weights/safetensors.js';
import { WeightsError } from '../src/weights/types.js';
import { withinTolerance } from '../src/parity/compare.js';
import { UNet, expectedShapes, unetConfigFromLdm, type LdmUNetParams, type UNetConfig } from '../src/unet/index.js';

const DIR = 'tests/fixtures/unet';
const fixture = JSON.parse(readFileSync(`${DIR}/fixture.json`, 'utf8')) as { config: LdmUNetParams; tolerance: number };
let cfg: UNetConfig;
let weights: SafetensorsFile;
let io: SafetensorsFile;

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: null });
  cfg = unetConfigFromLdm(fixture.config);
  weights = SafetensorsFile.open(`${DIR}/weights.safetensors`);
  io = SafetensorsFile.open(`${DIR}/io.safetensors`);
});

afterAll(() => {
  weights.close();
  io.close();
});

/** The fixture's forward pass through `unet`, NCHW out as the fixture stores it. */
function forward(unet: UNet): Float32Array {
  const [b, c, h, w] = io.info('x').shape;
  const [, n, d] = io.info('context').shape;
  const y = tf.tidy(() => {
    const x = tf.transpose(tf.tensor4d(io.float32('x'), [b, c, h, w]), [0, 2, 3, 1]) as tf.Tensor4D;
    const context = tf.tensor3d(io.float32('context'), [b, n, d]);
    return tf.transpose(unet.forward(x, Array.from(io.float32('timesteps')), { context }), [0, 3, 1, 2]);
  });
  const out = y.dataSync() as Float32Array;
  y.dispose();
  return out;
}

describe('streamed UNet', () => {
  it('holds no tensors after load, matches the reference and the resident UNet, and leaks nothing', () => {
    const before = tf.memory().numTensors;
    const streamed = UNet.load(weights, cfg, undefined, { residency: 'streamed' });
    expect(tf.memory().numTensors).toBe(before);
    expect(streamed.hostBytes).toBeGreaterThan(0);
    const got = forward(streamed);
    expect(tf.memory().numTensors).toBe(before);
    expect(withinTolerance(got, io.float32('out'), fixture.tolerance).passed).toBe(true);
    // The first pass rearranged the host copy into each layer's layout; the second reads it as rearranged.
    expect(Array.from(forward(streamed))).toEqual(Array.from(got));

    const resident = UNet.load(weights, cfg, undefined, { residency: 'resident' });
    expect(tf.memory().numTensors).toBeGreaterThan(before);
    expect(resident.hostBytes).toBe(0);
    const want = forward(resident);
    expect(Array.from(got)).toEqual(Array.from(want));
    resident.dispose();
    streamed.dispose();
    expect(tf.memory().numTensors).toBe(before);
  });

  it('runs after its file is closed (the weights live in the host copy)', () => {
    const src = SafetensorsFile.open(`${DIR}/weights.safetensors`);
    const streamed = UNet.load(src, cfg, undefined, { residency: 'streamed' });
    src.close();
    expect(withinTolerance(forward(streamed), io.float32('out'), fixture.tolerance).passed).toBe(true);
    streamed.dispose();
  });

  it('is resident by default off wasm', () => {
    expect(defaultResidency()).toBe('resident');
  });
});

describe('Held', () => {
  const counter = () => {
    const c = { made: 0, disposed: 0 };
    const make = () => {
      c.made++;
      return { dispose: () => void c.disposed++ };
    };
    return { c, make };
  };

  it('resident: builds once at load, disposes once', () => {
    const { c, make } = counter();
    const h = Held.load('resident', make);
    h.use(() => 1);
    h.use(() => 2);
    expect(c).toEqual({ made: 1, disposed: 0 });
    h.dispose();
    expect(c).toEqual({ made: 1, disposed: 1 });
  });

  it('streamed: builds at each use and disposes right after, even when the use throws', () => {
    const { c, make } = counter();
    const h = Held.load('streamed', make);
    expect(c.made).toBe(0);
    expect(h.use(() => 7)).toBe(7);
    expect(() =>
      h.use(() => {
        throw new Error('boom');
      }),
    ).toThrow('boom');
    expect(c).toEqual({ made: 2, disposed: 2 });
  });
});

describe('HostTensors', () => {
  it('keeps the bytes and dtype of each copied tensor and refuses others', () => {
    const keys = [...expectedShapes(cfg).keys()].slice(0, 3);
    const host = HostTensors.copy(weights, keys);
    for (const k of keys) {
      expect(host.info(k)).toEqual(weights.info(k));
      expect(Array.from(host.float32(k))).toEqual(Array.from(weights.float32(k)));
    }
    expect(host.byteLength).toBe(keys.reduce((n, k) => n + weights.bytes(k).byteLength, 0));
    const other = weights.keys().find((k) => !keys.includes(k)) as string;
    expect(() => host.float32(other)).toThrow(WeightsError);
    expect(() => HostTensors.copy(weights, ['no.such.key'])).toThrow(WeightsError);
  });
});
