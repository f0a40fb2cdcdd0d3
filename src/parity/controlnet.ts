/**
 * Parity runner for the `controlnet` fixture kind: lllyasviel's ControlNet on the tiny model of `pipeline/`.
 * Cases (fixture.json, README "ControlNet and Canny"):
 *   config            diffusers/config.json -> the same ControlNetConfig as the fixture's unet config; the hint
 *                     block's convs and strides as `config.hint_block` lists them
 *   keys              our diffusers -> original map equals `diffusers_key_map`; expected keys and shapes equal the file's
 *   FORMAT/unit/*     for each file (control_tiny.safetensors, control_tiny.pth, diffusers/): hint_embedding, the
 *                     7 residuals (scale 0.8) and the UNet's eps with them                     (tolerance.residuals, .eps)
 *   unit/eps_no_control   the UNet alone
 *   multi/*           derived here: two ControlNets (the .safetensors at 0.5 and the diffusers folder at 0.3) summed
 *                     equal one at 0.8, residual by residual (residuals are linear in the scale)
 *   CASE/edges, hint  canny() of the source image (0 differing pixels) and controlHint of it vs the stored hint;
 *                     the run itself takes hintFromEdges (the same values, NHWC)
 *   CASE/window       controlActive per step vs `control_applied` and `control_scale_per_step`
 *   CASE/step_i, latent, image   DDIM with CFG, the ControlNet on both halves inside the window; x_T from
 *                     TorchGenerator(seed), checked against the stored one                       (tolerance.latent, .image)
 * io.safetensors is NCHW; the models run NHWC.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import * as tf from '../backend/tf.js';
import { canny, controlHint, type CannyMode } from '../image/canny.js';
import { UNet, unetConfigFromLdm, type Conditioning, type LdmUNetParams, type UNetConfig, type UNetResiduals } from '../unet/index.js';
import { Vae, vaeConfigFromLdm } from '../vae/index.js';
import { createSampler, TorchGenerator, torchNoise } from '../scheduler/index.js';
import { SafetensorsFile } from '../weights/safetensors.js';
import { openWeights } from '../weights/open.js';
import type { TensorSource } from '../weights/types.js';
import {
  controlNetConfig, controlNetConfigFromDiffusers, hintBlockPlan, type ControlNetConfig, type DiffusersControlNetJson,
} from '../controlnet/config.js';
import { controlNetDiffusersToOriginal } from '../controlnet/keys.js';
import { openControlNet } from '../controlnet/files.js';
import { controlActive, controlledEps, controlResiduals, controlScales, disposeResiduals, type ControlUnit } from '../controlnet/guidance.js';
import { hintFromEdges } from '../controlnet/hint.js';
import { ControlNet, expectedControlNetShapes } from '../controlnet/model.js';
import { maxRelError, withinTolerance } from './compare.js';
import type { CaseResult, KindRunner } from './types.js';

const KIND = 'controlnet';
/** A seeded draw vs the stored x_T: both torch.randn float32. */
const NOISE_TOLERANCE = 1e-6;

interface E2eCase {
  readonly name: string;
  readonly sampler: 'ddim';
  readonly steps: number;
  readonly timesteps: readonly number[];
  readonly cfg_scale: number;
  readonly seed: number;
  readonly x_T: string;
  readonly source_image: string;
  readonly canny: { readonly mode: CannyMode; readonly low: number; readonly high: number };
  readonly edges: string;
  readonly hint: string;
  readonly hint_size: readonly [number, number];
  readonly controlnet_conditioning_scale: number;
  readonly control_guidance_start: number;
  readonly control_guidance_end: number;
  readonly control_applied: readonly boolean[];
  readonly control_scale_per_step: readonly number[];
  readonly step_latents: readonly string[];
  readonly latent: string;
  readonly image: string;
}

interface UnitCase {
  readonly name: 'unit';
  readonly conditioning_scale: number;
  readonly hint_embedding: string;
  readonly residuals: readonly { readonly name: string; readonly tensor: string }[];
  readonly eps: string;
  readonly eps_no_control: string;
}

