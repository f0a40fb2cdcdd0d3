/**
 * Parity runner for fixtures/clip: the text encoder on the fixture's random weights against the reference
 * outputs, one case per output (last_hidden_state = clip skip 1, penultimate_hidden_state = clip skip 2),
 * each over the whole batch of prompts. io.safetensors: input_ids I64 [B, 77], both outputs F32 [B, 77, width].
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import * as tf from '../backend/tf.js';
import { initBackend } from '../backend/select.js';
import { ClipTextEncoder, clipConfigFromLdm } from '../clip/index.js';
import { SafetensorsFile } from '../weights/safetensors.js';
import { decodeInt64 } from '../weights/dtypes.js';
import { withinTolerance } from './compare.js';
import type { CaseResult, KindRunner } from './types.js';

const OUTPUTS = [
  { name: 'last_hidden_state', clipSkip: 1 },
  { name: 'penultimate_hidden_state', clipSkip: 2 },
] as const;

export const run: KindRunner = async (dir, opts) => {
  await initBackend({ backend: opts.backend, log: null });
  const fixture = JSON.parse(readFileSync(join(dir, 'fixture.json'), 'utf8')) as { config: unknown; tolerance: number };
  const weights = SafetensorsFile.open(join(dir, 'weights.safetensors'));
  const io = SafetensorsFile.open(join(dir, 'io.safetensors'));
  let encoder: ClipTextEncoder | null = null;
  try {
    encoder = ClipTextEncoder.load(weights, clipConfigFromLdm(fixture.config));
    const [b, n] = io.info('input_ids').shape;
    const ids = tf.tensor2d(Int32Array.from(decodeInt64(io.bytes('input_ids'))), [b, n], 'int32');
    const results: CaseResult[] = [];
    for (const { name, clipSkip } of OUTPUTS) {
      const { hidden, penultimate } = encoder.forward(ids, { clipSkip });
      const r = withinTolerance(hidden.dataSync(), io.float32(name), fixture.tolerance);
      tf.dispose([hidden, penultimate]);
      results.push({ kind: 'clip', name, passed: r.passed, maxRelError: r.maxRelError, tolerance: fixture.tolerance });
    }
    ids.dispose();
    return results;
  } catch (e) {
    return [{ kind: 'clip', name: '*', passed: false, detail: e instanceof Error ? e.message : String(e) }];
  } finally {
    encoder?.dispose();
    weights.close();
    io.close();
  }
};
