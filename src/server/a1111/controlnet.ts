/**
 * The sd-webui-controlnet extension's side of A1111's API (Mikubill/sd-webui-controlnet v1.1.455,
 * internal_controlnet/args.py ControlNetUnit): `alwayson_scripts.controlnet.args`, one object per unit, read into
 * this server's ControlNet units.
 *
 *   enabled           false: skipped. Absent: run (the extension's default until v1.1.447; webuiapi sends none)
 *   image             base64 (a data: URL too), {image, mask}, [image, mask] or [{image, mask}, ...]: the first image;
 *                     `input_image` is its old name. None in img2img: the init image, as the extension does
 *   module            canny | none | invert ("invert (from white bg & black line)"); an IP-Adapter preprocessor
 *                     (ip-adapter_clip_sd15 = ip-adapter_clip_h, ip-adapter_clip_sdxl_plus_vith, ip-adapter-auto):
 *                     the unit is the request's IP-Adapter, its model in --ip-adapter-dir, weight its scale, the
 *                     window the whole run (one such unit; the image encoder is the server's); any other: 422
 *   model             "control_v11p_sd15_canny [d14c016b]": the hash dropped, the name looked up in --controlnet-dir
 *                     (failing an exact name, the shortest one containing it, as the extension finds "canny")
 *   weight            0..2 (the extension's range); guidance_start, guidance_end 0..1, start <= end
 *                     (`guidance` is guidance_end's old name)
 *   threshold_a, _b   canny's low and high; outside 1..255 (-1: unset) canny's defaults 100 and 200, as the extension
 *   resize_mode       "Just Resize" (0), "Crop and Resize" (1, default; centre crop to the output's aspect),
 *                     "Resize and Fill" (2): the same as Just Resize when the aspects agree, else 422
 *   control_mode      "Balanced" (0) only; "My prompt is more important" / "ControlNet is more important": 422
 *   processor_res, pixel_perfect, low_vram / lowvram, save_detected_map, hr_option: read and ignored (canny runs
 *                     on the image at the output size, which is what pixel_perfect asks for)
 * A unit's mask is not used by canny, none or invert (the extension only feeds it to inpaint and IP-Adapter
 * preprocessors) and is ignored.
 */
import sharp from 'sharp';
import type { ControlNetParams, ControlPreprocess, IpAdapterParams } from '../../pipeline/api.js';
import { resolveModel, type ModelDirs } from '../models-dir.js';
import { asBody, checkNumber, invalid, type Body } from './fields.js';

export type ControlModule = 'canny' | 'none' | 'invert' | 'ip-adapter';
export type ResizeMode = 'Just Resize' | 'Crop and Resize' | 'Resize and Fill';

/** One enabled unit of a request, its model found and its image still as sent. */
export interface A1111ControlUnit {
  /** Where it was in `args`, for messages. */
  readonly field: string;
  readonly module: ControlModule;
  /** The model as the request named it, without its hash. */
  readonly modelName: string;
  readonly modelPath: string;
  /** base64 as sent; null: the request's init image. */
  readonly image: string | null;
  readonly weight: number;
  readonly start: number;
  readonly end: number;
  readonly low: number;
  readonly high: number;
  readonly resizeMode: ResizeMode;
}

/** The preprocessors this server runs, by every name the extension gives them (`name` and UI label). */
const MODULES: Readonly<Record<string, ControlModule>> = Object.freeze({
  canny: 'canny',
  none: 'none',
  invert: 'invert',
  'invert (from white bg & black line)': 'invert',
  // The CLIP ViT-H/14 image encoder's preprocessors (scripts/preprocessor/legacy/preprocessor_compiled.py, ipadapter/presets.py).
  'ip-adapter_clip_sd15': 'ip-adapter',
  'ip-adapter_clip_h': 'ip-adapter',
  'ip-adapter_clip_sdxl_plus_vith': 'ip-adapter',
  'ip-adapter-auto': 'ip-adapter',
});

/** scripts/enums.py ResizeMode, its int_value() and the aliases of resize_mode_from_value. */
const RESIZE_MODES: Readonly<Record<string, ResizeMode>> = Object.freeze({
  'just resize': 'Just Resize',
  '0': 'Just Resize',
  'crop and resize': 'Crop and Resize',
  '1': 'Crop and Resize',
  'inner fit (scale to fit)': 'Crop and Resize',
  'scale to fit (inner fit)': 'Crop and Resize',
  'resize and fill': 'Resize and Fill',
  '2': 'Resize and Fill',
  'outer fit (shrink to fit)': 'Resize and Fill',
  'envelope (outer fit)': 'Resize and Fill',
});

