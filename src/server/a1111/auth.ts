/**
 * HTTP Basic auth as A1111's `--api-auth user:pass[,user2:pass2]` does it. Checked by the server's one auth gate
 * (../routes.ts), next to our Bearer key: with either configured, a request passes with a valid `Bearer KEY` or a
 * valid `Basic base64(user:pass)`, and is answered 401 with `WWW-Authenticate: Basic` (or Bearer when only the
 * key is configured) otherwise. Nothing configured: nothing is checked, so the `Basic ` header with empty
 * credentials that SillyTavern sends is accepted.
 */
import { createHash, timingSafeEqual } from 'node:crypto';

export interface BasicCredentials {
  readonly user: string;
  readonly password: string;
}

/** "user:pass,user2:pass2" (A1111's format; a password may itself hold ':'). */
export function parseApiAuth(spec: string): BasicCredentials[] {
  return spec
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s !== '')
    .map((s) => {
      const at = s.indexOf(':');
      if (at <= 0) throw new RangeError(`--api-auth: ${JSON.stringify(s)} is not user:password`);
      return { user: s.slice(0, at), password: s.slice(at + 1) };
    });
}

/** The credentials of an `Authorization: Basic ...` header; null when it is not Basic. */
export function basicCredentials(header: string | undefined): BasicCredentials | null {
  const m = /^Basic(?:\s+(\S*))?\s*$/i.exec(header ?? '');
  if (m === null) return null;
  const text = Buffer.from(m[1] ?? '', 'base64').toString('utf8');
  const at = text.indexOf(':');
  return at < 0 ? { user: text, password: '' } : { user: text.slice(0, at), password: text.slice(at + 1) };
}

const digest = (s: string): Buffer => createHash('sha256').update(s).digest();
/** Constant-time on hashes, so neither lengths nor prefixes leak. */
export const sameSecret = (a: string, b: string): boolean => timingSafeEqual(digest(a), digest(b));

/** Whether `given` is one of `allowed`; every entry is compared, so the time says nothing of which one matched. */
export function basicAllowed(given: BasicCredentials, allowed: readonly BasicCredentials[]): boolean {
  let ok = false;
  for (const c of allowed) ok = (sameSecret(given.user, c.user) && sameSecret(given.password, c.password)) || ok;
  return ok;
}
