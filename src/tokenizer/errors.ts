/** The tokenizer's one error type: a missing, unreadable or inconsistent vocabulary. Messages name the file and the fix. */
export class TokenizerError extends Error {
  override name = 'TokenizerError';
}
