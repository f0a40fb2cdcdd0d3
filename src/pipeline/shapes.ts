/**
 * Every tensor a full SD 1.x checkpoint holds for the three networks, with its PyTorch shape, under the original
 * single-file key names: the union of what the models read (each model's expectedShapes).
 */
import { SD15_CLIP, expectedShapes as clipShapes, type ClipConfig } from '../clip/index.js';
import { SD15_UNET, expectedShapes as unetShapes, type UNetConfig } from '../unet/index.js';
import { SD15_VAE, expectedShapes as vaeShapes, type VaeConfig } from '../vae/index.js';

export function checkpointShapes(clip: ClipConfig, unet: UNetConfig, vae: VaeConfig): Map<string, number[]> {
  return new Map([...clipShapes(clip), ...unetShapes(unet), ...vaeShapes(vae)]);
}

export const sd15Shapes = (): Map<string, number[]> => checkpointShapes(SD15_CLIP, SD15_UNET, SD15_VAE);
