/**
 * `sd generate` with the adapter flags, as a user runs it (a child process, cpu backend, the tiny fixture models):
 * --controlnet / --control-* (the PNG records the unit), --init-image + --mask, --ip-adapter / --ip-image, all at
 * once, and the one-line usage errors naming the flag.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import sharp from 'sharp';
import { SafetensorsFile } from '../src/weights/safetensors.js';
import { readPngParameters } from '../src/image/codec.js';
import { controlUnits, parseParameters } from '../src/image/parameters.js';

const ROOT = resolve('.');
const CLI = join(ROOT, 'bin/sd.js');
const FIX = join(ROOT, 'tests/fixtures');
const MODEL = ['--weights', join(FIX, 'pipeline/model.safetensors'), '--config', join(FIX, 'pipeline/fixture.json'), '--tokenizer', join(FIX, 'tokenizer')];
const QUICK = ['--prompt', 'a botanical illustration of a fern', '--seed', '3', '--steps', '2', '--sampler', 'ddim', '--width', '32', '--height', '32'];
const CONTROLNET = join(FIX, 'controlnet/control_tiny.safetensors');
const ADAPTER = join(FIX, 'ip-adapter/ip-adapter_sd15.safetensors');
const PHOTO = join(FIX, 'ip-adapter/photo.png');

const work = mkdtempSync(join(tmpdir(), 'sd-cli-adapters-'));
const SKETCH = join(work, 'sketch.png');
const INIT = join(work, 'init.png');
const MASK = join(work, 'mask.png');

beforeAll(async () => {
  const io = SafetensorsFile.open(join(FIX, 'controlnet/io.safetensors'));
  writeFileSync(SKETCH, await sharp(Buffer.from(io.bytes('e2e_ddim_a_source_image')), { raw: { width: 64, height: 64, channels: 3 } }).png().toBuffer());
  io.close();
  const init = Buffer.alloc(32 * 32 * 3).map((_, i) => (i * 7) % 256);
  writeFileSync(INIT, await sharp(init, { raw: { width: 32, height: 32, channels: 3 } }).png().toBuffer());
  const mask = Buffer.alloc(32 * 32).map((_, i) => (i % 32 < 16 ? 255 : 0)); // repaint the left half
  writeFileSync(MASK, await sharp(mask, { raw: { width: 32, height: 32, channels: 1 } }).png().toBuffer());
});
afterAll(() => rmSync(work, { recursive: true, force: true }));

function sd(args: string[]) {
  const r = spawnSync(process.execPath, [CLI, 'generate', ...args, '--backend', 'cpu'], { cwd: ROOT, encoding: 'utf8', env: { ...process.env, SD_BACKEND: '' } });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('sd generate with adapters', () => {
  it('--controlnet with --control-image, scale and window writes a PNG that records the unit', () => {
    const out = join(work, 'cn.png');
    const r = sd([...MODEL, ...QUICK, '--controlnet', CONTROLNET, '--control-image', SKETCH, '--control-scale', '0.8', '--control-end', '0.5', '--control-low', '50', '--out', out]);
    expect(r.stderr).not.toMatch(/Error/);
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(`${out} (seed 3)\n`);
    const units = controlUnits(parseParameters(readPngParameters(readFileSync(out))!).settings);
    expect(units).toEqual([{ Module: 'canny', Model: 'control_tiny', Weight: '0.8', 'Resize Mode': 'Just Resize', 'Threshold A': '50', 'Threshold B': '200', 'Guidance Start': '0', 'Guidance End': '0.5' }]);
  });

  it('ControlNet, IP-Adapter and inpainting in one run', async () => {
    const out = join(work, 'all.png');
    const r = sd([
      ...MODEL, ...QUICK, '--controlnet', CONTROLNET, '--control-image', SKETCH, '--init-image', INIT, '--mask', MASK, '--strength', '0.8',
      '--ip-adapter', ADAPTER, '--ip-image', PHOTO, '--ip-scale', '0.6', '--out', out,
    ]);
    expect(r.stderr).not.toMatch(/Error/);
    expect(r.code).toBe(0);
    const png = readFileSync(out);
    const { info } = await sharp(png).raw().toBuffer({ resolveWithObject: true });
    expect([info.width, info.height]).toEqual([32, 32]);
    const { settings } = parseParameters(readPngParameters(png)!);
    expect(settings).toMatchObject({ 'Mask blur': '0', 'Denoising strength': '0.8' });
    expect(controlUnits(settings).map((u) => [u.Module, u.Model, u.Weight])).toEqual([['canny', 'control_tiny', '1'], ['ip-adapter_clip_sd15', 'ip-adapter_sd15', '0.6']]);
  });

  it('usage errors name the flag, in one line, before any model is loaded', () => {
    const cases: [string[], RegExp][] = [
      [['--control-image', SKETCH], /--control-image applies to a ControlNet: add --controlnet FILE/],
      [['--controlnet', CONTROLNET], /--controlnet needs one --control-image each: 1 --controlnet, 0 --control-image/],
      [['--controlnet', CONTROLNET, '--control-image', SKETCH, '--control-scale', '0.5', '--control-scale', '0.7'], /--control-scale is given 2 times for 1 --controlnet/],
      [['--controlnet', CONTROLNET, '--control-image', SKETCH, '--control-scale', '5'], /--control-scale \(of --controlnet #1\): must be a number in 0\.\.2, got 5/],
      [['--controlnet', CONTROLNET, '--control-image', SKETCH, '--control-start', '0.6', '--control-end', '0.5'], /--control-start \(of --controlnet #1\): must be below end/],
      [['--controlnet', join(work, 'none.pth'), '--control-image', SKETCH], /--controlnet .*none\.pth: no such file/],
      [['--mask', MASK], /--mask needs --init-image/],
      [['--ip-adapter', ADAPTER], /--ip-adapter needs --ip-image/],
      [['--ip-image', PHOTO], /--ip-image applies to an IP-Adapter/],
    ];
    for (const [flags, message] of cases) {
      const r = sd([...MODEL, ...QUICK, ...flags]);
      expect(r.code, flags.join(' ')).not.toBe(0);
      expect(r.stderr).toMatch(message);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
    }
  });

  it('a file that is not a ControlNet is refused naming --controlnet', () => {
    const r = sd([...MODEL, ...QUICK, '--controlnet', join(FIX, 'pipeline/model.safetensors'), '--control-image', SKETCH]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/--controlnet \(of --controlnet #1\): .*not a ControlNet/);
  });
});
