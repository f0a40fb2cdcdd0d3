/**
 * `sd setup-native`: the native `tensorflow` backend without tfjs-node's libtensorflow download.
 *
 * tfjs-node 4.22 links libtensorflow 2.9.1 and downloads it at install; offline (or when the download 404s) npm
 * drops the package. A TensorFlow 2.x wheel carries a libtensorflow with the same C API (BACKENDS.md), so:
 *   1. find libtensorflow: --from, else a TensorFlow in python3's site-packages, else `pip download` into the cache;
 *   2. bring node_modules/@tensorflow/tfjs-node(-gpu) back if npm dropped it (locked version, scripts off);
 *   3. in a staging copy of the package: deps/lib gets libtensorflow_cc.so.2 and libtensorflow_framework.so.2
 *      under the names the binding links (libtensorflow.so[.2.9.1], libtensorflow_framework.so[.2.9.1]), refused
 *      unless they are ELF libraries for this machine exporting the C API the binding calls; deps/include gets
 *      the headers the binding includes (followed transitively, ~1 MB of the wheel's 268 MB include/);
 *   4. build the binding there, load it in a child process, then move the copy into place (rolled back on failure).
 */
import { mkdir, mkdtemp, open, readFile, readdir, rm, symlink, unlink } from 'node:fs/promises';
import { dirname, join, posix } from 'node:path';
import { fileURLToPath } from 'node:url';
import { homedir } from 'node:os';
import { checkExports } from './elf.js';
import { SetupError } from './errors.js';
import {
  buildBinding, checkBinding, copyPackage, diskUsage, lockedVersion, packageDir, restorePackage, swapIn,
  type BindingCheck, type NativePackage,
} from './package.js';
import { LIB_CC, LIB_FRAMEWORK, sourceFromPath, sourceFromPip, sourceFromPython, type LibSource } from './source.js';

/** The C API functions tfjs-node 4.22's binding (binding/*.cc) calls; the two libraries must export them all. */
export const TF_C_API: readonly string[] = Object.freeze([
  'TF_Version', 'TF_NewTensor', 'TF_AllocateTensor', 'TF_DeleteTensor', 'TF_TensorData', 'TF_TensorByteSize',
  'TF_TensorType', 'TF_TensorElementCount', 'TF_NumDims', 'TF_Dim', 'TF_DataTypeSize', 'TF_NewStatus',
  'TF_DeleteStatus', 'TF_GetCode', 'TF_Message', 'TF_NewBuffer', 'TF_NewBufferFromString', 'TF_DeleteBuffer',
  'TF_NewGraph', 'TF_DeleteGraph', 'TF_GraphOperationByName', 'TF_NewSessionOptions', 'TF_DeleteSessionOptions',
  'TF_LoadSessionFromSavedModel', 'TF_SessionRun', 'TF_DeleteSession', 'TF_DeviceListCount', 'TF_DeviceListName',
  'TF_DeviceListType', 'TF_DeleteDeviceList', 'TFE_NewContextOptions', 'TFE_DeleteContextOptions', 'TFE_NewContext',
  'TFE_DeleteContext', 'TFE_ContextListDevices', 'TFE_NewOp', 'TFE_DeleteOp', 'TFE_OpAddInput', 'TFE_OpSetAttrBool',
  'TFE_OpSetAttrBoolList', 'TFE_OpSetAttrFloat', 'TFE_OpSetAttrFloatList', 'TFE_OpSetAttrInt', 'TFE_OpSetAttrIntList',
  'TFE_OpSetAttrShape', 'TFE_OpSetAttrString', 'TFE_OpSetAttrType', 'TFE_Execute', 'TFE_NewTensorHandle',
  'TFE_DeleteTensorHandle', 'TFE_TensorHandleCopyToDevice', 'TFE_TensorHandleDataType', 'TFE_TensorHandleDim',
  'TFE_TensorHandleNumDims', 'TFE_TensorHandleResolve',
]);

/** deps/lib names tfjs-node's binding.gyp and install script expect (libtensorflow 2.9.1 naming) -> wheel file. */
const LINKS: Readonly<Record<string, string>> = Object.freeze({
  'libtensorflow.so': LIB_CC,
  'libtensorflow.so.2.9.1': LIB_CC,
  'libtensorflow_framework.so': LIB_FRAMEWORK,
  'libtensorflow_framework.so.2.9.1': LIB_FRAMEWORK,
});

