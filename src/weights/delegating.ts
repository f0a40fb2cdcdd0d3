/**
 * A TensorSource that serves another one's tensors: the base of the sources that change one thing about a file
 * (log its loads, rename its keys, merge LoRAs into some of its weights) and forward everything else.
 */
import { copyInto } from './files.js';
import type { TensorInfo, TensorSource } from './types.js';

export class DelegatingSource implements TensorSource {
  constructor(protected readonly base: TensorSource) {}

  get path(): string {
    return this.base.path;
  }

  keys(): string[] {
    return this.base.keys();
  }

  has(key: string): boolean {
    return this.base.has(key);
  }

  info(key: string): TensorInfo {
    return this.base.info(key);
  }

  bytes(key: string): Uint8Array {
    return this.base.bytes(key);
  }

  /**
   * Reads in place through the base, unless a subclass serves bytes of its own (it overrides `bytes`): then they are
   * copied from there, so that both ways to read a tensor always agree. Such a subclass may override this too.
   */
  bytesInto(key: string, out: Uint8Array): void {
    const base = this.base;
    if (this.bytes === DelegatingSource.prototype.bytes && base.bytesInto !== undefined) return base.bytesInto(key, out);
    copyInto(this.path, key, this.bytes(key), out);
  }

  float32(key: string): Float32Array {
    return this.base.float32(key);
  }

  close(): void {
    this.base.close();
  }
}
