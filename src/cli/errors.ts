/**
 * Errors that are the user's to fix (a missing file, a bad parameter, a refused weight file) print as one line
 * without a stack. Each module throws its own typed error; this is the one place that knows them all by name.
 */
const USER_ERRORS = new Set(['WeightsError', 'BackendError', 'TokenizerError', 'ConfigError', 'ParamError', 'UsageError', 'SetupError', 'DownloadError', 'ImageError', 'HeapError', 'ShapeError', 'SamplerError', 'QueueUrlError', 'S3UrlError', 'WeightsFetchError']);

export function isUserError(e: unknown): boolean {
  return e instanceof Error && USER_ERRORS.has(e.name);
}

/** A command was called wrongly (missing file, conflicting flags). */
export class UsageError extends Error {
  override name = 'UsageError';
}
