/**
 * Model names in queue mode (src/queue/model-names.ts): the front checks a name's form only and sends a reference;
 * the worker finds it in its own folders by sd serve's rule (listed names only, no traversal, no link out of the
 * folder) and a name it lacks fails with the 4xx naming the field and what the worker has. Prompt <lora:> tags the
 * worker cannot apply are dropped with a warning. No Redis needed: the references are what travels in a job.
 */
import { mkdirSync, mkdtempSync, realpathSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { decodeParams, encodeParams } from '../src/queue/protocol.js';
import { resolveModelNames } from '../src/queue/model-names.js';
import { toGenerateParams } from '../src/server/body.js';
import { HttpError } from '../src/server/errors.js';
import { parseModelRef, type ModelDirs } from '../src/server/models-dir.js';
import { parseGeneration } from '../src/server/a1111/request.js';

const root = mkdtempSync(path.join(tmpdir(), 'sd-names-'));
const dirs = { controlnet: path.join(root, 'cn'), ipAdapter: path.join(root, 'ip'), lora: path.join(root, 'lora'), imageEncoder: path.join(root, 'enc') };
function touch(file: string): string {
  mkdirSync(path.dirname(file), { recursive: true });
  writeFileSync(file, 'x');
  return realpathSync(file);
}
const canny = touch(path.join(dirs.controlnet, 'control_v11p_sd15_canny.safetensors'));
const ip = touch(path.join(dirs.ipAdapter, 'ip-adapter_sd15.safetensors'));
const ink = touch(path.join(dirs.lora, 'ink.safetensors'));
const evil = touch(path.join(root, 'outside', 'evil.safetensors'));
symlinkSync(evil, path.join(dirs.lora, 'evil.safetensors'));
mkdirSync(dirs.imageEncoder, { recursive: true });

const FRONT: ModelDirs = { onWorker: true };
const IMAGE = Buffer.from('not checked here').toString('base64');

/** What a front sends (through the job's JSON) and what the worker makes of it. */
const fromFront = (body: Record<string, unknown>) => decodeParams(encodeParams(toGenerateParams({ prompt: 'x', ...body }, FRONT)));

function onWorker(body: Record<string, unknown>, worker: ModelDirs = dirs, warnings: string[] = []) {
  const sent = fromFront(body);
  return { sent, got: resolveModelNames(sent, worker, (m) => warnings.push(m)), warnings };
}

function refused(f: () => unknown): HttpError {
  try {
    f();
  } catch (e) {
    expect(e).toBeInstanceOf(HttpError);
    return e as HttpError;
  }
  throw new Error('expected an HttpError');
}

describe('model names resolved by the worker', () => {
  it('the front sends references, no path of its own; the worker resolves them in its folders', () => {
    const { sent, got } = onWorker({
      controlnet: { model: 'control_v11p_sd15_canny', image: IMAGE },
      ip_adapter: { model: 'IP-Adapter_SD15', image: IMAGE },
      loras: [{ name: 'ink', multiplier: 0.5 }],
    });
    expect(parseModelRef(sent.controlNets?.[0].model ?? '')).toMatchObject({ kind: 'controlnet', name: 'control_v11p_sd15_canny', field: 'controlnet[0].model', status: 400 });
    expect(sent.ipAdapter?.imageEncoder).toBeUndefined();
    expect(got.controlNets?.[0].model).toBe(canny);
    expect(got.ipAdapter).toMatchObject({ model: ip, imageEncoder: dirs.imageEncoder });
    expect(got.loras).toEqual([{ path: ink, te: 0.5, unet: 0.5 }]);
  });

  it('a name that cannot be a file name is refused by the front (400 naming the field), before any job', () => {
    for (const name of ['../ink', '/etc/passwd', 'a/b', '..', 'a\\b']) {
      const e = refused(() => toGenerateParams({ prompt: 'x', loras: [{ name }] }, FRONT));
      expect([e.statusCode, e.field]).toEqual([400, 'loras[0].name']);
      expect(e.message).toMatch(/is not a LoRA name/);
    }
  });

  it("a name the worker lacks, or a link out of its folder, fails with the 4xx naming the field and the worker's names", () => {
    const e = refused(() => resolveModelNames(fromFront({ loras: [{ name: 'nope' }] }), dirs, () => undefined));
    expect([e.statusCode, e.field]).toEqual([400, 'loras[0].name']);
    expect(e.message).toBe("loras[0].name: no LoRA named \"nope\" in this worker's --lora-dir: it has ink");
    const out = refused(() => onWorker({ loras: [{ name: 'evil' }] }));
    expect(out.message).toMatch(/no LoRA named "evil"/);
    const none = refused(() => onWorker({ controlnet: { model: 'c', image: IMAGE } }, {}));
    expect(none.message).toMatch(/^controlnet\[0\]\.model: this worker offers no ControlNet models; start sd worker with --controlnet-dir DIR/);
  });

  it('prompt tags: applied when the worker has them; dropped with a warning without --lora-dir; an unknown one is 400', () => {
    expect(onWorker({ prompt: 'a <lora:ink:0.7>' }).got.loras).toEqual([{ path: ink, te: 0.7, unet: 0.7 }]);
    const bare = onWorker({ prompt: 'a <lora:ink:0.7>' }, {});
    expect(bare.got.loras).toEqual([]);
    expect(bare.warnings).toEqual(['<lora:ink> not applied: this worker has no --lora-dir']);
    expect(refused(() => onWorker({ prompt: 'a <lora:nope:1>' })).field).toBe('prompt');
  });

  it("A1111: a prompt tag the worker lacks is skipped with a warning, as A1111 skips it; its ControlNet's closest name is found there", () => {
    const g = parseGeneration({ prompt: 'a <lora:nope:1> <lora:ink:1>', alwayson_scripts: { controlnet: { args: [{ model: 'canny [d14c016b]', module: 'none', image: IMAGE }] } } }, 'txt2img', { width: 16, height: 16 }, FRONT);
    expect(g.loras.map((l) => parseModelRef(l.path)?.name)).toEqual(['nope', 'ink']);
    const unit = g.controlNets[0];
    expect(parseModelRef(unit.modelPath)).toMatchObject({ kind: 'controlnet', name: 'canny', closest: true, status: 422 });
    const warnings: string[] = [];
    const got = resolveModelNames({ prompt: g.prompt, loras: g.loras, controlNets: [{ model: unit.modelPath, image: new Uint8Array(1) }] }, dirs, (m) => warnings.push(m));
    expect(got.loras).toEqual([{ path: ink, te: 1, unet: 1 }]);
    expect(got.controlNets?.[0].model).toBe(canny);
    expect(warnings).toHaveLength(1);
    expect(warnings[0]).toMatch(/^<lora:nope> skipped: no LoRA named "nope"/);
  });

  it('paths that are not references pass through unchanged (a front that resolved them itself)', () => {
    const p = { prompt: 'x', loras: [{ path: ink, te: 1, unet: 1 }] };
    expect(resolveModelNames(p, {}, () => undefined)).toBe(p);
  });
});
