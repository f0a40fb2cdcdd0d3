/**
 * The wasm backend on several threads: a conv2d -> matMul -> softmax chain gives bit-identical outputs with
 * 2 threads and with 1 thread, agrees with the pure-JS cpu backend, its Slice kernel (ours) copies exactly what
 * the cpu backend's does, and each child process exits by itself
 * (pthread workers must not keep Node alive). Each run is its own child process: one backend per process.
 */
import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { maxRelError } from '../src/parity/compare.js';

const CHILD = fileURLToPath(new URL('./backend-child.ts', import.meta.url));

interface ChildResult {
  backend: string;
  threads: number | null;
  output: string;
  slices: string;
}

function runChild(backend: string, threads?: number): Promise<ChildResult> {
  const args = ['--import', 'tsx', CHILD, backend, ...(threads !== undefined ? [String(threads)] : [])];
  return new Promise((resolve, reject) => {
    execFile(process.execPath, args, { timeout: 300_000, env: { ...process.env, SD_BACKEND: '', SD_THREADS: '' } }, (err, stdout, stderr) => {
      if (err !== null) {
        const how = err.killed ? 'did not exit by itself (killed at the timeout)' : `failed (${err.message})`;
        reject(new Error(`child ${backend} threads=${threads ?? 'default'} ${how}\n${stderr}`));
        return;
      }
      resolve(JSON.parse(stdout.trim().split('\n').pop() ?? '') as ChildResult);
    });
  });
}

const floats = (b64: string) => new Float32Array(new Uint8Array(Buffer.from(b64, 'base64')).buffer);

describe('wasm backend threads', () => {
  it('2 threads give the same bits as 1 thread, and match the cpu backend', async () => {
    const [one, two, cpu] = await Promise.all([runChild('wasm', 1), runChild('wasm', 2), runChild('cpu')]);
    expect(one.backend).toBe('wasm');
    expect(two.backend).toBe('wasm');
    expect(one.threads).toBe(1);
    expect(two.threads).toBe(2);
    const a = floats(one.output);
    const b = floats(two.output);
    const e = floats(cpu.output);
    expect(a.length).toBe(1024 * 64);
    expect(b.length).toBe(a.length);
    const firstDiff = a.findIndex((v, i) => !Object.is(v, b[i]));
    expect(firstDiff, `first differing element ${firstDiff}: ${a[firstDiff]} vs ${b[firstDiff]}`).toBe(-1);
    expect(e.some((v) => v !== 0)).toBe(true);
    expect(maxRelError(a, e)).toBeLessThan(1e-4); // the fixtures' rule: max|a - e| / max|e|

    // Slices are copies: wasm's own Slice kernel must give exactly the cpu backend's values.
    const [s1, s2, sc] = [floats(one.slices), floats(two.slices), floats(cpu.slices)];
    expect(sc.length).toBe(140 + 168 + 48 + 1 + 0 + 9 + 12 + 18);
    expect(Array.from(s1)).toEqual(Array.from(sc));
    expect(Array.from(s2)).toEqual(Array.from(sc));
  });
});
