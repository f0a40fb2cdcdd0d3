/**
 * The adapter parts of `npm run bench` (bench.ts's --controlnet and --ip-adapter), on full-size random weights
 * written once by random-adapters.ts (fp16, cached beside the model's):
 *
 *   controlnet   one UNet + ControlNet CFG step (batch 2; the hint embedded once, as the pipeline does per
 *                generation) against the plain UNet step bench.ts measured just before: the cost of a ControlNet
 *   ip-adapter   the CLIP vision encoder (ViT-H/14 at 224x224, batch 1), the CFG token set of each adapter
 *                (photo and negative: basic image_proj(zeros), Plus the encoder on zero pixels), and one UNet CFG
 *                step with the basic and with the Plus adapter's tokens attached against the plain step
 * The ControlNet and adapters are made for bench.ts's UNet config (SD 1.5, SDXL base, or a --config's), the image
 * encoder is ViT-H/14 unless an image encoder config.json is given (e.g. the fixture's tiny one, to try the bench).
 * IP-Adapter needs a resident UNet: on wasm (UNet streamed) its UNet step is skipped, saying why.
 */
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import * as tf from '../src/backend/tf.js';
import { CLIP_VISION_H, clipVisionConfigFromJson, type ClipVisionConfig } from '../src/clip/vision.js';
import { IP_ADAPTER_PLUS_SD15, IP_ADAPTER_SD15, SD15_ADAPTER_CONFIGS, writeRandomAdapter, type AdapterConfigs, type AdapterModel } from '../src/cli/random-adapters.js';
import { CONTROL_PREFIX, ControlNet, controlNetConfig } from '../src/controlnet/index.js';
import { IpAdapter, loadImageEncoder } from '../src/ip-adapter/index.js';
import type { Conditioning, UNet } from '../src/unet/index.js';
import { SafetensorsFile } from '../src/weights/safetensors.js';

/** bench.ts's median-of-runs timer. */
export type Timer = (label: string, runs: number, fn: () => Promise<void>) => Promise<number>;

export interface AdapterBenchSetup {
  readonly unet: UNet;
  /** The plain step's inputs: latents [2, h, w, 4], the text conditioning of batch 2 (and SDXL's added embedding). */
  readonly x: tf.Tensor4D;
  readonly cond: Conditioning;
  /** bench.ts's plain UNet CFG step, seconds. */
  readonly plainStep: number;
  readonly cache: string;
  /** The model's cached-weights name (sd15, sdxl, sdxl-<config>): the adapters are made for its UNet. */
  readonly modelName: string;
  /** A transformers image encoder config.json instead of ViT-H/14's. */
  readonly imageEncoderConfig?: string;
  readonly runs: number;
  readonly time: Timer;
  readonly say: (s: string) => void;
}

export interface ControlNetBench {
  readonly hint_embed_s: number;
  readonly unet_controlnet_cfg_step_s: number;
  readonly controlnet_cost_s: number; // the step with the ControlNet less the plain step
  readonly controlnet_residency: string;
}

export interface IpAdapterBench {
  readonly image_encoder: string;
  readonly image_encoder_s: number;
  readonly tokens_basic_s: number;
  readonly tokens_plus_s: number;
  /** null on a streamed UNet (wasm), with the reason in `skipped`. */
  readonly unet_ip_basic_cfg_step_s: number | null;
  readonly unet_ip_plus_cfg_step_s: number | null;
  readonly ip_basic_cost_s: number | null;
  readonly ip_plus_cost_s: number | null;
  readonly skipped: string | null;
}

/** The configs the adapters are written from: made for `unet`'s config, reading `vision`'s features. */
function configsFor(s: AdapterBenchSetup, vision: ClipVisionConfig): AdapterConfigs {
  const unet = s.unet.config;
  return {
    controlNet: controlNetConfig(unet),
    vision,
    ipAdapter: { ...IP_ADAPTER_SD15, unet, vision },
    ipAdapterPlus: { ...IP_ADAPTER_PLUS_SD15, unet, vision, heads: Math.max(1, Math.round(unet.contextDim / 64)) },
  };
}

