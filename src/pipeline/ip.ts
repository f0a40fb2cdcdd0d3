/**
 * The IP-Adapter of a generation: adapter files and image encoders loaded once and kept by the model (IpAdapterCache),
 * and per request the image token set for the UNet's cross-attention (ip-adapter/tokens.ts):
 *
 *   photo --CLIPImageProcessor, CLIP vision encoder, image_proj--> [negative; photo] tokens [2, M, C], the scale
 *   guidance on, one batch [uncond, cond]: both rows; A1111 prompts of different lengths (uncond apart): row 0 goes
 *   with the negative prompt, row 1 with the prompt; guidance off: row 1 alone. A prompt of n AND parts: row 1
 *   with each part (repeated n times), as the prompt's cond rows.
 *
 * The adapter's key/value projections are attached to the UNet for the request and detached after it, also when it
 * fails or is cancelled (withAdapter), so the next request runs the plain UNet. A streamed UNet (wasm's default)
 * rebuilds its blocks at every use and cannot keep them: the request is refused, naming the backends that can.
 *
 * The image encoder, when not given: `image_encoder/` beside the adapter file, else one folder up, as tencent's
 * h94/IP-Adapter repository lays them out (models/ip-adapter_sd15.safetensors, models/image_encoder/).
 */
import { existsSync, statSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import * as tf from '../backend/tf.js';
import type { ClipVisionEncoder } from '../clip/vision.js';
import { IpAdapter, ipAdapterTokens, loadImageEncoder } from '../ip-adapter/index.js';
import { ConfigError, ShapeError } from '../nn/errors.js';
import { ImageError } from '../image/codec.js';
import { WeightsError } from '../weights/types.js';
import type { ExtraTokens } from '../unet/conditioning.js';
import type { UNet } from '../unet/index.js';
import { ParamError, type ResolvedIpAdapter } from './api.js';
import { partWeights, type GuidedConditioning } from './conditioning.js';

/** Where an adapter's image encoder is looked for when none is given, in order. */
export function imageEncoderCandidates(adapterPath: string): string[] {
  const dir = dirname(resolve(adapterPath));
  return [join(dir, 'image_encoder'), join(dir, '..', 'image_encoder'), join(dir, '..', 'models', 'image_encoder')];
}

const isEncoderDir = (d: string) => existsSync(join(d, 'config.json')) && statSync(d).isDirectory();

/** Turns a loading failure into a ParamError on `field` (the server answers 400 with it). */
function asParamError(field: string, e: unknown): unknown {
  return e instanceof ConfigError || e instanceof ShapeError || e instanceof WeightsError || e instanceof ImageError || e instanceof SyntaxError
    ? new ParamError(field, e.message)
    : e;
}

export class IpAdapterCache {
  private readonly adapters = new Map<string, IpAdapter>();
  private readonly encoders = new Map<string, ClipVisionEncoder>();

  adapter(path: string): IpAdapter {
    const key = resolve(path);
    const cached = this.adapters.get(key);
    if (cached !== undefined) return cached;
    if (!existsSync(key)) throw new ParamError('ipAdapter.model', `${path}: no such file`);
    let a: IpAdapter;
    try {
      a = IpAdapter.open(key);
    } catch (e) {
      throw asParamError('ipAdapter.model', e);
    }
    this.adapters.set(key, a);
    return a;
  }

  /** The encoder in `dir`, or (null) the first found beside the adapter. */
  encoder(dir: string | null, adapterPath: string): ClipVisionEncoder {
    const field = 'ipAdapter.imageEncoder';
    let found: string | undefined;
    if (dir !== null) {
      if (!existsSync(dir) || !isEncoderDir(dir)) throw new ParamError(field, `${dir}: not an image encoder folder (config.json and model.safetensors, transformers' CLIPVisionModelWithProjection)`);
      found = dir;
    } else {
      const tried = imageEncoderCandidates(adapterPath);
      found = tried.find(isEncoderDir);
      if (found === undefined) throw new ParamError(field, `no image encoder given, and none beside the adapter (looked in ${tried.join(', ')}): give its image_encoder/ folder`);
    }
    const key = resolve(found);
    const cached = this.encoders.get(key);
    if (cached !== undefined) return cached;
    let enc: ClipVisionEncoder;
    try {
      enc = loadImageEncoder(key);
    } catch (e) {
      throw asParamError(field, e);
    }
    this.encoders.set(key, enc);
    return enc;
  }

  get size(): { readonly adapters: number; readonly encoders: number } {
    return { adapters: this.adapters.size, encoders: this.encoders.size };
  }

  dispose(): void {
    for (const a of this.adapters.values()) a.dispose();
    for (const e of this.encoders.values()) e.dispose();
    this.adapters.clear();
    this.encoders.clear();
  }
}

/** The adapter of a request and its image tokens [2, M, C] (negative, photo); the tokens are the caller's to dispose. */
export async function ipTokensFor(
  r: ResolvedIpAdapter,
  photo: Uint8Array,
  cache: IpAdapterCache,
  unet: UNet,
  o: { readonly maxPixels?: number } = {},
): Promise<{ readonly adapter: IpAdapter; readonly tokens: ExtraTokens }> {
  if (unet.residency === 'streamed') {
    throw new ParamError('ipAdapter', "needs the UNet's weights resident, and this backend streams them (wasm): use the tensorflow or cpu backend for IP-Adapter");
  }
  const adapter = cache.adapter(r.model);
  const encoder = cache.encoder(r.imageEncoder, r.model);
  try {
    return { adapter, tokens: await ipAdapterTokens(adapter, encoder, photo, r.scale, { maxPixels: o.maxPixels }) };
  } catch (e) {
    throw asParamError('ipAdapter.image', e);
  }
}

/**
 * The conditioning with the image tokens joined to it as the guidance batch needs (see the header). Returns new
 * conditioning objects; the tensors of `cond` are shared, the token slices are new (free them with the result's
 * `dispose`, never disposeGuided, which would free the text too).
 */
export function withImageTokens(cond: GuidedConditioning, t: ExtraTokens, guidance: boolean): { readonly cond: GuidedConditioning; dispose(): void } {
  const [b, m, c] = t.tokens.shape;
  const row = (i: number) => tf.slice(t.tokens, [i, 0, 0], [1, m, c]) as tf.Tensor3D;
  if (b !== 2) throw new ShapeError(`IP-Adapter tokens: expected [2, M, C] (negative, photo), got [${t.tokens.shape}]`);
  const n = partWeights(cond).length;
  // the photo's row for each of the n parts: [n, M, C]
  const photoRows = () => (n === 1 ? row(1) : (tf.tidy(() => tf.tile(row(1), [n, 1, 1])) as tf.Tensor3D));
  if (!guidance) {
    const photo = photoRows();
    return { cond: { ...cond, extraTokens: [{ tokens: photo, scale: t.scale }] }, dispose: () => photo.dispose() };
  }
  if (cond.uncond === undefined && n === 1) return { cond: { ...cond, extraTokens: [t] }, dispose: () => undefined };
  if (cond.uncond === undefined) {
    const rows = tf.tidy(() => tf.concat([row(0), photoRows()]) as tf.Tensor3D); // [1 + n, M, C]
    return { cond: { ...cond, extraTokens: [{ tokens: rows, scale: t.scale }] }, dispose: () => rows.dispose() };
  }
  const [negative, photo] = [row(0), photoRows()];
  return {
    cond: { ...cond, extraTokens: [{ tokens: photo, scale: t.scale }], uncond: { ...cond.uncond, extraTokens: [{ tokens: negative, scale: t.scale }] } },
    dispose: () => tf.dispose([negative, photo]),
  };
}

/** Runs `fn` with the adapter attached to the UNet, detached afterwards whatever happens. */
export async function withAdapter<T>(adapter: IpAdapter | null, unet: UNet, fn: () => Promise<T>): Promise<T> {
  if (adapter === null) return fn();
  adapter.attach(unet);
  try {
    return await fn();
  } finally {
    adapter.detach();
  }
}
