/**
 * Builds native/kernels.c into native/build/sd_kernels.node (src/backend/kernels.ts loads it): one C file, compiled
 * by the system C compiler against Node's own headers (node_api.h), linked to nothing but libc, libm and pthreads.
 * `sd setup-native` runs it, since the kernels only serve the `tensorflow` backend; it takes ~2 s.
 * The result is written beside its final name, loaded in a child process (it must load and report this CPU able to
 * run it), and only then renamed into place, so a failed build never leaves a broken addon behind. It carries the
 * sha256 of the source it was built from: after an update that changes kernels.c, the old build is not used (the
 * loader says to rerun `sd setup-native`) instead of being called with arguments it does not know.
 */
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { kernelsSourceHash } from '../backend/kernels.js';
import { SetupError } from './errors.js';
import { nodeHeadersDir } from './package.js';

const run = promisify(execFile);

export interface KernelsBuild {
  readonly path: string;
  /** Whether this CPU can run them (AVX2 and FMA); built either way. */
  readonly usable: boolean;
  readonly seconds: number;
}

export async function buildKernels(root: string): Promise<KernelsBuild> {
  const t0 = performance.now();
  const source = join(root, 'native', 'kernels.c');
  const outDir = join(root, 'native', 'build');
  const path = join(outDir, 'sd_kernels.node');
  const staged = join(outDir, `sd_kernels.${process.pid}.tmp.node`);
  if (!existsSync(source)) throw new SetupError(`${source} is missing; is this a complete checkout?`);
  const headers = nodeHeadersDir();
  if (headers === null) {
    throw new SetupError(`Node's headers (include/node/node_api.h beside ${process.execPath}) are missing; install the Node package that carries them (Debian: nodejs-dev is not needed for official builds, which include them)`);
  }
  if (process.arch !== 'x64') throw new SetupError(`the native kernels are written for x86-64 (AVX2); this is ${process.arch}`);
  const cc = process.env.CC || 'cc';
  await mkdir(outDir, { recursive: true });
  try {
    const hash = kernelsSourceHash(source);
    const args = ['-O3', '-fPIC', '-shared', '-Wall', `-DSD_KERNELS_SOURCE="${hash}"`, '-I', join(headers, 'include', 'node'), source, '-o', staged, '-lpthread', '-lm'];
    await run(cc, args, {
      timeout: 300_000, maxBuffer: 16 << 20,
    });
  } catch (e) {
    await rm(staged, { force: true });
    const err = e as { stderr?: string; message: string };
    throw new SetupError(`compiling ${source} with ${cc} failed (set CC to use another C compiler):\n${(err.stderr || err.message).trim().split('\n').slice(-15).join('\n')}`);
  }
  let usable: boolean;
  try {
    const { stdout } = await run(process.execPath, ['-e', `process.stdout.write(String(require(${JSON.stringify(staged)}).available()))`], { timeout: 60_000 });
    usable = stdout.trim() === 'true';
  } catch (e) {
    await rm(staged, { force: true });
    throw new SetupError(`the freshly built kernels do not load: ${(e as Error).message}`);
  }
  await rename(staged, path);
  return { path, usable, seconds: (performance.now() - t0) / 1000 };
}
