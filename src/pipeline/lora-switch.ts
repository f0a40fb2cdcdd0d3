/**
 * Per-request LoRAs on a loaded model (GenerateParams.loras): the model switches to a request's LoRA set and back
 * without loading the checkpoint again, and its base weights come back exactly, bit for bit.
 *
 * How: merged, not applied unmerged. Switching on re-loads only the layers the LoRAs change, through each layer's
 * own load code (nn/reload.ts), from the checkpoint (opened again for the switch) with the LoRAs merged into those
 * weights (lora/source.ts: W' = W + m * scale * up @ down, as a load with the LoRAs computes it). The layers' base
 * weights (tensors, or the native kernels' packed panels) are kept while a set is on; switching off puts them back
 * and frees the merged ones, so nothing is recomputed or repacked and the restore is exact by construction (a UNet
 * streamed from a host copy, wasm's default, is served the merged tensors from that copy instead, the same way). A
 * request with the same set as the one on switches nothing; a request without LoRAs switches off.
 *
 * Why merged: on a full-size SD 1.5 the merge is paid once per switch (the product of each module, about 5 s for a
 * rank-32 LoRA on every attention layer on tensorflow, plus the reload and packing of those layers; bench/lora.ts
 * measures it), while the unmerged form `W x + m * scale * up(down(x))` pays on every layer of every step: for rank
 * 32 that is r (in + out) / (in * out) more multiply-adds on each Linear (20% at 320 channels, 10% at 640, 5% at
 * 1280) and about r / out on each 3x3 conv, most of it at the 64x64 level where a step spends most of its time, and
 * as memory-bound rank-32 products that run well below the kernels' rate. At ~10 s per CFG step on a CPU (README's
 * bench), 10-20% of a 20-step request is 20-40 s against a few seconds of merging, and a server that gets the same
 * LoRA set twice in a row pays nothing the second time. Merging also leaves every forward pass, and the native
 * kernels' fused blocks, exactly as they are. Its cost is memory: the changed layers are held twice while a set is
 * on. Measured (`npm run bench -- --lora-switch`, full-size SD 1.5 fp16, a rank-32 LoCon on all 350 modules, 2-core
 * Intel Xeon, tensorflow + kernels): on 21.1 s, off 0.002 s, RSS 9.7 -> 13.7 GB while on; the unmerged form would add
 * 0.10 TFLOP (6.2%) to each 16.7 s step of that run, at least 1.0 s a step, 20 s over 20 steps, every request.
 *
 * Refusals come before anything changes: an SDXL LoRA, a module that names no weight of the model or does not fit
 * it (LoraError naming the first such module, lora/source.ts), a weight no layer can load again, a checkpoint file
 * changed on disk since the model was loaded.
 * LoRAs given at load (LoadOptions.loras) are part of the base: a request's LoRAs are merged on top of them.
 */
import { statSync } from 'node:fs';
import { resolve } from 'node:path';
import type { LayerLog } from '../nn/reload.js';
import { bindLoras, readLora, withLoras, LoraError, type AppliedLora, type LoraFile, type LoraSpec } from '../lora/index.js';
import type { TensorSource } from '../weights/types.js';

/** A file's identity for "is this still the file I read": its size and modification time. */
function fileStamp(path: string): string {
  const s = statSync(path);
  return s.isDirectory() ? 'folder' : `${s.size}:${s.mtimeMs}`;
}

/** fileStamp of a request's LoRA file; LoraError naming it when there is none. */
function loraStamp(spec: LoraSpec): string {
  if (!Number.isFinite(spec.te) || !Number.isFinite(spec.unet)) {
    throw new LoraError(`${spec.path}: multipliers te ${spec.te}, unet ${spec.unet}: both must be finite numbers`);
  }
  try {
    return fileStamp(spec.path);
  } catch (e) {
    throw new LoraError(`${spec.path}: cannot read the LoRA file (${(e as NodeJS.ErrnoException).code ?? String(e)})`);
  }
}

interface ActiveSet {
  readonly id: string;
  readonly loras: readonly AppliedLora[];
  /** fileStamp of each LoRA file when it was read. */
  readonly stamps: readonly string[];
  /** Puts the base layers back and frees the merged ones. */
  readonly undo: () => void;
}

export class LoraSwitch {
  private active: ActiveSet | null = null;
  /** The last set switched off: its files are not read again when it comes back (LoRAs of 10-300 MB). */
  private recent: ActiveSet | null = null;
  /** Generations running with the active set: another set waits for none of them, it is refused. */
  private users = 0;
  private readonly stamp: string;

