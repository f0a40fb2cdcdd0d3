/**
 * A model with LoRAs applied, as a TensorSource: `withLoras(base, loras)` serves each targeted weight as
 * `W + sum m * scale * up @ down` (merge.ts), in float32 (`info` says F32, `bytes` are its float32 bytes), and every
 * other tensor of `base` as it is. The models load from it as from any checkpoint and so compute with the LoRAs;
 * nothing of `base` is written (each merged weight is a fresh copy), so the same base serves other LoRA sets.
 *
 * Binding checks every module of every LoRA before anything is served: an SDXL LoRA, a module that names no
 * weight of the model, or one whose shapes do not fit is refused (LoraError) naming the first such module.
 * Merging runs when a weight is read, once per read; the models read each weight once, at load.
 */
import { DelegatingSource } from '../weights/delegating.js';
import { copyInto } from '../weights/files.js';
import type { TensorInfo, TensorSource } from '../weights/types.js';
import { readLora } from './format.js';
import { loraTargets, sdxlModuleHint } from './keys.js';
import { addLoraDelta, misfit } from './merge.js';
import { LoraError, type AppliedLora, type LoraModule, type LoraSpec } from './types.js';

/** One module bound to the weight it changes, with the multiplier of its network. */
export interface BoundModule {
  readonly target: string;
  readonly module: LoraModule;
  readonly multiplier: number;
}

const SDXL_ON_SD1 = 'this is an SDXL LoRA; the loaded model is SD 1.x';

/** The modules of `lora` on the model `base`, each with its target key; throws LoraError for the first misfit. */
export function bindLora(base: TensorSource, applied: AppliedLora, targets = loraTargets(base.keys())): BoundModule[] {
  const { lora } = applied;
  if (lora.sdxl !== null) throw new LoraError(`${lora.path}: ${SDXL_ON_SD1} (${lora.sdxl})`);
  const seen = new Map<string, string>();
  return lora.modules.map((module) => {
    const target = targets.get(module.id);
    const problem = target === undefined ? `matches no weight of the model (${base.path})` : misfit(module, base.info(target.key).shape);
    if (target === undefined || problem !== null) {
      const hint = sdxlModuleHint(module.id, module.down.shape);
      if (hint !== null) throw new LoraError(`${lora.path}: ${SDXL_ON_SD1} (${hint})`);
      throw new LoraError(`${lora.path}: ${module.name}: ${problem}`);
    }
    const other = seen.get(target.key);
    if (other !== undefined) throw new LoraError(`${lora.path}: ${other} and ${module.name} both change ${target.key}`);
    seen.set(target.key, module.name);
    return { target: target.key, module, multiplier: module.network === 'te' ? applied.te : applied.unet };
  });
}

/** Every module of `loras` bound to `base`, by the key each changes, in the order applied; LoraError as bindLora. */
export function bindLoras(base: TensorSource, loras: readonly AppliedLora[]): Map<string, BoundModule[]> {
  const targets = loraTargets(base.keys());
  const byKey = new Map<string, BoundModule[]>();
  for (const applied of loras) {
    for (const bound of bindLora(base, applied, targets)) {
      const list = byKey.get(bound.target) ?? [];
      list.push(bound);
      byKey.set(bound.target, list);
    }
  }
  return byKey;
}

/** `base` with `loras` merged into the weights they target; `base` itself when there are none. */
export function withLoras(base: TensorSource, loras: readonly AppliedLora[]): TensorSource {
  if (loras.length === 0) return base;
  return new LoraMergedSource(base, loras, bindLoras(base, loras));
}

/** Reads the file of each spec (LoraError naming a file that is not a LoRA). */
export function readLoras(specs: readonly LoraSpec[]): AppliedLora[] {
  return specs.map((s) => ({ lora: readLora(s.path), te: s.te, unet: s.unet }));
}

/** Reads each file of `specs` and applies them to `base` (StableDiffusion.load's `loras`). */
export function withLoraFiles(base: TensorSource, specs: readonly LoraSpec[]): TensorSource {
  return withLoras(base, readLoras(specs));
}

/** `base` with the LoRAs' deltas added to the weights they touch (float32), every other tensor as it was. */
class LoraMergedSource extends DelegatingSource {
  constructor(
    base: TensorSource,
    /** What was applied, in order. */
    readonly loras: readonly AppliedLora[],
    private readonly merged: ReadonlyMap<string, readonly BoundModule[]>,
  ) {
    super(base);
  }

  override info(key: string): TensorInfo {
    const info = this.base.info(key);
    return this.merged.has(key) ? { dtype: 'F32', shape: info.shape } : info;
  }

  override bytes(key: string): Uint8Array {
    if (!this.merged.has(key)) return this.base.bytes(key);
    const w = this.float32(key);
    return new Uint8Array(w.buffer, w.byteOffset, w.byteLength);
  }

  override bytesInto(key: string, out: Uint8Array): void {
    const base = this.base;
    if (this.merged.has(key) || base.bytesInto === undefined) copyInto(this.path, key, this.bytes(key), out);
    else base.bytesInto(key, out);
  }

  override float32(key: string): Float32Array {
    const parts = this.merged.get(key);
    if (parts === undefined) return this.base.float32(key);
    const w = this.base.float32(key).slice(); // a copy: whatever the base hands out stays as it was
    for (const { module, multiplier } of parts) addLoraDelta(w, module, multiplier);
    return w;
  }
}
