/**
 * What the server needs of a model: generate one request at a time, know its size limits, be freed.
 * The real one is the pipeline's StableDiffusion (loadStableDiffusion); tests of the queue logic pass
 * a fake. The server never touches tensors.
 */
import type { GenerateOptions, GenerateParams, GenerateResult } from '../pipeline/api.js';
import type { ParamLimits } from '../pipeline/params.js';

export interface Engine {
  /** The model's limits (smallest size, default size, clip layers) for validating a request up front. */
  readonly limits: ParamLimits;
  generate(p: GenerateParams, o: GenerateOptions): Promise<GenerateResult>;
  dispose(): void;
}
