/**
 * The wasm backend in Node. Multithreading is added in wasm-threads work (BACKENDS.md); until then one thread.
 */
export async function loadWasm(_threads: number | undefined): Promise<void> {
  await import('@tensorflow/tfjs-backend-wasm');
}
