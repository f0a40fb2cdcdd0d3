/**
 * The parity runner's contract: each fixture kind (a folder of ../shared/fixtures) has a runner that
 * reads the folder and returns one result per case. `npm run parity -- DIR` prints them and counts.
 */
import type { BackendName } from '../backend/select.js';

export interface CaseResult {
  /** The fixture kind, i.e. the folder name: tokenizer, rng, samplers, clip, unet, vae, pipeline, bad-weights. */
  readonly kind: string;
  /** One case within the kind, e.g. `euler_a_karras_10` or `text #3`. */
  readonly name: string;
  readonly passed: boolean;
  /** max |actual - expected| / max |expected| over the compared tensor (the fixtures' comparison rule). */
  readonly maxRelError?: number;
  readonly tolerance?: number;
  /** Why it failed, or what was skipped and why. */
  readonly detail?: string;
}

export interface ParityOptions {
  readonly backend: BackendName;
}

/** Runs every case of one fixture folder. Must not throw for a failing case: report it as failed. */
export type KindRunner = (dir: string, opts: ParityOptions) => Promise<CaseResult[]>;
