/**
 * The tfjs-node package folder: bring it back when npm dropped it (its download failed), build its binding
 * against the libtensorflow placed in deps/, and check it loads, in a child process, as the 'tensorflow' backend.
 * Everything is built in a staging copy beside the package and moved into place only once it works.
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { cp, lstat, readFile, readdir, rename, rm, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { dirname, join, relative } from 'node:path';
import { promisify } from 'node:util';
import { SetupError } from './errors.js';

const run = promisify(execFile);

export const NATIVE_PACKAGES = ['@tensorflow/tfjs-node', '@tensorflow/tfjs-node-gpu'] as const;
export type NativePackage = (typeof NATIVE_PACKAGES)[number];

/** What the built binding reported when loaded. */
export interface BindingCheck {
  readonly tfVersion: string;
  readonly gpu: boolean;
}

export function packageDir(root: string, pkg: NativePackage): string {
  return join(root, 'node_modules', pkg);
}

/** The version package-lock.json pins for `pkg` (npm keeps the lock entry when it drops a failed optional dependency). */
export async function lockedVersion(root: string, pkg: NativePackage): Promise<string> {
  const lockPath = join(root, 'package-lock.json');
  let lock: { packages?: Record<string, { version?: string }> };
  try {
    lock = JSON.parse(await readFile(lockPath, 'utf8')) as typeof lock;
  } catch (e) {
    throw new SetupError(`cannot read ${lockPath} (${e instanceof Error ? e.message : String(e)}); run \`npm install\` first`);
  }
  const version = lock.packages?.[`node_modules/${pkg}`]?.version;
  if (version === undefined) throw new SetupError(`${lockPath} has no entry for ${pkg}; add it to optionalDependencies and run \`npm install\``);
  return version;
}

async function digest(file: string): Promise<string | null> {
  try {
    return createHash('sha256').update(await readFile(file)).digest('hex');
  } catch {
    return null;
  }
}

/**
 * `npm install --no-save --ignore-scripts pkg@locked`: the package and its dependencies without its download.
 * package.json and package-lock.json are checked unchanged afterwards (put back and refused if npm touched them).
 */
export async function restorePackage(root: string, pkg: NativePackage, version: string, log: (l: string) => void): Promise<void> {
  const guarded = ['package.json', 'package-lock.json'].map((f) => join(root, f));
  const before = await Promise.all(guarded.map(async (f) => ({ f, text: await readFile(f).catch(() => null), sum: await digest(f) })));
  const args = ['install', '--no-save', '--ignore-scripts', '--prefer-offline', '--no-audit', '--no-fund', `${pkg}@${version}`];
  log(`${pkg} is not in node_modules (npm drops it when its libtensorflow download fails): npm ${args.join(' ')}`);
  try {
    await run('npm', args, { cwd: root, timeout: 900_000, maxBuffer: 64 << 20 });
  } catch (e) {
    const detail = (e as { stderr?: string }).stderr?.trim().split('\n').slice(-3).join(' ') ?? String(e);
    throw new SetupError(`npm could not install ${pkg}@${version} (${detail})`);
  }
  for (const b of before) {
    if ((await digest(b.f)) !== b.sum) {
      if (b.text !== null) await writeFile(b.f, b.text);
      throw new SetupError(`npm changed ${b.f} while installing ${pkg} (put back as it was); install ${pkg}@${version} by hand with --ignore-scripts`);
    }
  }
  if (!existsSync(join(packageDir(root, pkg), 'package.json'))) throw new SetupError(`npm finished but ${packageDir(root, pkg)} is still missing`);
}

/** A copy of the package without its deps/, lib/ and build/ (those are made anew). */
export async function copyPackage(from: string, to: string): Promise<void> {
  const skip = new Set(['deps', 'lib', 'build'].map((d) => join(from, d)));
  await cp(from, to, { recursive: true, verbatimSymlinks: true, filter: (src) => !skip.has(src) });
}

export function nodeHeadersDir(): string | null {
  // Node installed with its headers (distribution packages, nvm, official tarballs): <prefix>/include/node
  const prefix = dirname(dirname(process.execPath));
  return existsSync(join(prefix, 'include', 'node', 'node_api.h')) ? prefix : null;
}

