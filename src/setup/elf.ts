/**
 * Checks a shared library before it is linked: a 64-bit little-endian ELF shared object for this machine's
 * architecture, whole (its section table lies inside the file), exporting the functions asked for.
 * Reads the ELF header, the section headers, .dynsym and .dynstr only (a few MB of a 788 MB library).
 */
import { open, type FileHandle } from 'node:fs/promises';
import { arch } from 'node:os';
import { SetupError } from './errors.js';

/** e_machine values (ELF gABI) for the architectures Node reports. */
const MACHINES: Readonly<Record<string, number>> = Object.freeze({ x64: 62, arm64: 183 });
const MACHINE_NAMES: Readonly<Record<number, string>> = Object.freeze({ 3: 'x86 (32-bit)', 62: 'x86-64', 40: 'arm', 183: 'aarch64', 243: 'riscv' });

const ET_DYN = 3;
const SHT_DYNSYM = 11;
const SHT_NOBITS = 8;
const SHN_UNDEF = 0;
const STT_FUNC = 2;
const SYM_SIZE = 24;

export interface ElfInfo {
  readonly machine: string;
  /** Functions the library defines and exports. */
  readonly exports: ReadonlySet<string>;
}

async function readAt(fh: FileHandle, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  const { bytesRead } = await fh.read(buf, 0, length, offset);
  return buf.subarray(0, bytesRead);
}

interface Section {
  readonly type: number;
  readonly offset: number;
  readonly size: number;
  readonly link: number;
}

function checkHeader(h: Buffer, file: string): void {
  if (h.length < 64 || h.readUInt32BE(0) !== 0x7f454c46) throw new SetupError(`${file} is not an ELF shared library`);
  if (h[4] !== 2 || h[5] !== 1) throw new SetupError(`${file} is not a 64-bit little-endian ELF library`);
  if (h.readUInt16LE(16) !== ET_DYN) throw new SetupError(`${file} is an ELF file but not a shared library`);
  const machine = h.readUInt16LE(18);
  const want = MACHINES[arch()];
  if (want === undefined) throw new SetupError(`this machine's architecture (${arch()}) has no TensorFlow wheel the setup knows`);
  if (machine !== want) {
    throw new SetupError(`${file} is built for ${MACHINE_NAMES[machine] ?? `ELF machine ${machine}`}, this machine is ${arch()}: use a wheel for this architecture`);
  }
}

async function sections(fh: FileHandle, h: Buffer, file: string, fileSize: number): Promise<Section[]> {
  const shoff = Number(h.readBigUInt64LE(0x28));
  const shentsize = h.readUInt16LE(0x3a);
  const shnum = h.readUInt16LE(0x3c);
  if (shoff === 0 || shnum === 0 || shoff + shnum * shentsize > fileSize) {
    throw new SetupError(`${file} is truncated or damaged (section table missing or past the end of the file)`);
  }
  const table = await readAt(fh, shoff, shnum * shentsize);
  const out: Section[] = [];
  for (let i = 0; i < shnum; i++) {
    const p = i * shentsize;
    const s = { type: table.readUInt32LE(p + 4), offset: Number(table.readBigUInt64LE(p + 0x18)), size: Number(table.readBigUInt64LE(p + 0x20)), link: table.readUInt32LE(p + 0x28) };
    if (s.type !== SHT_NOBITS && s.offset + s.size > fileSize) throw new SetupError(`${file} is truncated (section ${i} runs past the end of the file)`);
    out.push(s);
  }
  return out;
}

function exportedFunctions(symtab: Buffer, strtab: Buffer): Set<string> {
  const names = new Set<string>();
  for (let p = 0; p + SYM_SIZE <= symtab.length; p += SYM_SIZE) {
    const nameOff = symtab.readUInt32LE(p);
    const type = symtab[p + 4] & 0xf;
    const shndx = symtab.readUInt16LE(p + 6);
    if (shndx === SHN_UNDEF || type !== STT_FUNC) continue;
    const end = strtab.indexOf(0, nameOff);
    names.add(strtab.toString('latin1', nameOff, end < 0 ? strtab.length : end));
  }
  return names;
}

export async function readElf(file: string): Promise<ElfInfo> {
  const fh = await open(file, 'r');
  try {
    const { size } = await fh.stat();
    const h = await readAt(fh, 0, 64);
    checkHeader(h, file);
    const secs = await sections(fh, h, file, size);
    const dynsym = secs.find((s) => s.type === SHT_DYNSYM);
    if (dynsym === undefined || secs[dynsym.link] === undefined) throw new SetupError(`${file} has no dynamic symbol table`);
    const strtab = secs[dynsym.link];
    const exports = exportedFunctions(await readAt(fh, dynsym.offset, dynsym.size), await readAt(fh, strtab.offset, strtab.size));
    return { machine: arch(), exports };
  } finally {
    await fh.close();
  }
}

/** Throws SetupError naming the missing functions unless `files` together export all of `required`. */
export async function checkExports(files: readonly string[], required: readonly string[], what: string): Promise<void> {
  const exported = new Set<string>();
  for (const f of files) for (const name of (await readElf(f)).exports) exported.add(name);
  const missing = required.filter((f) => !exported.has(f));
  if (missing.length > 0) {
    const shown = missing.slice(0, 5).join(', ') + (missing.length > 5 ? `, ... (${missing.length} in all)` : '');
    throw new SetupError(`${files.join(' + ')} do not export ${what} (missing ${shown}): not a libtensorflow this binding can use`);
  }
}
