/** The SD 1.x UNet: config, loader and forward pass. See unet.ts for the architecture. */
export { SD15_UNET, UNetError, unetConfigFromLdm, unetBlockPlan, validateConfig } from './config.js';
export type { LdmUNetParams, UNetConfig, UNetBlockPlan } from './config.js';
export { UNet, expectedShapes, type UNetLoadOptions } from './unet.js';
export { timestepEmbedding } from './timestep.js';
