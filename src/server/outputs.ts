/**
 * The outputs folder: every result saved as `<uid>.png` (with its `parameters` text chunk) and a
 * `<uid>.json` sidecar. Nothing is ever overwritten:
 *   - a uid is reserved when a request is accepted; one whose files exist, or that a job in flight holds,
 *     is refused up front (the server answers 409 Conflict), so the client learns before waiting;
 *   - each file is written to a temp file in the same folder (`.<uid>.<ext>.tmp-<random>`), flushed, then
 *     hard-linked to its name (link fails if the name exists, where rename would silently replace it)
 *     and the temp name removed. A reader sees a whole file or none; a crash leaves only `*.tmp-*` files.
 * The json is linked before the png, so every png in the folder has its json.
 */
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { HttpError } from './errors.js';

export class OutputStore {
  private readonly reserved = new Set<string>();

  private constructor(readonly dir: string) {}

  /** Creates the folder if needed. */
  static async open(dir: string): Promise<OutputStore> {
    await fs.mkdir(dir, { recursive: true });
    return new OutputStore(path.resolve(dir));
  }

  pngPath(uid: string): string {
    return path.join(this.dir, `${uid}.png`);
  }

  jsonPath(uid: string): string {
    return path.join(this.dir, `${uid}.json`);
  }

  /** Hold `uid` for a job, or 409 when its files exist or another job holds it. */
  reserve(uid: string): void {
    if (this.reserved.has(uid)) throw conflict(uid, 'a job in progress already uses it');
    if (existsSync(this.pngPath(uid)) || existsSync(this.jsonPath(uid))) throw conflict(uid, `${uid}.png already exists in the outputs folder`);
    this.reserved.add(uid);
  }

  release(uid: string): void {
    this.reserved.delete(uid);
  }

  /** Writes both files (json first); on any failure removes what it created and throws. */
  async save(uid: string, png: Uint8Array, sidecar: unknown): Promise<void> {
    const json = Buffer.from(JSON.stringify(sidecar, null, 2) + '\n');
    await this.publish(this.jsonPath(uid), json);
    try {
      await this.publish(this.pngPath(uid), png);
    } catch (e) {
      await fs.rm(this.jsonPath(uid), { force: true });
      throw e;
    }
  }

  /** temp file + fsync + link: the file appears whole under `target`, or not at all. */
  private async publish(target: string, bytes: Uint8Array): Promise<void> {
    const tmp = path.join(this.dir, `.${path.basename(target)}.tmp-${randomBytes(6).toString('hex')}`);
    try {
      const fh = await fs.open(tmp, 'wx');
      try {
        await fh.writeFile(bytes);
        await fh.sync();
      } finally {
        await fh.close();
      }
      await fs.link(tmp, target);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EEXIST') throw conflict(path.basename(target, path.extname(target)), `${path.basename(target)} appeared meanwhile`);
      throw e;
    } finally {
      await fs.rm(tmp, { force: true });
    }
  }
}

function conflict(uid: string, why: string): HttpError {
  return new HttpError(409, `uid: '${uid}' is taken (${why}); choose another uid or leave it out for a random one`, 'uid');
}
