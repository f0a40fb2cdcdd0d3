/**
 * sd setup-native's checks, on small files made here: the wheel (zip) reader extracts members and refuses
 * corrupt or truncated archives; the ELF check accepts a real shared library of this machine and refuses one
 * without the TensorFlow C API, one for another architecture, a truncated one and a non-ELF file; and a whole
 * setup from a wrong "wheel" fails with SetupError leaving the installed package exactly as it was.
 */
import { mkdtempSync, mkdirSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { checkExports, readElf } from '../src/setup/elf.js';
import { SetupError } from '../src/setup/errors.js';
import { setupNative } from '../src/setup/native.js';
import { WheelSource } from '../src/setup/source.js';
import { buildZip } from './zip-builder.js';

const dir = mkdtempSync(join(tmpdir(), 'sd-setup-test-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A wheel in memory: each member deflated (method 8) or stored (0), with its CRC-32. */
function makeZip(members: Record<string, Buffer>, deflate = true): Buffer {
  return Buffer.from(buildZip(Object.entries(members).map(([name, data]) => ({ name, data, deflate }))));
}

/** A shared library this Node process has loaded (libc, libm, ...): a real ELF for this machine. */
function loadedLibrary(): string {
  const maps = readFileSync('/proc/self/maps', 'utf8');
  const libs = [...maps.matchAll(/\s(\/\S+\.so(?:\.\d+)*)$/gm)].map((m) => m[1]).filter((p) => /lib(c|m)[.-]/.test(p));
  if (libs.length === 0) throw new Error('no libc/libm in /proc/self/maps');
  return libs.sort((a, b) => statSync(a).size - statSync(b).size)[0];
}

const linux = process.platform === 'linux' && (process.arch === 'x64' || process.arch === 'arm64');

describe('wheel (zip) reader', () => {
  const text = Buffer.from('#include "tensorflow/c/tf_status.h"\n'.repeat(200));
  const bin = Buffer.from(Array.from({ length: 5000 }, (_, i) => (i * 7919) & 255));

  it('lists and extracts stored and deflated members, checking CRC and size', async () => {
    for (const deflate of [true, false]) {
      const file = join(dir, `ok-${deflate}.whl`);
      writeFileSync(file, makeZip({ 'tensorflow/a.h': text, 'tensorflow/b.bin': bin, 'empty': Buffer.alloc(0) }, deflate));
      const zip = await WheelSource.open(file, '');
      expect(zip.names().sort()).toEqual(['empty', 'tensorflow/a.h', 'tensorflow/b.bin']);
      expect((await zip.read('tensorflow/a.h')).equals(text)).toBe(true);
      await zip.copyTo('tensorflow/b.bin', join(dir, 'b.bin'));
      expect(readFileSync(join(dir, 'b.bin')).equals(bin)).toBe(true);
      expect((await zip.read('empty')).length).toBe(0);
      zip.close();
    }
  });

  it('refuses a corrupt member, a truncated archive and a file that is not a zip', async () => {
    const good = makeZip({ 'tensorflow/b.bin': bin }, false);
    const corrupt = Buffer.from(good);
    corrupt[30 + 'tensorflow/b.bin'.length + 100] ^= 0xff;
    writeFileSync(join(dir, 'corrupt.whl'), corrupt);
    const corruptZip = await WheelSource.open(join(dir, 'corrupt.whl'), '');
    await expect(corruptZip.read('tensorflow/b.bin')).rejects.toThrow(/corrupt \(CRC\/size mismatch\)/);
    await expect(corruptZip.copyTo('tensorflow/b.bin', join(dir, 'corrupt.bin'))).rejects.toThrow(/corrupt \(CRC\/size mismatch\)/);
    corruptZip.close();
    writeFileSync(join(dir, 'truncated.whl'), good.subarray(0, good.length - 30));
    await expect(WheelSource.open(join(dir, 'truncated.whl'))).rejects.toThrow(SetupError);
    writeFileSync(join(dir, 'text.whl'), 'not a zip at all');
    await expect(WheelSource.open(join(dir, 'text.whl'))).rejects.toThrow(/not a zip\/wheel file/);
  });

  it('stops a deflated member that inflates past its declared size (a zip bomb) in memory and when streaming', async () => {
    const bomb = makeZip({ 'tensorflow/bomb': Buffer.alloc(4 << 20) });
    bomb.writeUInt32LE(1000, bomb.indexOf(Buffer.from([0x50, 0x4b, 0x01, 0x02])) + 24); // central directory: size 1000
    writeFileSync(join(dir, 'bomb.whl'), bomb);
    const zip = await WheelSource.open(join(dir, 'bomb.whl'), '');
    await expect(zip.read('tensorflow/bomb')).rejects.toThrow(/corrupt \(CRC\/size mismatch\)/);
    await expect(zip.copyTo('tensorflow/bomb', join(dir, 'bomb.bin'))).rejects.toThrow(/corrupt \(CRC\/size mismatch\)/);
    expect(statSync(join(dir, 'bomb.bin')).size).toBeLessThan(4 << 20);
    zip.close();
  });
});

describe.runIf(linux)('ELF check', () => {
  const lib = linux ? loadedLibrary() : '';

  it('reads the exported functions of a real shared library', async () => {
    const info = await readElf(lib);
    expect(info.exports.size).toBeGreaterThan(100);
    await expect(checkExports([lib], [...info.exports].slice(0, 10), 'test functions')).resolves.toBeUndefined();
  });

  it('refuses a library without the TensorFlow C API, naming what is missing', async () => {
    await expect(checkExports([lib], ['TF_Version', 'TFE_NewContext'], 'the TensorFlow C API')).rejects.toThrow(/missing TF_Version, TFE_NewContext/);
  });

  it('refuses another architecture, a truncated library and a non-ELF file', async () => {
    const bytes = readFileSync(lib);
    const other = Buffer.from(bytes);
    other.writeUInt16LE(process.arch === 'x64' ? 183 : 62, 18);
    writeFileSync(join(dir, 'other-arch.so'), other);
    await expect(readElf(join(dir, 'other-arch.so'))).rejects.toThrow(/built for (aarch64|x86-64)/);
    writeFileSync(join(dir, 'truncated.so'), bytes.subarray(0, Math.floor(bytes.length / 2)));
    await expect(readElf(join(dir, 'truncated.so'))).rejects.toThrow(/truncated/);
    writeFileSync(join(dir, 'text.so'), '#!/bin/sh\necho not a library\n'.repeat(10));
    await expect(readElf(join(dir, 'text.so'))).rejects.toThrow(/not an ELF/);
  });

  it('a whole setup from a wheel whose library lacks the C API fails and leaves the package untouched', async () => {
    const root = join(dir, 'project');
    const pkg = join(root, 'node_modules', '@tensorflow', 'tfjs-node');
    mkdirSync(join(pkg, 'binding'), { recursive: true });
    mkdirSync(join(pkg, 'deps', 'lib'), { recursive: true });
    writeFileSync(join(pkg, 'package.json'), '{"name":"@tensorflow/tfjs-node","version":"4.22.0"}');
    writeFileSync(join(pkg, 'binding', 'tfjs_backend.cc'), '#include "tensorflow/c/c_api.h"\n');
    writeFileSync(join(pkg, 'deps', 'lib', 'previous-install'), 'kept');
    writeFileSync(join(root, 'package-lock.json'), '{"packages":{"node_modules/@tensorflow/tfjs-node":{"version":"4.22.0"}}}');
    const so = readFileSync(lib);
    const wheel = join(dir, 'fake_tensorflow-2.21.0-py3-none-any.whl');
    writeFileSync(wheel, makeZip({
      'tensorflow/libtensorflow_cc.so.2': so,
      'tensorflow/libtensorflow_framework.so.2': so,
      'tensorflow/include/tensorflow/c/c_api.h': Buffer.from('int TF_Version(void);\n'),
    }));
    const before = JSON.stringify(readdirSync(pkg, { recursive: true }).sort());
    await expect(setupNative({ root, from: wheel, force: true })).rejects.toThrow(/do not export the TensorFlow C API/);
    expect(JSON.stringify(readdirSync(pkg, { recursive: true }).sort())).toBe(before);
    expect(readFileSync(join(pkg, 'deps', 'lib', 'previous-install'), 'utf8')).toBe('kept');
    expect(readdirSync(join(root, 'node_modules', '@tensorflow'))).toEqual(['tfjs-node']); // no staging folder or lock left
  });

  it('refuses --from a zip that is not a TensorFlow wheel', async () => {
    const wheel = join(dir, 'other.whl');
    writeFileSync(wheel, makeZip({ 'numpy/__init__.py': Buffer.from('') }));
    await expect(setupNative({ root: join(dir, 'project'), from: wheel, force: true })).rejects.toThrow(/no tensorflow\/libtensorflow_cc\.so\.2/);
  });
});
