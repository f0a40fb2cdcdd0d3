/**
 * The adapter files of `sd random-weights`, in the layouts people download, with every tensor's PyTorch shape taken
 * from the loader that reads it (run against a WeightView probe):
 *
 *   controlnet-sd15        control_v11p_sd15_canny.safetensors: `control_model.*` (ControlNet.load's keys)
 *   clip-vision-h          image_encoder/: transformers CLIPVisionModelWithProjection ViT-H/14, config.json +
 *                          model.safetensors (ClipVisionEncoder.loadFrom's keys)
 *   ip-adapter-sd15        ip-adapter_sd15.safetensors: `image_proj.{proj,norm}.*` (ImageProjModel, 4 tokens) and
 *   ip-adapter-plus-sd15   ip-adapter-plus_sd15.safetensors: `image_proj.*` (Resampler: 16 queries, depth 4, 12 heads)
 *                          and both with `ip_adapter.{1,3,...,31}.to_{k,v}_ip.weight`, one pair per cross-attention of
 *                          the UNet in UNet.crossAttentions() order, each the shape of that attention's `to_k`.
 * The IP-Adapter projections size themselves from the file (image-proj.ts, resampler.ts): their probes are handed a
 * source holding only the shapes they read sizes from, and record every key they then ask for.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { CLIP_VISION_H, expectedVisionShapes, type ClipVisionConfig } from '../clip/vision.js';
import { CONTROL_PREFIX, SD15_CONTROLNET, expectedControlNetShapes, type ControlNetConfig } from '../controlnet/index.js';
import { ImageProjModel, Resampler } from '../ip-adapter/index.js';
import { WeightView } from '../nn/weight-view.js';
import { SD15_UNET, expectedShapes as unetShapes, type UNetConfig } from '../unet/index.js';
import { writeRandomCheckpoint } from '../weights/random.js';
import type { TensorInfo, TensorSource } from '../weights/types.js';

export const ADAPTER_MODELS = ['controlnet-sd15', 'clip-vision-h', 'ip-adapter-sd15', 'ip-adapter-plus-sd15'] as const;
export type AdapterModel = (typeof ADAPTER_MODELS)[number];

export const isAdapterModel = (m: string): m is AdapterModel => (ADAPTER_MODELS as readonly string[]).includes(m);

/** What an IP-Adapter file's sizes follow: the UNet it attaches to, the image encoder it reads, its projection. */
export interface IpAdapterShapeConfig {
  readonly kind: 'basic' | 'plus';
  readonly unet: UNetConfig;
  readonly vision: ClipVisionConfig;
  /** Image tokens: ImageProjModel's clip_extra_context_tokens (4), or the Resampler's num_queries (16). */
  readonly tokens: number;
  /** Resampler only: perceiver layers and heads of 64 (tencent's Plus: depth 4, heads 12). */
  readonly depth: number;
  readonly heads: number;
}

/** tencent-ailab's ip-adapter_sd15 and ip-adapter-plus_sd15 (ViT-H/14 image encoder, SD 1.5 UNet). */
export const IP_ADAPTER_SD15: IpAdapterShapeConfig = Object.freeze({ kind: 'basic', unet: SD15_UNET, vision: CLIP_VISION_H, tokens: 4, depth: 0, heads: 0 });
export const IP_ADAPTER_PLUS_SD15: IpAdapterShapeConfig = Object.freeze({ kind: 'plus', unet: SD15_UNET, vision: CLIP_VISION_H, tokens: 16, depth: 4, heads: 12 });

/** The configs each model is written from; a test substitutes tiny ones. */
export interface AdapterConfigs {
  readonly controlNet: ControlNetConfig;
  readonly vision: ClipVisionConfig;
  readonly ipAdapter: IpAdapterShapeConfig;
  readonly ipAdapterPlus: IpAdapterShapeConfig;
}

export const SD15_ADAPTER_CONFIGS: AdapterConfigs = Object.freeze({
  controlNet: SD15_CONTROLNET,
  vision: CLIP_VISION_H,
  ipAdapter: IP_ADAPTER_SD15,
  ipAdapterPlus: IP_ADAPTER_PLUS_SD15,
});

/** A file that holds only shapes: what the IP-Adapter projections read their sizes from. */
function shapesOnly(shapes: ReadonlyMap<string, readonly number[]>): TensorSource {
  const none = (key: string): never => {
    throw new Error(`random-adapters: ${key} has a shape only`);
  };
  return {
    path: '(shapes)',
    keys: () => [...shapes.keys()],
    has: (key) => shapes.has(key),
    info: (key): TensorInfo => ({ dtype: 'F32', shape: [...(shapes.get(key) ?? none(key))] }),
    bytes: none,
    float32: none,
    close: () => undefined,
  };
}

