/**
 * Parity runner for fixtures/vae: the VAE on the fixture's random weights against the reference outputs.
 * Cases: `mean` and `logvar` of encode(image), `decoded` = decode(z). io.safetensors holds NCHW tensors
 * (image [B, 3, H, W], mean/logvar/z [B, 4, h, w], decoded [B, 3, H, W]); the VAE runs NHWC, so inputs are
 * transposed in and outputs back before comparing.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import * as tf from '../backend/tf.js';
import { initBackend } from '../backend/select.js';
import { Vae, vaeConfigFromLdm } from '../vae/index.js';
import { SafetensorsFile } from '../weights/safetensors.js';
import type { TensorSource } from '../weights/types.js';
import { withinTolerance } from './compare.js';
import type { CaseResult, KindRunner } from './types.js';

/** An NCHW fixture tensor as NHWC. */
export function readNhwc(io: TensorSource, key: string): tf.Tensor4D {
  const [b, c, h, w] = io.info(key).shape;
  return tf.tidy(() => tf.transpose(tf.tensor4d(io.float32(key), [b, c, h, w]), [0, 2, 3, 1]));
}

/** NHWC -> the NCHW values, for comparing with a fixture tensor. Frees x. */
function nchwValues(x: tf.Tensor4D): Float32Array {
  const v = tf.tidy(() => tf.transpose(x, [0, 3, 1, 2]));
  x.dispose();
  const data = v.dataSync() as Float32Array;
  v.dispose();
  return data;
}

export const run: KindRunner = async (dir, opts) => {
  await initBackend({ backend: opts.backend, log: null });
  const fixture = JSON.parse(readFileSync(join(dir, 'fixture.json'), 'utf8')) as { config: unknown; tolerance: number };
  const tol = fixture.tolerance;
  const weights = SafetensorsFile.open(join(dir, 'weights.safetensors'));
  const io = SafetensorsFile.open(join(dir, 'io.safetensors'));
  let vae: Vae | null = null;
  try {
    vae = Vae.load(weights, vaeConfigFromLdm(fixture.config));
    const results: CaseResult[] = [];
    const check = (name: string, actual: tf.Tensor4D) => {
      const r = withinTolerance(nchwValues(actual), io.float32(name), tol);
      results.push({ kind: 'vae', name, passed: r.passed, maxRelError: r.maxRelError, tolerance: tol });
    };
    const image = readNhwc(io, 'image');
    const { mean, logvar } = vae.encode(image);
    image.dispose();
    check('mean', mean);
    check('logvar', logvar);
    const z = readNhwc(io, 'z');
    check('decoded', vae.decode(z));
    z.dispose();
    return results;
  } catch (e) {
    return [{ kind: 'vae', name: '*', passed: false, detail: e instanceof Error ? e.message : String(e) }];
  } finally {
    vae?.dispose();
    weights.close();
    io.close();
  }
};
