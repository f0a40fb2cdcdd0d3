// The VAE against the reference fixture (tests/fixtures/vae, random weights, NCHW there) on the cpu backend.
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as tf from '../src/backend/tf.js';
import { initBackend } from '../src/backend/select.js';
import { SD15_VAE, Vae, expectedShapes, vaeConfigFromLdm, type VaeConfig } from '../src/vae/index.js';
import { ConfigError, ShapeError } from '../src/nn/weight-view.js';
import { maxRelError } from '../src/parity/compare.js';
import { readNhwc } from '../src/parity/vae.js';
import { SafetensorsFile } from '../src/weights/safetensors.js';
import type { TensorInfo, TensorSource } from '../src/weights/types.js';

const DIR = 'tests/fixtures/vae';
const fixture = JSON.parse(readFileSync(`${DIR}/fixture.json`, 'utf8')) as { config: Record<string, unknown>; tolerance: number; downsample_factor: number };
const cfg: VaeConfig = vaeConfigFromLdm(fixture.config);
let weights: SafetensorsFile;
let io: SafetensorsFile;
let vae: Vae;

/** The fixture weights plus extra float32 tensors. */
class WithExtra implements TensorSource {
  readonly path = '<fixture + extra>';
  constructor(private readonly base: TensorSource, private readonly extra: Map<string, { shape: number[]; data: Float32Array }>) {}
  keys(): string[] {
    return [...this.base.keys(), ...this.extra.keys()];
  }
  has(k: string): boolean {
    return this.extra.has(k) || this.base.has(k);
  }
  info(k: string): TensorInfo {
    const e = this.extra.get(k);
    return e !== undefined ? { dtype: 'F32', shape: e.shape } : this.base.info(k);
  }
  bytes(k: string): Uint8Array {
    const e = this.extra.get(k);
    return e !== undefined ? new Uint8Array(e.data.buffer.slice(0)) : this.base.bytes(k);
  }
  float32(k: string): Float32Array {
    return this.extra.get(k)?.data.slice() ?? this.base.float32(k);
  }
  close(): void {}
}

/** NHWC -> NCHW values (the fixture's layout). */
function nchw(x: tf.Tensor4D): Float32Array {
  return tf.tidy(() => tf.transpose(x, [0, 3, 1, 2]).dataSync() as Float32Array);
}

beforeAll(async () => {
  await initBackend({ backend: 'cpu', log: null });
  weights = SafetensorsFile.open(`${DIR}/weights.safetensors`);
  io = SafetensorsFile.open(`${DIR}/io.safetensors`);
  vae = Vae.load(weights, cfg);
});

afterAll(() => {
  vae.dispose();
  weights.close();
  io.close();
});

describe('vae config', () => {
  it('translates the LDM ddconfig format', () => {
    expect(cfg).toEqual({
      inChannels: 3, outChannels: 3, ch: 32, chMult: [1, 2, 2], numResBlocks: 1, attnResolutions: [], resolution: 32, zChannels: 4, embedDim: 4,
    });
    expect(vae.factor).toBe(fixture.downsample_factor);
    expect(() => vaeConfigFromLdm({ ...fixture.config, double_z: false })).toThrow(ConfigError);
    expect(() => vaeConfigFromLdm({ ...fixture.config, ch_mult: [] })).toThrow(/ch_mult/);
  });

  it('expectedShapes lists exactly the fixture keys; the SD 1.5 VAE has 248 tensors, 83,653,863 parameters', () => {
    const shapes = expectedShapes(cfg);
    expect([...shapes.keys()].sort()).toEqual(weights.keys().sort());
    for (const k of weights.keys()) expect(shapes.get(k)).toEqual(weights.info(k).shape);
    const full = expectedShapes(SD15_VAE);
    expect(full.size).toBe(248);
    expect([...full.values()].reduce((n, s) => n + s.reduce((a, b) => a * b, 1), 0)).toBe(83_653_863);
  });

  it('refuses a config that does not fit the checkpoint', () => {
    expect(() => Vae.load(weights, { ...cfg, ch: 64 })).toThrow(ShapeError);
    expect(() => Vae.load(weights, { ...cfg, numResBlocks: 2 })).toThrow(/missing first_stage_model\.encoder\.down\.0\.block\.1\./);
  });
});