/** The canny preprocessor's sliders (scripts/preprocessor/model_free_preprocessors.py PreprocessorCanny). */
export const CANNY_SLIDERS = Object.freeze({ low: { value: 100, min: 1, max: 255 }, high: { value: 200, min: 1, max: 255 } });
/** The extension's field limits (ControlNetUnit: weight ge=0 le=2). */
const MAX_WEIGHT = 2;
/** Units one request may run (the extension's default control_net_unit_count is 3). */
export const MAX_UNITS = 4;

/** "control_v11p_sd15_canny [d14c016b]" -> "control_v11p_sd15_canny" (the extension lists models with A1111's short hash). */
export const withoutHash = (model: string): string => model.replace(/\s*\[[0-9a-fA-F]{6,64}\]\s*$/, '').trim();

/** The script's entry, named as A1111 names scripts (case-insensitive title). */
export function controlNetScript(scripts: Body): { key: string; body: Body } | null {
  const key = Object.keys(scripts).find((k) => k.toLowerCase() === 'controlnet');
  return key === undefined ? null : { key, body: asBody(scripts[key] ?? {}, `alwayson_scripts.${key}`) };
}

/**
 * The enabled units of `alwayson_scripts.controlnet` (its `args` list), models resolved in the server's
 * --controlnet-dir; every refusal is a 422 naming the unit's field.
 */
export function parseControlNetArgs(script: { key: string; body: Body }, dirs: ModelDirs, img2img: boolean): A1111ControlUnit[] {
  const at = `alwayson_scripts.${script.key}.args`;
  const args = script.body.args ?? [];
  if (!Array.isArray(args)) throw invalid(at, 'must be a list of ControlNet units (objects)');
  const units: A1111ControlUnit[] = [];
  for (const [i, raw] of args.entries()) {
    if (raw === null || raw === undefined) continue;
    if (typeof raw !== 'object' || Array.isArray(raw)) throw invalid(`${at}[${i}]`, 'must be a ControlNet unit (an object); positional script args are not read');
    const unit = parseUnit(raw as Body, `${at}[${i}]`, dirs, img2img);
    if (unit !== null) units.push(unit);
  }
  if (units.length > MAX_UNITS) throw invalid(at, `${units.length} enabled units, over this server's limit of ${MAX_UNITS}`);
  const ip = units.filter((u) => u.module === 'ip-adapter');
  if (ip.length > 1) throw invalid(`${ip[1].field}.module`, 'one IP-Adapter unit per request on this server');
  return units;
}

function parseUnit(u: Body, field: string, dirs: ModelDirs, img2img: boolean): A1111ControlUnit | null {
  const f = (k: string): string => `${field}.${k}`;
  if (u.enabled !== undefined && u.enabled !== null && !flag(u.enabled, f('enabled'))) return null;
  const module = moduleOf(u.module, f('module'));
  const modelName = typeof u.model === 'string' ? withoutHash(u.model) : '';
  if (u.model !== undefined && u.model !== null && typeof u.model !== 'string') throw invalid(f('model'), 'must be a string, a model of GET /controlnet/model_list');
  if (modelName === '' || modelName.toLowerCase() === 'none') throw invalid(f('model'), 'no ControlNet model given; name one of GET /controlnet/model_list');
  const modelPath = resolveModel(module === 'ip-adapter' ? 'ipAdapter' : 'controlnet', dirs, modelName, f('model'), 422, true);
  const image = imageOf(u.image ?? u.input_image, u.image !== undefined && u.image !== null ? f('image') : f('input_image'));
  if (image === null && !img2img) throw invalid(f('image'), 'controlnet is enabled but no input image is given');
  const number = (k: string, fallback: number, min: number, max: number): number =>
    u[k] === undefined || u[k] === null ? fallback : checkNumber(f(k), u[k], { min, max });
  const weight = number('weight', 1, 0, MAX_WEIGHT);
  const start = number('guidance_start', 0, 0, 1);
  const end = u.guidance_end === undefined || u.guidance_end === null ? number('guidance', 1, 0, 1) : number('guidance_end', 1, 0, 1);
  if (start > end) throw invalid(f('guidance_start'), `guidance_start (${start}) > guidance_end (${end})`);
  if (module === 'ip-adapter' && (start !== 0 || end !== 1)) throw invalid(f('guidance_start'), 'an IP-Adapter acts in every step here: send guidance_start 0 and guidance_end 1');
  const slider = (k: string, s: { value: number; min: number; max: number }): number => {
    const v = u[k] === undefined || u[k] === null ? -1 : checkNumber(f(k), u[k]);
    return v < s.min || v > s.max ? s.value : v; // the extension's bound_check_params: out of range is the default
  };
  controlModeOf(u.control_mode, f('control_mode'));
  return {
    field,
    module,
    modelName,
    modelPath,
    image,
    weight,
    start,
    end,
    low: slider('threshold_a', CANNY_SLIDERS.low),
    high: slider('threshold_b', CANNY_SLIDERS.high),
    resizeMode: resizeModeOf(u.resize_mode, f('resize_mode')),
  };
}

