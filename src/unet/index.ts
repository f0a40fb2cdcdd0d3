/** The denoising UNet: config, blocks, loader, forward pass and its conditioning. See unet.ts for the architecture. */
export { SD15_UNET, headsAt, unetConfigFromLdm, unetBlockPlan, validateConfig } from './config.js';
export { unetConfigFromDiffusers, type DiffusersUNetJson } from './diffusers-config.js';
export type { AttentionSpec, HeadSpec, LdmUNetParams, UNetConfig, UNetBlockPlan } from './config.js';
export { UNet, expectedShapes, type UNetLoadOptions } from './unet.js';
export { concatConditioning, conditioningTensors, disposeConditioning } from './conditioning.js';
export type { Conditioning, ExtraTokens, UNetResiduals } from './conditioning.js';
export { timestepEmbedding } from './timestep.js';
