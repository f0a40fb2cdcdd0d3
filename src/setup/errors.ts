/** The error `sd setup-native` throws for anything the user can fix: a wrong file, a missing tool, a failed build. */
export class SetupError extends Error {
  override name = 'SetupError';
}