function visionConfig(s: AdapterBenchSetup): { cfg: ClipVisionConfig; name: string } {
  if (s.imageEncoderConfig === undefined) return { cfg: CLIP_VISION_H, name: 'clip-vision-h' };
  const cfg = clipVisionConfigFromJson(JSON.parse(readFileSync(s.imageEncoderConfig, 'utf8')));
  return { cfg, name: `clip-vision-${cfg.width}x${cfg.layers}-${cfg.imageSize}` };
}

/** The cached random file (or the image encoder's folder) of `model`, written once. */
function ensureAdapter(s: AdapterBenchSetup, model: AdapterModel, name: string, configs: AdapterConfigs): string {
  mkdirSync(s.cache, { recursive: true });
  const path = join(s.cache, model === 'clip-vision-h' ? `${name}-random-fp16` : `${name}-random-fp16.safetensors`);
  if (!existsSync(model === 'clip-vision-h' ? join(path, 'model.safetensors') : path)) {
    s.say(`writing ${path} (once; cached for later runs)`);
    writeRandomAdapter(model, path, { half: true, configs });
  }
  return path;
}

export async function benchControlNet(s: AdapterBenchSetup): Promise<ControlNetBench> {
  const configs = configsFor(s, SD15_ADAPTER_CONFIGS.vision);
  const path = ensureAdapter(s, 'controlnet-sd15', `${s.modelName}-controlnet`, configs);
  s.say('ControlNet');
  const src = SafetensorsFile.open(path);
  const net = ControlNet.load(src, configs.controlNet, CONTROL_PREFIX);
  src.close();
  const [b, h, w] = s.x.shape;
  const hint = tf.randomUniform([1, 8 * h, 8 * w, 3], 0, 1, 'float32', 1) as tf.Tensor4D;
  let embedding: tf.Tensor4D | null = null;
  try {
    const hintEmbed = await s.time('ControlNet hint embedding (once a generation)', s.runs, async () => {
      const e = net.embedHint(hint);
      await e.data();
      e.dispose();
    });
    embedding = net.embedHint(hint);
    const e = embedding;
    const step = await s.time(`UNet + ControlNet CFG step (batch ${b}, ${h}x${w})`, s.runs, async () => {
      const residuals = net.forwardEmbedded(s.x, new Array<number>(b).fill(500), s.cond, e, 1);
      const y = s.unet.forward(s.x, new Array<number>(b).fill(500), { ...s.cond, residuals });
      tf.dispose([...residuals.down, residuals.middle]);
      await y.data();
      y.dispose();
    });
    return { hint_embed_s: hintEmbed, unet_controlnet_cfg_step_s: step, controlnet_cost_s: step - s.plainStep, controlnet_residency: net.residency };
  } finally {
    tf.dispose([hint, ...(embedding === null ? [] : [embedding])]);
    net.dispose();
  }
}

