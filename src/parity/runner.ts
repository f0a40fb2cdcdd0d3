/**
 * Runs every fixture kind found in a folder laid out like ../shared/fixtures and counts the results.
 * A folder whose kind has no runner is reported as failed ("not implemented"), never skipped.
 */
import { existsSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import type { CaseResult, KindRunner, ParityOptions } from './types.js';

/** Fixture folder name -> its runner, imported only when that kind runs. */
const RUNNERS: Readonly<Record<string, () => Promise<{ run: KindRunner }>>> = {
  tokenizer: () => import('./tokenizer.js'),
  'bad-weights': () => import('./bad-weights.js'),
  rng: () => import('./rng.js'),
  'rng-philox': () => import('./rng-philox.js'),
  samplers: () => import('./samplers.js'),
  clip: () => import('./clip.js'),
  vae: () => import('./vae.js'),
  unet: () => import('./unet.js'),
  pipeline: () => import('./pipeline.js'),
  canny: () => import('./canny.js'),
  inpaint: () => import('./inpaint.js'),
  controlnet: () => import('./controlnet.js'),
  lora: () => import('./lora.js'),
  sdxl: () => import('./sdxl.js'),
  'prompt-weights': () => import('./prompt-weights.js'),
  'ip-adapter': () => import('./ip-adapter.js'),
};

export const KNOWN_KINDS = Object.keys(RUNNERS);

/** The runner of a kind, or why there is none (a folder of an unknown kind fails, it is never skipped). */
async function runnerFor(kind: string): Promise<KindRunner | string> {
  const load = RUNNERS[kind];
  if (load === undefined) return `no runner for fixture kind "${kind}" (known: ${KNOWN_KINDS.join(', ')})`;
  return (await load()).run;
}

/** The fixture kinds present in dir: its sub-folders, or dir itself when it is one fixture folder. */
export function kindsIn(dir: string): { kind: string; path: string }[] {
  if (!existsSync(dir)) throw new Error(`${dir}: no such folder`);
  const self = dir.replace(/\/+$/, '').split('/').pop() ?? '';
  if (self in RUNNERS) return [{ kind: self, path: dir }];
  return readdirSync(dir)
    .filter((name) => statSync(join(dir, name)).isDirectory())
    .sort()
    .map((name) => ({ kind: name, path: join(dir, name) }));
}

export async function runParity(
  dir: string,
  opts: ParityOptions & { kinds?: readonly string[]; onResult?: (r: CaseResult) => void },
): Promise<CaseResult[]> {
  const results: CaseResult[] = [];
  const report = (r: CaseResult) => {
    results.push(r);
    opts.onResult?.(r);
  };
  for (const { kind, path } of kindsIn(dir)) {
    if (opts.kinds !== undefined && !opts.kinds.includes(kind)) continue;
    const runner = await runnerFor(kind);
    if (typeof runner === 'string') {
      report({ kind, name: '*', passed: false, detail: runner });
      continue;
    }
    try {
      for (const r of await runner(path, opts)) report(r);
    } catch (e) {
      report({ kind, name: '*', passed: false, detail: `runner crashed: ${e instanceof Error ? e.stack : String(e)}` });
    }
  }
  return results;
}

export function formatResult(r: CaseResult): string {
  const status = r.passed ? 'PASS' : 'FAIL';
  const err = r.maxRelError !== undefined ? ` max rel err ${r.maxRelError.toExponential(2)}` : '';
  const tol = r.tolerance !== undefined ? ` (tol ${r.tolerance})` : '';
  const detail = r.detail !== undefined ? ` - ${r.detail}` : '';
  return `${status} ${r.kind}/${r.name}${err}${tol}${detail}`;
}

export function summary(results: readonly CaseResult[]): string {
  const passed = results.filter((r) => r.passed).length;
  return `${passed} passed, ${results.length - passed} failed`;
}
