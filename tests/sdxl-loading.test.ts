/**
 * Loading SDXL base from its two layouts: the diffusers folder (tests/fixtures/sdxl/pipeline/diffusers, a copy of
 * the reference fixture's) seen under the original single file's names (src/weights/diffusers.ts, layout.ts), with
 * the same shapes and values as model-fp16.safetensors; the pipeline fixture from both sources; refusals; `sd inspect`
 * (family, parameters per network) and `sd convert` (folder -> file, --half) on both; `sd random-weights --model
 * sdxl` (the full-size shape map without writing 10 GB; writing on the fixture's tiny config).
 */
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { initBackend } from '../src/backend/select.js';
import { familyOf, formatSummary } from '../src/cli/commands/inspect.js';
import { randomModelShapes, randomWeightsCommand } from '../src/cli/commands/random-weights.js';
import { runPart } from '../src/parity/sdxl.js';
import { detectFamily } from '../src/pipeline/families.js';
import { resolveParams } from '../src/pipeline/params.js';
import { StableDiffusion, sdxlConfigFromJson } from '../src/pipeline/pipeline.js';
import { convertWeights } from '../src/weights/convert.js';
import { partOf, summarizeWeights } from '../src/weights/inspect.js';
import { diffusersToOriginal } from '../src/weights/layout.js';
import { detectLayout, openWeights, weightsFormat } from '../src/weights/open.js';
import { SafetensorsFile, writeSafetensors } from '../src/weights/safetensors.js';
import type { TensorSource } from '../src/weights/types.js';

const PIPELINE = 'tests/fixtures/sdxl/pipeline';
const SINGLE = `${PIPELINE}/model-fp16.safetensors`;
const FOLDER = `${PIPELINE}/diffusers`;
/** The single file's non-weights (fixtures/README.md, SDXL): a diffusers folder has none of them. */
const NON_WEIGHTS = [
  'conditioner.embedders.0.transformer.text_model.embeddings.position_ids',
  'conditioner.embedders.1.model.logit_scale',
  'denoiser.sigmas',
];

const tmp = mkdtempSync(join(tmpdir(), 'sd-sdxl-loading-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** Every key of `ref` but the non-weights is in `src` with the same shape and float32 values, and nothing else is. */
function expectSameWeights(src: TensorSource, ref: TensorSource): void {
  const weights = ref.keys().filter((k) => !NON_WEIGHTS.includes(k));
  expect(src.keys().sort()).toEqual(weights.sort());
  for (const k of weights) {
    expect(src.info(k).shape, k).toEqual(ref.info(k).shape);
    const [a, b] = [src.float32(k), ref.float32(k)];
    expect(Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength)), k).toBe(true);
  }
}

/** A copy of the fixture's folder whose text encoders are rewritten by `edit` (name -> new name, or null to drop). */
function folderWithTextEncoders(name: string, edit: (key: string) => string | null): string {
  const dir = join(tmp, name);
  for (const c of ['unet', 'vae']) {
    mkdirSync(join(dir, c), { recursive: true });
    copyFileSync(join(FOLDER, c, 'diffusion_pytorch_model.safetensors'), join(dir, c, 'diffusion_pytorch_model.safetensors'));
  }
  for (const c of ['text_encoder', 'text_encoder_2']) {
    mkdirSync(join(dir, c), { recursive: true });
    const src = SafetensorsFile.open(join(FOLDER, c, 'model.safetensors'));
    const renamed = new Map<string, string>();
    for (const k of src.keys()) {
      const to = edit(k);
      if (to !== null) renamed.set(to, k);
    }
    writeSafetensors(join(dir, c, 'model.safetensors'), [...renamed].map(([to, k]) => [to, src.info(k)] as const), (to) => src.bytes(renamed.get(to) ?? ''));
    src.close();
  }
  writeFileSync(join(dir, 'model_index.json'), '{"_class_name": "StableDiffusionXLPipeline"}');
  return dir;
}

