/**
 * Parity for the SDXL UNet and VAE parts of the `sdxl` fixture kind (sdxl.ts runs the folder), on the tiny model of
 * sdxl/pipeline's single file (the parts' fixture.json `weights`). Tensors in io.safetensors are NCHW.
 *
 * unet/  each case: the added embedding [text_embeds, F(time_ids)] (add_embeds) and the noise prediction of
 *        x, timesteps, context and that embedding (out); also the checkpoint's keys vs expectedShapes.
 * vae/   decoded = decode(z), raw (the pipeline's scale factor 0.13025 is not applied here).
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import * as tf from '../backend/tf.js';
import { initBackend } from '../backend/select.js';
import { sdxlAddedEmbedding } from '../pipeline/conditioning.js';
import { UNet, expectedShapes, unetConfigFromLdm, type LdmUNetParams } from '../unet/index.js';
import { Vae, vaeConfigFromLdm } from '../vae/index.js';
import { SafetensorsFile } from '../weights/safetensors.js';
import { withinTolerance } from './compare.js';
import type { CaseResult, ParityOptions } from './types.js';
import { readNhwc } from './vae.js';

const KIND = 'sdxl';

interface Part<C> {
  readonly weights: string;
  readonly config: C;
  readonly tolerance: number;
  readonly cases: readonly Record<string, string | unknown>[];
}

/** NHWC -> NCHW values. */
function nchw(x: tf.Tensor4D): Float32Array {
  return tf.tidy(() => tf.transpose(x, [0, 3, 1, 2])).dataSync() as Float32Array;
}

function compared(name: string, got: Float32Array, want: Float32Array, tol: number): CaseResult {
  const r = withinTolerance(got, want, tol);
  return { kind: KIND, name, passed: r.passed, maxRelError: r.maxRelError, tolerance: tol };
}

const failed = (name: string, e: unknown): CaseResult => ({ kind: KIND, name, passed: false, detail: e instanceof Error ? e.message : String(e) });

function readPart<C>(dir: string): { fixture: Part<C>; weights: SafetensorsFile; io: SafetensorsFile } {
  const fixture = JSON.parse(readFileSync(join(dir, 'fixture.json'), 'utf8')) as Part<C>;
  const weights = SafetensorsFile.open(join(dir, fixture.weights));
  return { fixture, weights, io: SafetensorsFile.open(join(dir, 'io.safetensors')) };
}

interface UNetCase {
  readonly x: string;
  readonly timesteps: string;
  readonly context: string;
  readonly text_embeds: string;
  readonly add_embeds: string;
  readonly out: string;
  readonly time_ids_values: readonly (readonly number[])[];
}

export async function runUnet(dir: string, opts: ParityOptions): Promise<CaseResult[]> {
  await initBackend({ backend: opts.backend, log: null });
  const { fixture, weights, io } = readPart<LdmUNetParams & { addition_time_embed_dim: number }>(dir);
  const results: CaseResult[] = [];
  let unet: UNet | null = null;
  try {
    const cfg = unetConfigFromLdm(fixture.config);
    const want = expectedShapes(cfg);
    const unexpected = weights.keys().filter((k) => k.startsWith('model.diffusion_model.') && !want.has(k));
    const missing = [...want].filter(([k, s]) => !weights.has(k) || weights.info(k).shape.join() !== s.join()).map(([k]) => k);
    results.push({
      kind: KIND, name: 'unet/shapes', passed: unexpected.length + missing.length === 0,
      detail: `${want.size} keys${missing.length > 0 ? `; missing or mis-shaped ${missing.slice(0, 3).join(', ')}` : ''}${unexpected.length > 0 ? `; unexpected ${unexpected.slice(0, 3).join(', ')}` : ''}`,
    });
    unet = UNet.load(weights, cfg);
    const model = unet;
    (fixture.cases as unknown as UNetCase[]).forEach((c, i) => {
      const [b] = io.info(c.text_embeds).shape;
      const textEmbeds = tf.tensor2d(io.float32(c.text_embeds), [b, io.info(c.text_embeds).shape[1]]);
      const added = sdxlAddedEmbedding(textEmbeds, c.time_ids_values, fixture.config.addition_time_embed_dim);
      results.push(compared(`unet/case${i}/add_embeds`, added.dataSync() as Float32Array, io.float32(c.add_embeds), fixture.tolerance));
      const x = readNhwc(io, c.x);
      const [, n, d] = io.info(c.context).shape;
      const context = tf.tensor3d(io.float32(c.context), [b, n, d]);
      const out = model.forward(x, Array.from(io.float32(c.timesteps)), { context, added });
      results.push(compared(`unet/case${i}/out`, nchw(out), io.float32(c.out), fixture.tolerance));
      tf.dispose([textEmbeds, added, x, context, out]);
    });
    return results;
  } catch (e) {
    return [...results, failed('unet/*', e)];
  } finally {
    unet?.dispose();
    weights.close();
    io.close();
  }
}

export async function runVae(dir: string, opts: ParityOptions): Promise<CaseResult[]> {
  await initBackend({ backend: opts.backend, log: null });
  const { fixture, weights, io } = readPart<unknown>(dir);
  let vae: Vae | null = null;
  try {
    vae = Vae.load(weights, vaeConfigFromLdm(fixture.config));
    const model = vae;
    return (fixture.cases as unknown as { z: string; decoded: string }[]).map((c, i) => {
      const z = readNhwc(io, c.z);
      const decoded = model.decode(z);
      const r = compared(`vae/case${i}/decoded`, nchw(decoded), io.float32(c.decoded), fixture.tolerance);
      tf.dispose([z, decoded]);
      return r;
    });
  } catch (e) {
    return [failed('vae/*', e)];
  } finally {
    vae?.dispose();
    weights.close();
    io.close();
  }
}

