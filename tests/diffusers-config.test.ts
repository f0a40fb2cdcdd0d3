/**
 * A diffusers folder's config.json files make its pipeline config (pipeline/diffusers-config.ts): the tiny SDXL
 * folder of the fixtures gives the fixture's own config, SD 1.5's and SDXL base's published config.json files give
 * the built-in configs, a folder loads without --config and generates what it generates with it, and a config.json
 * the engine cannot run is refused naming the file and the field.
 */
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { initBackend } from '../src/backend/select.js';
import { diffusersFolderConfig } from '../src/pipeline/diffusers-config.js';
import { SD15_PIPELINE, SDXL_BASE_PIPELINE, StableDiffusion, sdxlConfigFromJson, type AnyPipelineConfig } from '../src/pipeline/pipeline.js';
import { headsAt, type UNetConfig } from '../src/unet/index.js';

const FOLDER = 'tests/fixtures/sdxl/pipeline/diffusers';
const fixtureConfig = JSON.parse(readFileSync('tests/fixtures/sdxl/pipeline/fixture.json', 'utf8')).config;

const tmp = mkdtempSync(join(tmpdir(), 'sd-diffusers-config-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** A folder holding only the given components' config.json files. */
function folder(name: string, components: Record<string, unknown>): string {
  const dir = join(tmp, name);
  for (const [c, json] of Object.entries(components)) {
    mkdirSync(join(dir, c), { recursive: true });
    writeFileSync(join(dir, c, 'config.json'), JSON.stringify(json));
  }
  return dir;
}

/** The same UNet: equal fields, and the same head count wherever there is attention (diffusers gives counts, sgm widths). */
function expectSameUNet(a: UNetConfig, b: UNetConfig): void {
  const { heads: ha, ...ra } = a;
  const { heads: hb, ...rb } = b;
  expect(ra).toEqual(rb);
  a.channelMult.forEach((m, level) => {
    const ch = m * a.modelChannels;
    if (a.transformerDepth[level] > 0 || level === a.channelMult.length - 1) expect([level, headsAt(a, level, ch)]).toEqual([level, headsAt(b, level, ch)]);
  });
  void ha;
  void hb;
}

// SD 1.5's unet/, vae/ and text_encoder/ config.json (runwayml/stable-diffusion-v1-5), the fields that matter
const SD15_UNET_JSON = {
  _class_name: 'UNet2DConditionModel', act_fn: 'silu', attention_head_dim: 8, block_out_channels: [320, 640, 1280, 1280],
  center_input_sample: false, cross_attention_dim: 768, down_block_types: ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
  downsample_padding: 1, flip_sin_to_cos: true, freq_shift: 0, in_channels: 4, layers_per_block: 2, mid_block_scale_factor: 1,
  norm_eps: 1e-5, norm_num_groups: 32, out_channels: 4, sample_size: 64, up_block_types: ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'],
};
const SD15_VAE_JSON = {
  _class_name: 'AutoencoderKL', act_fn: 'silu', block_out_channels: [128, 256, 512, 512], down_block_types: Array(4).fill('DownEncoderBlock2D'),
  in_channels: 3, latent_channels: 4, layers_per_block: 2, norm_num_groups: 32, out_channels: 3, sample_size: 512, up_block_types: Array(4).fill('UpDecoderBlock2D'),
};
const SD15_TEXT_JSON = {
  architectures: ['CLIPTextModel'], hidden_act: 'quick_gelu', hidden_size: 768, intermediate_size: 3072, layer_norm_eps: 1e-5,
  max_position_embeddings: 77, num_attention_heads: 12, num_hidden_layers: 12, projection_dim: 768, vocab_size: 49408,
};
// SDXL base 1.0's (stabilityai/stable-diffusion-xl-base-1.0)
const SDXL_UNET_JSON = {
  addition_embed_type: 'text_time', addition_time_embed_dim: 256, attention_head_dim: [5, 10, 20], block_out_channels: [320, 640, 1280],
  cross_attention_dim: 2048, down_block_types: ['DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'], in_channels: 4, layers_per_block: 2,
  out_channels: 4, projection_class_embeddings_input_dim: 2816, sample_size: 128, transformer_layers_per_block: [1, 2, 10], use_linear_projection: true,
};
const SDXL_VAE_JSON = { ...SD15_VAE_JSON, sample_size: 1024, scaling_factor: 0.13025, force_upcast: true };
const SDXL_TEXT_JSON = { ...SD15_TEXT_JSON };
const SDXL_TEXT2_JSON = {
  architectures: ['CLIPTextModelWithProjection'], hidden_act: 'gelu', hidden_size: 1280, intermediate_size: 5120, layer_norm_eps: 1e-5,
  max_position_embeddings: 77, num_attention_heads: 20, num_hidden_layers: 32, projection_dim: 1280, vocab_size: 49408,
};

describe('diffusers folder config.json -> pipeline config', () => {
  it("the fixture's tiny SDXL folder gives the fixture's config", () => {
    const got = diffusersFolderConfig(FOLDER, 'sdxl');
    const want = sdxlConfigFromJson(fixtureConfig);
    if (got === null || !('family' in got)) throw new Error('expected an SDXL config');
    expectSameUNet(got.unet, want.unet);
    expect(got.vae).toEqual(want.vae);
    expect(got.text).toEqual(want.text);
    expect([got.scaleFactor, got.timeEmbedDim]).toEqual([want.scaleFactor, want.timeEmbedDim]);
    expect([got.width, got.height]).toEqual([64, 64]); // sample_size 8 latents, the VAE's x8
  });

  it("SD 1.5's published config.json files give SD15_PIPELINE", () => {
    const dir = folder('sd15', { unet: SD15_UNET_JSON, vae: SD15_VAE_JSON, text_encoder: SD15_TEXT_JSON });
    expect(diffusersFolderConfig(dir, 'sd1')).toEqual(SD15_PIPELINE);
  });

  it("SDXL base's published config.json files give SDXL_BASE_PIPELINE", () => {
    const dir = folder('sdxl', { unet: SDXL_UNET_JSON, vae: SDXL_VAE_JSON, text_encoder: SDXL_TEXT_JSON, text_encoder_2: SDXL_TEXT2_JSON });
    const got = diffusersFolderConfig(dir, 'sdxl') as typeof SDXL_BASE_PIPELINE;
    expectSameUNet(got.unet, SDXL_BASE_PIPELINE.unet);
    const { unet: _u, ...rest } = got;
    const { unet: _w, ...want } = SDXL_BASE_PIPELINE;
    expect(rest).toEqual(want);
  });

  it('a single file, or a folder without unet/config.json, has none', () => {
    expect(diffusersFolderConfig('tests/fixtures/sdxl/pipeline/model-fp16.safetensors', 'sdxl')).toBeNull();
    expect(diffusersFolderConfig(folder('empty', { vae: SD15_VAE_JSON }), 'sd1')).toBeNull();
  });

  it('a config.json the engine cannot run is refused naming the file and the field', () => {
    const bad = (name: string, unet: unknown) => () => diffusersFolderConfig(folder(name, { unet }), 'sd1');
    expect(bad('class', { ...SD15_UNET_JSON, class_embed_type: 'timestep' })).toThrow(/class\/unet\/config\.json: class_embed_type/);
    expect(bad('blocks', { ...SD15_UNET_JSON, block_out_channels: [320, 500] })).toThrow(/blocks\/unet\/config\.json: block_out_channels/);
    expect(bad('heads', { ...SD15_UNET_JSON, attention_head_dim: 7 })).toThrow(/heads\/unet\/config\.json: .*heads/);
    const vae = folder('vae-bad', { unet: SD15_UNET_JSON, vae: { ...SD15_VAE_JSON, scaling_factor: -1 } });
    expect(() => diffusersFolderConfig(vae, 'sd1')).toThrow(/vae-bad\/vae\/config\.json: "scaling_factor"/);
    const broken = folder('broken', { unet: SD15_UNET_JSON });
    writeFileSync(join(broken, 'unet', 'config.json'), '{ not json');
    expect(() => diffusersFolderConfig(broken, 'sd1')).toThrow(/broken\/unet\/config\.json: not a readable JSON config/);
  });

  it('the tiny SDXL folder loads without --config and generates what it generates with the config', async () => {
    await initBackend({ backend: 'cpu', log: null });
    const load = (config?: AnyPipelineConfig) => StableDiffusion.load({ weights: FOLDER, config, tokenizer: 'tests/fixtures/tokenizer' });
    const run = async (sd: StableDiffusion) => {
      try {
        return (await sd.generate({ prompt: 'a lighthouse', seed: 7, steps: 2, width: 64, height: 64 })).images[0].rgb;
      } finally {
        sd.dispose();
      }
    };
    const without = await run(await load());
    const withConfig = await run(await load(sdxlConfigFromJson(fixtureConfig)));
    expect(Buffer.from(without).equals(Buffer.from(withConfig))).toBe(true);
    // what it took before the folder's config was read: the family default, which this folder does not fit
    await expect(load(SDXL_BASE_PIPELINE)).rejects.toThrow(/unet|text|shape/i);
  });
});