interface Fixture {
  readonly config: {
    readonly controlnet: LdmUNetParams;
    readonly unet: LdmUNetParams;
    readonly hint_block: { readonly channels: readonly number[]; readonly strides: readonly number[]; readonly downsample: number };
    readonly pipeline_fixture: string;
    readonly original_config: { readonly model: { readonly params: { readonly first_stage_config: { readonly params: { readonly ddconfig: Record<string, unknown>; readonly embed_dim: number } } } } };
  };
  readonly files: { readonly original_safetensors: string; readonly original_pth: string; readonly diffusers: readonly string[] };
  readonly tolerance: { readonly residuals: number; readonly eps: number; readonly hint_embedding: number; readonly latent: number; readonly image: number };
  readonly diffusers_key_map: Readonly<Record<string, string>>;
  readonly cases: readonly (UnitCase | E2eCase)[];
}

const message = (e: unknown): string => (e instanceof Error ? e.message : String(e));
const failed = (name: string, e: unknown): CaseResult => ({ kind: KIND, name, passed: false, detail: message(e) });

function compared(name: string, actual: ArrayLike<number>, expected: ArrayLike<number>, tolerance: number, detail?: string): CaseResult {
  const { passed, maxRelError: err } = withinTolerance(actual, expected, tolerance);
  return { kind: KIND, name, passed: passed && detail === undefined, maxRelError: err, tolerance, detail };
}

/** An NCHW io tensor as NHWC. */
function nhwc(io: TensorSource, key: string): tf.Tensor4D {
  const [b, c, h, w] = io.info(key).shape;
  return tf.tidy(() => tf.transpose(tf.tensor4d(io.float32(key), [b, c, h, w]), [0, 2, 3, 1]));
}

/** NHWC -> NCHW values. */
function nchw(x: tf.Tensor4D): Float32Array {
  return tf.tidy(() => tf.transpose(x, [0, 3, 1, 2])).dataSync() as Float32Array;
}

function context(io: TensorSource, ...keys: string[]): tf.Tensor3D {
  return tf.tidy(() => tf.concat(keys.map((k) => tf.tensor3d(io.float32(k), io.info(k).shape as [number, number, number])), 0));
}

function configCase(dir: string, fx: Fixture, cfg: ControlNetConfig): CaseResult {
  const name = 'config';
  try {
    const path = join(dir, 'diffusers', 'config.json');
    const fromJson = controlNetConfigFromDiffusers(JSON.parse(readFileSync(path, 'utf8')) as DiffusersControlNetJson, path);
    const problems: string[] = [];
    // heads: the fixture's num_heads is one count for every level; diffusers' attention_head_dim the same
    if (JSON.stringify(fromJson) !== JSON.stringify(cfg)) problems.push(`config.json gives ${JSON.stringify(fromJson)}, fixture.json ${JSON.stringify(cfg)}`);
    const plan = hintBlockPlan(cfg);
    const channels = plan.slice(0, -1).map((s) => s.cout);
    const strides = plan.map((s) => s.stride);
    const want = fx.config.hint_block;
    if (channels.join() !== want.channels.join()) problems.push(`hint block widths [${channels.join(', ')}] vs [${want.channels.join(', ')}]`);
    if (strides.join() !== want.strides.join()) problems.push(`hint block strides [${strides.join(', ')}] vs [${want.strides.join(', ')}]`);
    if (plan.reduce((f, s) => f * s.stride, 1) !== want.downsample) problems.push(`downsample ${plan.reduce((f, s) => f * s.stride, 1)} vs ${want.downsample}`);
    return { kind: KIND, name, passed: problems.length === 0, detail: problems.length === 0 ? `${plan.length} hint convs` : problems.join('; ') };
  } catch (e) {
    return failed(name, e);
  }
}