export interface SetupOptions {
  /** A wheel, an unpacked wheel or an installed tensorflow package folder. */
  readonly from?: string;
  /** Set up @tensorflow/tfjs-node-gpu (from the CUDA-enabled `tensorflow` wheel) instead of tfjs-node. */
  readonly gpu?: boolean;
  /** Rebuild even when the package already loads. */
  readonly force?: boolean;
  /** Project folder holding node_modules and package-lock.json; default: this checkout. */
  readonly root?: string;
  readonly python?: string;
  readonly cacheDir?: string;
  readonly log?: (line: string) => void;
}

export interface SetupResult {
  readonly package: NativePackage;
  readonly dir: string;
  readonly check: BindingCheck;
  /** Where libtensorflow came from; null when the package already worked and nothing was done. */
  readonly source: string | null;
  readonly seconds: number;
  /** Bytes now in the package's deps/ and lib/. */
  readonly bytes: number;
}

/** src/setup (or dist/setup) -> the checkout. */
export function defaultRoot(): string {
  return dirname(dirname(dirname(fileURLToPath(import.meta.url))));
}

export function defaultCacheDir(): string {
  return join(process.env.SD_CACHE_DIR || join(process.env.XDG_CACHE_HOME || join(homedir(), '.cache'), 'sd-tfjs'), 'wheels');
}

export async function setupNative(o: SetupOptions = {}): Promise<SetupResult> {
  const t0 = performance.now();
  const log = o.log ?? (() => undefined);
  const root = o.root ?? defaultRoot();
  const pkg: NativePackage = o.gpu === true ? '@tensorflow/tfjs-node-gpu' : '@tensorflow/tfjs-node';
  const dir = packageDir(root, pkg);
  const done = async (check: BindingCheck, source: string | null): Promise<SetupResult> => ({
    package: pkg, dir, check, source, seconds: (performance.now() - t0) / 1000,
    bytes: (await diskUsage(join(dir, 'deps')).catch(() => 0)) + (await diskUsage(join(dir, 'lib')).catch(() => 0)),
  });

  if (o.force !== true && o.from === undefined) {
    const ok = await checkBinding(root, dir).catch(() => null);
    if (ok !== null) {
      log(`${pkg} already loads (TensorFlow ${ok.tfVersion}); --force rebuilds it`);
      return done(ok, null);
    }
  }
  const source = await findSource(o, log);
  try {
    log(`libtensorflow from ${source.description}`);
    await ensurePackage(root, pkg, log);
    const check = await withLock(dirname(dir), () => stageAndSwap(root, pkg, source, log));
    log(`${pkg} works: backend 'tensorflow', TensorFlow ${check.tfVersion}${check.gpu ? ', GPU' : ''}`);
    return await done(check, source.description);
  } finally {
    source.close();
  }
}

async function findSource(o: SetupOptions, log: (l: string) => void): Promise<LibSource> {
  if (o.from !== undefined) return sourceFromPath(o.from);
  const python = o.python ?? (process.env.SD_PYTHON || 'python3');
  const installed = await sourceFromPython(python, o.gpu === true);
  if (installed !== null) return installed;
  return sourceFromPip(python, o.cacheDir ?? defaultCacheDir(), o.gpu === true, log);
}

async function ensurePackage(root: string, pkg: NativePackage, log: (l: string) => void): Promise<void> {
  try {
    await readdir(packageDir(root, pkg));
  } catch {
    await restorePackage(root, pkg, await lockedVersion(root, pkg), log);
  }
}

async function stageAndSwap(root: string, pkg: NativePackage, source: LibSource, log: (l: string) => void): Promise<BindingCheck> {
  const dir = packageDir(root, pkg);
  await removeStaleStages(dirname(dir));
  const stage = await mkdtemp(join(dirname(dir), '.sd-setup-'));
  try {
    const staged = join(stage, 'package');
    await copyPackage(dir, staged);
    await placeLibraries(source, join(staged, 'deps', 'lib'), log);
    await placeHeaders(source, staged, join(staged, 'deps', 'include'), log);
    log('building the binding (node-pre-gyp, g++)');
    let t = performance.now();
    await buildBinding(root, staged);
    log(`built in ${((performance.now() - t) / 1000).toFixed(1)} s; loading it in a child process`);
    t = performance.now();
    await checkBinding(root, staged);
    log(`loads (${((performance.now() - t) / 1000).toFixed(1)} s); moving it into ${dir}`);
    return await swapIn(root, staged, dir, stage);
  } finally {
    await rm(stage, { recursive: true, force: true });
  }
}

