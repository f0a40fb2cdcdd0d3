/**
 * The native `tensorflow` backend: @tensorflow/tfjs-node-gpu, else @tensorflow/tfjs-node.
 * Both are optional dependencies whose own install downloads libtensorflow; `sd setup-native` provides it instead.
 */
export async function loadNative(): Promise<string | null> {
  const reasons: string[] = [];
  for (const pkg of ['@tensorflow/tfjs-node-gpu', '@tensorflow/tfjs-node']) {
    try {
      await import(pkg);
      return null;
    } catch (e) {
      reasons.push(`${pkg}: ${e instanceof Error ? e.message.split('\n')[0] : String(e)}`);
    }
  }
  return `libtensorflow not found; run \`sd setup-native\` (${reasons.join('; ')})`;
}