function keysCase(dir: string, fx: Fixture, cfg: ControlNetConfig): CaseResult[] {
  const out: CaseResult[] = [];
  let diffusers: SafetensorsFile | null = null;
  let single: SafetensorsFile | null = null;
  try {
    diffusers = SafetensorsFile.open(join(dir, 'diffusers', 'diffusion_pytorch_model.safetensors'));
    const map = controlNetDiffusersToOriginal(diffusers.keys(), diffusers.path);
    const want = Object.entries(fx.diffusers_key_map);
    const problems = want.filter(([orig, diff]) => map.get(orig) !== diff).map(([orig, diff]) => `${diff} -> ${map.get(orig) === undefined ? 'nothing' : 'another name'} (want ${orig})`);
    if (map.size !== want.length) problems.push(`${map.size} names mapped, the fixture lists ${want.length}`);
    out.push({ kind: KIND, name: 'keys/diffusers_key_map', passed: problems.length === 0, detail: problems.length === 0 ? `${map.size} keys` : problems.slice(0, 4).join('; ') });
  } catch (e) {
    out.push(failed('keys/diffusers_key_map', e));
  } finally {
    diffusers?.close();
  }
  try {
    single = SafetensorsFile.open(join(dir, fx.files.original_safetensors));
    const shapes = expectedControlNetShapes(cfg);
    const problems: string[] = [];
    for (const [key, shape] of shapes) {
      if (!single.has(key)) problems.push(`missing ${key}`);
      else if (single.info(key).shape.join() !== shape.join()) problems.push(`${key}: [${single.info(key).shape}] vs expected [${shape}]`);
    }
    for (const key of single.keys()) if (!shapes.has(key)) problems.push(`unexpected ${key}`);
    out.push({ kind: KIND, name: 'keys/shapes', passed: problems.length === 0, detail: problems.length === 0 ? `${shapes.size} keys` : problems.slice(0, 4).join('; ') });
  } catch (e) {
    out.push(failed('keys/shapes', e));
  } finally {
    single?.close();
  }
  return out;
}

/** The ControlNet of one file of the fixture, through openControlNet as a user's file would go. */
function loadFormat(path: string, cfg: ControlNetConfig): ControlNet {
  const opened = openControlNet(path);
  try {
    return ControlNet.load(opened.source, opened.config ?? cfg, opened.prefix);
  } finally {
    opened.source.close();
  }
}

/** The unit case's inputs. */
interface UnitInputs {
  readonly x: tf.Tensor4D;
  readonly t: number[];
  readonly cond: Conditioning;
  readonly hint: tf.Tensor4D;
}

function unitResults(label: string, net: ControlNet, unet: UNet, io: TensorSource, c: UnitCase, tol: Fixture['tolerance'], inp: UnitInputs): CaseResult[] {
  const out: CaseResult[] = [];
  const emb = net.embedHint(inp.hint);
  out.push(compared(`${label}/unit/hint_embedding`, nchw(emb), io.float32(c.hint_embedding), tol.hint_embedding));
  emb.dispose();
  const r = net.forward(inp.x, inp.t, inp.cond, inp.hint, c.conditioning_scale);
  try {
    const all = [...r.down, r.middle];
    c.residuals.forEach((spec, i) => out.push(compared(`${label}/unit/${spec.name}`, nchw(all[i]), io.float32(spec.tensor), tol.residuals)));
    if (all.length !== c.residuals.length) out.push({ kind: KIND, name: `${label}/unit/residuals`, passed: false, detail: `${all.length} residuals, the fixture has ${c.residuals.length}` });
    const eps = unet.forward(inp.x, inp.t, { ...inp.cond, residuals: r });
    out.push(compared(`${label}/unit/eps`, nchw(eps), io.float32(c.eps), tol.eps));
    eps.dispose();
  } finally {
    disposeResiduals(r);
  }
  return out;
}

