/**
 * Parity runner for fixtures/prompt-weights: A1111's prompt syntax and weighted, chunked text encoding against
 * A1111's own outputs, on the tiny CLIP of ../clip and the tokenizer of ../tokenizer (both resolved next to the
 * fixture folder, as its config names them). One result per case of cases.json:
 *
 *   parse      parsePromptAttention: texts exact, weights to tolerance.weights; usesPromptEditing vs schedule_unchanged
 *   multicond  splitMulticond: parts and distinct texts exact
 *   encode     parsed, token counts, chunks (ids exact, multipliers to tolerance.weights), then the tensors
 *              NAME_input_ids I64 [k, 77], NAME_multipliers F32 [k, 77], NAME_z and NAME_cond F32 [1, 77k, C]
 *   cfg_pad    cond and uncond of a prompt pair as they are, with 'pad_cond_uncond' and with 'pad_cond_uncond_v0'
 *   and_stack  an AND prompt's parts stacked [parts, 77k, C], and its conds_list
 * Tensors compare by the fixtures' rule with tolerance.cond.
 */
import { readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import * as tf from '../backend/tf.js';
import { initBackend } from '../backend/select.js';
import { ClipTextEncoder, clipConfigFromLdm } from '../clip/index.js';
import {
  encodeA1111Multicond,
  encodeA1111Prompt,
  encodeChunks,
  reconcileCondUncond,
  targetTokenCount,
  tokenizeLine,
  type A1111Options,
  type CondUncondPadding,
  type Emphasis,
} from '../pipeline/a1111-prompt.js';
import { ClipTokenizer } from '../tokenizer/index.js';
import { distinctTexts, parsePromptAttention, splitMulticond, usesPromptEditing, type WeightedText } from '../tokenizer/prompt-syntax.js';
import { decodeInt64 } from '../weights/dtypes.js';
import { SafetensorsFile } from '../weights/safetensors.js';
import { maxRelError, withinTolerance } from './compare.js';
import type { CaseResult, KindRunner } from './types.js';

const KIND = 'prompt-weights';
/** Where the fixture's config says its encoder and tokenizer are, relative to the fixture folder. */
const CLIP_DIR = '../clip';
const TOKENIZER_DIR = '../tokenizer';

interface FixtureOpts {
  readonly emphasis: Emphasis;
  readonly comma_padding_backtrack: number;
  readonly CLIP_stop_at_last_layers: number;
  readonly use_old_emphasis_implementation: boolean;
}
interface Pair {
  readonly cond: string;
  readonly uncond: string;
}
type Case =
  | { kind: 'parse'; text: string; parsed: WeightedText[]; schedule_unchanged: boolean }
  | { kind: 'multicond'; text: string; texts: string[]; parts: [string, number][] }
  | {
      kind: 'encode';
      name: string;
      prompt: string;
      opts: FixtureOpts;
      parsed: WeightedText[];
      token_count: number;
      target_token_count: number;
      chunks: { tokens: number[]; multipliers: number[] }[];
      input_ids: string;
      multipliers: string;
      z: string;
      cond: string;
    }
  | ({ kind: 'cfg_pad'; name: string; prompt: string; negative_prompt: string; empty_cond: string } & Pair &
      Record<'pad_cond_uncond' | 'pad_cond_uncond_v0', Pair>)
  | { kind: 'and_stack'; name: string; prompt: string; parts: [string, number][]; conds_list: [number, number][][]; stacked: string };

interface Fixture {
  readonly config: { readonly default_opts: FixtureOpts };
  readonly tolerance: { readonly weights: number; readonly cond: number };
  readonly cases: readonly Case[];
}

interface Env {
  readonly tokenizer: ClipTokenizer;
  readonly clip: ClipTextEncoder;
  readonly io: SafetensorsFile;
  readonly tol: Fixture['tolerance'];
  readonly defaults: A1111Options;
}

/** The problems found in one case: its worst tensor error, and whether an exact comparison failed. */
class Checks {
  readonly problems: string[] = [];
  worst = 0;
  mismatch = false;
  constructor(private readonly env: Env) {}

  exact(what: string, got: unknown, want: unknown): void {
    if (JSON.stringify(got) !== JSON.stringify(want)) this.fail(what, `got ${JSON.stringify(got)}, expected ${JSON.stringify(want)}`);
  }

  /** Numbers to a relative tolerance, elementwise (weights, multipliers). */
  close(what: string, got: readonly number[], want: readonly number[], tol: number): void {
    if (got.length !== want.length) return this.fail(what, `${got.length} values, expected ${want.length}`);
    const bad = got.findIndex((g, i) => !(Math.abs(g - want[i]) <= tol * Math.abs(want[i])));
    if (bad >= 0) this.fail(what, `at ${bad}: got ${got[bad]}, expected ${want[bad]}`);
  }

  parsed(what: string, got: readonly WeightedText[], want: readonly WeightedText[]): void {
    this.exact(`${what} texts`, got.map(([t]) => t), want.map(([t]) => t));
    this.close(`${what} weights`, got.map(([, w]) => w), want.map(([, w]) => w), this.env.tol.weights);
  }

  /** A tensor against io.safetensors[key]: shape exact, values by the fixtures' rule. */
  tensor(what: string, got: tf.Tensor, key: string): void {
    const want = this.env.io.info(key).shape;
    if (got.shape.join() !== want.join()) return this.fail(what, `shape [${got.shape}], expected [${want}] (${key})`);
    const r = withinTolerance(got.dataSync(), this.env.io.float32(key), this.env.tol.cond);
    this.worst = Math.max(this.worst, r.maxRelError);
    if (!r.passed) this.problems.push(`${what}: max rel err ${r.maxRelError.toExponential(2)} (${key})`);
  }

  /** A failed exact comparison (texts, ids, counts, shapes): reported as max rel err 1. */
  fail(what: string, why: string): void {
    this.problems.push(`${what}: ${why}`);
    this.mismatch = true;
  }

  result(name: string, tolerance: number): CaseResult {
    const passed = this.problems.length === 0;
    const maxRelError = this.mismatch ? Math.max(this.worst, 1) : this.worst;
    return { kind: KIND, name, passed, maxRelError, tolerance, ...(passed ? {} : { detail: this.problems.join('; ') }) };
  }
}

function toOptions(o: FixtureOpts): A1111Options {
  if (o.use_old_emphasis_implementation) throw new Error('use_old_emphasis_implementation is not implemented');
  return { clipSkip: o.CLIP_stop_at_last_layers, emphasis: o.emphasis, commaPaddingBacktrack: o.comma_padding_backtrack };
}

function checkParse(c: Extract<Case, { kind: 'parse' }>, k: Checks): void {
  k.parsed('parsed', parsePromptAttention(c.text), c.parsed);
  k.exact('prompt editing seen', usesPromptEditing(c.text), !c.schedule_unchanged);
}

function checkMulticond(c: Extract<Case, { kind: 'multicond' }>, k: Checks): void {
  const parts = splitMulticond(c.text);
  k.exact('parts', parts.map((p) => [p.text, p.weight]), c.parts);
  k.exact('texts', distinctTexts(parts), c.texts);
}

function checkEncode(c: Extract<Case, { kind: 'encode' }>, k: Checks, env: Env): void {
  const opts = toOptions(c.opts);
  const line = tokenizeLine(env.tokenizer, c.prompt, opts);
  k.parsed('parsed', line.parsed, c.parsed);
  k.exact('token_count', [line.tokenCount, targetTokenCount(line.tokenCount)], [c.token_count, c.target_token_count]);
  k.exact('chunk count', line.chunks.length, c.chunks.length);
  line.chunks.forEach((chunk, i) => {
    if (i >= c.chunks.length) return;
    k.exact(`chunk ${i} tokens`, chunk.tokens, c.chunks[i].tokens);
    k.close(`chunk ${i} multipliers`, chunk.multipliers, c.chunks[i].multipliers, env.tol.weights);
  });
  k.exact('input_ids', line.chunks.flatMap((ch) => ch.tokens), decodeInt64(env.io.bytes(c.input_ids)));
  const mults = Float32Array.from(line.chunks.flatMap((ch) => ch.multipliers));
  if (maxRelError(mults, env.io.float32(c.multipliers)) !== 0) k.fail('multipliers', `differ from ${c.multipliers} as float32`);
  const { z, cond } = encodeChunks(env.clip, line.chunks, opts);
  k.tensor('z', z, c.z);
  k.tensor('cond', cond, c.cond);
  tf.dispose([z, cond]);
}

function checkCfgPad(c: Extract<Case, { kind: 'cfg_pad' }>, k: Checks, env: Env): void {
  const cond = encodeA1111Prompt(env.tokenizer, env.clip, c.prompt, env.defaults);
  const uncond = encodeA1111Prompt(env.tokenizer, env.clip, c.negative_prompt, env.defaults);
  const empty = encodeA1111Prompt(env.tokenizer, env.clip, '', env.defaults);
  k.tensor('empty_cond', empty, c.empty_cond);
  const modes: [CondUncondPadding, Pair][] = [
    ['none', c],
    ['pad_cond_uncond', c.pad_cond_uncond],
    ['pad_cond_uncond_v0', c.pad_cond_uncond_v0],
  ];
  for (const [mode, want] of modes) {
    const got = reconcileCondUncond(cond, uncond, mode, empty);
    k.tensor(`${mode} cond`, got.cond, want.cond);
    k.tensor(`${mode} uncond`, got.uncond, want.uncond);
    tf.dispose([got.cond, got.uncond]);
  }
  tf.dispose([cond, uncond, empty]);
}

function checkAndStack(c: Extract<Case, { kind: 'and_stack' }>, k: Checks, env: Env): void {
  k.exact('parts', splitMulticond(c.prompt).map((p) => [p.text, p.weight]), c.parts);
  const { cond, weights } = encodeA1111Multicond(env.tokenizer, env.clip, c.prompt, env.defaults);
  k.exact('conds_list', [weights.map((w, i) => [i, w])], c.conds_list);
  k.tensor('stacked', cond, c.stacked);
  cond.dispose();
}

/** `encode/short_weights`, `parse #3 "((nested))"`: the case kind and its name or index and text. */
function caseName(c: Case, index: number): string {
  if ('name' in c) return `${c.kind}/${c.name}`;
  const chars = Array.from(c.text);
  return `${c.kind} #${index} ${JSON.stringify(chars.length > 24 ? `${chars.slice(0, 24).join('')}…` : c.text)}`;
}

function runCase(c: Case, index: number, env: Env): CaseResult {
  const k = new Checks(env);
  try {
    if (c.kind === 'parse') checkParse(c, k);
    else if (c.kind === 'multicond') checkMulticond(c, k);
    else if (c.kind === 'encode') checkEncode(c, k, env);
    else if (c.kind === 'cfg_pad') checkCfgPad(c, k, env);
    else if (c.kind === 'and_stack') checkAndStack(c, k, env);
    else k.fail('kind', `unknown case kind ${JSON.stringify((c as { kind: unknown }).kind)}`);
  } catch (e) {
    k.fail('threw', e instanceof Error ? e.message : String(e));
  }
  const tensors = c.kind === 'encode' || c.kind === 'cfg_pad' || c.kind === 'and_stack';
  return k.result(caseName(c, index), tensors ? env.tol.cond : env.tol.weights);
}

export const run: KindRunner = async (dir, opts) => {
  await initBackend({ backend: opts.backend, log: null });
  const fixture = JSON.parse(readFileSync(join(dir, 'cases.json'), 'utf8')) as Fixture;
  const clipDir = resolve(dir, CLIP_DIR);
  const tokDir = resolve(dir, TOKENIZER_DIR);
  const clipFixture = JSON.parse(readFileSync(join(clipDir, 'fixture.json'), 'utf8')) as { config: unknown };
  const weights = SafetensorsFile.open(join(clipDir, 'weights.safetensors'));
  const io = SafetensorsFile.open(join(dir, 'io.safetensors'));
  let clip: ClipTextEncoder | null = null;
  try {
    clip = ClipTextEncoder.load(weights, clipConfigFromLdm(clipFixture.config));
    const tokenizer = ClipTokenizer.fromHfFiles(join(tokDir, 'vocab.json'), join(tokDir, 'merges.txt'));
    const env: Env = { tokenizer, clip, io, tol: fixture.tolerance, defaults: toOptions(fixture.config.default_opts) };
    return fixture.cases.map((c, i) => runCase(c, i, env));
  } catch (e) {
    return [{ kind: KIND, name: '*', passed: false, detail: e instanceof Error ? e.message : String(e) }];
  } finally {
    clip?.dispose();
    weights.close();
    io.close();
  }
};
