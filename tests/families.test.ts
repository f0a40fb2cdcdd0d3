/**
 * Model families recognised from a checkpoint's keys (src/pipeline/families.ts): SD 1.x and SDXL base are run,
 * the others are refused by name before any network is built, and a config of the wrong family is refused.
 */
import { describe, expect, it } from 'vitest';
import { ConfigError } from '../src/nn/errors.js';
import { detectFamily } from '../src/pipeline/families.js';
import { SDXL_BASE_PIPELINE, StableDiffusion, familyOf, limitsFor, SD15_PIPELINE } from '../src/pipeline/pipeline.js';
import { SafetensorsFile } from '../src/weights/safetensors.js';
import { source } from './helpers.js';

const keys = (...names: string[]) => source(Object.fromEntries(names.map((n) => [n, [1]])));

describe('model families', () => {
  it('tells SD 1.x and SDXL base apart by their keys', () => {
    for (const [file, family] of [['tests/fixtures/pipeline/model.safetensors', 'sd1'], ['tests/fixtures/sdxl/pipeline/model-fp16.safetensors', 'sdxl']]) {
      const src = SafetensorsFile.open(file);
      expect(detectFamily(src), file).toBe(family);
      src.close();
    }
  });

  it.each([
    ['conditioner.embedders.0.model.transformer.resblocks.0.ln_1.weight', /SDXL refiner checkpoints are not supported yet/],
    ['cond_stage_model.model.transformer.resblocks.0.ln_1.weight', /Stable Diffusion 2\.x/],
    ['model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight', /Stable Diffusion 3/],
    ['double_blocks.0.img_attn.qkv.weight', /FLUX/],
  ])('refuses %s by name', (key, why) => {
    expect(() => detectFamily(keys(key, 'model.diffusion_model.label_emb.0.0.weight'))).toThrow(why);
    expect(() => detectFamily(keys(key))).toThrow(ConfigError);
  });

  it('gives each family its limits (default size, work bounds) and refuses a config of the other family', async () => {
    expect(limitsFor(SD15_PIPELINE)).toMatchObject({ family: 'sd1', width: 512, height: 512, clipLayers: 12 });
    expect(limitsFor(SDXL_BASE_PIPELINE)).toMatchObject({ family: 'sdxl', width: 1024, height: 1024 });
    expect(familyOf(SDXL_BASE_PIPELINE)).toBe('sdxl');
    const load = StableDiffusion.load({ weights: 'tests/fixtures/sdxl/pipeline/model-fp16.safetensors', config: SD15_PIPELINE, tokenizer: 'tests/fixtures/tokenizer' });
    await expect(load).rejects.toThrow(/the checkpoint is SDXL, but the config given is for SD 1\.x/);
  });
});