/** The cross-attentions' `to_k` shapes [dim, contextDim] in IP-Adapter numbering order: input, output, middle blocks. */
export function crossAttentionShapes(unet: UNetConfig): number[][] {
  const toK = [...unetShapes(unet, '')].filter(([k]) => /\.attn2\.to_k\.weight$/.test(k));
  const part = (name: string) => toK.filter(([k]) => k.startsWith(`${name}.`)).map(([, s]) => s);
  return [...part('input_blocks'), ...part('output_blocks'), ...part('middle_block')];
}

/** Every tensor of an IP-Adapter file (tencent's flat .safetensors names) for cfg. */
export function ipAdapterShapes(cfg: IpAdapterShapeConfig): Map<string, number[]> {
  const dim = cfg.unet.contextDim;
  const probe = WeightView.probe('image_proj');
  if (cfg.kind === 'basic') {
    const sizes = new Map([['image_proj.proj.weight', [cfg.tokens * dim, cfg.vision.projectionDim]], ['image_proj.norm.weight', [dim]]]);
    ImageProjModel.load(probe, shapesOnly(sizes)).dispose();
  } else {
    const inner = 64 * cfg.heads;
    const sizes = new Map<string, number[]>([
      ['image_proj.latents', [1, cfg.tokens, dim]],
      ['image_proj.proj_in.weight', [dim, cfg.vision.width]], // the penultimate hidden states: the encoder's width
      ['image_proj.proj_out.weight', [dim, dim]],
      ...Array.from({ length: cfg.depth }, (_, i): [string, number[]] => [`image_proj.layers.${i}.0.to_q.weight`, [inner, dim]]),
    ]);
    Resampler.load(probe, shapesOnly(sizes)).dispose();
  }
  const shapes = probe.shapes();
  crossAttentionShapes(cfg.unet).forEach((s, i) => {
    shapes.set(`ip_adapter.${2 * i + 1}.to_k_ip.weight`, [s[0], dim]);
    shapes.set(`ip_adapter.${2 * i + 1}.to_v_ip.weight`, [s[0], dim]);
  });
  return shapes;
}

/** transformers' config.json of a CLIPVisionModelWithProjection: the fields clipVisionConfigFromJson reads. */
export function clipVisionConfigJson(cfg: ClipVisionConfig): Record<string, unknown> {
  return {
    architectures: ['CLIPVisionModelWithProjection'],
    model_type: 'clip_vision_model',
    hidden_act: cfg.act,
    hidden_size: cfg.width,
    image_size: cfg.imageSize,
    intermediate_size: cfg.mlpWidth,
    layer_norm_eps: cfg.layerNormEps,
    num_attention_heads: cfg.heads,
    num_channels: 3,
    num_hidden_layers: cfg.layers,
    patch_size: cfg.patchSize,
    projection_dim: cfg.projectionDim,
    torch_dtype: 'float32',
  };
}

/** The tensors of one adapter model's weight file. */
export function adapterShapes(model: AdapterModel, cfg: AdapterConfigs = SD15_ADAPTER_CONFIGS): Map<string, number[]> {
  switch (model) {
    case 'controlnet-sd15':
      return expectedControlNetShapes(cfg.controlNet, CONTROL_PREFIX);
    case 'clip-vision-h':
      return expectedVisionShapes(cfg.vision);
    case 'ip-adapter-sd15':
      return ipAdapterShapes(cfg.ipAdapter);
    case 'ip-adapter-plus-sd15':
      return ipAdapterShapes(cfg.ipAdapterPlus);
  }
}

export interface WriteAdapterOptions {
  readonly half?: boolean;
  readonly seed?: number;
  readonly configs?: AdapterConfigs;
  readonly onTensor?: (done: number, total: number) => void;
}

/**
 * Writes `model` at `out`: a .safetensors file, or for clip-vision-h the folder `out` (config.json and
 * model.safetensors, as loadImageEncoder reads it). Returns the weight file's path and its tensors.
 */
export function writeRandomAdapter(model: AdapterModel, out: string, o: WriteAdapterOptions = {}): { file: string; shapes: Map<string, number[]> } {
  const configs = o.configs ?? SD15_ADAPTER_CONFIGS;
  const shapes = adapterShapes(model, configs);
  let file = out;
  if (model === 'clip-vision-h') {
    mkdirSync(out, { recursive: true });
    writeFileSync(join(out, 'config.json'), `${JSON.stringify(clipVisionConfigJson(configs.vision), null, 2)}\n`);
    file = join(out, 'model.safetensors');
  }
  writeRandomCheckpoint(file, shapes, { half: o.half, seed: o.seed, onTensor: o.onTensor });
  return { file, shapes };
}
