// The CLIP, VAE and UNet fixtures on the wasm backend. A process has one backend and the other test files use cpu,
// so this runs the parity command in a child process and reads its report.
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';

const KINDS = ['clip', 'vae', 'unet'];

describe('model fixtures on wasm', () => {
  it('every clip, vae and unet case passes', async () => {
    const args = ['bin/sd.js', 'parity', 'tests/fixtures', ...KINDS.flatMap((k) => ['--kind', k]), '--backend', 'wasm'];
    let stdout: string;
    try {
      ({ stdout } = await promisify(execFile)(process.execPath, args, { maxBuffer: 16 * 2 ** 20 }));
    } catch (e) {
      // A failing case makes the command exit non-zero: show its report rather than only the exit code.
      const out = (e as { stdout?: string; stderr?: string }).stdout ?? '';
      throw new Error(`parity --backend wasm failed:\n${out}\n${(e as { stderr?: string }).stderr ?? String(e)}`, { cause: e });
    }
    const summary = /^(\d+) passed, (\d+) failed$/m.exec(stdout);
    expect(summary, stdout).not.toBeNull();
    const [passed, failed] = [Number(summary?.[1]), Number(summary?.[2])];
    expect(failed, stdout).toBe(0);
    for (const kind of KINDS) expect(stdout, `no ${kind} case ran`).toMatch(new RegExp(`^PASS ${kind}/`, 'm'));
    const listed = stdout.split('\n').filter((l) => /^(PASS|FAIL) /.test(l)).length;
    expect(passed).toBe(listed);
  }, 600_000);
});
