/**
 * Layers that load their weights again from another source: how a loaded model takes per-request LoRAs without
 * being loaded again (pipeline/lora-switch.ts).
 *
 * A model loaded from `log.source(src)` records, for each Linear and Conv2d weight it reads, how to load that
 * layer's weights again from another TensorSource under the same key: the layer's own load code run again, in the
 * same layout and for the same execution (TensorFlow ops, or the native kernels' packed panels). A reload puts the
 * new weights in use and keeps the old ones as they are; its undo puts the old ones back and frees the new, so the
 * base weights come back bit for bit with nothing repacked.
 *
 * The model files know nothing of this: Linear.load and Conv2d.load record themselves through their WeightView,
 * and only when the view's source is a logged one. A model streamed from a host copy of its weights (residency.ts,
 * wasm's default) builds its layers anew at every use, from that copy: the copy records itself instead, and a reload
 * serves the new values from it in place of the old, which it keeps to put back.
 */
import { DelegatingSource } from '../weights/delegating.js';
import type { TensorSource } from '../weights/types.js';
import type { HostTensors } from './residency.js';

/** Loads a layer's weights again from `src` and puts them in use; returns what puts the previous ones back. */
export type Reload = (src: TensorSource) => () => void;

/** One layer's record: how to reload it, and a copy of the values it computes with now (its weights as held). */
export interface LayerRecord {
  readonly reload: Reload;
  readonly values: () => Float32Array[];
}

export class LayerLog {
  private readonly reloads = new Map<string, LayerRecord[]>();

  /** `src` as models load from it: every Linear and Conv2d weight loaded from it is recorded here. */
  source(src: TensorSource): TensorSource {
    return new LoggedSource(src, this);
  }

  /** Called by the layers as they load. */
  record(key: string, layer: LayerRecord): void {
    const list = this.reloads.get(key) ?? [];
    list.push(layer);
    this.reloads.set(key, list);
  }

  /**
   * A copy of what every recorded layer computes with, by key: its tensors' values, or its packed panels and bias
   * on the native kernels. Two snapshots are equal byte for byte exactly when the layers hold the same weights.
   */
  snapshot(): Map<string, Float32Array[]> {
    return new Map([...this.reloads].map(([key, layers]) => [key, layers.flatMap((l) => l.values())]));
  }

  /**
   * Called by HostTensors.copy: each tensor of `host` can be served anew, except the embedding tables, which a
   * streamed text encoder builds once at load (clip/index.ts) and so would not see served anew; no LoRA changes them.
   */
  recordHost(host: HostTensors): void {
    for (const key of host.keys()) {
      if (/embedding/.test(key)) continue;
      this.record(key, { reload: (src) => host.swap(key, src.float32(key)), values: () => [asFloat32(host.heldBytes(key))] });
    }
  }

  /** Whether some loaded layer (or host copy) holds the weight `key`. */
  has(key: string): boolean {
    return this.reloads.has(key);
  }

  /**
   * Every layer holding `key` loads it again from `src`; the result undoes all of them. A layer that fails leaves
   * the ones before it undone, so either all hold the new weight or all the old.
   */
  reload(key: string, src: TensorSource): () => void {
    const undos: (() => void)[] = [];
    const undoAll = () => {
      for (const undo of undos.splice(0).reverse()) undo();
    };
    try {
      for (const { reload } of this.reloads.get(key) ?? []) undos.push(reload(src));
    } catch (e) {
      undoAll();
      throw e;
    }
    return undoAll;
  }
}

/** Bytes as float32 values for a snapshot, zero-padded to whole values (fp16 tensors of an odd length). */
function asFloat32(bytes: Uint8Array): Float32Array {
  const padded = new Uint8Array(Math.ceil(bytes.length / 4) * 4);
  padded.set(bytes);
  return new Float32Array(padded.buffer);
}

/** A TensorSource whose loads are logged: it serves `base` unchanged. */
export class LoggedSource extends DelegatingSource {
  constructor(
    base: TensorSource,
    readonly log: LayerLog,
  ) {
    super(base);
  }
}
