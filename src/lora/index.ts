/**
 * LoRA: low-rank weight deltas applied to a loaded SD 1.x model. Files (format.ts: kohya-ss / A1111, diffusers /
 * PEFT) -> modules named as the trainer's model named them -> the checkpoint weights they change (keys.ts) ->
 * a TensorSource that serves the merged weights (source.ts, merge.ts). Prompt tags (tags.ts) and a LoRA folder
 * (resolve.ts) say which LoRAs a request wants.
 */
export { readLora, parseLora } from './format.js';
export { kohyaName, peftName, loraTargets, sdxlEvidence, type LoraTarget } from './keys.js';
export { addLoraDelta, misfit } from './merge.js';
export { bindLora, bindLoras, readLoras, withLoraFiles, withLoras, type BoundModule } from './source.js';
export { extractLoraTags, type ExtraNetworkTag, type LoraTag, type PromptTags } from './tags.js';
export { LORA_EXTENSIONS, resolveLora } from './resolve.js';
export { LoraError } from './types.js';
export type { AppliedLora, LoraFile, LoraFormat, LoraModule, LoraNetwork, LoraSpec, LoraTensor } from './types.js';
