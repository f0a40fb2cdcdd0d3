/**
 * Where results are kept: `<uid>.png` (with its parameters chunk) and `<uid>.json`, in a local folder or in
 * S3-compatible storage (`s3://bucket/prefix`). Both keep the folder's promises (../server/outputs.ts): nothing is
 * ever overwritten (a taken uid is a 409 HttpError), a reader sees a whole object or none, the json is stored
 * before the png and removed again when the png fails, so every png has its json and a failed save leaves nothing.
 */
import { readFile } from 'node:fs/promises';
import { HttpError } from '../server/errors.js';
import { OutputStore } from '../server/outputs.js';
import { S3Outputs, parseS3Url, type S3Settings } from './s3.js';

export type OutputKind = 'png' | 'json';

export interface OutputStorage {
  /** The folder or s3:// URL, for logs and /health. */
  readonly location: string;
  /** Whether either file of `uid` exists. */
  exists(uid: string): Promise<boolean>;
  /** Stores both files (json first) or throws: 409 when a file of `uid` exists, the cause otherwise; nothing half made. */
  save(uid: string, png: Uint8Array, sidecar: unknown): Promise<void>;
  /** The stored bytes, or null when absent. */
  read(uid: string, kind: OutputKind): Promise<Buffer | null>;
}

/** `s3://bucket/prefix` (with `settings`: endpoint, region) or a folder path. */
export async function openOutputs(spec: string, settings: S3Settings = {}): Promise<OutputStorage> {
  if (spec.startsWith('s3://')) return new S3Outputs(parseS3Url(spec, '--outputs'), settings);
  return new FolderOutputs(await OutputStore.open(spec));
}

export const isS3Url = (spec: string): boolean => spec.startsWith('s3://');

/** The folder: ../server/outputs.ts's temp file + link, which refuses a name that exists. */
export class FolderOutputs implements OutputStorage {
  constructor(private readonly store: OutputStore) {}

  get location(): string {
    return this.store.dir;
  }

  async exists(uid: string): Promise<boolean> {
    return (await this.read(uid, 'json')) !== null || (await this.read(uid, 'png')) !== null;
  }

  save(uid: string, png: Uint8Array, sidecar: unknown): Promise<void> {
    return this.store.save(uid, png, sidecar);
  }

  async read(uid: string, kind: OutputKind): Promise<Buffer | null> {
    try {
      return await readFile(kind === 'png' ? this.store.pngPath(uid) : this.store.jsonPath(uid));
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw e;
    }
  }
}

export function uidTaken(uid: string, why: string): HttpError {
  return new HttpError(409, `uid: '${uid}' is taken (${why}); choose another uid or leave it out for a random one`, 'uid');
}
