/**
 * The native `tensorflow` backend, where `sd setup-native` has run (skipped otherwise, with the reason): a child
 * process starts it through initBackend, tf.getBackend() from src/backend/tf.ts reports 'tensorflow' (one shared
 * tfjs-core), and the conv2d -> matMul -> softmax chain agrees with the pure-JS cpu backend.
 */
import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { packageProblem } from '../src/backend/tfjs-node.js';
import { maxRelError } from '../src/parity/compare.js';

const CHILD = fileURLToPath(new URL('./backend-child.ts', import.meta.url));
const problems = [packageProblem('@tensorflow/tfjs-node-gpu'), packageProblem('@tensorflow/tfjs-node')];
const ready = problems.some((p) => p === null);
if (!ready) console.warn(`skipping the tensorflow backend tests: ${problems.join('; ')}; run \`sd setup-native\``);

interface ChildResult {
  backend: string;
  output: string;
}

function runChild(backend: string): Promise<ChildResult> {
  return new Promise((resolve, reject) => {
    execFile(process.execPath, ['--import', 'tsx', CHILD, backend], { timeout: 300_000, env: { ...process.env, SD_BACKEND: '' } }, (err, stdout, stderr) => {
      if (err !== null) reject(new Error(`child ${backend} failed: ${err.message}\n${stderr}`));
      else resolve(JSON.parse(stdout.trim().split('\n').pop() ?? '') as ChildResult);
    });
  });
}

const floats = (b64: string) => new Float32Array(new Uint8Array(Buffer.from(b64, 'base64')).buffer);

describe.runIf(ready)('tensorflow backend', () => {
  it('starts as the tfjs-core backend and matches the cpu backend', async () => {
    const [native, cpu] = await Promise.all([runChild('tensorflow'), runChild('cpu')]);
    expect(native.backend).toBe('tensorflow');
    const a = floats(native.output);
    const e = floats(cpu.output);
    expect(a.length).toBe(e.length);
    expect(e.some((v) => v !== 0)).toBe(true);
    expect(maxRelError(a, e)).toBeLessThan(1e-4); // the fixtures' rule: max|a - e| / max|e|
  });
});