/** node-pre-gyp install --build-from-source: compiles binding/*.cc against deps/include, links deps/lib (~15 s). */
export async function buildBinding(root: string, dir: string): Promise<void> {
  let preGyp: string;
  try {
    preGyp = createRequire(join(root, 'package.json')).resolve('@mapbox/node-pre-gyp/bin/node-pre-gyp');
  } catch {
    throw new SetupError(`@mapbox/node-pre-gyp is not installed in ${root}/node_modules; run \`npm install\``);
  }
  const env: NodeJS.ProcessEnv = { ...process.env };
  const headers = nodeHeadersDir();
  if (env.npm_config_nodedir === undefined && headers !== null) env.npm_config_nodedir = headers;
  env.npm_config_jobs ??= 'max'; // node-gyp: compile the binding's sources in parallel
  try {
    await run(process.execPath, [preGyp, 'install', '--build-from-source'], { cwd: dir, env, timeout: 1_800_000, maxBuffer: 64 << 20 });
  } catch (e) {
    const out = `${(e as { stdout?: string }).stdout ?? ''}\n${(e as { stderr?: string }).stderr ?? ''}`.trim().split('\n').slice(-15).join('\n');
    throw new SetupError(`building the tfjs-node binding failed (g++, make and python3 are needed; Node headers ${headers ?? 'are downloaded by node-gyp'}):\n${out}`);
  }
}

/** Loads the package in a child process: backend 'tensorflow', one matMul, the TensorFlow version. */
export async function checkBinding(root: string, dir: string): Promise<BindingCheck> {
  const script = `
    process.env.TF_CPP_MIN_LOG_LEVEL = process.env.TF_CPP_MIN_LOG_LEVEL || '2';
    require(${JSON.stringify(dir)});
    const tf = require(require.resolve('@tensorflow/tfjs-core', { paths: [${JSON.stringify(root)}] }));
    if (tf.getBackend() !== 'tensorflow') throw new Error('backend is ' + tf.getBackend() + ', not tensorflow');
    const y = tf.matMul(tf.tensor2d([[1, 2], [3, 4]]), tf.tensor2d([[5, 6], [7, 8]]));
    const got = Array.from(y.dataSync()).join(',');
    if (got !== '19,22,43,50') throw new Error('matMul gave ' + got + ', expected 19,22,43,50');
    const b = tf.backend();
    console.log(JSON.stringify({ tfVersion: b.binding.TF_Version, gpu: b.isUsingGpuDevice === true }));`;
  try {
    const { stdout } = await run(process.execPath, ['-e', script], { cwd: root, timeout: 300_000, maxBuffer: 16 << 20 });
    return JSON.parse(stdout.trim().split('\n').pop() ?? '') as BindingCheck;
  } catch (e) {
    const err = (e as { stderr?: string }).stderr?.trim().split('\n').filter((l) => /Error|error:|cannot|undefined symbol/.test(l)).slice(0, 3).join(' ') ?? '';
    throw new SetupError(`${relative(root, dir) || dir} does not load: ${err || (e instanceof Error ? e.message : String(e))}`);
  }
}

/** Bytes under a folder, symlinks not followed. */
export async function diskUsage(dir: string): Promise<number> {
  let total = 0;
  for (const e of await readdir(dir, { withFileTypes: true, recursive: true })) {
    if (e.isFile()) total += (await lstat(join(e.parentPath, e.name))).size;
  }
  return total;
}

/**
 * Put the staged package in place of the installed one, check it there, and roll back if it does not load.
 * `stage` is the staging folder (on the same file system); the old package goes to stage/old and is deleted after.
 */
export async function swapIn(root: string, staged: string, target: string, stage: string): Promise<BindingCheck> {
  const old = join(stage, 'old');
  const hadOld = existsSync(target);
  if (hadOld) await rename(target, old);
  await rename(staged, target);
  try {
    return await checkBinding(root, target);
  } catch (e) {
    await rename(target, join(stage, 'failed'));
    if (hadOld) await rename(old, target);
    throw e;
  } finally {
    await rm(old, { recursive: true, force: true });
  }
}
