/**
 * What a LoRA is once read, whatever file format it came in (format.ts): low-rank deltas for some of a model's
 * weights, each `W' = W + m * scale * up @ down`, with m the text-encoder or UNet multiplier of the request
 * (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3; kohya-ss `merge_to`).
 *
 *   down  [r, in] (Linear) or [r, in, kh, kw] (Conv2d: the target's kernel, stride and padding)
 *   up    [out, r] or [out, r, 1, 1]
 *
 * Modules keep the names their file gives them; keys.ts says which checkpoint weight each one changes.
 */
import { WeightsError } from '../weights/types.js';

/** Which multiplier scales a module: the text encoder's (`te`) or the UNet's (`unet`). */
export type LoraNetwork = 'te' | 'unet';

/** How the file names its modules and stores its scale. */
export type LoraFormat = 'kohya' | 'peft';

/** One tensor of a LoRA, decoded to float32, row-major in its PyTorch shape. */
export interface LoraTensor {
  readonly shape: readonly number[];
  readonly data: Float32Array;
}

export interface LoraModule {
  /** The module as the file names it (a kohya stem `lora_unet_...`, or a PEFT path `unet.down_blocks...`). */
  readonly name: string;
  /** The name keys.ts looks up: the kohya stem, or the PEFT path with its `unet.` / `text_encoder.` prefix. */
  readonly id: string;
  readonly network: LoraNetwork;
  readonly down: LoraTensor;
  readonly up: LoraTensor;
  /** alpha / r (kohya: the module's `.alpha`, r when absent; PEFT: lora_alpha / r from the file's metadata, else 1). */
  readonly scale: number;
}

export interface LoraFile {
  readonly path: string;
  /** The file name without its extension: the name `<lora:NAME:...>` tags use. */
  readonly name: string;
  readonly format: LoraFormat;
  /** Why the file's names say it was trained for SDXL, or null: such a LoRA is refused on an SD 1.x model. */
  readonly sdxl: string | null;
  readonly modules: readonly LoraModule[];
  /** The safetensors `__metadata__` (kohya's `ss_*` training settings), empty for other files. */
  readonly metadata: ReadonlyMap<string, string>;
}

/** A LoRA as applied to a model: the file and its two multipliers (A1111 `<lora:name:te:unet>`). */
export interface AppliedLora {
  readonly lora: LoraFile;
  readonly te: number;
  readonly unet: number;
}

/** A LoRA file to apply at load (StableDiffusion.load's `loras`), by path. */
export interface LoraSpec {
  readonly path: string;
  readonly te: number;
  readonly unet: number;
}

/**
 * A LoRA file, tag or name was refused: the message names the file (or tag) and the first key or argument that does
 * not fit. Names in it come from files and prompts, so they arrive escaped (WeightsError's `printable`).
 */
export class LoraError extends WeightsError {
  override name = 'LoraError';
}
