/**
 * Parity for the `sdxl` fixture kind: a folder of parts (tokenizer/, text_encoders/, unet/, vae/, pipeline/),
 * each run by its own runner below. A part with no runner yet is one failed result, never skipped.
 *
 * tokenizer/      cases.json: every text through tokenizer 1 (`ids`, padded with 49407) and tokenizer 2 (`ids_2`,
 *                 padded with 0 as open_clip.tokenize does), exact. The vocabulary is the kind's sibling
 *                 `../tokenizer/` folder. `ids_2_diffusers` (diffusers' `!` handling) is not followed.
 * text_encoders/  fixture.json + io.safetensors: both encoders on the pipeline's single file, from the stored ids
 *                 (each output) and from the prompts (tokenizers + SdxlTextEncoder: ids, context, text_embeds).
 * unet/, vae/     sdxl-networks.ts; pipeline/: sdxl-pipeline.ts.
 */
import { existsSync, readFileSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import * as tf from '../backend/tf.js';
import { initBackend } from '../backend/select.js';
import { ClipTextEncoder, clipConfigFromLdm } from '../clip/index.js';
import { loadOpenClipText } from '../clip/open-clip.js';
import { SdxlTextEncoder } from '../clip/sdxl-text.js';
import { ClipTokenizer, OPEN_CLIP_PAD_ID } from '../tokenizer/index.js';
import { decodeInt64 } from '../weights/dtypes.js';
import { SafetensorsFile } from '../weights/safetensors.js';
import type { TensorSource } from '../weights/types.js';
import { withinTolerance } from './compare.js';
import { runUnet, runVae } from './sdxl-networks.js';
import { runPipeline } from './sdxl-pipeline.js';
import type { CaseResult, KindRunner, ParityOptions } from './types.js';

const KIND = 'sdxl';

type PartRunner = (dir: string, opts: ParityOptions) => Promise<CaseResult[]>;

const failed = (name: string, e: unknown): CaseResult => ({
  kind: KIND,
  name,
  passed: false,
  detail: e instanceof Error ? e.message : String(e),
});

/** Where two id lists first differ, or null when they are equal. */
function firstDifference(got: readonly number[], want: readonly number[]): string | null {
  const n = Math.max(got.length, want.length);
  for (let i = 0; i < n; i++) {
    if (got[i] !== want[i]) return `at ${i}: got ${got[i] ?? '(end)'}, expected ${want[i] ?? '(end)'}`;
  }
  return null;
}

function idsResult(name: string, got: readonly number[], want: readonly number[]): CaseResult {
  const diff = firstDifference(got, want);
  if (diff === null) return { kind: KIND, name, passed: true, maxRelError: 0 };
  return { kind: KIND, name, passed: false, maxRelError: 1, detail: diff };
}

/** The CLIP vocabulary the sdxl fixtures use: the `tokenizer/` folder beside the kind's folder. */
function vocabularyOf(partDir: string): ClipTokenizer {
  return ClipTokenizer.fromFile(join(partDir, '..', '..', 'tokenizer'));
}

interface TokenizerCase {
  readonly text: string;
  readonly ids: readonly number[];
  readonly ids_2: readonly number[];
}

const runTokenizer: PartRunner = async (dir) => {
  const { cases } = JSON.parse(readFileSync(join(dir, 'cases.json'), 'utf8')) as { cases: TokenizerCase[] };
  let tok: ClipTokenizer;
  try {
    tok = vocabularyOf(dir);
  } catch (e) {
    return [failed('tokenizer/*', e)];
  }
  return cases.flatMap((c, i) => {
    const chars = Array.from(c.text);
    const name = `tokenizer #${i} ${JSON.stringify(chars.length > 24 ? `${chars.slice(0, 24).join('')}…` : c.text)}`;
    return [
      idsResult(`${name} ids`, tok.encode(c.text), c.ids),
      idsResult(`${name} ids_2`, tok.encode(c.text, { padId: OPEN_CLIP_PAD_ID }), c.ids_2),
    ];
  });
};

interface TextEncodersFixture {
  readonly weights: string;
  readonly config: { readonly text_encoder: { prefix: string }; readonly text_encoder_2: { prefix: string } };
  readonly prompts: readonly string[];
  readonly tolerance: number;
}

function int32Ids(io: TensorSource, key: string): tf.Tensor2D {
  const [b, n] = io.info(key).shape;
  return tf.tensor2d(Int32Array.from(decodeInt64(io.bytes(key))), [b, n], 'int32');
}

const runTextEncoders: PartRunner = async (dir, opts) => {
  await initBackend({ backend: opts.backend, log: null });
  const fixture = JSON.parse(readFileSync(join(dir, 'fixture.json'), 'utf8')) as TextEncodersFixture;
  const tol = fixture.tolerance;
  const prefix = (p: string) => p.replace(/\.$/, '');
  const weights = SafetensorsFile.open(join(dir, fixture.weights));
  const io = SafetensorsFile.open(join(dir, 'io.safetensors'));
  let clipL: ClipTextEncoder | null = null;
  let clipG: ClipTextEncoder | null = null;
  const results: CaseResult[] = [];
  const compare = (name: string, t: tf.Tensor, key: string) => {
    const r = withinTolerance(t.dataSync(), io.float32(key), tol);
    results.push({ kind: KIND, name: `text_encoders/${name}`, passed: r.passed, maxRelError: r.maxRelError, tolerance: tol });
  };
  try {
    clipL = ClipTextEncoder.load(weights, clipConfigFromLdm(fixture.config.text_encoder), prefix(fixture.config.text_encoder.prefix));
    clipG = loadOpenClipText(weights, clipConfigFromLdm(fixture.config.text_encoder_2), prefix(fixture.config.text_encoder_2.prefix));
    const idsL = int32Ids(io, 'input_ids');
    const idsG = int32Ids(io, 'input_ids_2');
    const l = clipL.forward(idsL);
    const g = clipG.forward(idsG, { pooled: true });
    compare('text_encoder_hidden_states_penultimate', l.penultimate, 'text_encoder_hidden_states_penultimate');
    compare('text_encoder_last_hidden_state', l.hidden, 'text_encoder_last_hidden_state');
    compare('text_encoder_2_hidden_states_penultimate', g.penultimate, 'text_encoder_2_hidden_states_penultimate');
    compare('text_encoder_2_last_hidden_state', g.hidden, 'text_encoder_2_last_hidden_state');
    compare('text_encoder_2_pooled_unprojected', g.pooled as tf.Tensor2D, 'text_encoder_2_pooled_unprojected');
    compare('text_embeds', g.projected as tf.Tensor2D, 'text_embeds');
    tf.dispose([idsL, idsG, l.hidden, l.penultimate, g.hidden, g.penultimate, g.pooled as tf.Tensor2D, g.projected as tf.Tensor2D]);

    // From the prompts: both tokenizers, then the conditioning SDXL feeds the UNet.
    const text = new SdxlTextEncoder(vocabularyOf(dir), clipL, clipG);
    const [wantL, wantG] = [decodeInt64(io.bytes('input_ids')), decodeInt64(io.bytes('input_ids_2'))];
    const [gotL, gotG] = text.tokenize(fixture.prompts);
    results.push(idsResult('text_encoders/prompts -> input_ids', gotL.flat(), wantL));
    results.push(idsResult('text_encoders/prompts -> input_ids_2', gotG.flat(), wantG));
    const { context, pooled } = text.encode(fixture.prompts);
    compare('prompts -> context', context, 'context');
    compare('prompts -> text_embeds', pooled, 'text_embeds');
    tf.dispose([context, pooled]);
    return results;
  } catch (e) {
    return [...results, failed('text_encoders/*', e)];
  } finally {
    clipL?.dispose();
    clipG?.dispose();
    weights.close();
    io.close();
  }
};

/** The parts this project runs so far, by sub-folder name. */
export const PARTS: Readonly<Record<string, PartRunner>> = { tokenizer: runTokenizer, text_encoders: runTextEncoders, unet: runUnet, vae: runVae, pipeline: runPipeline };

/** One part of an sdxl fixture folder (`dir` is the sdxl folder); an unknown part is one failed result. */
export async function runPart(dir: string, part: string, opts: ParityOptions): Promise<CaseResult[]> {
  const runner = PARTS[part];
  if (runner === undefined) return [{ kind: KIND, name: part, passed: false, detail: 'not implemented yet' }];
  try {
    return await runner(join(dir, part), opts);
  } catch (e) {
    return [failed(`${part}/*`, e)];
  }
}

export const run: KindRunner = async (dir, opts) => {
  if (!existsSync(dir)) throw new Error(`${dir}: no such folder`);
  const parts = readdirSync(dir).filter((name) => statSync(join(dir, name)).isDirectory()).sort();
  const results: CaseResult[] = [];
  for (const part of parts) results.push(...(await runPart(dir, part, opts)));
  return results;
};
