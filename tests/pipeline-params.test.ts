import { describe, expect, it } from 'vitest';
import { ParamError, type GenerateParams } from '../src/pipeline/api.js';
import { DEFAULTS, MAX_SEED, resolveParams, SD15_LIMITS, usesGuidance } from '../src/pipeline/params.js';

const TINY = { width: 32, height: 32, minSize: 32, clipLayers: 3 };

/** The ParamError a call throws (fails the test if it throws nothing or something else). */
function paramError(p: GenerateParams, limits = SD15_LIMITS): ParamError {
  try {
    resolveParams(p, limits);
  } catch (e) {
    expect(e).toBeInstanceOf(ParamError);
    return e as ParamError;
  }
  throw new Error(`resolveParams accepted ${JSON.stringify(p)}`);
}

describe('resolveParams', () => {
  it('fills the A1111 defaults and the model size', () => {
    const r = resolveParams({ prompt: 'a fern', seed: 7 });
    expect(r).toEqual({
      prompt: 'a fern',
      negativePrompt: '',
      seed: 7,
      steps: 20,
      cfgScale: 7.5,
      cfg: true,
      sampler: 'euler_a',
      karras: false,
      width: 512,
      height: 512,
      clipSkip: 1,
      strength: null,
      batch: 1,
      noise: 'cpu',
      promptSyntax: 'a1111',
      padCondUncond: false,
      conventions: 'a1111',
      originalSize: [512, 512],
      cropTopLeft: [0, 0],
      targetSize: [512, 512],
      controlNets: [],
      ipAdapter: null,
      mask: false,
    });
    expect(Object.isFrozen(r)).toBe(true);
    expect(resolveParams({ prompt: '' }, TINY).width).toBe(32);
  });

  it('takes noise, prompt syntax and conventions by name; conventions default to the model source', () => {
    const r = resolveParams({ prompt: 'x', noise: 'gpu', promptSyntax: 'plain', conventions: 'diffusers' });
    expect([r.noise, r.promptSyntax, r.conventions]).toEqual(['gpu', 'plain', 'diffusers']);
    expect(resolveParams({ prompt: 'x' }, { ...TINY, conventions: 'diffusers' }).conventions).toBe('diffusers');
    for (const [field, value] of [['noise', 'cuda'], ['promptSyntax', 'compel'], ['conventions', 'comfy']] as const) {
      expect(() => resolveParams({ prompt: 'x', [field]: value } as never)).toThrow(new RegExp(`^${field}: must be one of`));
    }
  });

  it('takes SDXL size conditioning (defaults [H, W], [0, 0], [H, W]) and refuses it for SD 1.x', () => {
    const sdxl = { family: 'sdxl' as const, width: 1024, height: 1024, minSize: 64, clipLayers: 12 };
    const r = resolveParams({ prompt: 'x', width: 768, height: 1024 }, sdxl);
    expect([r.originalSize, r.cropTopLeft, r.targetSize]).toEqual([[1024, 768], [0, 0], [1024, 768]]);
    const s = resolveParams({ prompt: 'x', originalSize: [2048, 1536], cropTopLeft: [16, 0], targetSize: [1024, 1024] }, sdxl);
    expect([s.originalSize, s.cropTopLeft, s.targetSize]).toEqual([[2048, 1536], [16, 0], [1024, 1024]]);
    expect(() => resolveParams({ prompt: 'x', originalSize: [0, 10] }, sdxl)).toThrow(/^originalSize: must be two integers in 1\.\.16384/);
    expect(() => resolveParams({ prompt: 'x', cropTopLeft: [1.5, 0] }, sdxl)).toThrow(/^cropTopLeft: must be two integers/);
    expect(() => resolveParams({ prompt: 'x', targetSize: [512, 512] })).toThrow(/^targetSize: applies to SDXL models only/);
  });

  it('draws a random seed in range when none is given', () => {
    const seeds = new Set(Array.from({ length: 20 }, () => resolveParams({ prompt: 'x' }).seed));
    expect(seeds.size).toBeGreaterThan(1);
    for (const s of seeds) expect(Number.isInteger(s) && s >= 0 && s <= MAX_SEED).toBe(true);
  });

  it('names the field and its range for every bad value', () => {
    const cases: [GenerateParams, string, RegExp][] = [
      [{ prompt: 3 as unknown as string }, 'prompt', /string/],
      [{ prompt: 'x'.repeat(5000) }, 'prompt', /at most 4000/],
      [{ prompt: 'a', seed: -1 }, 'seed', /0\.\.4294967295/],
      [{ prompt: 'a', seed: 2 ** 32 }, 'seed', /0\.\.4294967295/],
      [{ prompt: 'a', seed: 1.5 }, 'seed', /integer/],
      [{ prompt: 'a', steps: 0 }, 'steps', /1\.\.200/],
      [{ prompt: 'a', steps: 201 }, 'steps', /1\.\.200/],
      [{ prompt: 'a', cfgScale: 31 }, 'cfgScale', /0\.\.30/],
      [{ prompt: 'a', cfgScale: NaN }, 'cfgScale', /0\.\.30/],
      [{ prompt: 'a', sampler: 'plms' as never }, 'sampler', /ddpm, ddim, euler, euler_a, heun, lms, dpmpp_2m/],
      [{ prompt: 'a', width: 500 }, 'width', /multiple of 8 in 64\.\.2048/],
      [{ prompt: 'a', height: 4096 }, 'height', /multiple of 8 in 64\.\.2048/],
      [{ prompt: 'a', width: 32 }, 'width', /64\.\.2048/],
      [{ prompt: 'a', clipSkip: 12 }, 'clipSkip', /1\.\.11/],
      [{ prompt: 'a', batch: 9 }, 'batch', /1\.\.8/],
      [{ prompt: 'a', karras: 'yes' as never }, 'karras', /true or false/],
      [{ prompt: 'a', strength: 0.5 }, 'strength', /init image/],
      [{ prompt: 'a', initImage: new Uint8Array([1]), strength: 0 }, 'strength', /\(0, 1\]/],
      [{ prompt: 'a', initImage: new Uint8Array([1]), strength: 1.5 }, 'strength', /\(0, 1\]/],
      [{ prompt: 'a', initImage: new Uint8Array() }, 'initImage', /PNG or JPEG/],
    ];
    for (const [p, field, message] of cases) {
      const e = paramError(p);
      expect(e.field, JSON.stringify(p).slice(0, 80)).toBe(field);
      expect(e.message).toMatch(message);
      expect(e.message.startsWith(`${field}: `)).toBe(true);
    }
    expect(paramError({ prompt: 'a', clipSkip: 3 }, TINY).message).toMatch(/1\.\.2/);
  });

  it('defaults img2img strength to 0.75 and accepts the edges of every range', () => {
    expect(resolveParams({ prompt: 'a', initImage: new Uint8Array([1]) }).strength).toBe(DEFAULTS.strength);
    const r = resolveParams({ prompt: 'a', seed: MAX_SEED, steps: 200, cfgScale: 0, width: 2048, height: 64, clipSkip: 11, batch: 8 });
    expect([r.seed, r.steps, r.cfgScale, r.width, r.height, r.clipSkip, r.batch]).toEqual([MAX_SEED, 200, 0, 2048, 64, 11, 8]);
  });

  it('runs guidance unless it is off or the scale is 1', () => {
    expect(usesGuidance(resolveParams({ prompt: 'a' }))).toBe(true);
    expect(usesGuidance(resolveParams({ prompt: 'a', cfg: false }))).toBe(false);
    expect(usesGuidance(resolveParams({ prompt: 'a', cfgScale: 1 }))).toBe(false);
  });
});

