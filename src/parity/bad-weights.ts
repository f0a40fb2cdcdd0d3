/**
 * bad-weights fixtures: hostile and broken weight files. A case passes iff opening the file (and reading every
 * tensor, should it open) throws a WeightsError, and the marker file the evil pickles would create is absent.
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { openWeights } from '../weights/open.js';
import { WeightsError } from '../weights/types.js';
import type { CaseResult, KindRunner } from './types.js';

/** Created by the evil pickles' payload (`touch ...`) if anything ever executed them. */
export const PWNED_MARKER = '/tmp/sd-fixture-pwned-public';

interface Cases {
  readonly cases: readonly { readonly file: string; readonly why: string }[];
}

export const run: KindRunner = async (dir) => {
  const { cases } = JSON.parse(readFileSync(join(dir, 'cases.json'), 'utf-8')) as Cases;
  return cases.map(({ file, why }) => runCase(join(dir, file), file, why));
};

function runCase(path: string, file: string, why: string): CaseResult {
  const result = (passed: boolean, detail: string): CaseResult => ({ kind: 'bad-weights', name: file, passed, detail });
  if (existsSync(PWNED_MARKER)) return result(false, `${PWNED_MARKER} exists before the case ran; remove it and run again`);
  const outcome = openAndReadAll(path);
  if (existsSync(PWNED_MARKER)) return result(false, `${PWNED_MARKER} was created: something in the file was executed`);
  if (outcome === null) return result(false, `accepted, but it must be refused (${why})`);
  if (!(outcome instanceof WeightsError)) return result(false, `threw ${outcome.name}, not WeightsError: ${outcome.message}`);
  return result(true, outcome.message);
}

/** The error opening or reading threw, or null when the whole file was read without one. */
function openAndReadAll(path: string): Error | null {
  try {
    const src = openWeights(path);
    try {
      for (const k of src.keys()) src.bytes(k);
    } finally {
      src.close();
    }
    return null;
  } catch (e) {
    return e instanceof Error ? e : new Error(String(e));
  }
}
