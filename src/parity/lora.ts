/**
 * Parity runner for fixtures/lora: LoRAs (kohya-ss F16 LoCon, kohya F32, PEFT) on the tiny SD 1.x model of
 * ../pipeline (fixture.json `config.base_model`), every case of fixture.json:
 *   merged_weights  W' of 12 modules (linear, 1x1 and 3x3 convs, text encoder) at two multipliers   (tolerance.merged)
 *                   after checking that each kohya name maps to the case's original key
 *   base            the UNet and text encoder without a LoRA on the cases' inputs: the inputs themselves
 *   single, pair, split (and single_peft: botanical_peft.safetensors in place of botanical)
 *                   UNet eps on (unet_x, unet_timesteps, unet_context) and the text encoder's last hidden state
 *                   on te_input_ids, both from weights merged with the case's LoRAs        (unet_eps, te_hidden)
 *   prompt_syntax   each prompt's tags: clean prompt (exact), LoRAs and multipliers, other tags
 *   txt2img         the A1111 prompt's tags cut out and resolved in the fixture folder, then the pipeline loaded
 *                   with those LoRAs: text conditioning, Euler ancestral latent from seed 777 (each draw of
 *                   TorchGenerator(777) checked against x_T and the listed noise), decoded image
 * Tensors in io.safetensors are NCHW; the engine's are NHWC.
 */
import { readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import * as tf from '../backend/tf.js';
import { initBackend } from '../backend/select.js';
import { ClipTextEncoder } from '../clip/index.js';
import { UNet, disposeConditioning } from '../unet/index.js';
import { createSampler } from '../scheduler/index.js';
import { pipelineConfigFromLdm, StableDiffusion, type PipelineConfig } from '../pipeline/pipeline.js';
import { extractLoraTags, loraTargets, readLora, resolveLora, withLoras, type AppliedLora, type LoraFile } from '../lora/index.js';
import { openWeights } from '../weights/open.js';
import { SafetensorsFile } from '../weights/safetensors.js';
import { decodeInt64 } from '../weights/dtypes.js';
import type { TensorSource } from '../weights/types.js';
import { maxRelError, withinTolerance } from './compare.js';
import { checkedTorchDraws } from './draws.js';
import type { CaseResult, KindRunner } from './types.js';

const KIND = 'lora';
/** One draw of the seeded generator vs the listed tensor: both are torch.randn float32 values. */

interface FixtureLora {
  readonly file: string;
  readonly te_multiplier: number;
  readonly unet_multiplier: number;
}

interface MergedCase {
  readonly case: 'merged_weights';
  readonly lora: string;
  readonly multipliers: readonly number[];
  readonly modules: readonly { readonly kohya: string; readonly original: string; readonly expected: Readonly<Record<string, string>> }[];
}

interface ModelCase {
  readonly case: 'single' | 'pair' | 'split';
  readonly loras: readonly FixtureLora[];
  readonly unet_eps: string;
  readonly te_hidden: string;
  readonly base?: { readonly unet_eps: string; readonly te_hidden: string };
}

interface SyntaxCase {
  readonly case: 'prompt_syntax';
  readonly cases: readonly {
    readonly prompt: string;
    readonly clean_prompt: string;
    readonly loras: readonly { readonly name: string; readonly te_multiplier: number; readonly unet_multiplier: number; readonly dyn_dim: number | null }[];
    readonly other_extra_networks: readonly { readonly type: string; readonly args: readonly string[] }[];
  }[];
}

interface Txt2ImgCase {
  readonly case: 'txt2img';
  readonly prompt_a1111: string;
  readonly prompt: string;
  readonly negative_prompt: string;
  readonly loras: readonly FixtureLora[];
  readonly steps: number;
  readonly cfg_scale: number;
  readonly seed: number;
  readonly input_ids: string;
  readonly cond: string;
  readonly uncond: string;
  readonly x_T: string;
  readonly noise: readonly string[];
  readonly latent: string;
  readonly image: string;
}

type FixtureCase = MergedCase | ModelCase | SyntaxCase | Txt2ImgCase;

interface Fixture {
  readonly config: { readonly base_model: string };
  readonly tolerance: { readonly merged: number; readonly unet_eps: number; readonly te_hidden: number; readonly latent: number; readonly image: number };
  readonly cases: readonly FixtureCase[];
}

/** What every case reads: the fixture folder, its files, the base model, the LoRAs (each read once). */
interface Context {
  readonly dir: string;
  readonly fx: Fixture;
  readonly cfg: PipelineConfig;
  readonly basePath: string;
  readonly base: TensorSource;
  readonly io: SafetensorsFile;
  readonly lora: (file: string) => LoraFile;
}

const message = (e: unknown): string => (e instanceof Error ? e.message : String(e));
const failed = (name: string, e: unknown): CaseResult => ({ kind: KIND, name, passed: false, detail: message(e) });

function compared(name: string, actual: ArrayLike<number>, expected: ArrayLike<number>, tolerance: number, detail?: string): CaseResult {
  const { passed, maxRelError: err } = withinTolerance(actual, expected, tolerance);
  return { kind: KIND, name, passed: passed && detail === undefined, maxRelError: err, tolerance, detail };
}

/** NCHW values from the io file -> NHWC tensor. */
function nhwc(io: SafetensorsFile, key: string): tf.Tensor4D {
  const [b, c, h, w] = io.info(key).shape;
  return tf.tidy(() => tf.transpose(tf.tensor4d(io.float32(key), [b, c, h, w]), [0, 2, 3, 1]));
}

/** NHWC tensor -> NCHW values, to compare with the io file. */
function nchwValues(x: tf.Tensor4D): Float32Array {
  return tf.tidy(() => tf.transpose(x, [0, 3, 1, 2])).dataSync() as Float32Array;
}

function ids(io: SafetensorsFile, key: string): number[][] {
  const [b, n] = io.info(key).shape;
  const flat = decodeInt64(io.bytes(key));
  return Array.from({ length: b }, (_, i) => flat.slice(i * n, (i + 1) * n));
}

const applied = (ctx: Context, loras: readonly FixtureLora[], file = (f: string) => f): AppliedLora[] =>
  loras.map((l) => ({ lora: ctx.lora(file(l.file)), te: l.te_multiplier, unet: l.unet_multiplier }));

function mergedCase(ctx: Context, c: MergedCase): CaseResult[] {
  const lora = ctx.lora(c.lora);
  const targets = loraTargets(ctx.base.keys());
  const wrong = c.modules.filter((m) => targets.get(m.kohya)?.key !== m.original);
  const mapping: CaseResult = wrong.length === 0
    ? { kind: KIND, name: 'merged_weights/names', passed: true, detail: `${c.modules.length} kohya names -> original keys` }
    : { kind: KIND, name: 'merged_weights/names', passed: false, detail: wrong.map((m) => `${m.kohya} -> ${targets.get(m.kohya)?.key ?? 'nothing'}, expected ${m.original}`).join('; ') };
  const results = [mapping];
  for (const m of c.multipliers) {
    const name = `merged_weights/m${m.toFixed(1)}`;
    try {
      const src = withLoras(ctx.base, [{ lora, te: m, unet: m }]);
      let worst = { err: 0, key: '' };
      for (const mod of c.modules) {
        const err = maxRelError(src.float32(mod.original), ctx.io.float32(mod.expected[m.toFixed(1)]));
        if (err > worst.err || worst.key === '') worst = { err, key: mod.original };
      }
      const passed = worst.err <= ctx.fx.tolerance.merged;
      results.push({ kind: KIND, name, passed, maxRelError: worst.err, tolerance: ctx.fx.tolerance.merged, detail: `${c.modules.length} weights, worst ${worst.key}` });
    } catch (e) {
      results.push(failed(name, e));
    }
  }
  return results;
}

/** The UNet's eps and the text encoder's last hidden state on the cases' inputs, from `src`. */
function modelOutputs(ctx: Context, src: TensorSource): { eps: Float32Array; hidden: Float32Array } {
  const { io, cfg } = ctx;
  let clip: ClipTextEncoder | null = null;
  let unet: UNet | null = null;
  try {
    clip = ClipTextEncoder.load(src, cfg.clip);
    const encoder = clip;
    const hidden = tf.tidy(() => {
      const out = encoder.forward(tf.tensor2d(ids(io, 'te_input_ids'), undefined, 'int32'));
      return tf.keep(out.hidden);
    });
    unet = UNet.load(src, cfg.unet);
    const model = unet;
    const eps = tf.tidy(() => {
      const context = tf.tensor3d(io.float32('unet_context'), io.info('unet_context').shape as [number, number, number]);
      return model.forward(nhwc(io, 'unet_x'), Array.from(io.float32('unet_timesteps')), { context });
    });
    const out = { eps: nchwValues(eps), hidden: hidden.dataSync() as Float32Array };
    tf.dispose([eps, hidden]);
    return out;
  } finally {
    clip?.dispose();
    unet?.dispose();
  }
}

function modelCase(ctx: Context, name: string, loras: readonly AppliedLora[], expected: { unet_eps: string; te_hidden: string }): CaseResult[] {
  try {
    const { eps, hidden } = modelOutputs(ctx, withLoras(ctx.base, loras));
    const tol = ctx.fx.tolerance;
    return [
      compared(`${name}/unet_eps`, eps, ctx.io.float32(expected.unet_eps), tol.unet_eps),
      compared(`${name}/te_hidden`, hidden, ctx.io.float32(expected.te_hidden), tol.te_hidden),
    ];
  } catch (e) {
    return [failed(`${name}/*`, e)];
  }
}

function syntaxCase(c: SyntaxCase): CaseResult[] {
  return c.cases.map((s, i) => {
    const name = `prompt_syntax/${i}`;
    try {
      const got = extractLoraTags(s.prompt);
      const want = {
        prompt: s.clean_prompt,
        loras: s.loras.map((l) => ({ name: l.name, te: l.te_multiplier, unet: l.unet_multiplier, dyn: l.dyn_dim })),
        others: s.other_extra_networks.map((o) => ({ type: o.type, args: o.args })),
      };
      const same = JSON.stringify(got) === JSON.stringify(want);
      return { kind: KIND, name, passed: same, detail: same ? JSON.stringify(s.prompt) : `got ${JSON.stringify(got)}, expected ${JSON.stringify(want)}` };
    } catch (e) {
      return failed(name, e);
    }
  });
}

/** TorchGenerator(seed) as generate() draws it, each draw checked against x_T and then the listed noise. */
const checkedNoise = (io: SafetensorsFile, c: Txt2ImgCase) => checkedTorchDraws(io, c.seed, [c.x_T, ...c.noise], { allListed: true });

/** The prompt's tags against the case: clean text, and each tag resolved in the fixture folder to the case's LoRA. */
function txt2imgTags(ctx: Context, c: Txt2ImgCase): { result: CaseResult; specs: { path: string; te: number; unet: number }[] } {
  const tags = extractLoraTags(c.prompt_a1111);
  const specs = tags.loras.map((t) => ({ path: resolveLora(ctx.dir, t.name), te: t.te, unet: t.unet }));
  const want = c.loras.map((l) => ({ path: resolve(ctx.dir, l.file), te: l.te_multiplier, unet: l.unet_multiplier }));
  const got = specs.map((s) => ({ ...s, path: resolve(s.path) }));
  const problems = [
    ...(tags.prompt === c.prompt ? [] : [`clean prompt ${JSON.stringify(tags.prompt)}, expected ${JSON.stringify(c.prompt)}`]),
    ...(JSON.stringify(got) === JSON.stringify(want) ? [] : [`LoRAs ${JSON.stringify(got)}, expected ${JSON.stringify(want)}`]),
  ];
  const result = { kind: KIND, name: 'txt2img/tags', passed: problems.length === 0, detail: problems.length === 0 ? JSON.stringify(c.prompt_a1111) : problems.join('; ') };
  return { result, specs };
}

async function txt2imgCase(ctx: Context, c: Txt2ImgCase): Promise<CaseResult[]> {
  const { io, fx } = ctx;
  let tags: ReturnType<typeof txt2imgTags>;
  try {
    tags = txt2imgTags(ctx, c);
  } catch (e) {
    return [failed('txt2img/tags', e)];
  }
  const results = [tags.result];
  let sd: StableDiffusion;
  try {
    sd = await StableDiffusion.load({ weights: ctx.basePath, config: ctx.cfg, tokenizer: join(ctx.dir, '..', 'tokenizer'), loras: tags.specs });
  } catch (e) {
    return [...results, failed('txt2img/*', `load failed: ${message(e)}`)];
  }
  const cond = sd.encodeText([c.negative_prompt, c.prompt], 1);
  let latent: tf.Tensor4D | undefined;
  try {
    const [uncondCtx, condCtx] = tf.split(cond.context, 2);
    results.push(
      compared('txt2img/uncond', uncondCtx.dataSync(), io.float32(c.uncond), fx.tolerance.te_hidden),
      compared('txt2img/cond', condCtx.dataSync(), io.float32(c.cond), fx.tolerance.te_hidden),
    );
    tf.dispose([uncondCtx, condCtx]);
    const { noise, problems } = checkedNoise(io, c);
    const [, zc, h, w] = io.info(c.latent).shape;
    latent = await sd.sampleLatent({
      sampler: createSampler({ name: 'euler_a', steps: c.steps, karras: false }),
      cond,
      guidanceScale: c.cfg_scale,
      noise,
      latentShape: [1, h, w, zc],
    });
    results.push(compared('txt2img/latent', nchwValues(latent), io.float32(c.latent), fx.tolerance.latent, problems()));
    const image = sd.decodeLatent(latent);
    results.push(compared('txt2img/image', image.dataSync(), io.float32(c.image), fx.tolerance.image));
    image.dispose();
  } catch (e) {
    results.push(failed('txt2img/*', e));
  } finally {
    disposeConditioning(cond);
    latent?.dispose();
    sd.dispose();
  }
  return results;
}

async function runCase(ctx: Context, c: FixtureCase): Promise<CaseResult[]> {
  switch (c.case) {
    case 'merged_weights':
      return mergedCase(ctx, c);
    case 'single':
    case 'pair':
    case 'split': {
      const results = modelCase(ctx, c.case, applied(ctx, c.loras), c);
      if (c.case === 'single') {
        results.push(...modelCase(ctx, 'single_peft', applied(ctx, c.loras, (f) => f.replace(/\.safetensors$/, '_peft.safetensors')), c));
      }
      return results;
    }
    case 'prompt_syntax':
      return syntaxCase(c);
    case 'txt2img':
      return txt2imgCase(ctx, c);
    default:
      return [{ kind: KIND, name: String((c as { case?: unknown }).case), passed: false, detail: 'unknown case' }];
  }
}

export const run: KindRunner = async (dir, opts) => {
  await initBackend({ backend: opts.backend, log: null });
  const fx = JSON.parse(readFileSync(join(dir, 'fixture.json'), 'utf8')) as Fixture;
  const cfg = pipelineConfigFromLdm(fx, join(dir, 'fixture.json'));
  const basePath = resolve(dir, fx.config.base_model);
  const base = openWeights(basePath);
  const io = SafetensorsFile.open(join(dir, 'io.safetensors'));
  const cache = new Map<string, LoraFile>();
  const lora = (file: string): LoraFile => {
    const hit = cache.get(file) ?? readLora(join(dir, file));
    cache.set(file, hit);
    return hit;
  };
  const ctx: Context = { dir, fx, cfg, basePath, base, io, lora };
  try {
    const single = fx.cases.find((c): c is ModelCase => c.case === 'single');
    const results = single?.base === undefined ? [] : modelCase(ctx, 'base', [], single.base);
    for (const c of fx.cases) {
      try {
        results.push(...(await runCase(ctx, c)));
      } catch (e) {
        results.push(failed(`${c.case}/*`, e));
      }
    }
    return results;
  } finally {
    base.close();
    io.close();
  }
};
