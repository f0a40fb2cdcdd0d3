/**
 * `npm run bench -- --peers` (#22): the peers timed right after our own parts, in the same run on the same machine,
 * one after another (never alongside anything of ours), on the same work:
 *   torch        ../shared/peers/torch_sd_bench.py: the SD 1.5 / SDXL base UNet and VAE decoder as PyTorch users run
 *                them (fp32, channels_last, scaled_dot_product_attention), random weights;
 *   onnxruntime  bench/peers/onnx_sd_bench.py: the same modules exported with torch.onnx.export (cached under
 *                <--cache>/onnx; attention as onnxruntime's fused MultiHeadAttention) and run on onnxruntime's CPU
 *                execution provider, every graph optimisation on. SDXL's UNet (10.3 GB of fp32 weights) is skipped,
 *                with the reason in the table, where the machine has too little free memory to export and run it.
 * Both print one JSON line per part (median of N timed runs after a warm-up), which is parsed here, and the ratios
 * ours/peer are computed per part and against the faster peer ("best").
 *
 * The Python: --peer-python PATH, else $SD_PEER_PYTHON, else the first of /tmp/peer/bin/python and python3 that
 * imports torch. The torch peer needs torch (and numpy); the ONNX one also onnxruntime and onnx. A peer whose
 * modules are missing is reported as "not installed: pip install torch==2.13.0+cpu onnxruntime numpy onnx" and the
 * bench still finishes.
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = dirname(fileURLToPath(import.meta.url));
/** The torch peer, beside this checkout: ../shared/peers/ ($SD_TORCH_PEER overrides). */
export const TORCH_PEER = process.env.SD_TORCH_PEER ?? resolve(HERE, '..', '..', 'shared', 'peers', 'torch_sd_bench.py');
export const ONNX_PEER = join(HERE, 'peers', 'onnx_sd_bench.py');
export const PEER_INSTALL = 'pip install torch==2.13.0+cpu onnxruntime numpy onnx';
const DEFAULT_PYTHONS = ['/tmp/peer/bin/python', 'python3'];

export type PeerName = 'torch' | 'onnxruntime';
export const PEER_NAMES: readonly PeerName[] = ['torch', 'onnxruntime'];
export type PartName = 'unet' | 'vae';

/** One part as a peer printed it. */
export interface PeerTiming {
  readonly median_s: number;
  readonly runs_s: readonly number[];
  readonly warmup_s: number;
  readonly gflop_per_s: number;
  readonly threads: number;
  /** The peer's own line, as printed. */
  readonly line: Record<string, unknown>;
}

export interface PeerRun {
  /** 'ok': it ran (a part may still be skipped); 'not installed' / 'missing' / 'failed': see `problem`. */
  readonly status: 'ok' | 'not installed' | 'missing' | 'failed';
  readonly problem: string | null;
  readonly version: string | null;
  readonly seconds: number;
  readonly unet: PeerTiming | null;
  readonly vae: PeerTiming | null;
  /** Parts the peer ran but could not time, and why (e.g. SDXL's export on too little memory). */
  readonly skipped: Partial<Record<PartName, string>>;
}

export interface PartRatios {
  readonly ours_s: number;
  readonly torch: number | null;
  readonly onnxruntime: number | null;
  /** ours / the faster peer's time, and which peer that was. */
  readonly best: number | null;
  readonly best_peer: PeerName | null;
}

export interface PeersReport {
  readonly python: string | null;
  readonly torch: PeerRun;
  readonly onnxruntime: PeerRun;
  /** ours / peer (below 1: ours is faster). */
  readonly ratios: Record<PartName, PartRatios>;
}

export interface PeerOptions {
  readonly model: 'sd15' | 'sdxl';
  /** Image side in pixels (SD 1.5: 512; SDXL: 1024, 768 or 512). */
  readonly size: number;
  readonly runs: number;
  readonly threads: number;
  /** The bench's cache folder; the ONNX exports go to <cache>/onnx. */
  readonly cache: string;
  readonly python?: string;
  readonly say: (s: string) => void;
}