/** Staging folders a killed setup left behind (only called while holding the lock). */
async function removeStaleStages(dir: string): Promise<void> {
  for (const f of await readdir(dir)) if (f.startsWith('.sd-setup-')) await rm(join(dir, f), { recursive: true, force: true });
}

/** Copy both libraries, check them (ELF for this machine, C API exported), then link the 2.9.1 names. */
async function placeLibraries(source: LibSource, libDir: string, log: (l: string) => void): Promise<void> {
  await mkdir(libDir, { recursive: true });
  for (const lib of [LIB_FRAMEWORK, LIB_CC]) {
    if (!(await source.has(lib))) throw new SetupError(`${source.description} has no ${lib}; it is not a TensorFlow 2.x package for Linux`);
    const t = performance.now();
    await source.copyTo(lib, join(libDir, lib));
    log(`  ${lib} (${((performance.now() - t) / 1000).toFixed(1)} s)`);
  }
  // TF 2.21 splits the C API: TF_Version and TFE_* in libtensorflow_cc, TF_NewTensor and TF_GetCode in the framework
  await checkExports([join(libDir, LIB_CC), join(libDir, LIB_FRAMEWORK)], TF_C_API, 'the TensorFlow C API');
  for (const [name, target] of Object.entries(LINKS)) await symlink(target, join(libDir, name));
}

const INCLUDE_RE = /^\s*#\s*include\s*["<]([^">]+)[">]/gm;

/** The wheel's headers the binding includes, followed transitively (only those the wheel has). */
async function placeHeaders(source: LibSource, pkgDir: string, includeDir: string, log: (l: string) => void): Promise<void> {
  const pending: string[] = [];
  for (const f of await readdir(join(pkgDir, 'binding'))) {
    const text = await readFile(join(pkgDir, 'binding', f), 'utf8');
    for (const m of text.matchAll(INCLUDE_RE)) pending.push(m[1]);
  }
  const seen = new Set<string>();
  while (pending.length > 0) {
    const h = posix.normalize(pending.pop() ?? '');
    if (seen.has(h) || !(await source.has(`include/${h}`))) continue;
    seen.add(h);
    const text = (await source.read(`include/${h}`)).toString('utf8');
    for (const m of text.matchAll(INCLUDE_RE)) pending.push(m[1]);
  }
  if (!seen.has('tensorflow/c/c_api.h') || !seen.has('tensorflow/c/eager/c_api.h')) {
    throw new SetupError(`${source.description} has no include/tensorflow/c/c_api.h and eager/c_api.h; use a TensorFlow wheel (the headers ship in it)`);
  }
  for (const h of seen) {
    await mkdir(dirname(join(includeDir, h)), { recursive: true });
    await source.copyTo(`include/${h}`, join(includeDir, h));
  }
  log(`  ${seen.size} headers`);
}

/** One setup at a time per node_modules/@tensorflow folder; a lock left by a dead process is taken over. */
async function withLock<T>(dir: string, body: () => Promise<T>): Promise<T> {
  const lock = join(dir, '.sd-setup.lock');
  for (let attempt = 0; ; attempt++) {
    try {
      const fh = await open(lock, 'wx');
      await fh.writeFile(String(process.pid));
      await fh.close();
      break;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST' || attempt > 0) throw new SetupError(`cannot take ${lock}: ${(e as Error).message}`);
      const pid = Number(await readFile(lock, 'utf8').catch(() => 'NaN'));
      if (Number.isInteger(pid) && pid > 0 && alive(pid)) throw new SetupError(`another setup-native (pid ${pid}) is running; wait for it or delete ${lock}`);
      await unlink(lock).catch(() => undefined);
    }
  }
  try {
    return await body();
  } finally {
    await unlink(lock).catch(() => undefined);
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}
