/**
 * API key format, hashing and comparison. A key is `rk_<tenant>_<keyId>_<secret>`: the tenant and key id
 * route the check to the tenant's Durable Object without any global index; only SHA-256(key) is stored.
 */

export const KEY_PREFIX = 'rk_';
export const TENANT_ID_PATTERN = /^[a-z0-9][a-z0-9-]{0,62}$/;
const KEY_ID_PATTERN = /^[a-z0-9]{8}$/;
const SECRET_PATTERN = /^[A-Za-z0-9_-]{20,}$/;
/** Characters of the key shown when listing keys (tenant, key id and the first secret characters). */
const SHOWN_SECRET_CHARS = 4;

export interface ParsedKey {
  tenantId: string;
  keyId: string;
}

export function parseKey(key: string): ParsedKey | null {
  if (!key.startsWith(KEY_PREFIX)) return null;
  const rest = key.slice(KEY_PREFIX.length);
  const a = rest.indexOf('_');
  const b = rest.indexOf('_', a + 1);
  if (a < 0 || b < 0) return null;
  const tenantId = rest.slice(0, a);
  const keyId = rest.slice(a + 1, b);
  const secret = rest.slice(b + 1);
  if (!TENANT_ID_PATTERN.test(tenantId) || !KEY_ID_PATTERN.test(keyId) || !SECRET_PATTERN.test(secret)) return null;
  return { tenantId, keyId };
}

export function keyPrefix(key: string): string {
  const parsed = parseKey(key);
  if (!parsed) throw new Error('not an API key');
  return `${KEY_PREFIX}${parsed.tenantId}_${parsed.keyId}_${key.slice(KEY_PREFIX.length + parsed.tenantId.length + parsed.keyId.length + 2).slice(0, SHOWN_SECRET_CHARS)}`;
}

function base64url(bytes: Uint8Array): string {
  let s = '';
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

/** A fresh key for a tenant: random 8-char id and 256 random bits of secret. */
export function newKey(tenantId: string): { key: string; keyId: string } {
  if (!TENANT_ID_PATTERN.test(tenantId)) throw new Error(`bad tenant id '${tenantId}'`);
  const idBytes = crypto.getRandomValues(new Uint8Array(8));
  const keyId = Array.from(idBytes, (b) => 'abcdefghijklmnopqrstuvwxyz0123456789'[b % 36]).join('');
  const secret = base64url(crypto.getRandomValues(new Uint8Array(32)));
  return { key: `${KEY_PREFIX}${tenantId}_${keyId}_${secret}`, keyId };
}

export async function sha256Hex(text: string): Promise<string> {
  const digest = await crypto.subtle.digest('SHA-256', new TextEncoder().encode(text));
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, '0')).join('');
}

/** Constant-time equality of two strings of equal length (hex digests, secrets); false on length mismatch. */
export function constantTimeEqual(a: string, b: string): boolean {
  const ea = new TextEncoder().encode(a);
  const eb = new TextEncoder().encode(b);
  if (ea.byteLength !== eb.byteLength) {
    // Still spend the comparison so the timing does not reveal the length check.
    crypto.subtle.timingSafeEqual(ea, ea);
    return false;
  }
  return crypto.subtle.timingSafeEqual(ea, eb);
}