/** Which modules of `mods` do not import in `python` (all of them when it does not run); and torch's version. */
function probe(python: string, mods: readonly string[]): { missing: string[]; versions: Record<string, string>; runs: boolean } {
  const code = [
    'import importlib, json',
    'out = {}',
    `for m in ${JSON.stringify(mods)}:`,
    '    try: out[m] = getattr(importlib.import_module(m), "__version__", "?")',
    '    except Exception: out[m] = None',
    'print(json.dumps(out))',
  ].join('\n');
  const r = spawnSync(python, ['-c', code], { encoding: 'utf8', timeout: 120_000 });
  if (r.status !== 0 || r.stdout === null) return { missing: [...mods], versions: {}, runs: false };
  try {
    const got = JSON.parse(r.stdout.trim().split('\n').at(-1) ?? '{}') as Record<string, string | null>;
    const versions: Record<string, string> = {};
    for (const [m, v] of Object.entries(got)) if (v !== null) versions[m] = v;
    return { missing: mods.filter((m) => got[m] === null || got[m] === undefined), versions, runs: true };
  } catch {
    return { missing: [...mods], versions: {}, runs: false };
  }
}

/** The Python to run the peers with: the one asked for, else the first default that imports torch. */
export function findPython(asked?: string): { python: string | null; tried: string[] } {
  const explicit = asked ?? (process.env.SD_PEER_PYTHON || undefined);
  if (explicit !== undefined) return { python: explicit, tried: [explicit] };
  const tried: string[] = [];
  for (const p of DEFAULT_PYTHONS) {
    if (p.startsWith('/') && !existsSync(p)) continue;
    tried.push(p);
    const r = probe(p, ['torch']);
    if (r.runs && r.missing.length === 0) return { python: p, tried };
  }
  // none has torch: report on the first that runs at all
  return { python: tried.find((p) => probe(p, []).runs) ?? null, tried };
}

const partOf = (model: string): PartName | null => (model.includes('unet') ? 'unet' : model.includes('vae') ? 'vae' : null);

const notRun = (status: PeerRun['status'], problem: string): PeerRun => ({
  status, problem, version: null, seconds: 0, unet: null, vae: null, skipped: {},
});

