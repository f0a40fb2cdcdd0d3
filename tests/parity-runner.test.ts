import { mkdirSync, mkdtempSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { maxRelError } from '../src/parity/compare.js';
import { kindsIn, runParity, summary } from '../src/parity/runner.js';

describe('parity runner', () => {
  it('applies the fixtures rule max|a-e| / max|e|, and NaN fails', () => {
    expect(maxRelError([1, 2, 3], [1, 2, 4])).toBeCloseTo(0.25);
    expect(maxRelError([0, 0], [0, 0])).toBe(0);
    expect(maxRelError([NaN, 1], [1, 1])).toBeNaN();
    expect(() => maxRelError([1], [1, 2])).toThrow(/length mismatch/);
  });

  it('reports a folder of an unknown kind as failed, never skipped, and counts', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'sd-parity-'));
    mkdirSync(join(dir, 'mystery'));
    symlinkSync(resolve('tests/fixtures/tokenizer'), join(dir, 'tokenizer'));
    expect(kindsIn(dir).map((k) => k.kind)).toEqual(['mystery', 'tokenizer']);
    const results = await runParity(dir, { backend: 'cpu' });
    const mystery = results.filter((r) => r.kind === 'mystery');
    expect(mystery).toHaveLength(1);
    expect(mystery[0].passed).toBe(false);
    expect(mystery[0].detail).toMatch(/no runner for fixture kind "mystery"/);
    const tokenizer = results.filter((r) => r.kind === 'tokenizer');
    expect(tokenizer.length).toBeGreaterThan(0);
    expect(tokenizer.every((r) => r.passed)).toBe(true);
    expect(summary(results)).toBe(`${tokenizer.length} passed, 1 failed`);
  });

  it('runs one fixture folder given directly', () => {
    expect(kindsIn('tests/fixtures/rng')).toEqual([{ kind: 'rng', path: 'tests/fixtures/rng' }]);
  });
});