describe('SDXL diffusers folder under the original single-file names', () => {
  it('shows every weight of model-fp16.safetensors with its shape and float32 values', () => {
    const src = openWeights(FOLDER);
    const ref = openWeights(SINGLE);
    expect(weightsFormat(src)).toBe('diffusers-folder');
    expect(detectLayout(src)).toBe('diffusers');
    expectSameWeights(src, ref);
    src.close();
    ref.close();
  });

  it('stacks encoder 2 q/k/v into in_proj and transposes text_projection, byte for byte', () => {
    const src = openWeights(FOLDER);
    const ref = openWeights(SINGLE);
    for (const k of ['conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight', 'conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias', 'conditioner.embedders.1.model.text_projection']) {
      expect(src.info(k), k).toEqual(ref.info(k));
      expect(Buffer.from(src.bytes(k)).equals(Buffer.from(ref.bytes(k))), k).toBe(true);
    }
    expect(src.info('conditioner.embedders.1.model.text_projection').shape).toEqual([8, 6]); // [w, projection_dim]
    expect(src.info('model.diffusion_model.label_emb.0.0.weight').shape).toEqual([128, 54]); // add_embedding.linear_1
    src.close();
    ref.close();
  });

  it('reads text encoders saved without the text_model. module (recent transformers)', () => {
    const dir = folderWithTextEncoders('no-text-model', (k) => k.replace(/^text_model\./, ''));
    const src = openWeights(dir);
    const ref = openWeights(SINGLE);
    expectSameWeights(src, ref);
    src.close();
    ref.close();
  });

  it('ignores position_ids in encoder 2 (open_clip keeps no such buffer)', () => {
    const m = diffusersToOriginal('text_encoder_2', ['text_model.embeddings.position_ids', 'text_model.final_layer_norm.weight'], 'te2');
    expect([...m.keys()]).toEqual(['conditioner.embedders.1.model.ln_final.weight']);
  });

  it('refuses a layer missing k, a key with no open_clip name, and absurd layer indices', () => {
    const dir = folderWithTextEncoders('no-k', (k) => (k === 'text_model.encoder.layers.1.self_attn.k_proj.weight' ? null : k));
    expect(() => openWeights(dir)).toThrow(/has text_model\.encoder\.layers\.1\.self_attn\.q_proj\.weight but no text_model\.encoder\.layers\.1\.self_attn\.k_proj\.weight/);
    expect(() => diffusersToOriginal('text_encoder_2', ['text_model.vision.weight'], 'te2')).toThrow(/text_encoder_2 key text_model\.vision\.weight has no open_clip name/);
    expect(() => diffusersToOriginal('text_encoder_2', ['text_model.encoder.layers.99999999999.mlp.fc1.weight'], 'te2')).toThrow(/layer index 99999999999 is past 1023/);
  });

  it('refuses a folder with text_encoder_2/ but no text_encoder/ as an SDXL refiner', () => {
    const dir = join(tmp, 'refiner');
    for (const c of ['unet', 'vae', 'text_encoder_2']) mkdirSync(join(dir, c), { recursive: true });
    writeFileSync(join(dir, 'model_index.json'), '{"_class_name": "StableDiffusionXLImg2ImgPipeline"}');
    expect(() => openWeights(dir)).toThrow(/SDXL refiner checkpoints are not supported yet/);
  });
});

describe('the sdxl pipeline fixture from both sources', () => {
  it('passes every case from the single file and from the diffusers folder (cpu)', async () => {
    const results = await runPart('tests/fixtures/sdxl', 'pipeline', { backend: 'cpu' });
    for (const r of results) expect(r.passed, `${r.name}: ${r.detail ?? r.maxRelError}`).toBe(true);
    const single = results.filter((r) => r.name.startsWith('pipeline/single_file/'));
    const folder = results.filter((r) => r.name.startsWith('pipeline/diffusers/'));
    expect(single.length).toBeGreaterThan(10);
    expect(folder.map((r) => r.name.replace('/diffusers/', '/'))).toEqual(single.map((r) => r.name.replace('/single_file/', '/')));
  }, 300_000);
});

