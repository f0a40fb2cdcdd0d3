/**
 * `npm run bench:load -- [--model sd15|sdxl] [--runs N] [--cache DIR] [--json]`
 *
 * Loading from a cold page cache against the disk: each round empties the page cache (/proc/sys/vm/drop_caches,
 * so it needs root), reads the bench's fp16 file once straight through (16 MB reads into one buffer: the disk's
 * speed, as `dd` measures it), then once more past the page cache (O_DIRECT, as the loader reads its large tensors,
 * where the system allows it), empties the cache again and loads the model as `sd generate` and `sd serve` do
 * (StableDiffusion.load: every network, the kernels' packed weights, on the backend chosen as usual). Rounds
 * alternate the three, so all meet the same disk; prints each round, the medians and the ratios. The target is a
 * load at 90% of the disk's speed (as dd reads it) or more.
 */
import { closeSync, constants, existsSync, openSync, readSync, statSync, writeFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { join } from 'node:path';
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { initBackend } from '../src/backend/select.js';
import { awaitPacks, readDirect, trimHeap } from '../src/backend/kernels.js';
import { StableDiffusion } from '../src/pipeline/pipeline.js';

const args = yargs(hideBin(process.argv))
  .option('model', { choices: ['sd15', 'sdxl'] as const, default: 'sd15' as const })
  .option('runs', { type: 'number', default: 3 })
  .option('cache', { type: 'string', default: '.cache/bench' })
  .option('json', { type: 'boolean', default: false })
  .strict()
  .parseSync();

const say = (line: string): void => void process.stderr.write(`[load ${new Date().toISOString().slice(11, 19)}] ${line}\n`);
const DROP_CACHES = '/proc/sys/vm/drop_caches';

const weights = join(args.cache, `${args.model}-random-fp16.safetensors`);
if (!existsSync(weights)) {
  process.stderr.write(`${weights} is missing: \`npm run bench -- --model ${args.model}\` writes it once\n`);
  process.exit(1);
}
const mb = statSync(weights).size / 1e6;

/** Empties the page cache (clean pages only: nothing is lost); false where this process may not. */
function dropCaches(): boolean {
  try {
    writeFileSync(DROP_CACHES, '3');
    return true;
  } catch {
    return false;
  }
}
if (!dropCaches()) {
  process.stderr.write(`bench:load empties the page cache through ${DROP_CACHES}, which this process may not write: run it as root\n`);
  process.exit(1);
}

/** Seconds to read the whole file from a cold cache, as `dd bs=16M` does. */
function readThrough(): number {
  dropCaches();
  const fd = openSync(weights, 'r');
  const buf = Buffer.allocUnsafe(16 * 2 ** 20);
  const t0 = performance.now();
  try {
    for (let at = 0, n = 1; n > 0; at += n) n = readSync(fd, buf, 0, buf.length, at);
  } finally {
    closeSync(fd);
  }
  return (performance.now() - t0) / 1000;
}

/**
 * Seconds to read the whole file from a cold cache past the page cache (O_DIRECT, 16 MB reads, as the loader reads
 * large tensors: SafetensorsFile), or null where the system or the kernels cannot.
 */
function readDirectThrough(): number | null {
  if (constants.O_DIRECT === undefined) return null;
  dropCaches();
  let fd: number;
  try {
    fd = openSync(weights, constants.O_RDONLY | constants.O_DIRECT);
  } catch {
    return null; // a file system without direct I/O
  }
  const size = statSync(weights).size, chunk = 16 * 2 ** 20;
  const buf = new Uint8Array(chunk);
  const t0 = performance.now();
  try {
    for (let at = 0; at < size; at += chunk) if (!readDirect(fd, at, buf.subarray(0, Math.min(chunk, size - at)))) return null;
  } finally {
    closeSync(fd);
  }
  return (performance.now() - t0) / 1000;
}

/** Seconds to load every network of the model from a cold cache (its weights packed: the kernels' packing ends). */
async function load(): Promise<number> {
  dropCaches();
  const t0 = performance.now();
  const sd = await StableDiffusion.load({ weights, tokenizer: 'tests/fixtures/tokenizer' });
  awaitPacks();
  const seconds = (performance.now() - t0) / 1000;
  sd.dispose();
  trimHeap();
  return seconds;
}

const backend = await initBackend({});
say(`${weights}: ${mb.toFixed(0)} MB, backend ${backend.name}; ${args.runs} rounds of a read straight through (through the page cache, then past it), then a load`);
const rounds: { disk: number; direct: number | null; load: number }[] = [];
for (let i = 0; i < args.runs; i++) {
  const disk = readThrough();
  const direct = readDirectThrough();
  const loaded = await load();
  rounds.push({ disk: mb / disk, direct: direct === null ? null : mb / direct, load: mb / loaded });
  const past = direct === null ? '' : `, past the cache ${(mb / direct).toFixed(0)} MB/s`;
  say(`round ${i + 1}: disk ${(mb / disk).toFixed(0)} MB/s${past}, load ${(mb / loaded).toFixed(0)} MB/s (${loaded.toFixed(2)} s)`);
}
const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length / 2;
  return Number.isInteger(mid) ? (s[mid - 1] + s[mid]) / 2 : s[Math.floor(mid)];
};
const directs = rounds.flatMap((r) => (r.direct === null ? [] : [r.direct]));
const disk = median(rounds.map((r) => r.disk)), loaded = median(rounds.map((r) => r.load));
const direct = directs.length === rounds.length ? median(directs) : null;
const result = {
  model: args.model, cpu: cpus()[0]?.model ?? 'unknown', backend: backend.name, file_mb: mb, rounds,
  disk_mb_per_s: disk, direct_mb_per_s: direct, load_mb_per_s: loaded, ratio: loaded / disk, ratio_direct: direct === null ? null : loaded / direct,
};
if (args.json) process.stdout.write(JSON.stringify(result) + '\n');
else {
  const rows: [string, string][] = [
    ['file', `${weights} (${mb.toFixed(0)} MB, fp16), on ${result.cpu}, backend ${backend.name}`],
    ['disk, cold (median)', `${disk.toFixed(0)} MB/s through the page cache (as dd reads)`],
    ...(direct === null ? [] : [['', `${direct.toFixed(0)} MB/s past it (O_DIRECT)`] as [string, string]]),
    ['load, cold (median)', `${loaded.toFixed(0)} MB/s`],
    ['load / disk', `${result.ratio.toFixed(2)} (target >= 0.90)${direct === null ? '' : `; ${(loaded / direct).toFixed(2)} of the direct reads`}`],
  ];
  for (const [k, v] of rows) process.stdout.write(`${k.padEnd(22)}${v}\n`);
}
