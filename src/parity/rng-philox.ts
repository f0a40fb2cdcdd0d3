/**
 * Parity of the CUDA (Philox) generator (tests/fixtures/rng-philox): per seed, one or more torch.randn draws in a
 * row from one generator, each one case; a later draw is checked too, since it runs at the next Philox offset.
 * Draws go through `createGenerator('gpu', seed)`, the way the pipeline picks its noise source.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createGenerator } from '../scheduler/noise.js';
import { SafetensorsFile } from '../weights/safetensors.js';
import { withinTolerance } from './compare.js';
import type { CaseResult, KindRunner } from './types.js';

interface PhiloxDraw {
  readonly shape: number[];
  readonly tensor: string;
}

interface PhiloxCase {
  readonly seed: number;
  readonly draws: PhiloxDraw[];
}

interface PhiloxFixture {
  readonly tolerance: number;
  readonly cases: PhiloxCase[];
}

const KIND = 'rng-philox';

function runCase(c: PhiloxCase, io: SafetensorsFile, tolerance: number): CaseResult[] {
  const name = `seed ${c.seed}`;
  try {
    const gen = createGenerator('gpu', c.seed);
    return c.draws.map((d, i) => {
      const r = withinTolerance(gen.randn(d.shape), io.float32(d.tensor), tolerance);
      return { kind: KIND, name: `${name} draw ${i} [${d.shape.join(',')}]`, passed: r.passed, maxRelError: r.maxRelError, tolerance };
    });
  } catch (e) {
    return [{ kind: KIND, name, passed: false, detail: e instanceof Error ? e.message : String(e) }];
  }
}

export const run: KindRunner = async (dir) => {
  const fixture = JSON.parse(readFileSync(join(dir, 'cases.json'), 'utf8')) as PhiloxFixture;
  const io = SafetensorsFile.open(join(dir, 'randn.safetensors'));
  try {
    return fixture.cases.flatMap((c) => runCase(c, io, fixture.tolerance));
  } finally {
    io.close();
  }
};