describe('sd inspect and sd convert for SDXL', () => {
  it('inspect names the family and counts each network, the same for the single file and the folder', () => {
    const lines: string[] = [];
    for (const path of [SINGLE, FOLDER]) {
      const src = openWeights(path);
      const s = summarizeWeights(src);
      expect(familyOf(src, s)).toBe('SDXL base');
      expect(s.numelByPart).toMatchObject({ unet: 932_292, vae: 367_527, text_encoder: 198_680, text_encoder_2: 398_560 });
      lines.push(formatSummary(path, s, false, familyOf(src, s)).split('\n').find((l) => l.startsWith('parameters:')) ?? '');
      src.close();
    }
    expect(lines[0]).toBe('parameters: 1,897,059 (unet 932,292, vae 367,527, text encoder 1 198,680, text encoder 2 398,560)');
    expect(lines[1]).toBe(lines[0]);
    const sd1 = openWeights('tests/fixtures/pipeline/model.safetensors');
    expect(familyOf(sd1, summarizeWeights(sd1))).toBe('SD 1.x');
    sd1.close();
  });

  it('inspect says what a checkpoint of an unsupported family is', () => {
    const path = join(tmp, 'refiner.safetensors');
    writeSafetensors(path, [['conditioner.embedders.0.model.ln_final.weight', { dtype: 'F32', shape: [2] }]], () => new Float32Array(2));
    const src = openWeights(path);
    expect(familyOf(src, summarizeWeights(src))).toBe('not supported: SDXL refiner checkpoints are not supported yet (only SDXL base 1.0)');
    src.close();
  });

  it('convert: the folder -> one file under the single file\'s names; fp32 -> --half gives the fp16 file back', () => {
    const ref = openWeights(SINGLE);
    const fromFolder = join(tmp, 'from-folder.safetensors');
    expect(convertWeights(FOLDER, fromFolder).tensors).toBe(ref.keys().length - NON_WEIGHTS.length);
    const got = openWeights(fromFolder);
    expectSameWeights(got, ref);
    expect(got.info('conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight')).toEqual({ dtype: 'F16', shape: [24, 8] });
    got.close();

    const fp32 = join(tmp, 'sdxl-fp32.safetensors');
    const floats = ref.keys().filter((k) => ref.info(k).dtype === 'F16');
    writeSafetensors(fp32, ref.keys().map((k) => [k, floats.includes(k) ? { dtype: 'F32', shape: ref.info(k).shape } : ref.info(k)] as const), (k) => (floats.includes(k) ? ref.float32(k) : ref.bytes(k)));
    const half = join(tmp, 'sdxl-half.safetensors');
    expect(convertWeights(fp32, half, { half: true }).tensors).toBe(ref.keys().length);
    const back = openWeights(half);
    for (const k of ref.keys()) {
      expect(back.info(k), k).toEqual(ref.info(k));
      expect(Buffer.from(back.bytes(k)).equals(Buffer.from(ref.bytes(k))), k).toBe(true);
    }
    back.close();
    const again = join(tmp, 'folder-half.safetensors');
    convertWeights(FOLDER, again, { half: true });
    const h = openWeights(again);
    expect(h.keys().every((k) => h.info(k).dtype === 'F16')).toBe(true);
    h.close();
    ref.close();
  });
});

describe('sd random-weights --model sdxl', () => {
  const fixtureConfig = (JSON.parse(readFileSync(`${PIPELINE}/fixture.json`, 'utf8')) as { config: Record<string, unknown> }).config;

  it('full size: SDXL base under the single file\'s names, UNet exactly 2,567,463,684 parameters (shape map only)', () => {
    const shapes = randomModelShapes('sdxl');
    const numel: Record<string, number> = {};
    for (const [k, shape] of shapes) numel[partOf(k)] = (numel[partOf(k)] ?? 0) + shape.reduce((a, d) => a * d, 1);
    expect(numel).toEqual({ unet: 2_567_463_684, text_encoder: 123_060_480, text_encoder_2: 694_659_840, vae: 83_653_863 });
    expect(shapes.size).toBe(2513); // sd_xl_base_1.0.safetensors' 2,515 less position_ids and logit_scale
    expect(shapes.get('conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight')).toEqual([3840, 1280]);
    expect(shapes.get('conditioner.embedders.1.model.text_projection')).toEqual([1280, 1280]);
    expect(shapes.get('model.diffusion_model.label_emb.0.0.weight')).toEqual([1280, 2816]);
    expect(shapes.get('model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight')).toEqual([1280, 2048]);
    const keys = [...shapes.keys()];
    expect(detectFamily({ path: 'random', keys: () => keys } as unknown as TensorSource)).toBe('sdxl');
    expect(randomModelShapes('sd15').size).toBeLessThan(shapes.size);
  });

  it('a tiny config gives exactly the fixture single file\'s weights and shapes', () => {
    const shapes = randomModelShapes('sdxl', sdxlConfigFromJson(fixtureConfig));
    const ref = openWeights(SINGLE);
    const weights = ref.keys().filter((k) => !NON_WEIGHTS.includes(k));
    expect([...shapes.keys()].sort()).toEqual(weights.sort());
    for (const k of weights) expect(shapes.get(k), k).toEqual(ref.info(k).shape);
    ref.close();
  });

  it('writes a tiny SDXL (fp16) that the pipeline loads as SDXL', async () => {
    const config = join(tmp, 'tiny-sdxl.json');
    writeFileSync(config, JSON.stringify(fixtureConfig));
    const out = join(tmp, 'tiny-sdxl-random.safetensors');
    const write = randomWeightsCommand.handler as (a: object) => Promise<void>;
    await write({ out, model: 'sdxl', config, half: true, seed: 3, force: false });
    const src = openWeights(out);
    expect(src.keys().every((k) => src.info(k).dtype === 'F16')).toBe(true);
    expect(familyOf(src, summarizeWeights(src))).toBe('SDXL base');
    src.close();
    await initBackend({ backend: 'cpu', log: null });
    const sd = await StableDiffusion.load({ weights: out, config: sdxlConfigFromJson(fixtureConfig), tokenizer: 'tests/fixtures/tokenizer' });
    sd.dispose();
    await expect(write({ out, model: 'sdxl', config, half: true, seed: 3, force: false })).rejects.toThrow(/exists: pass --force/);
  });
});