describe('resolveParams: ControlNets, IP-Adapter, mask', () => {
  const image = new Uint8Array([0x89, 0x50, 0x4e, 0x47]);
  const cn = { model: 'control_v11p_sd15_canny.pth', image };

  it('fills the ControlNet defaults (canny 100/200, scale 1, window 0 .. 1) and the IP-Adapter scale', () => {
    const r = resolveParams({ prompt: 'x', controlNets: [cn, { ...cn, preprocess: 'none', scale: 0.5, start: 0.2, end: 0.6 }], ipAdapter: { model: 'ip.bin', image } });
    expect(r.controlNets).toEqual([
      { model: cn.model, preprocess: 'canny', low: 100, high: 200, scale: 1, start: 0, end: 1 },
      { model: cn.model, preprocess: 'none', low: null, high: null, scale: 0.5, start: 0.2, end: 0.6 },
    ]);
    expect(r.ipAdapter).toEqual({ model: 'ip.bin', scale: 1, imageEncoder: null });
    expect(resolveParams({ prompt: 'x', initImage: image, mask: image }).mask).toBe(true);
  });

  it('names the bad field', () => {
    const cases: [GenerateParams, string][] = [
      [{ prompt: 'x', mask: image }, 'mask'],
      [{ prompt: 'x', initImage: image, mask: new Uint8Array(0) }, 'mask'],
      [{ prompt: 'x', controlNets: [{ ...cn, model: '' }] }, 'controlNets[0].model'],
      [{ prompt: 'x', controlNets: [cn, { ...cn, image: new Uint8Array(0) }] }, 'controlNets[1].image'],
      [{ prompt: 'x', controlNets: [{ ...cn, scale: 2.5 }] }, 'controlNets[0].scale'],
      [{ prompt: 'x', controlNets: [{ ...cn, start: 0.5, end: 0.4 }] }, 'controlNets[0].start'],
      [{ prompt: 'x', controlNets: [{ ...cn, end: 1.5 }] }, 'controlNets[0].end'],
      [{ prompt: 'x', controlNets: [{ ...cn, low: 300 }] }, 'controlNets[0].low'],
      [{ prompt: 'x', controlNets: [{ ...cn, preprocess: 'none', high: 10 }] }, 'controlNets[0].high'],
      [{ prompt: 'x', controlNets: [{ ...cn, preprocess: 'depth' as 'none' }] }, 'controlNets[0].preprocess'],
      [{ prompt: 'x', controlNets: Array.from({ length: 5 }, () => cn) }, 'controlNets'],
      [{ prompt: 'x', ipAdapter: { model: 'ip.bin', image, scale: Number.NaN } }, 'ipAdapter.scale'],
      [{ prompt: 'x', ipAdapter: { model: 'ip.bin', image: 'photo.png' as unknown as Uint8Array } }, 'ipAdapter.image'],
    ];
    for (const [p, field] of cases) expect(paramError(p).field, JSON.stringify(p, (_, v: unknown) => (v instanceof Uint8Array ? '<bytes>' : v))).toBe(field);
  });
});
