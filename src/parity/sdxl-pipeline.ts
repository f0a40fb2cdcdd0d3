/**
 * Parity for the `pipeline` part of the `sdxl` fixture kind: tiny SDXL txt2img through StableDiffusion (the family
 * recognised from the keys, the fixture's config), with diffusers' scheduler semantics for SDXL, from each source
 * the fixture has: the original single file (model-fp16.safetensors) and the diffusers folder (diffusers/, shown
 * under the single file's names by weights/diffusers.ts). Per case: the negative embeddings (encoded, or zeros when
 * none is given), x_T = the seed's first torch.randn, the scaled start latent, the final latent and the image (NHWC).
 * Case names say the source: `pipeline/single_file/euler/latent`, `pipeline/diffusers/euler/latent`.
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import * as tf from '../backend/tf.js';
import { initBackend } from '../backend/select.js';
import { StableDiffusion, sdxlConfigFromJson } from '../pipeline/pipeline.js';
import { resolveParams } from '../pipeline/params.js';
import { createSampler, TorchGenerator, torchNoise } from '../scheduler/index.js';
import { disposeConditioning } from '../unet/index.js';
import { SafetensorsFile } from '../weights/safetensors.js';
import { withinTolerance } from './compare.js';
import type { CaseResult, ParityOptions } from './types.js';

const KIND = 'sdxl';

interface PipelineCase {
  readonly name: string;
  readonly sampler: 'euler' | 'euler_a' | 'dpmpp_2m_karras';
  readonly steps: number;
  readonly cfg_scale: number;
  readonly seed: number;
  readonly negative_prompt: string | null;
  readonly x_T: string;
  readonly latent_init: string;
  readonly negative_prompt_embeds: string;
  readonly negative_pooled_prompt_embeds: string;
  readonly latent: string;
  readonly image: string;
}

interface PipelineFixture {
  readonly checkpoints?: { readonly single_file?: readonly { readonly file: string }[]; readonly diffusers?: string };
  readonly config: Record<string, unknown> & { prompt: string; width: number; height: number };
  readonly tolerance: { embeds: number; latent: number; image: number };
  readonly cases: readonly PipelineCase[];
}

const nchw = (x: tf.Tensor4D): Float32Array => tf.tidy(() => tf.transpose(x, [0, 3, 1, 2])).dataSync() as Float32Array;

/** The weights the fixture lists (`checkpoints`), each a named source: its single files, then its diffusers folder. */
function sources(dir: string, fixture: PipelineFixture): [string, string][] {
  const singles = fixture.checkpoints?.single_file ?? [{ file: 'model-fp16.safetensors' }];
  const out: [string, string][] = singles.map(({ file }, i) => [i === 0 ? 'single_file' : file, join(dir, file)]);
  const folder = fixture.checkpoints?.diffusers;
  if (folder !== undefined && existsSync(join(dir, folder))) out.push(['diffusers', join(dir, folder)]);
  return out;
}

export async function runPipeline(dir: string, opts: ParityOptions): Promise<CaseResult[]> {
  await initBackend({ backend: opts.backend, log: null });
  const fixture = JSON.parse(readFileSync(join(dir, 'fixture.json'), 'utf8')) as PipelineFixture;
  const io = SafetensorsFile.open(join(dir, 'io.safetensors'));
  try {
    const results: CaseResult[] = [];
    for (const [source, weights] of sources(dir, fixture)) results.push(...(await runSource(source, weights, dir, fixture, io)));
    return results;
  } finally {
    io.close();
  }
}

async function runSource(source: string, weights: string, dir: string, fixture: PipelineFixture, io: SafetensorsFile): Promise<CaseResult[]> {
  const tol = fixture.tolerance;
  const results: CaseResult[] = [];
  const compare = (name: string, got: ArrayLike<number>, key: string, t: number) => {
    const r = withinTolerance(Float32Array.from(got), io.float32(key), t);
    results.push({ kind: KIND, name: `pipeline/${source}/${name}`, passed: r.passed, maxRelError: r.maxRelError, tolerance: t });
  };
  let sd: StableDiffusion | null = null;
  try {
    sd = await StableDiffusion.load({
      weights,
      config: sdxlConfigFromJson(fixture.config),
      // the folder's tokenizer/ and tokenizer_2/ leave out vocab.json + merges.txt (the fixture's diffusers_has_vocab):
      // both sources read the top-level tokenizer fixture, whose files they are
      tokenizer: join(dir, '..', '..', 'tokenizer'),
    });
    const { prompt, width, height } = fixture.config;
    for (const c of fixture.cases) {
      const karras = c.sampler === 'dpmpp_2m_karras';
      const sampler = karras ? 'dpmpp_2m' : c.sampler;
      const r = resolveParams({ prompt, negativePrompt: c.negative_prompt ?? '', seed: c.seed, steps: c.steps, cfgScale: c.cfg_scale, sampler, karras, width, height }, sd.limits);
      const cond = sd.encodePrompts(r, c.negative_prompt);
      const [uncond] = tf.split(cond.context, 2);
      compare(`${c.name}/negative_prompt_embeds`, uncond.dataSync(), c.negative_prompt_embeds, tol.embeds);
      const pooledUncond = tf.slice(cond.added as tf.Tensor2D, [0, 0], [1, io.info(c.negative_pooled_prompt_embeds).shape[1]]);
      compare(`${c.name}/negative_pooled_prompt_embeds`, pooledUncond.dataSync(), c.negative_pooled_prompt_embeds, tol.embeds);
      tf.dispose([uncond, pooledUncond]);
      const shape = [1, height / 8, width / 8, 4] as const;
      const generator = new TorchGenerator(c.seed);
      const noise = torchNoise(generator);
      const xT = noise(shape) as tf.Tensor4D;
      compare(`${c.name}/x_T`, nchw(xT), c.x_T, tol.latent);
      const s = createSampler(sd.samplerConfig(r)); // the family's own conventions (diffusers' for SDXL)
      const start = s.start(xT);
      compare(`${c.name}/latent_init`, nchw(start), c.latent_init, tol.latent);
      s.dispose();
      tf.dispose([xT, start]);
      const latent = await sd.sampleLatent({
        sampler: createSampler(sd.samplerConfig(r)),
        cond,
        guidanceScale: c.cfg_scale,
        noise: torchNoise(new TorchGenerator(c.seed)),
        latentShape: shape,
      });
      compare(`${c.name}/latent`, nchw(latent), c.latent, tol.latent);
      const image = sd.decodeLatent(latent);
      compare(`${c.name}/image`, image.dataSync(), c.image, tol.image);
      tf.dispose([latent, image]);
      disposeConditioning(cond);
    }
    return results;
  } catch (e) {
    return [...results, { kind: KIND, name: `pipeline/${source}/*`, passed: false, detail: e instanceof Error ? e.message : String(e) }];
  } finally {
    sd?.dispose();
  }
}