describe('SDXL refusals', () => {
  const fixtureConfig = (JSON.parse(readFileSync(`${PIPELINE}/fixture.json`, 'utf8')) as { config: Record<string, unknown> }).config;
  const load = (weights: string) => StableDiffusion.load({ weights, config: sdxlConfigFromJson(fixtureConfig), tokenizer: 'tests/fixtures/tokenizer' });

  /** The fixture file without `drop`, or with `reshape`'s shape reversed (same bytes). */
  function broken(name: string, edit: { drop?: string; reshape?: string }): string {
    const ref = SafetensorsFile.open(SINGLE);
    const path = join(tmp, `${name}.safetensors`);
    const infos = ref.keys().filter((k) => k !== edit.drop).map((k) => {
      const info = ref.info(k);
      return [k, k === edit.reshape ? { dtype: info.dtype, shape: [...info.shape].reverse() } : info] as const;
    });
    writeSafetensors(path, infos, (k) => ref.bytes(k));
    ref.close();
    return path;
  }

  it('a missing or mis-shaped tensor of any network is named, with its expected shape', async () => {
    await initBackend({ backend: 'cpu', log: null });
    const cases: [string, { drop?: string; reshape?: string }, RegExp][] = [
      ['no-label-emb', { drop: 'model.diffusion_model.label_emb.0.2.bias' }, /missing tensor model\.diffusion_model\.label_emb\.0\.2\.bias \[128\]/],
      ['no-unet-proj', { drop: 'model.diffusion_model.output_blocks.2.1.proj_out.weight' }, /missing tensor model\.diffusion_model\.output_blocks\.2\.1\.proj_out\.weight \[32, 32\]/],
      ['no-te2-bias', { drop: 'conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_bias' }, /missing conditioner\.embedders\.1\.model\.transformer\.resblocks\.1\.attn\.in_proj_bias \[24\]/],
      ['te2-projection', { reshape: 'conditioner.embedders.1.model.text_projection' }, /conditioner\.embedders\.1\.model\.text_projection: expected \[8, 6\], got \[6, 8\]/],
      ['te1-fc1', { reshape: 'conditioner.embedders.0.transformer.text_model.encoder.layers.2.mlp.fc1.weight' }, /conditioner\.embedders\.0\.transformer\.text_model\.encoder\.layers\.2\.mlp\.fc1\.weight: expected \[16, 4\], got \[4, 16\]/],
      ['vae-conv', { reshape: 'first_stage_model.decoder.up.0.block.0.conv1.weight' }, /first_stage_model\.decoder\.up\.0\.block\.0\.conv1\.weight: expected \[32, 32, 3, 3\], got \[3, 3, 32, 32\]/],
    ];
    for (const [name, edit, message] of cases) await expect(load(broken(name, edit)), name).rejects.toThrow(message);
  });

  it('a size that is not a multiple of 8 is refused with the field named', async () => {
    await initBackend({ backend: 'cpu', log: null });
    const sd = await load(SINGLE);
    try {
      expect(() => resolveParams({ prompt: 'x', width: 1000, height: 1020 }, sd.limits)).toThrow(/height: must be a multiple of 8/);
      expect(() => resolveParams({ prompt: 'x', width: 1001, height: 1024 }, sd.limits)).toThrow(/width: must be a multiple of 8/);
      expect(resolveParams({ prompt: 'x', width: 832, height: 1216 }, sd.limits)).toMatchObject({ width: 832, height: 1216 });
    } finally {
      sd.dispose();
    }
  });
});
