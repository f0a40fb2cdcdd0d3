/**
 * Where libtensorflow comes from, in order: `--from` (a wheel file, an unpacked wheel folder or an installed
 * `tensorflow` package folder), a TensorFlow installed in the machine's Python (found by path: importing it takes
 * seconds), else `pip download` of the pinned wheel into the cache. Every source is seen the same way: members
 * named as inside the `tensorflow/` package folder ("libtensorflow_cc.so.2", "include/tensorflow/c/c_api.h").
 */
import { execFile } from 'node:child_process';
import { copyFile, mkdir, readdir, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { WeightsError } from '../weights/types.js';
import { ZipArchive } from '../weights/zip.js';
import { SetupError } from './errors.js';

const run = promisify(execFile);

/** The TensorFlow release whose wheel carries the libtensorflow the binding links (C API unchanged since 2.9). */
export interface WheelSpec {
  readonly cpu: string;
  readonly gpu: string;
  /** How a downloaded wheel's file name starts, to find it in the cache without asking pip. */
  readonly cpuPrefix: string;
  readonly gpuPrefix: string;
}
export const TF_WHEEL: WheelSpec = Object.freeze({
  cpu: 'tensorflow-cpu==2.21.0',
  gpu: 'tensorflow==2.21.0',
  cpuPrefix: 'tensorflow_cpu-2.21.0-',
  gpuPrefix: 'tensorflow-2.21.0-',
});

export const LIB_CC = 'libtensorflow_cc.so.2';
export const LIB_FRAMEWORK = 'libtensorflow_framework.so.2';

export interface LibSource {
  /** Said in progress lines: "wheel /x/y.whl", "installed TensorFlow at /site-packages/tensorflow". */
  readonly description: string;
  has(member: string): Promise<boolean>;
  read(member: string): Promise<Buffer>;
  copyTo(member: string, dest: string): Promise<void>;
  /** Frees what the source holds open; it must not be used afterwards. */
  close(): void;
}

/**
 * A wheel's members under `prefix` ("tensorflow/" in a TensorFlow wheel), read with the zip reader the weights
 * share (src/weights/zip.ts): deflated members inflated, the big libraries streamed to disk, every member
 * CRC- and size-checked. Its WeightsErrors become SetupErrors.
 */
export class WheelSource implements LibSource {
  private constructor(
    private readonly zip: ZipArchive,
    private readonly prefix: string,
  ) {}

  static async open(path: string, prefix = 'tensorflow/'): Promise<WheelSource> {
    try {
      return new WheelSource(ZipArchive.open(path), prefix);
    } catch (e) {
      rethrowAsSetupError(e, ': it is not a zip/wheel file that can be read; delete it (a cached download is fetched again) or pass another with --from');
    }
  }

  get description(): string {
    return `wheel ${this.zip.path}`;
  }
  /** Members under the prefix, named without it. */
  names(): string[] {
    return this.zip.names().filter((n) => n.startsWith(this.prefix)).map((n) => n.slice(this.prefix.length));
  }
  async has(member: string): Promise<boolean> {
    return this.zip.entries.has(this.prefix + member);
  }
  async read(member: string): Promise<Buffer> {
    try {
      const bytes = this.zip.readEntry(this.prefix + member);
      return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    } catch (e) {
      rethrowAsSetupError(e, '');
    }
  }
  async copyTo(member: string, dest: string): Promise<void> {
    await this.zip.extract(this.prefix + member, dest).catch((e: unknown) => rethrowAsSetupError(e, ''));
  }
  close(): void {
    this.zip.close();
  }
}

/** Throws the zip reader's WeightsError as the SetupError setup-native reports, `advice` appended; other errors as they are. */
function rethrowAsSetupError(e: unknown, advice: string): never {
  if (e instanceof WeightsError) throw new SetupError(e.message + advice, { cause: e });
  throw e;
}

class FolderSource implements LibSource {
  constructor(
    private readonly root: string,
    readonly description: string,
  ) {}
  async has(member: string): Promise<boolean> {
    return isFile(join(this.root, member));
  }
  read(member: string): Promise<Buffer> {
    return readFile(join(this.root, member));
  }
  copyTo(member: string, dest: string): Promise<void> {
    return copyFile(join(this.root, member), dest);
  }
  close(): void {}
}

async function isFile(p: string): Promise<boolean> {
  try {
    return (await stat(p)).isFile();
  } catch {
    return false;
  }
}

async function isDir(p: string): Promise<boolean> {
  try {
    return (await stat(p)).isDirectory();
  } catch {
    return false;
  }
}

/** A folder holding libtensorflow_cc.so.2: the tensorflow package itself, or a wheel unpacked (tensorflow/ inside). */
async function folderSource(dir: string, what: string): Promise<LibSource | null> {
  for (const root of [dir, join(dir, 'tensorflow')]) {
    if (await isFile(join(root, LIB_CC))) return new FolderSource(root, `${what} ${root}`);
  }
  return null;
}

/** `--from PATH`: a wheel (any zip), an unpacked wheel, or an installed tensorflow package folder. */
export async function sourceFromPath(path: string): Promise<LibSource> {
  if (await isDir(path)) {
    const src = await folderSource(path, 'TensorFlow folder');
    if (src === null) throw new SetupError(`--from ${path}: no ${LIB_CC} in it or in ${join(path, 'tensorflow')}; pass a TensorFlow wheel, an unpacked wheel or the installed tensorflow package folder`);
    return src;
  }
  if (!(await isFile(path))) throw new SetupError(`--from ${path}: no such file or folder`);
  const wheel = await WheelSource.open(path);
  if (!(await wheel.has(LIB_CC))) {
    wheel.close();
    throw new SetupError(`--from ${path}: this zip has no tensorflow/${LIB_CC}; pass a TensorFlow 2.x wheel for Linux (tensorflow or tensorflow-cpu)`);
  }
  return wheel;
}

/** site-packages folders of python3, asked without importing TensorFlow (that takes seconds). */
async function sitePackages(python: string): Promise<string[]> {
  const code = 'import json, site, sys; print(json.dumps(site.getsitepackages() + [site.getusersitepackages()] + sys.path))';
  try {
    const { stdout } = await run(python, ['-c', code], { timeout: 30_000 });
    return [...new Set(JSON.parse(stdout) as string[])].filter((p) => p !== '');
  } catch {
    return [];
  }
}

/** True when `dir` holds the dist-info of the CUDA-enabled `tensorflow` distribution (not tensorflow_cpu). */
async function hasCudaDistribution(dir: string): Promise<boolean> {
  try {
    return (await readdir(dir)).some((f) => /^tensorflow-[\d.]+\.dist-info$/.test(f));
  } catch {
    return false;
  }
}

/** An installed TensorFlow in the machine's Python (SD_PYTHON, else python3), or null; with gpu, only `tensorflow`. */
export async function sourceFromPython(python: string, gpu: boolean): Promise<LibSource | null> {
  for (const dir of await sitePackages(python)) {
    const tfDir = join(dir, 'tensorflow');
    if (!(await isFile(join(tfDir, LIB_CC)))) continue;
    if (gpu && !(await hasCudaDistribution(dir))) continue;
    return new FolderSource(tfDir, 'installed TensorFlow at');
  }
  return null;
}

async function cachedWheel(dir: string, prefix: string): Promise<string | null> {
  try {
    const hit = (await readdir(dir)).filter((f) => f.startsWith(prefix) && f.endsWith('.whl')).sort();
    return hit.length > 0 ? join(dir, hit[hit.length - 1]) : null;
  } catch {
    return null;
  }
}

/** The pinned wheel from the cache, else `pip download`ed into it (works offline where pip has a local index). */
export async function sourceFromPip(python: string, cacheDir: string, gpu: boolean, log: (l: string) => void): Promise<LibSource> {
  const spec = gpu ? TF_WHEEL.gpu : TF_WHEEL.cpu;
  const prefix = gpu ? TF_WHEEL.gpuPrefix : TF_WHEEL.cpuPrefix;
  let wheel = await cachedWheel(cacheDir, prefix);
  if (wheel === null) {
    await mkdir(cacheDir, { recursive: true });
    log(`downloading ${spec} with pip into ${cacheDir} (${gpu ? 'several hundred MB' : 'about 270 MB'})`);
    try {
      await run(python, ['-m', 'pip', 'download', spec, '--no-deps', '--only-binary=:all:', '-d', cacheDir], { timeout: 3_600_000, maxBuffer: 64 << 20 });
    } catch (e) {
      const detail = e instanceof Error ? (e as Error & { stderr?: string }).stderr?.trim().split('\n').slice(-3).join(' ') || e.message : String(e);
      throw new SetupError(`\`${python} -m pip download ${spec}\` failed (${detail}); download a TensorFlow wheel for this machine yourself and run \`sd setup-native --from FILE.whl\``);
    }
    wheel = await cachedWheel(cacheDir, prefix);
    if (wheel === null) throw new SetupError(`pip reported success but no ${prefix}*.whl is in ${cacheDir}`);
  } else {
    log(`using the cached wheel ${wheel}`);
  }
  return sourceFromPath(wheel);
}
