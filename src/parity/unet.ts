/**
 * Parity runner for tests/fixtures/unet: the CompVis UNetModel on random weights (fixture.json "config").
 * Cases: `forward` (x, timesteps, context from io.safetensors -> out, NCHW there, NHWC here) and `shapes`
 * (expectedShapes(config) names exactly the keys and shapes of weights.safetensors).
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import * as tf from '../backend/tf.js';
import { SafetensorsFile } from '../weights/safetensors.js';
import { UNet, expectedShapes, unetConfigFromLdm, type LdmUNetParams, type UNetConfig } from '../unet/index.js';
import { withinTolerance } from './compare.js';
import type { CaseResult, KindRunner } from './types.js';

interface UNetFixture {
  readonly config: LdmUNetParams;
  readonly tolerance: number;
}

const KIND = 'unet';

export const run: KindRunner = async (dir) => {
  let fixture: UNetFixture;
  let cfg: UNetConfig;
  try {
    fixture = JSON.parse(readFileSync(join(dir, 'fixture.json'), 'utf8')) as UNetFixture;
    cfg = unetConfigFromLdm(fixture.config);
  } catch (e) {
    return [{ kind: KIND, name: '*', passed: false, detail: `cannot read ${dir}/fixture.json: ${message(e)}` }];
  }
  return [shapesCase(dir, cfg), forwardCase(dir, cfg, fixture.tolerance)];
};

function message(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

function shapesCase(dir: string, cfg: UNetConfig): CaseResult {
  const name = 'shapes';
  let weights: SafetensorsFile | null = null;
  try {
    weights = SafetensorsFile.open(join(dir, 'weights.safetensors'));
    const want = expectedShapes(cfg);
    const problems: string[] = [];
    for (const [key, shape] of want) {
      if (!weights.has(key)) problems.push(`missing ${key}`);
      else if (weights.info(key).shape.join() !== shape.join()) problems.push(`${key}: [${weights.info(key).shape}] vs expected [${shape}]`);
    }
    for (const key of weights.keys()) if (!want.has(key)) problems.push(`unexpected ${key}`);
    return problems.length === 0
      ? { kind: KIND, name, passed: true, detail: `${want.size} keys` }
      : { kind: KIND, name, passed: false, detail: problems.slice(0, 5).join('; ') };
  } catch (e) {
    return { kind: KIND, name, passed: false, detail: message(e) };
  } finally {
    weights?.close();
  }
}

function forwardCase(dir: string, cfg: UNetConfig, tolerance: number): CaseResult {
  const name = 'forward';
  let weights: SafetensorsFile | null = null;
  let io: SafetensorsFile | null = null;
  let unet: UNet | null = null;
  try {
    weights = SafetensorsFile.open(join(dir, 'weights.safetensors'));
    io = SafetensorsFile.open(join(dir, 'io.safetensors'));
    unet = UNet.load(weights, cfg);
    const src = io;
    const model = unet;
    const timesteps = Array.from(src.float32('timesteps'));
    const actual = tf.tidy(() => {
      const x = nchwToNhwc(src, 'x');
      const context = tf.tensor3d(src.float32('context'), src.info('context').shape as [number, number, number]);
      return tf.transpose(model.forward(x, timesteps, { context }), [0, 3, 1, 2]); // back to NCHW
    });
    const got = actual.dataSync();
    actual.dispose();
    const { passed, maxRelError } = withinTolerance(got, src.float32('out'), tolerance);
    return { kind: KIND, name, passed, maxRelError, tolerance };
  } catch (e) {
    return { kind: KIND, name, passed: false, detail: message(e) };
  } finally {
    unet?.dispose();
    weights?.close();
    io?.close();
  }
}

function nchwToNhwc(src: SafetensorsFile, key: string): tf.Tensor4D {
  const shape = src.info(key).shape as [number, number, number, number];
  return tf.transpose(tf.tensor4d(src.float32(key), shape), [0, 2, 3, 1]);
}