/** Two ControlNets at scales 0.5 and 0.3, summed, vs one at 0.8 (the fixture's residuals). */
function multiResults(a: ControlNet, b: ControlNet, io: TensorSource, c: UnitCase, tol: number, inp: UnitInputs): CaseResult[] {
  const units: ControlUnit[] = [
    { net: a, hint: inp.hint, scale: 0.5, start: 0, end: 1 },
    { net: b, hint: inp.hint, scale: c.conditioning_scale - 0.5, start: 0, end: 1 },
  ];
  const r = controlResiduals(units, inp.x, inp.t, 0, 1, inp.cond) as UNetResiduals;
  try {
    const all = [...r.down, r.middle];
    return c.residuals.map((spec, i) => compared(`multi/${spec.name}`, nchw(all[i]), io.float32(spec.tensor), tol));
  } finally {
    disposeResiduals(r);
  }
}

async function e2eResults(c: E2eCase, net: ControlNet, unet: UNet, vae: Vae, io: TensorSource, tol: Fixture['tolerance'], scaleFactor: number): Promise<CaseResult[]> {
  const out: CaseResult[] = [];
  const name = c.name;
  // the hint: canny of the source image, HWC3 / 255
  const [hh, hw] = c.hint_size;
  const edges = canny(io.bytes(c.source_image), hw, hh, c.canny);
  const want = io.bytes(c.edges);
  const differing = edges.reduce((n, v, i) => n + (v === want[i] ? 0 : 1), 0);
  out.push({ kind: KIND, name: `${name}/edges`, passed: differing === 0, detail: `${differing} of ${edges.length} pixels differ` });
  const planar = controlHint(edges); // [3, H, W]
  out.push(compared(`${name}/hint`, planar, io.float32(c.hint), 0));
  // the window
  const n = c.steps;
  const applied = Array.from({ length: n }, (_, i) => controlActive(i, n, c.control_guidance_start, c.control_guidance_end));
  const scales = controlScales(n, { scale: c.controlnet_conditioning_scale, start: c.control_guidance_start, end: c.control_guidance_end });
  const windowOk = applied.join() === c.control_applied.join() && scales.join() === c.control_scale_per_step.join();
  out.push({ kind: KIND, name: `${name}/window`, passed: windowOk, detail: `active on steps [${applied.flatMap((a, i) => (a ? [i] : [])).join(', ')}]` });

  const hint = hintFromEdges(edges, hw, hh);
  const cond: Conditioning = { context: context(io, 'uncond', 'cond') };
  const sampler = createSampler({ name: c.sampler, steps: n });
  let x: tf.Tensor4D | null = null;
  try {
    if (sampler.timesteps.join() !== c.timesteps.join()) {
      out.push({ kind: KIND, name: `${name}/timesteps`, passed: false, detail: `[${sampler.timesteps.join(', ')}] vs [${c.timesteps.join(', ')}]` });
    }
    const shape = io.info(c.x_T).shape;
    const drawn = torchNoise(new TorchGenerator(c.seed))([shape[0], shape[2], shape[3], shape[1]]) as tf.Tensor4D;
    const noiseErr = maxRelError(nchw(drawn), io.float32(c.x_T));
    out.push({ kind: KIND, name: `${name}/x_T`, passed: noiseErr <= NOISE_TOLERANCE, maxRelError: noiseErr, tolerance: NOISE_TOLERANCE });
    x = tf.tidy(() => sampler.start(drawn));
    drawn.dispose();
    const embedding = net.embedHint(hint);
    const units: ControlUnit[] = [{ net, hint, hintEmbedding: embedding, scale: c.controlnet_conditioning_scale, start: c.control_guidance_start, end: c.control_guidance_end }];
    try {
      for (let i = 0; i < sampler.totalSteps; i++) {
        const eps = controlledEps(unet, units, cond, c.cfg_scale, i, sampler.totalSteps);
        const cur: tf.Tensor4D = x;
        const next: tf.Tensor4D = tf.tidy(() => sampler.step(i, cur, eps, () => {
          throw new Error('DDIM (eta 0) draws no noise');
        }));
        cur.dispose();
        x = next;
        const key = c.step_latents[i];
        if (key !== undefined) out.push(compared(`${name}/step_${i}`, nchw(x), io.float32(key), tol.latent));
        await new Promise<void>((resolve) => setImmediate(resolve));
      }
    } finally {
      embedding.dispose();
    }
    out.push(compared(`${name}/latent`, nchw(x), io.float32(c.latent), tol.latent));
    const latent = x;
    const image = tf.tidy(() => tf.clipByValue(tf.add(tf.mul(vae.decode(tf.div<tf.Tensor4D>(latent, scaleFactor)), 0.5), 0.5), 0, 1));
    out.push(compared(`${name}/image`, image.dataSync(), io.float32(c.image), tol.image));
    image.dispose();
  } catch (e) {
    out.push(failed(`${name}/*`, e));
  } finally {
    sampler.dispose();
    x?.dispose();
    hint.dispose();
    cond.context.dispose();
  }
  return out;
}

