/**
 * Outputs in S3-compatible storage (AWS S3, MinIO, R2, Ceph...) through @aws-sdk/client-s3. Credentials and region
 * come from the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, profiles); `endpoint`
 * points at a server other than AWS (path-style addressing then).
 *
 * Every PUT is conditional (`If-None-Match: *`): the server refuses an existing key with 412, answered as 409 for
 * the uid, so two workers can never overwrite each other's image. An S3 PUT is atomic (the object appears whole or
 * not at all); when the png's PUT fails after the json's, the json is deleted again, so no half result remains.
 */
import { DeleteObjectCommand, GetObjectCommand, HeadObjectCommand, PutObjectCommand, S3Client } from '@aws-sdk/client-s3';
import type { OutputKind, OutputStorage } from './outputs.js';
import { uidTaken } from './outputs.js';

export interface S3Settings {
  /** e.g. http://127.0.0.1:9000 for MinIO; absent: AWS. */
  readonly endpoint?: string;
  /** Absent: AWS_REGION, else us-east-1. */
  readonly region?: string;
}

export interface S3Location {
  readonly bucket: string;
  /** '' or ending in '/'. */
  readonly prefix: string;
}

export class S3UrlError extends Error {
  override name = 'S3UrlError';
}

/** `s3://bucket[/prefix]`. */
export function parseS3Url(url: string, flag: string): S3Location {
  const m = /^s3:\/\/([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:\/(.*))?$/.exec(url);
  if (m === null) throw new S3UrlError(`${flag}: expected s3://BUCKET[/PREFIX] with a bucket name of 3-63 lowercase letters, digits, dots and dashes, got ${JSON.stringify(url)}`);
  const prefix = (m[2] ?? '').replace(/^\/+/, '');
  return { bucket: m[1], prefix: prefix === '' || prefix.endsWith('/') ? prefix : `${prefix}/` };
}

export function s3Client(settings: S3Settings): S3Client {
  return new S3Client({
    region: settings.region ?? process.env.AWS_REGION ?? 'us-east-1',
    ...(settings.endpoint !== undefined ? { endpoint: settings.endpoint, forcePathStyle: true } : {}),
  });
}

const statusOf = (e: unknown): number | undefined => (e as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode;

export class S3Outputs implements OutputStorage {
  readonly client: S3Client;

  constructor(
    readonly where: S3Location,
    settings: S3Settings,
  ) {
    this.client = s3Client(settings);
  }

  get location(): string {
    return `s3://${this.where.bucket}/${this.where.prefix}`;
  }

  key(uid: string, kind: OutputKind): string {
    return `${this.where.prefix}${uid}.${kind}`;
  }

  async exists(uid: string): Promise<boolean> {
    for (const kind of ['json', 'png'] as const) {
      try {
        await this.client.send(new HeadObjectCommand({ Bucket: this.where.bucket, Key: this.key(uid, kind) }));
        return true;
      } catch (e) {
        if (statusOf(e) !== 404) throw e;
      }
    }
    return false;
  }

  async save(uid: string, png: Uint8Array, sidecar: unknown): Promise<void> {
    const json = Buffer.from(JSON.stringify(sidecar, null, 2) + '\n');
    await this.put(uid, 'json', json, 'application/json');
    try {
      await this.put(uid, 'png', png, 'image/png');
    } catch (e) {
      await this.client.send(new DeleteObjectCommand({ Bucket: this.where.bucket, Key: this.key(uid, 'json') })).catch(() => undefined);
      throw e;
    }
  }

  async read(uid: string, kind: OutputKind): Promise<Buffer | null> {
    try {
      const r = await this.client.send(new GetObjectCommand({ Bucket: this.where.bucket, Key: this.key(uid, kind) }));
      return r.Body === undefined ? Buffer.alloc(0) : Buffer.from(await r.Body.transformToByteArray());
    } catch (e) {
      if (statusOf(e) === 404) return null;
      throw e;
    }
  }

  private async put(uid: string, kind: OutputKind, body: Uint8Array, contentType: string): Promise<void> {
    try {
      await this.client.send(new PutObjectCommand({ Bucket: this.where.bucket, Key: this.key(uid, kind), Body: body, ContentType: contentType, IfNoneMatch: '*' }));
    } catch (e) {
      // 412 Precondition Failed: the key exists; 409 ConditionalRequestConflict: another PUT of it is in flight.
      if (statusOf(e) === 412 || statusOf(e) === 409) throw uidTaken(uid, `${this.location}${uid}.${kind} already exists`);
      throw new Error(`storing ${this.location}${uid}.${kind} failed: ${(e as Error).message}`, { cause: e });
    }
  }
}