describe('vae matches the reference', () => {
  it('encode: mean and logvar (the two halves of the moments)', () => {
    const image = readNhwc(io, 'image');
    const { mean, logvar } = vae.encode(image);
    expect(mean.shape).toEqual([1, 8, 8, 4]);
    expect(maxRelError(nchw(mean), io.float32('mean'))).toBeLessThanOrEqual(fixture.tolerance);
    expect(maxRelError(nchw(logvar), io.float32('logvar'))).toBeLessThanOrEqual(fixture.tolerance);
    const moments = io.float32('moments');
    expect(maxRelError(nchw(mean), moments.subarray(0, 4 * 64))).toBeLessThanOrEqual(fixture.tolerance);
    tf.dispose([image, mean, logvar]);
  });

  it('decode(z)', () => {
    const z = readNhwc(io, 'z');
    const out = vae.decode(z);
    expect(out.shape).toEqual([1, 32, 32, 3]);
    expect(maxRelError(nchw(out), io.float32('decoded'))).toBeLessThanOrEqual(fixture.tolerance);
    tf.dispose([z, out]);
  });

  it('rejects inputs of the wrong shape', () => {
    const odd = tf.zeros([1, 30, 32, 3]) as tf.Tensor4D;
    expect(() => vae.encode(odd)).toThrow(/multiples of 4/);
    const z3 = tf.zeros([1, 8, 8, 3]) as tf.Tensor4D;
    expect(() => vae.decode(z3)).toThrow(/\[B, H, W, 4\]/);
    tf.dispose([odd, z3]);
  });

  it('leaks no tensors across repeated encodes and decodes', () => {
    const image = tf.randomUniform([1, 8, 8, 3], -1, 1, 'float32', 1) as tf.Tensor4D;
    const z = tf.randomNormal([1, 2, 2, 4], 0, 1, 'float32', 2) as tf.Tensor4D;
    const before = tf.memory().numTensors;
    for (let i = 0; i < 3; i++) {
      const { mean, logvar } = vae.encode(image);
      tf.dispose([mean, logvar, vae.decode(z)]);
    }
    expect(tf.memory().numTensors).toBe(before);
    tf.dispose([image, z]);
  });
});

describe('attention at attnResolutions (besides the mid block)', () => {
  // Level 1 of the fixture config is 16x16 (resolution 32): encoder down.1.attn.0, decoder up.1.attn.{0,1}, 64 channels.
  const attnCfg: VaeConfig = { ...cfg, attnResolutions: [16] };
  const base = expectedShapes(cfg);
  const extraKeys = [...expectedShapes(attnCfg).entries()].filter(([k]) => !base.has(k));

  function withAttn(zeroProj: boolean): Vae {
    const extra = new Map<string, { shape: number[]; data: Float32Array }>();
    let seed = 7;
    for (const [k, shape] of extraKeys) {
      const data = new Float32Array(shape.reduce((a, b) => a * b, 1));
      const zero = zeroProj && k.includes('.proj_out.');
      if (!zero) for (let i = 0; i < data.length; i++) data[i] = k.endsWith('norm.weight') ? 1 : ((seed = (seed * 48271) % 2147483647) / 2147483647 - 0.5) * 0.2;
      extra.set(k, { shape, data });
    }
    return Vae.load(new WithExtra(weights, extra), attnCfg);
  }

  it('loads the extra attention blocks', () => {
    expect(extraKeys.map(([k]) => k.split('.attn.')[0]).filter((v, i, a) => a.indexOf(v) === i))
      .toEqual(['first_stage_model.encoder.down.1', 'first_stage_model.decoder.up.1']);
  });

  it('a zero proj_out makes them the identity (same outputs as the fixture); a non-zero one changes the output', () => {
    const z = readNhwc(io, 'z');
    const identity = withAttn(true);
    const out = identity.decode(z);
    expect(maxRelError(nchw(out), io.float32('decoded'))).toBeLessThanOrEqual(fixture.tolerance);
    const small = tf.randomNormal([1, 2, 2, 4], 0, 1, 'float32', 3) as tf.Tensor4D;
    const active = withAttn(false);
    const [a, b] = [identity.decode(small), active.decode(small)];
    expect(maxRelError(a.dataSync(), b.dataSync())).toBeGreaterThan(1e-3);
    tf.dispose([z, out, small, a, b]);
    identity.dispose();
    active.dispose();
  });
});
