/* global fetch, localStorage, URL */
/**
 * The page's client of the sd serve API: the API key (entered once, kept in localStorage, sent as a Bearer
 * token), JSON calls that throw ApiError with the server's message, streams and images fetched with the key (an
 * <img src> or an EventSource cannot send an Authorization header), images as blob: URLs.
 */

const KEY_STORAGE = 'sd-serve.api-key';

export class ApiError extends Error {
  /** @param {number} status @param {string} message @param {string | undefined} field */
  constructor(status, message, field) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.field = field;
  }
}

export function storedKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) ?? '';
  } catch {
    return ''; // storage disabled: the key lives only as long as the page
  }
}

/** The key the calls send now. */
let current = storedKey();

/** @param {string} key the empty string forgets it */
export function storeKey(key) {
  try {
    if (key === '') localStorage.removeItem(KEY_STORAGE);
    else localStorage.setItem(KEY_STORAGE, key);
  } catch {
    // storage disabled
  }
  current = key;
}

function headers(extra = {}) {
  return current !== '' ? { ...extra, authorization: `Bearer ${current}` } : extra;
}

/** @param {Response} res */
async function failure(res) {
  let message = `${res.status} ${res.statusText}`;
  let field;
  try {
    const body = await res.json();
    if (typeof body.message === 'string') message = body.message;
    if (typeof body.field === 'string') field = body.field;
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(res.status, message, field);
}

/**
 * A JSON call. @param {string} method @param {string} path @param {unknown} [body]
 * @returns {Promise<any>} the parsed answer; throws ApiError on a status >= 400 or a network failure (status 0)
 */
export async function call(method, path, body) {
  let res;
  try {
    res = await fetch(path, {
      method,
      headers: headers(body !== undefined ? { 'content-type': 'application/json' } : {}),
      body: body !== undefined ? JSON.stringify(body) : undefined,
      cache: 'no-store',
    });
  } catch (e) {
    throw new ApiError(0, `the server did not answer (${e instanceof Error ? e.message : String(e)})`);
  }
  if (!res.ok) throw await failure(res);
  return res.json();
}

/** A GET with the key, the answer as it comes (for streams). @param {string} path @param {Record<string, string>} [extra] */
export function fetchWithKey(path, extra = {}) {
  return fetch(path, { headers: headers(extra), cache: 'no-store' });
}

/** An image of the server as a blob: URL (the caller revokes it). @param {string} path @returns {Promise<string>} */
export async function imageUrl(path) {
  const res = await fetch(path, { headers: headers() });
  if (!res.ok) throw await failure(res);
  return URL.createObjectURL(await res.blob());
}
