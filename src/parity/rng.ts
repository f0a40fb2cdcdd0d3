/**
 * Parity of the torch-compatible generator (tests/fixtures/rng): for each seed and shape, two torch.randn draws
 * in a row from one generator; each draw is one case, since the second depends on the state the first left.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { TorchGenerator } from '../scheduler/torch-generator.js';
import { SafetensorsFile } from '../weights/safetensors.js';
import { withinTolerance } from './compare.js';
import type { CaseResult, KindRunner } from './types.js';

interface RngCase {
  readonly seed: number;
  readonly shape: number[];
  readonly first: string;
  readonly second: string;
}

interface RngFixture {
  readonly tolerance: number;
  readonly cases: RngCase[];
}

function runCase(c: RngCase, io: SafetensorsFile, tolerance: number): CaseResult[] {
  const name = `seed ${c.seed} [${c.shape.join(',')}]`;
  try {
    const gen = new TorchGenerator(c.seed);
    return (['first', 'second'] as const).map((draw) => {
      const r = withinTolerance(gen.randn(c.shape), io.float32(c[draw]), tolerance);
      return { kind: 'rng', name: `${name} ${draw}`, passed: r.passed, maxRelError: r.maxRelError, tolerance };
    });
  } catch (e) {
    return [{ kind: 'rng', name, passed: false, detail: e instanceof Error ? e.message : String(e) }];
  }
}

export const run: KindRunner = async (dir) => {
  const fixture = JSON.parse(readFileSync(join(dir, 'cases.json'), 'utf8')) as RngFixture;
  const io = SafetensorsFile.open(join(dir, 'randn.safetensors'));
  try {
    return fixture.cases.flatMap((c) => runCase(c, io, fixture.tolerance));
  } finally {
    io.close();
  }
};