function flag(v: unknown, field: string): boolean {
  if (typeof v === 'boolean') return v;
  if (v === 'true' || v === 'false') return v === 'true';
  if (v === 0 || v === 1) return v === 1;
  throw invalid(field, `must be true or false, got ${JSON.stringify(v)}`);
}

function moduleOf(v: unknown, field: string): ControlModule {
  if (v === undefined || v === null) return 'none'; // the extension's default module
  if (typeof v !== 'string') throw invalid(field, 'must be a string');
  const m = MODULES[v.trim().toLowerCase()];
  if (m === undefined) throw invalid(field, `preprocessor ${JSON.stringify(v)} is not available on this server: canny, none, invert or an IP-Adapter's (GET /controlnet/module_list)`);
  return m;
}

/** The first image of whichever shape the extension accepts; null for none (or ""). */
function imageOf(v: unknown, field: string): string | null {
  let first = v;
  if (Array.isArray(first)) first = first.length === 0 ? null : first[0];
  if (first !== null && typeof first === 'object' && !Array.isArray(first)) first = (first as Body).image;
  if (first === undefined || first === null || first === '') return null;
  if (typeof first !== 'string') throw invalid(field, 'must be a base64 image, {image, mask} or a list of them');
  return first;
}

function controlModeOf(v: unknown, field: string): void {
  if (v === undefined || v === null || v === 0 || v === '0' || (typeof v === 'string' && v.trim().toLowerCase() === 'balanced')) return;
  throw invalid(field, `control mode ${JSON.stringify(v)} is not supported by this server: only "Balanced" (0)`);
}

function resizeModeOf(v: unknown, field: string): ResizeMode {
  if (v === undefined || v === null) return 'Crop and Resize'; // ResizeMode.INNER_FIT, the extension's default
  const m = RESIZE_MODES[String(v).trim().toLowerCase()];
  if (m === undefined) throw invalid(field, `${JSON.stringify(v)} is not a resize mode: "Just Resize", "Crop and Resize" or "Resize and Fill" (0, 1, 2)`);
  return m;
}

/**
 * A unit's control image as the engine takes it (resized by it to width x height): cropped to the output's aspect
 * first for "Crop and Resize", inverted for the invert preprocessor. `bytes` have passed the upload checks.
 */
export async function prepareControlImage(bytes: Uint8Array, unit: A1111ControlUnit, width: number, height: number): Promise<Uint8Array> {
  if (unit.module === 'ip-adapter') return bytes; // the photo: CLIP's own preprocessing crops it
  const meta = await sharp(bytes).metadata();
  const sameAspect = meta.width !== undefined && meta.height !== undefined && meta.width * height === meta.height * width;
  if (!sameAspect && unit.resizeMode === 'Resize and Fill') {
    throw invalid(`${unit.field}.resize_mode`, `"Resize and Fill" of a ${meta.width}x${meta.height} image into ${width}x${height} is not supported: send "Crop and Resize" or "Just Resize", or an image of the output's aspect`);
  }
  const crop = !sameAspect && unit.resizeMode === 'Crop and Resize';
  if (!crop && unit.module !== 'invert') return bytes;
  let img = sharp(bytes).removeAlpha();
  if (crop) img = img.resize(width, height, { fit: 'cover', position: 'centre' });
  if (unit.module === 'invert') img = img.negate();
  return new Uint8Array(await img.png().toBuffer());
}

/** The pipeline's IP-Adapter of an ip-adapter unit, `image` its checked bytes. */
export function toIpAdapterParams(unit: A1111ControlUnit, image: Uint8Array, dirs: ModelDirs): IpAdapterParams {
  return { model: unit.modelPath, image, scale: unit.weight, ...(dirs.imageEncoder != null && dirs.imageEncoder !== '' ? { imageEncoder: dirs.imageEncoder } : {}) };
}

/** The pipeline's ControlNet of a unit, `image` its prepared bytes. */
export function toControlNetParams(unit: A1111ControlUnit, image: Uint8Array): ControlNetParams {
  const preprocess: ControlPreprocess = unit.module === 'canny' ? 'canny' : 'none';
  const thresholds = preprocess === 'canny' ? { low: unit.low, high: unit.high } : {};
  return { model: unit.modelPath, image, preprocess, ...thresholds, scale: unit.weight, start: unit.start, end: unit.end };
}
