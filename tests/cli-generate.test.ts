/**
 * `sd generate` as a user runs it: a child process on the tiny fixture model (cpu backend). The seeded DDPM case
 * of tests/fixtures/pipeline twice -> byte-identical PNGs (the second beside the first, never over it) whose
 * pixels match the fixture image; and the one-line errors for missing weights, tokenizer and bad parameters.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import sharp from 'sharp';
import { SafetensorsFile } from '../src/weights/safetensors.js';
import { withinTolerance } from '../src/parity/compare.js';
import { readPngParameters } from '../src/image/codec.js';
import { formatDuration, ProgressBar } from '../src/cli/progress.js';
import { outputPath, writeNew } from '../src/cli/commands/generate.js';

const ROOT = resolve('.');
const CLI = join(ROOT, 'bin/sd.js');
const FIX = join(ROOT, 'tests/fixtures/pipeline');
const fixture = JSON.parse(readFileSync(join(FIX, 'fixture.json'), 'utf8')) as {
  config: { prompt: string };
  tolerance: { image: number };
};
const MODEL = ['--weights', join(FIX, 'model.safetensors'), '--config', join(FIX, 'fixture.json'), '--tokenizer', join(ROOT, 'tests/fixtures/tokenizer')];
/** The fixture's seeded txt2img case: ddpm, seed 42, 10 steps, cfg 7.5, empty negative prompt. */
const DDPM = ['--prompt', fixture.config.prompt, '--seed', '42', '--steps', '10', '--cfg', '7.5', '--sampler', 'ddpm', '--width', '32', '--height', '32'];

/** DDPM without its prompt and steps. */
const SMALL = DDPM.slice(2).filter((_, i, a) => a[i] !== '--steps' && a[i - 1] !== '--steps');