export async function benchIpAdapter(s: AdapterBenchSetup): Promise<IpAdapterBench> {
  const vision = visionConfig(s);
  const configs = configsFor(s, vision.cfg);
  const encoderDir = ensureAdapter(s, 'clip-vision-h', vision.name, configs);
  const basicPath = ensureAdapter(s, 'ip-adapter-sd15', `${s.modelName}-ip-adapter-${vision.name}`, configs);
  const plusPath = ensureAdapter(s, 'ip-adapter-plus-sd15', `${s.modelName}-ip-adapter-plus-${vision.name}`, configs);
  s.say(`image encoder (${vision.name})`);
  const encoder = loadImageEncoder(encoderDir);
  const adapters = [IpAdapter.open(basicPath), IpAdapter.open(plusPath)];
  const size = vision.cfg.imageSize;
  const pixels = tf.randomNormal([1, size, size, 3], 0, 1, 'float32', 2) as tf.Tensor4D;
  const tokensOf = (a: IpAdapter) =>
    tf.tidy(() => tf.concat([a.negativeTokens(encoder), a.imageTokens(encoder.forward(pixels))]) as tf.Tensor3D);
  try {
    const encode = await s.time(`image encoder (batch 1, ${size}x${size})`, s.runs, async () => {
      const out = encoder.forward(pixels);
      await out.imageEmbeds.data();
      tf.dispose([out.imageEmbeds, out.pooled, out.lastHidden, out.penultimate]);
    });
    const tokenTimes = [];
    for (const a of adapters) {
      tokenTimes.push(
        await s.time(`IP-Adapter ${a.kind} tokens (photo and negative)`, s.runs, async () => {
          const t = tokensOf(a);
          await t.data();
          t.dispose();
        }),
      );
    }
    const base = {
      image_encoder: `${vision.name} (${size}x${size})`,
      image_encoder_s: encode,
      tokens_basic_s: tokenTimes[0],
      tokens_plus_s: tokenTimes[1],
    };
    if (s.unet.residency === 'streamed') {
      const skipped = 'IP-Adapter attaches to a resident UNet; this one is streamed (wasm)';
      s.say(`IP-Adapter UNet step skipped: ${skipped}`);
      return { ...base, unet_ip_basic_cfg_step_s: null, unet_ip_plus_cfg_step_s: null, ip_basic_cost_s: null, ip_plus_cost_s: null, skipped };
    }
    const steps: number[] = [];
    const [b, h, w] = s.x.shape;
    for (const a of adapters) {
      const tokens = tf.tidy(() => tf.tile(tokensOf(a), [b / 2, 1, 1]) as tf.Tensor3D);
      a.attach(s.unet);
      try {
        steps.push(
          await s.time(`UNet CFG step with IP-Adapter ${a.kind} tokens (batch ${b}, ${h}x${w})`, s.runs, async () => {
            const y = s.unet.forward(s.x, new Array<number>(b).fill(500), { ...s.cond, extraTokens: [{ tokens, scale: 0.6 }] });
            await y.data();
            y.dispose();
          }),
        );
      } finally {
        a.detach();
        tokens.dispose();
      }
    }
    return {
      ...base,
      unet_ip_basic_cfg_step_s: steps[0],
      unet_ip_plus_cfg_step_s: steps[1],
      ip_basic_cost_s: steps[0] - s.plainStep,
      ip_plus_cost_s: steps[1] - s.plainStep,
      skipped: null,
    };
  } finally {
    pixels.dispose();
    for (const a of adapters) a.dispose();
    encoder.dispose();
  }
}

/** The table rows of the adapter parts. */
export function adapterRows(cn: ControlNetBench | null, ip: IpAdapterBench | null, plainStep: number): [string, string][] {
  const rows: [string, string][] = [];
  const cost = (step: number) => `${step.toFixed(2)} s (${(step - plainStep >= 0 ? '+' : '')}${(step - plainStep).toFixed(2)} s, ${((step / plainStep - 1) * 100).toFixed(0)}% over the plain step)`;
  if (cn !== null) {
    rows.push(['UNet + ControlNet CFG step', `${cost(cn.unet_controlnet_cfg_step_s)}; ControlNet ${cn.controlnet_residency}`]);
    rows.push(['ControlNet hint embedding (once a generation)', `${cn.hint_embed_s.toFixed(2)} s`]);
  }
  if (ip !== null) {
    rows.push([`image encoder ${ip.image_encoder}, batch 1`, `${ip.image_encoder_s.toFixed(2)} s`]);
    rows.push(['IP-Adapter tokens, photo + negative (basic; Plus)', `${ip.tokens_basic_s.toFixed(2)} s; ${ip.tokens_plus_s.toFixed(2)} s`]);
    if (ip.unet_ip_basic_cfg_step_s !== null && ip.unet_ip_plus_cfg_step_s !== null) {
      rows.push(['UNet CFG step with IP-Adapter basic tokens', cost(ip.unet_ip_basic_cfg_step_s)]);
      rows.push(['UNet CFG step with IP-Adapter Plus tokens', cost(ip.unet_ip_plus_cfg_step_s)]);
    } else {
      rows.push(['UNet CFG step with IP-Adapter', `skipped: ${ip.skipped}`]);
    }
  }
  return rows;
}