export const run: KindRunner = async (dir) => {
  let fx: Fixture;
  let unetCfg: UNetConfig;
  let cfg: ControlNetConfig;
  try {
    fx = JSON.parse(readFileSync(join(dir, 'fixture.json'), 'utf8')) as Fixture;
    unetCfg = unetConfigFromLdm(fx.config.unet);
    cfg = controlNetConfig(unetConfigFromLdm({ ...fx.config.controlnet, out_channels: fx.config.controlnet.in_channels }));
  } catch (e) {
    return [failed('*', `cannot read ${dir}/fixture.json: ${message(e)}`)];
  }
  const results: CaseResult[] = [configCase(dir, fx, cfg), ...keysCase(dir, fx, cfg)];
  const formats: [string, string][] = [
    ['safetensors', join(dir, fx.files.original_safetensors)],
    ['pth', join(dir, fx.files.original_pth)],
    ['diffusers', join(dir, 'diffusers')],
  ];
  const io = SafetensorsFile.open(join(dir, 'io.safetensors'));
  const model = openWeights(join(dir, fx.config.pipeline_fixture, 'model.safetensors'));
  const nets = new Map<string, ControlNet>();
  let unet: UNet | null = null;
  let vae: Vae | null = null;
  try {
    unet = UNet.load(model, unetCfg);
    const first = fx.config.original_config.model.params.first_stage_config.params;
    vae = Vae.load(model, vaeConfigFromLdm({ ...first.ddconfig, embed_dim: first.embed_dim }));
    for (const [label, path] of formats) {
      try {
        nets.set(label, loadFormat(path, cfg));
      } catch (e) {
        results.push(failed(`${label}/load`, e));
      }
    }
    const unit = fx.cases.find((c): c is UnitCase => c.name === 'unit');
    if (unit !== undefined) {
      const inp: UnitInputs = { x: nhwc(io, 'x'), t: Array.from(io.float32('timesteps')), cond: { context: context(io, 'context') }, hint: nhwc(io, 'hint') };
      try {
        const plain = unet.forward(inp.x, inp.t, inp.cond);
        results.push(compared('unit/eps_no_control', nchw(plain), io.float32(unit.eps_no_control), fx.tolerance.eps));
        plain.dispose();
        for (const [label, net] of nets) results.push(...unitResults(label, net, unet, io, unit, fx.tolerance, inp));
        const [a, b] = [nets.get('safetensors'), nets.get('diffusers')];
        if (a !== undefined && b !== undefined) results.push(...multiResults(a, b, io, unit, fx.tolerance.residuals, inp));
      } catch (e) {
        results.push(failed('unit/*', e));
      } finally {
        tf.dispose([inp.x, inp.cond.context, inp.hint]);
      }
    }
    const net = nets.get('safetensors');
    const scaleFactor = (fx.config.original_config.model.params as { scale_factor?: number }).scale_factor ?? 0.18215;
    for (const c of fx.cases) {
      if (c.name === 'unit') continue;
      if (net === undefined) results.push(failed(`${c.name}/*`, 'the ControlNet did not load'));
      else results.push(...(await e2eResults(c as E2eCase, net, unet, vae, io, fx.tolerance, scaleFactor)));
    }
  } catch (e) {
    results.push(failed('*', e));
  } finally {
    for (const n of nets.values()) n.dispose();
    unet?.dispose();
    vae?.dispose();
    model.close();
    io.close();
  }
  return results;
};
