/**
 * The ControlNets of a generation: loaded once per file and kept by the model (ControlNetCache), and for each
 * request the control units (controlnet/guidance.ts) the denoising loop runs:
 *
 *   image bytes --decode, stretched to the hint size--> RGB --canny(low, high) | as is--> hint [1, 8h, 8w, 3] in [0, 1]
 *   hint --net.embedHint--> hint embedding, once per generation (it depends on the hint alone)
 *
 * The hint size is the latent's times the hint block's downsampling (8 for SD; for SD's VAE that is the image size).
 * Canny runs on the resized image, as A1111's ControlNet extension does with "Just Resize".
 * The ControlNet reads the UNet's text context and added embedding, never an IP-Adapter's image tokens (diffusers
 * and A1111 pass it the prompt embeddings alone).
 */
import { existsSync } from 'node:fs';
import { resolve } from 'node:path';
import * as tf from '../backend/tf.js';
import { canny } from '../image/canny.js';
import { decodeImage, type DecodeOptions } from '../image/codec.js';
import { hintDownsample, hintFromEdges, hintFromRgb, loadControlNet, type ControlNet, type ControlUnit } from '../controlnet/index.js';
import { ConfigError, ShapeError } from '../nn/errors.js';
import { WeightsError } from '../weights/types.js';
import type { UNetConfig } from '../unet/index.js';
import { ParamError, type ResolvedControlNet } from './api.js';

/** Loaded ControlNets by resolved path; the model that owns the cache disposes it. */
export class ControlNetCache {
  private readonly nets = new Map<string, ControlNet>();

  /** `base`: the UNet the residuals go to; a ControlNet made for another model is refused when loaded. */
  constructor(private readonly base: UNetConfig) {}

  /** The ControlNet at `path` (loaded now or earlier); a file that is missing, broken or made for another model is a ParamError on `field`. */
  get(path: string, field: string): ControlNet {
    const key = resolve(path);
    const cached = this.nets.get(key);
    if (cached !== undefined) return cached;
    if (!existsSync(key)) throw new ParamError(field, `${path}: no such file or folder`);
    let net: ControlNet;
    try {
      net = loadControlNet(key, this.base);
    } catch (e) {
      if (e instanceof ConfigError || e instanceof ShapeError || e instanceof WeightsError) throw new ParamError(field, e.message);
      throw e;
    }
    this.nets.set(key, net);
    return net;
  }

  get size(): number {
    return this.nets.size;
  }

  dispose(): void {
    for (const n of this.nets.values()) n.dispose();
    this.nets.clear();
  }
}

/** One request's ControlNet: what was resolved (params.ts) and its image. */
export interface ControlRequest {
  readonly resolved: ResolvedControlNet;
  readonly image: Uint8Array;
}

/** The hint of one control image: [1, H, W, 3] in [0, 1] at the hint size. */
export async function controlHintOf(req: ControlRequest, width: number, height: number, field: string, o: DecodeOptions = {}): Promise<tf.Tensor4D> {
  const { rgb } = await decodeImage(req.image, width, height, field, o);
  const r = req.resolved;
  if (r.preprocess === 'none') return hintFromRgb(rgb, width, height);
  const edges = canny(rgb, width, height, { low: r.low ?? 100, high: r.high ?? 200, mode: 'rgb' });
  return hintFromEdges(edges, width, height);
}

/** The units of one generation with their hints and hint embeddings; dispose frees those (not the nets). */
export interface PreparedControl {
  readonly units: readonly ControlUnit[];
  dispose(): void;
}

export function disposeControl(units: readonly ControlUnit[]): void {
  for (const u of units) tf.dispose([u.hint, ...(u.hintEmbedding === undefined ? [] : [u.hintEmbedding])]);
}

/**
 * Loads (or finds) each ControlNet, decodes its image to the hint size of a latent of latentHeight x latentWidth
 * and computes the hint embedding. Frees what it made when a later one fails.
 */
export async function prepareControl(
  requests: readonly ControlRequest[],
  cache: ControlNetCache,
  latentHeight: number,
  latentWidth: number,
  o: DecodeOptions = {},
): Promise<PreparedControl> {
  const units: ControlUnit[] = [];
  try {
    for (const [i, req] of requests.entries()) {
      const net = cache.get(req.resolved.model, `controlNets[${i}].model`);
      const f = hintDownsample(net.config);
      const hint = await controlHintOf(req, latentWidth * f, latentHeight * f, `controlNets[${i}].image`, o);
      let hintEmbedding: tf.Tensor4D;
      try {
        hintEmbedding = net.embedHint(hint);
      } catch (e) {
        hint.dispose();
        throw e;
      }
      const { scale, start, end } = req.resolved;
      units.push({ net, hint, hintEmbedding, scale, start, end });
    }
  } catch (e) {
    disposeControl(units);
    throw e;
  }
  return { units, dispose: () => disposeControl(units) };
}
