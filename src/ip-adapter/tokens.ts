/**
 * From a photo to the UNet's extra token set, what a pipeline needs of IP-Adapter in three calls:
 *
 *   encoder = loadImageEncoder('models/image_encoder')           once; cache it (ViT-H is ~2.5 GB in fp32)
 *   adapter = IpAdapter.open('ip-adapter_sd15.safetensors'); adapter.attach(unet)
 *   extra   = await ipAdapterTokens(adapter, encoder, photoBytes, 0.6)   [negative; photo] tokens, the scale
 *   cond    = { ...concatConditioning([uncond, cond]), extraTokens: [extra] }   batch [uncond, cond] for CFG
 *
 * The token batch follows CFG's order: row 0 the negative image tokens (with the negative prompt), row 1 the
 * photo's (with the prompt); the ip scale applies to both halves, as tencent's and diffusers' pipelines do.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import * as tf from '../backend/tf.js';
import { ClipVisionEncoder, clipVisionConfigFromJson } from '../clip/vision.js';
import { openWeights } from '../weights/open.js';
import type { ExtraTokens } from '../unet/conditioning.js';
import type { IpAdapter } from './adapter.js';
import { decodePhoto, preprocessClipImage } from './preprocess.js';

/** An `image_encoder/` folder as published beside the adapters: config.json and model.safetensors. */
export function loadImageEncoder(dir: string): ClipVisionEncoder {
  const cfg = clipVisionConfigFromJson(JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8')));
  const src = openWeights(join(dir, 'model.safetensors'));
  try {
    return ClipVisionEncoder.load(src, cfg);
  } finally {
    src.close();
  }
}

/** The CFG token set [2, M, C] (negative, photo) with its scale; `maxPixels` bounds the photo before decoding. */
export async function ipAdapterTokens(
  adapter: IpAdapter,
  encoder: ClipVisionEncoder,
  photo: Uint8Array,
  scale: number,
  { maxPixels }: { maxPixels?: number } = {},
): Promise<ExtraTokens> {
  if (!Number.isFinite(scale)) throw new RangeError(`ip-adapter: the scale must be a finite number, got ${scale}`);
  const { pixels } = preprocessClipImage(await decodePhoto(photo, { maxPixels }), encoder.cfg.imageSize);
  const tokens = tf.tidy(() => {
    const features = encoder.forward(pixels);
    return tf.concat([adapter.negativeTokens(encoder), adapter.imageTokens(features)]) as tf.Tensor3D;
  });
  pixels.dispose();
  return { tokens, scale };
}