const work = mkdtempSync(join(tmpdir(), 'sd-generate-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

function sd(args: string[], cwd = ROOT) {
  const r = spawnSync(process.execPath, [CLI, 'generate', ...args, '--backend', 'cpu'], { cwd, encoding: 'utf8', env: { ...process.env, SD_BACKEND: '' } });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('sd generate', () => {
  it('writes the fixture image, the same bytes on a second run, without overwriting', async () => {
    const out = join(work, 'out');
    const first = sd([...MODEL, ...DDPM, '--out', out]);
    expect(first.stderr).not.toMatch(/Error/);
    expect(first.code).toBe(0);
    expect(first.stdout).toBe(`${join(out, '42.png')} (seed 42)\n`);
    const second = sd([...MODEL, ...DDPM, '--out', out]);
    expect(second.code).toBe(0);
    expect(second.stdout).toBe(`${join(out, '42-1.png')} (seed 42)\n`);
    expect(readdirSync(out).sort()).toEqual(['42-1.png', '42.png']);

    const a = readFileSync(join(out, '42.png'));
    const b = readFileSync(join(out, '42-1.png'));
    expect(a.equals(b)).toBe(true);
    expect(readPngParameters(a)).toMatch(/^a botanical illustration of a fern\nSteps: 10, Sampler: DDPM, CFG scale: 7.5, Seed: 42, Size: 32x32, Model: model, RNG: CPU$/);

    const { data, info } = await sharp(a).raw().toBuffer({ resolveWithObject: true });
    expect([info.width, info.height, info.channels]).toEqual([32, 32, 3]);
    const io = SafetensorsFile.open(join(FIX, 'io.safetensors'));
    const expected = io.float32('ddpm_image'); // NHWC [1, 32, 32, 3] in [0, 1]
    io.close();
    const tol = fixture.tolerance.image + 0.5 / 255; // plus half a level of uint8 rounding
    const { passed, maxRelError } = withinTolerance(Float32Array.from(data, (v) => v / 255), expected, tol);
    expect(maxRelError).toBeLessThanOrEqual(tol);
    expect(passed).toBe(true);
  });

  it('takes --noise, --conventions, --prompt-syntax and --lora-dir, records them, and skips an unknown LoRA with a warning', () => {
    const out = join(work, 'gpu.png');
    const prompt = 'a (fern:1.2) <lora:nowhere:0.8>';
    const r = sd([...MODEL, ...SMALL, '--prompt', prompt, '--noise', 'gpu', '--conventions', 'diffusers', '--lora-dir', work, '--steps', '2', '--out', out]);
    expect(r.code).toBe(0);
    expect(r.stderr).toMatch(/sd: warning: no LoRA named "nowhere" in .*; <lora:nowhere> skipped/);
    const text = readPngParameters(readFileSync(out)) ?? '';
    expect(text).toMatch(/^a \(fern:1\.2\) <lora:nowhere:0\.8>\nSteps: 2, Sampler: DDPM, .*Conventions: diffusers$/);
    expect(text).not.toMatch(/RNG/);
    const plain = sd([...MODEL, ...SMALL, '--prompt', 'a <lora:x>', '--prompt-syntax', 'plain', '--steps', '1', '--out', join(work, 'plain.png')]);
    expect(plain.code).toBe(0);
    expect(readPngParameters(readFileSync(join(work, 'plain.png')))).toMatch(/RNG: CPU, Prompt syntax: plain$/);
    const noDir = sd([...MODEL, '--prompt', 'a <lora:x>', '--target-size', '32,32', '--steps', '1']);
    expect(noDir.code).toBe(1);
    expect(noDir.stderr).toMatch(/warning: LoRA tags not applied \(<lora:x>\): give --lora-dir/);
    expect(noDir.stderr).toMatch(/targetSize: applies to SDXL models only/);
  });

  it('says where to put missing weights and how to get them', () => {
    const r = sd(['--weights', join(work, 'nope.safetensors'), '--prompt', 'a fern']);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/^sd: weights not found: .*nope\.safetensors; put an SD 1\.x checkpoint .*`sd download`/);
    expect(r.stderr).not.toMatch(/\n\s+at /); // one line, no stack
  });

  it('says where it looked for the tokenizer and how to get it', () => {
    // cwd without a weights/ folder and weights in a folder without a tokenizer
    const r = sd(['--weights', join(FIX, 'model.safetensors'), '--config', join(FIX, 'fixture.json'), ...DDPM], work);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/^sd: tokenizer not found \(looked in .*tests\/fixtures\/pipeline, .*sd-generate-\w+\/weights\).*`sd download/m);
  });

  it('refuses a bad parameter with its range before loading anything', () => {
    const r = sd([...MODEL, '--prompt', 'a fern', '--steps', '0']);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe('sd: steps: must be an integer in 1..200, got 0\n');
    const size = sd([...MODEL, '--prompt', 'a fern', '--width', '30']);
    expect(size.stderr).toBe('sd: width: must be a multiple of 8 in 32..2048, got 30\n');
  });
});

describe('progress bar', () => {
  /** A fake stream and clock: what was written, and time that moves 1 s per step. */
  function fake(isTTY: boolean) {
    const written: string[] = [];
    let t = 0;
    const stream = { isTTY, write: (s: string) => (written.push(s), true) };
    return { written, stream, now: () => t, tick: (ms: number) => (t += ms) };
  }

  it('renders label, step/total, elapsed and ETA', () => {
    const f = fake(true);
    const bar = new ProgressBar('sampling', 4, { stream: f.stream, now: f.now });
    expect(bar.render(0, 8)).toBe('sampling [--------] 0/4 elapsed 0:00 eta ?');
    f.tick(3000);
    expect(bar.render(1, 8)).toBe('sampling [##------] 1/4 elapsed 0:03 eta 0:09');
    expect(formatDuration(3_725_000)).toBe('1:02:05');
  });

  it('redraws one line on a TTY and prints sparse plain lines elsewhere', () => {
    const tty = fake(true);
    const bar = new ProgressBar('x', 3, { stream: tty.stream, now: tty.now });
    [1, 2, 3].forEach((s) => bar.update(s));
    bar.finish();
    expect(tty.written.slice(0, 3).every((l) => l.startsWith('\r') && !l.includes('\n'))).toBe(true);
    expect(tty.written.at(-1)).toBe('\n');

    const log = fake(false);
    const plain = new ProgressBar('x', 20, { stream: log.stream, now: log.now, every: 10 });
    for (let s = 1; s <= 20; s++) plain.update(s);
    plain.finish();
    expect(log.written.map((l) => l.split(' ')[2])).toEqual(['10/20', '20/20']);
  });
});

describe('output files', () => {
  it('names images after their seed in a folder, or uses a .png path, never overwriting', () => {
    const dir = join(work, 'names');
    expect(outputPath(dir, 7)).toBe(join(dir, '7.png'));
    expect(outputPath(join(dir, 'cat.png'), 7)).toBe(join(dir, 'cat.png'));
    const bytes = new Uint8Array([1, 2, 3]);
    expect(writeNew(join(dir, 'cat.png'), bytes)).toBe(join(dir, 'cat.png'));
    expect(writeNew(join(dir, 'cat.png'), new Uint8Array([9]))).toBe(join(dir, 'cat-1.png'));
    expect(writeNew(join(dir, 'cat.png'), bytes)).toBe(join(dir, 'cat-2.png'));
    expect([...readFileSync(join(dir, 'cat.png'))]).toEqual([1, 2, 3]);
  });
});
