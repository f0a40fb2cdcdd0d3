/**
 * GET /metrics of the in-process server (no Redis): Prometheus text whose counters and histograms follow the jobs
 * run by a fake engine (a failing prompt included); and the queue's job format: byte fields (init image, mask,
 * control images) survive the trip through JSON as themselves, not as arrays of numbers.
 */
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { encodePng } from '../src/image/codec.js';
import type { GenerateOptions, GenerateParams, GenerateResult } from '../src/pipeline/api.js';
import { resolveParams, type ParamLimits } from '../src/pipeline/params.js';
import { decodeParams, encodeParams } from '../src/queue/protocol.js';
import type { Engine } from '../src/server/engine.js';
import { SdServer } from '../src/server/server.js';

class QuickEngine implements Engine {
  readonly limits: ParamLimits = { width: 16, height: 16, minSize: 8, clipLayers: 3 };
  async generate(p: GenerateParams, o: GenerateOptions): Promise<GenerateResult> {
    const r = resolveParams(p, this.limits);
    if (p.prompt === 'fail') throw new Error('the engine broke');
    for (let s = 1; s <= r.steps; s++) o.onProgress?.(s, r.steps);
    const rgb = new Uint8Array(r.width * r.height * 3).fill(9);
    return { images: [{ png: await encodePng({ rgb, width: r.width, height: r.height }), rgb, seed: r.seed }], params: r };
  }
  dispose(): void {}
}

let server: SdServer;

beforeAll(async () => {
  server = await SdServer.start({ loadEngine: async () => new QuickEngine(), outputs: mkdtempSync(path.join(tmpdir(), 'sd-metrics-')) }, { port: 0, host: '127.0.0.1' });
  await server.ready();
});

afterAll(() => server.shutdown({ graceS: 0 }));

const post = (body: unknown): Promise<Response> =>
  fetch(`${server.url}/inference`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });

describe('GET /metrics in process', () => {
  it('counts the finished jobs by status, their durations, the queue and the running jobs', async () => {
    expect((await post({ prompt: 'a', steps: 2 })).status).toBe(200);
    expect((await post({ prompt: 'b', steps: 3 })).status).toBe(200);
    expect((await post({ prompt: 'fail', steps: 1 })).status).toBe(500);
    const res = await fetch(`${server.url}/metrics`);
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toBe('text/plain; version=0.0.4; charset=utf-8');
    const text = await res.text();
    expect(text).toContain('# TYPE sd_jobs_total counter\n');
    expect(text).toContain('sd_jobs_total{status="succeeded"} 2\n');
    expect(text).toContain('sd_jobs_total{status="failed"} 1\n');
    expect(text).toContain('sd_job_failures_total 1\n');
    expect(text).toContain('sd_job_duration_seconds_bucket{le="+Inf"} 2\n');
    expect(text).toContain('sd_job_duration_seconds_count 2\n');
    expect(text).toContain('sd_job_wait_seconds_count 3\n');
    expect(text).toContain('sd_queue_depth 0\n');
    expect(text).toContain('sd_jobs_running 0\n');
    expect(text).not.toContain('sd_workers'); // only in queue mode
    // buckets are cumulative
    const buckets = [...text.matchAll(/^sd_job_duration_seconds_bucket\{le="[^"]+"\} (\d+)$/gm)].map((m) => Number(m[1]));
    expect(buckets).toEqual([...buckets].sort((x, y) => x - y));
  });
});

describe('the queue job format', () => {
  it('byte fields come back as the same bytes, everything else unchanged', () => {
    const initImage = new Uint8Array([0, 1, 2, 250, 255]);
    const mask = Buffer.from([7, 7, 7]);
    const p: GenerateParams = { prompt: 'x', seed: 4, strength: 0.5, initImage, mask, controlNets: [{ model: '/m/c.safetensors', image: new Uint8Array([9, 8]), scale: 0.7 }] };
    const wire = JSON.parse(JSON.stringify(encodeParams(p))) as Record<string, unknown>;
    expect(wire.initImage).toEqual({ $bytes: Buffer.from(initImage).toString('base64') });
    expect(wire.mask).toEqual({ $bytes: mask.toString('base64') });
    const back = decodeParams(wire);
    expect(back.initImage).toBeInstanceOf(Uint8Array);
    expect([...(back.initImage ?? [])]).toEqual([...initImage]);
    expect([...(back.mask ?? [])]).toEqual([...mask]);
    expect([...(back.controlNets?.[0].image ?? [])]).toEqual([9, 8]);
    expect({ ...back, initImage: undefined, mask: undefined, controlNets: undefined }).toEqual({ prompt: 'x', seed: 4, strength: 0.5 });
    expect(back.controlNets?.[0]).toMatchObject({ model: '/m/c.safetensors', scale: 0.7 });
  });
});
