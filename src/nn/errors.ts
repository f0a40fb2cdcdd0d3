/**
 * The two faults of a model that are not the weight file's (weights/types.ts WeightsError is): each is one type,
 * caught with `instanceof`, whose message names the field or the tensor and says what to do.
 */

/**
 * A tensor's shape is not what it must be: a checkpoint weight that does not fit the config (or tensors missing or
 * extra), or an input to a model or layer of the wrong shape.
 */
export class ShapeError extends Error {
  override name = 'ShapeError';
}

/** A model config (ours or a foreign format being translated) is malformed: the message names the field. */
export class ConfigError extends Error {
  override name = 'ConfigError';
}