  constructor(
    /** The checkpoint the model was loaded from. */
    private readonly weights: string,
    /** Opens it again (as the model was loaded: under the original key names). */
    private readonly open: () => TensorSource,
    /** LoRAs merged at load: part of the base. */
    private readonly fixed: readonly AppliedLora[],
    /** The model's layers, as they recorded themselves at load. */
    private readonly log: LayerLog,
  ) {
    this.stamp = fileStamp(weights);
  }

  /** Whether a request's LoRAs are on now. */
  get on(): boolean {
    return this.active !== null;
  }

  /** The LoRAs of the set that is on (load-time ones not included). */
  get loras(): readonly AppliedLora[] {
    return this.active?.loras ?? [];
  }

  /**
   * Switches to `specs` (nothing to do when they are on already; none: the base weights) and holds them until the
   * returned release is called. A different set while a generation holds one is refused.
   */
  use(specs: readonly LoraSpec[]): () => void {
    const id = JSON.stringify(specs.map((s) => [resolve(s.path), loraStamp(s), s.te, s.unet]));
    const current = this.active?.id ?? '[]';
    if (id !== current) {
      if (this.users > 0) throw new LoraError('another generation is running with other LoRAs on this model; requests with different LoRAs run one at a time');
      this.switchTo(id, specs);
    }
    this.users++;
    let released = false;
    return () => {
      if (!released) this.users--;
      released = true;
    };
  }

  /** A copy of what every Linear and Conv2d of the model computes with, by weight key (nn/reload.ts). */
  snapshot(): Map<string, Float32Array[]> {
    return this.log.snapshot();
  }

  /** Back to the base weights (those loaded, with the load-time LoRAs). */
  restore(): void {
    const active = this.active;
    this.active = null;
    active?.undo();
    if (active !== null) this.recent = active;
  }

  private switchTo(id: string, specs: readonly LoraSpec[]): void {
    if (specs.length === 0) return this.restore();
    const stamps = specs.map(loraStamp);
    const loras = specs.map((s, i) => ({ lora: this.read(s.path, stamps[i]), te: s.te, unet: s.unet }));
    if (fileStamp(this.weights) !== this.stamp) {
      throw new LoraError(`${this.weights}: the checkpoint changed on disk since the model was loaded; load the model again to use LoRAs`);
    }
    const base = this.open();
    try {
      const all = [...this.fixed, ...loras];
      const keys = this.keysToReload(base, all, loras);
      const merged = withLoras(base, all);
      this.restore();
      const undos: (() => void)[] = [];
      const undo = () => {
        for (const u of undos.splice(0).reverse()) u();
      };
      try {
        for (const key of keys) undos.push(this.log.reload(key, merged));
      } catch (e) {
        undo();
        throw e;
      }
      this.active = { id, loras, stamps, undo };
    } finally {
      base.close();
    }
  }

  /** The weights the request's LoRAs change, all held by loaded layers; LoraError for the first that is not. */
  private keysToReload(base: TensorSource, all: readonly AppliedLora[], request: readonly AppliedLora[]): string[] {
    const fileOf = new Map(request.flatMap((a) => a.lora.modules.map((m) => [m, a.lora.path] as const)));
    const keys: string[] = [];
    for (const [key, bound] of bindLoras(base, all)) {
      // a module at multiplier 0 adds nothing (addLoraDelta): the layer holds that weight already
      const own = bound.find((b) => fileOf.has(b.module) && b.multiplier !== 0);
      if (own === undefined) continue; // changed by load-time LoRAs only, or not at all
      if (!this.log.has(key)) {
        const file = fileOf.get(own.module) ?? '';
        throw new LoraError(
          `${file}: ${own.module.name}: ${key} is held by no layer of this model that can load it again, so it cannot change per request: apply the LoRA at load (LoadOptions.loras, sd generate --lora)`,
        );
      }
      keys.push(key);
    }
    return keys;
  }

  /** The LoRA at `path`: as the set on now (or the last one) read it, unless the file changed since; else read. */
  private read(path: string, stamp: string): LoraFile {
    for (const set of [this.active, this.recent]) {
      const i = set?.loras.findIndex((a) => resolve(a.lora.path) === resolve(path)) ?? -1;
      if (set !== null && i >= 0 && set.stamps[i] === stamp) return set.loras[i].lora;
    }
    return readLora(path);
  }
}
