/**
 * ControlNet: the model (model.ts: the UNet's encoder blocks, the hint encoder, zero convs), its config (config.ts),
 * its files (files.ts, names in keys.ts) and the guidance rules a denoising loop applies (guidance.ts).
 */
export {
  CONTROL_PREFIX, SD15_CONTROLNET, SD_HINT_BLOCK, checkFitsUNet, controlNetConfig, controlNetConfigFromDiffusers, hintBlockPlan, hintDownsample,
  validateControlNetConfig, type ControlNetConfig, type DiffusersControlNetJson, type HintBlockConfig, type HintConvSpec,
} from './config.js';
export { ControlNet, expectedControlNetShapes, type ControlNetLoadOptions } from './model.js';
export { HintEncoder, hintFromEdges, hintFromRgb } from './hint.js';
export { controlNetDiffusersToOriginal, isDiffusersControlNet } from './keys.js';
export { loadControlNet, openControlNet, type ControlNetFormat, type OpenedControlNet } from './files.js';
export {
  addResiduals, checkControlUnit, controlActive, controlResiduals, controlScales, controlledEps, disposeResiduals, type ControlUnit,
} from './guidance.js';