/** Runs one peer script to its end, its progress (stderr) passed on, its JSON lines (stdout) parsed. */
async function runPeer(name: PeerName, python: string, script: string, args: string[], env: NodeJS.ProcessEnv, version: string | null,
  say: (s: string) => void): Promise<PeerRun> {
  say(`peer ${name}: ${python} ${[script, ...args].join(' ')}`);
  const t0 = performance.now();
  const lines: Record<string, unknown>[] = [];
  const tail: string[] = [];
  const code = await new Promise<number | null>((done) => {
    const child = spawn(python, [script, ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      out += d;
      let i;
      while ((i = out.indexOf('\n')) >= 0) {
        const line = out.slice(0, i).trim();
        out = out.slice(i + 1);
        if (!line.startsWith('{')) continue;
        try {
          lines.push(JSON.parse(line) as Record<string, unknown>);
          say(`peer ${name}: ${line}`);
        } catch {
          // not one of its result lines
        }
      }
    });
    child.stderr.setEncoding('utf8').on('data', (d: string) => {
      for (const l of d.split('\n')) {
        if (l.trim() === '' || /DeprecationWarning|torch\.onnx\.export\(/.test(l)) continue;
        tail.push(l);
        if (tail.length > 20) tail.shift();
        process.stderr.write(`  [${name}] ${l}\n`);
      }
    });
    child.on('error', (e) => {
      tail.push(e.message);
      done(null);
    });
    child.on('close', (c) => done(c));
  });
  const seconds = (performance.now() - t0) / 1000;
  const parts: Partial<Record<PartName, PeerTiming>> = {};
  const skipped: Partial<Record<PartName, string>> = {};
  for (const l of lines) {
    const part = partOf(String(l.model));
    if (part === null) continue;
    if (typeof l.skipped === 'string') skipped[part] = l.skipped;
    else if (typeof l.median_s === 'number') {
      parts[part] = {
        median_s: l.median_s, runs_s: (l.runs_s as number[] | undefined) ?? [], warmup_s: Number(l.warmup_s),
        gflop_per_s: Number(l.gflop_per_s), threads: Number(l.threads), line: l,
      };
    }
  }
  const failed = code !== 0;
  return {
    status: failed && Object.keys(parts).length === 0 ? 'failed' : 'ok',
    problem: failed ? `exited with ${code ?? 'an error'}: ${tail.slice(-3).join(' | ')}` : null,
    version, seconds, unet: parts.unet ?? null, vae: parts.vae ?? null, skipped,
  };
}

/** Both peers, one after the other, on the bench's work; then the ratios to `ours` (seconds per part). */
export async function runPeers(opts: PeerOptions, ours: Record<PartName, number>): Promise<PeersReport> {
  const { python, tried } = findPython(opts.python);
  const sizeArgs = opts.model === 'sdxl' ? ['--model', 'sdxl', '--size', String(opts.size)] : [];
  const common = ['both', String(opts.runs), ...sizeArgs];
  const env = { ...process.env, OMP_NUM_THREADS: String(opts.threads), PYTHONUNBUFFERED: '1' };
  const run = async (name: PeerName, script: string, mods: string[], extra: string[]): Promise<PeerRun> => {
    if (python === null) return notRun('not installed', `no Python found (tried ${tried.join(', ')}): ${PEER_INSTALL}`);
    if (!existsSync(script)) return notRun('missing', `${script} not found`);
    const p = probe(python, mods);
    if (!p.runs) return notRun('not installed', `${python} does not run: ${PEER_INSTALL}`);
    if (p.missing.length > 0) return notRun('not installed', `${p.missing.join(', ')} not installed in ${python}: ${PEER_INSTALL}`);
    const version = name === 'torch' ? p.versions.torch : `${p.versions.onnxruntime} (export: torch ${p.versions.torch})`;
    return runPeer(name, python, script, [...common, ...extra], env, version ?? null, opts.say);
  };
  const torch = await run('torch', TORCH_PEER, ['torch', 'numpy'], []);
  const onnx = await run('onnxruntime', ONNX_PEER, ['torch', 'numpy', 'onnx', 'onnxruntime'],
    ['--threads', String(opts.threads), '--cache', join(opts.cache, 'onnx'), '--peer', TORCH_PEER]);
  const ratios = (part: PartName): PartRatios => {
    const t = torch[part]?.median_s ?? null;
    const o = onnx[part]?.median_s ?? null;
    const best = t === null ? o : o === null ? t : Math.min(t, o);
    return {
      ours_s: ours[part],
      torch: t === null ? null : ours[part] / t,
      onnxruntime: o === null ? null : ours[part] / o,
      best: best === null ? null : ours[part] / best,
      best_peer: best === null ? null : best === t ? 'torch' : 'onnxruntime',
    };
  };
  return { python, torch, onnxruntime: onnx, ratios: { unet: ratios('unet'), vae: ratios('vae') } };
}

const sec = (v: number | null | undefined) => (v === null || v === undefined ? '-' : v.toFixed(2));
const ratio = (v: number | null) => (v === null ? '-' : `${v.toFixed(2)}x`);

/** The peers' table: part, ours (s), torch (s), onnx (s), ours/torch, ours/onnx, ours/best; then each peer's status. */
export function peerTable(r: PeersReport, labels: Record<PartName, string>): string[] {
  const head = ['part', 'ours (s)', 'torch (s)', 'onnx (s)', 'ours/torch', 'ours/onnx', 'ours/best'];
  const rows = (['unet', 'vae'] as const).map((p) => {
    const q = r.ratios[p];
    const short = q.best_peer === 'onnxruntime' ? 'onnx' : q.best_peer;
    return [labels[p], sec(q.ours_s), sec(r.torch[p]?.median_s), sec(r.onnxruntime[p]?.median_s), ratio(q.torch), ratio(q.onnxruntime),
      q.best === null ? '-' : `${ratio(q.best)} (${short})`];
  });
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i].length)));
  const fmt = (row: string[]) => row.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ');
  const out = [fmt(head), ...rows.map(fmt)];
  for (const name of PEER_NAMES) {
    const p = r[name];
    const attention = (p.unet ?? p.vae)?.line.attention;
    const what = p.status === 'ok'
      ? `${name} ${p.version ?? ''}${typeof attention === 'string' ? `, attention ${attention === 'mha' ? 'as MultiHeadAttention' : attention}` : ''}, `
        + `${p.unet?.threads ?? p.vae?.threads ?? '?'} threads, ${p.seconds.toFixed(0)} s in all`
      : `${name}: ${p.status}: ${p.problem ?? ''}`;
    out.push(`  ${what}`);
    if (p.status === 'ok' && p.problem !== null) out.push(`  ${name}: ${p.problem}`);
    for (const [part, why] of Object.entries(p.skipped)) out.push(`  ${name} ${part}: skipped: ${why}`);
  }
  if (r.python !== null) out.push(`  python: ${r.python}`);
  return out;
}
