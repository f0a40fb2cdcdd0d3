/**
 * Shared by the tests: for the layer tests, float32 tensors held in memory as a TensorSource, filled from a
 * fixed-seed LCG; for the server tests, a recording fake Engine, a server started on it, and JSON calls.
 */
import { mkdtempSync } from 'node:fs';
import * as path from 'node:path';
import type { GenerateOptions, GenerateParams, GenerateResult } from '../src/pipeline/api.js';
import type { ParamLimits } from '../src/pipeline/params.js';
import type { Engine } from '../src/server/engine.js';
import type { StableDiffusion } from '../src/pipeline/pipeline.js';
import type { SdServer, ServerOptions } from '../src/server/server.js';
import type { TensorInfo, TensorSource } from '../src/weights/types.js';

/** An in-memory TensorSource of float32 tensors. */
export class MemorySource implements TensorSource {
  readonly path = '<memory>';
  constructor(private readonly t: Map<string, { shape: number[]; data: Float32Array }>) {}
  keys(): string[] {
    return [...this.t.keys()];
  }
  has(k: string): boolean {
    return this.t.has(k);
  }
  info(k: string): TensorInfo {
    return { dtype: 'F32', shape: this.get(k).shape };
  }
  bytes(k: string): Uint8Array {
    return new Uint8Array(this.get(k).data.buffer.slice(0));
  }
  float32(k: string): Float32Array {
    return this.get(k).data.slice();
  }
  close(): void {}
  private get(k: string) {
    const v = this.t.get(k);
    if (v === undefined) throw new Error(`no ${k}`);
    return v;
  }
}

let seed = 1;
export function rand(n: number): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    seed = (seed * 1103515245 + 12345) % 2147483648;
    a[i] = seed / 2147483648 - 0.5;
  }
  return a;
}

export function source(shapes: Record<string, number[]>): MemorySource {
  const m = new Map<string, { shape: number[]; data: Float32Array }>();
  for (const [k, shape] of Object.entries(shapes)) m.set(k, { shape, data: rand(shape.reduce((a, b) => a * b, 1)) });
  return new MemorySource(m);
}


/** `png` with `extra` chunks (pngChunk) inserted right after IHDR, which ends at byte 33. */
export const withChunks = (png: Buffer, extra: readonly Buffer[]): Buffer => Buffer.concat([png.subarray(0, 33), ...extra, png.subarray(33)]);

// -- the server tests' fake-engine set-up (tests/server-adapters, a1111-controlnet): the server stack is imported
// only when a test starts one, so that the layer tests that use the helpers above do not load it.

/** A fake Engine that records the GenerateParams of each job and answers a flat image of `fill`. */
export class RecordingEngine implements Engine {
  readonly limits: ParamLimits = { width: 16, height: 16, minSize: 8, clipLayers: 3 };
  readonly seen: GenerateParams[] = [];
  constructor(private readonly fill = 7) {}
  async generate(p: GenerateParams, _o: GenerateOptions): Promise<GenerateResult> {
    this.seen.push(p);
    const [{ resolveParams }, { encodePng }] = await Promise.all([import('../src/pipeline/params.js'), import('../src/image/codec.js')]);
    const r = resolveParams(p, this.limits);
    const rgb = new Uint8Array(r.width * r.height * 3).fill(this.fill);
    return { images: [{ png: await encodePng({ rgb, width: r.width, height: r.height }), rgb, seed: r.seed }], params: r };
  }
  dispose(): void {}
}

/** An SdServer on 127.0.0.1 (any port) running `engine`, its outputs in a new folder under `root`, loaded. */
export async function startServer(engine: Engine, root: string, extra: Partial<ServerOptions> = {}): Promise<SdServer> {
  const { SdServer } = await import('../src/server/server.js');
  const s = await SdServer.start({ loadEngine: async () => engine, outputs: mkdtempSync(path.join(root, 'out-')), ...extra }, { port: 0, host: '127.0.0.1' });
  await s.ready();
  return s;
}

/** An HTTP call with a JSON body (or none), its answer parsed. */
export async function callJson(s: { url: string }, method: string, route: string, body?: unknown): Promise<{ status: number; json: Record<string, unknown> }> {
  const res = await fetch(`${s.url}${route}`, {
    method,
    headers: body !== undefined ? { 'content-type': 'application/json' } : {},
    body: body !== undefined ? JSON.stringify(body) : undefined,
  });
  const text = await res.text();
  return { status: res.status, json: (text === '' ? {} : JSON.parse(text)) as Record<string, unknown> };
}

export const b64 = (b: Uint8Array): string => Buffer.from(b).toString('base64');

/** The tiny fixture model (tests/fixtures/pipeline) on the cpu backend, as the server tests run it for real. */
export async function loadTinyModel(): Promise<StableDiffusion> {
  const [{ initBackend }, { StableDiffusion, pipelineConfigFromLdm }, { readFileSync }] = await Promise.all([
    import('../src/backend/select.js'),
    import('../src/pipeline/pipeline.js'),
    import('node:fs'),
  ]);
  await initBackend({ backend: 'cpu', log: null });
  const config = pipelineConfigFromLdm(JSON.parse(readFileSync(`${TINY_MODEL}/fixture.json`, 'utf8')).config);
  return StableDiffusion.load({ weights: `${TINY_MODEL}/model.safetensors`, config, tokenizer: 'tests/fixtures/tokenizer' });
}

export const TINY_MODEL = 'tests/fixtures/pipeline';

/** `engine` lent to a server: its shutdown does not dispose it (the test goes on using it). */
export const borrowed = (engine: Engine): Engine => ({ limits: engine.limits, generate: (p, o) => engine.generate(p, o), dispose: () => {} });
