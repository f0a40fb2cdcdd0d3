/**
 * Zip archives built by hand in memory, for tests of the zip reader (src/weights/zip.ts) and of what reads zips:
 * entries stored, or deflated where asked; `zip64: true` writes every size and offset through zip64 extra fields and
 * the zip64 end records, as writers do past 4 GB. Its constants are spelled here from APPNOTE.TXT (4.3), not shared
 * with the reader, so that a wrong one in either is caught.
 */
import { crc32, deflateRawSync } from 'node:zlib';

const SIG_LOCAL = 0x04034b50;
const SIG_CENTRAL = 0x02014b50;
const SIG_EOCD = 0x06054b50;
const SIG_ZIP64_EOCD = 0x06064b50;
const SIG_ZIP64_LOCATOR = 0x07064b50;
const EOCD_BYTES = 22;
const ZIP64_LOCATOR_BYTES = 20;
const ZIP64_EOCD_BYTES = 56;
const CENTRAL_BYTES = 46;
const LOCAL_BYTES = 30;
const U16_MAX = 0xffff;
const U32_MAX = 0xffffffff;
const METHOD_STORED = 0;
const METHOD_DEFLATE = 8;

export interface ZipInput {
  readonly name: string;
  readonly data: Uint8Array;
  /** Deflate (method 8) this entry instead of storing it. */
  readonly deflate?: boolean;
}

export function buildZip(files: readonly ZipInput[], opts: { zip64?: boolean; comment?: string } = {}): Uint8Array {
  const zip64 = opts.zip64 ?? false;
  const chunks: Uint8Array[] = [];
  const central: Uint8Array[] = [];
  let offset = 0;
  const push = (b: Uint8Array) => {
    chunks.push(b);
    offset += b.byteLength;
  };
  for (const f of files) {
    const name = new TextEncoder().encode(f.name);
    const crc = crc32(f.data);
    const method = f.deflate === true ? METHOD_DEFLATE : METHOD_STORED;
    const body = f.deflate === true ? deflateRawSync(f.data) : f.data;
    const local = new DataView(new ArrayBuffer(LOCAL_BYTES));
    local.setUint32(0, SIG_LOCAL, true);
    local.setUint16(4, zip64 ? 45 : 20, true);
    local.setUint16(8, method, true);
    local.setUint32(14, crc, true);
    local.setUint32(18, body.byteLength, true);
    local.setUint32(22, f.data.byteLength, true);
    local.setUint16(26, name.byteLength, true);
    const localOffset = offset;
    push(new Uint8Array(local.buffer));
    push(name);
    push(body);
    const extra = zip64 ? zip64Extra([f.data.byteLength, body.byteLength, localOffset]) : new Uint8Array(0);
    const c = new DataView(new ArrayBuffer(CENTRAL_BYTES));
    c.setUint32(0, SIG_CENTRAL, true);
    c.setUint16(4, zip64 ? 45 : 20, true);
    c.setUint16(6, zip64 ? 45 : 20, true);
    c.setUint16(10, method, true);
    c.setUint32(16, crc, true);
    c.setUint32(20, zip64 ? U32_MAX : body.byteLength, true);
    c.setUint32(24, zip64 ? U32_MAX : f.data.byteLength, true);
    c.setUint16(28, name.byteLength, true);
    c.setUint16(30, extra.byteLength, true);
    c.setUint32(42, zip64 ? U32_MAX : localOffset, true);
    central.push(new Uint8Array(c.buffer), name, extra);
  }
  const cdOffset = offset;
  for (const b of central) push(b);
  const cdSize = offset - cdOffset;
  if (zip64) {
    const recordAt = offset;
    const rec = new DataView(new ArrayBuffer(ZIP64_EOCD_BYTES));
    rec.setUint32(0, SIG_ZIP64_EOCD, true);
    rec.setBigUint64(4, BigInt(ZIP64_EOCD_BYTES - 12), true);
    rec.setUint16(12, 45, true);
    rec.setUint16(14, 45, true);
    rec.setBigUint64(24, BigInt(files.length), true);
    rec.setBigUint64(32, BigInt(files.length), true);
    rec.setBigUint64(40, BigInt(cdSize), true);
    rec.setBigUint64(48, BigInt(cdOffset), true);
    push(new Uint8Array(rec.buffer));
    const loc = new DataView(new ArrayBuffer(ZIP64_LOCATOR_BYTES));
    loc.setUint32(0, SIG_ZIP64_LOCATOR, true);
    loc.setBigUint64(8, BigInt(recordAt), true);
    loc.setUint32(16, 1, true);
    push(new Uint8Array(loc.buffer));
  }
  const comment = new TextEncoder().encode(opts.comment ?? '');
  const eocd = new DataView(new ArrayBuffer(EOCD_BYTES));
  eocd.setUint32(0, SIG_EOCD, true);
  eocd.setUint16(8, zip64 ? U16_MAX : files.length, true);
  eocd.setUint16(10, zip64 ? U16_MAX : files.length, true);
  eocd.setUint32(12, zip64 ? U32_MAX : cdSize, true);
  eocd.setUint32(16, zip64 ? U32_MAX : cdOffset, true);
  eocd.setUint16(20, comment.byteLength, true);
  push(new Uint8Array(eocd.buffer));
  push(comment);
  return Buffer.concat(chunks);
}

function zip64Extra(values: readonly number[]): Uint8Array {
  const v = new DataView(new ArrayBuffer(4 + 8 * values.length));
  v.setUint16(0, 1, true);
  v.setUint16(2, 8 * values.length, true);
  values.forEach((x, i) => v.setBigUint64(4 + 8 * i, BigInt(x), true));
  return new Uint8Array(v.buffer);
}
